//! The browser page in a real browser: headless Chromium driven through
//! chromedriver (the W3C WebDriver protocol, spoken with the tests' own small
//! HTTP client), against the real daemon, with an `nc`-style client on the
//! other side.
//!
//! Without `chromium` and `chromedriver` on the PATH the test prints why and
//! skips; with `BABY_REQUIRE_SERVICES=1` (as in CI) it fails instead.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::http::Http;
use common::{Client, Daemon, WAIT, services_required, sqlite_url, temp_dir};
use hyper::Method;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// The key W3C WebDriver uses for element references.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find(names: &[&str]) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate.display().to_string());
            }
        }
    }
    None
}

/// chromedriver on a free port; killed when dropped.
struct Driver {
    _child: Child,
    http: Http,
    session: String,
    _profile: tempfile::TempDir,
}

impl Driver {
    async fn start(chromium: &str, chromedriver: &str) -> Driver {
        let port = {
            // Ask the OS for a free port, then hand it to chromedriver.
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let http = Http::new(addr);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let status = http.get("/status").await;
                if status.status == 200 && status.json()["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = temp_dir();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    format!("--user-data-dir={}", profile.path().display()),
                    "--window-size=1200,800",
                ],
            },
        }}});
        let reply = http.post("/session", None, &caps).await;
        assert_eq!(reply.status, 200, "new session: {}", reply.text());
        let session = reply.json()["value"]["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Driver {
            _child: child,
            http,
            session,
            _profile: profile,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{}", self.session, path);
        let body = body.map(|b| Bytes::from(b.to_string()));
        let reply = self
            .http
            .request(method, &path, &[("content-type", "application/json")], body)
            .await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        reply.json()["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().expect("an element").to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.call(
            Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.call(
            Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        self.call(
            Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Waits until `script` returns true in the page.
    async fn until(&self, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.eval(script).await == Value::Bool(true) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let log = self
                    .eval("return document.getElementById('log').innerText")
                    .await;
                panic!("timed out waiting for {what}; the page shows: {log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the window.
    async fn screenshot(&self, path: &str) {
        use base64_png::decode;
        let png = self.call(Method::GET, "/screenshot", None).await;
        let bytes = decode(png.as_str().expect("base64 text"));
        std::fs::write(path, bytes).expect("the screenshot is written");
    }

    async fn quit(self) {
        let path = format!("/session/{}", self.session);
        let _ = self.http.request(Method::DELETE, &path, &[], None).await;
    }
}

/// JS: whether the message log has a line whose text is exactly `text`.
fn log_has(text: &str) -> String {
    format!(
        "return [...document.querySelectorAll('#log .line .text')].some(e => e.textContent === {});",
        json!(text)
    )
}

#[tokio::test]
async fn the_page_chats_with_nc_and_shows_markup_as_text() {
    let (Some(chromium), Some(chromedriver)) = (
        find(&["chromium", "chromium-browser", "google-chrome"]),
        find(&["chromedriver"]),
    ) else {
        let why = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)";
        if services_required() {
            panic!("the browser test is required (BABY_REQUIRE_SERVICES=1): {why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    };
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let d = Daemon::start(&["--db", db.as_str()]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;

    let driver = Driver::start(&chromium, &chromedriver).await;
    driver.goto(&format!("http://{}/", d.http)).await;
    assert_eq!(
        driver.eval("return document.title").await,
        json!("baby-discord")
    );

    // Pick a nick and connect.
    driver.type_into("#nick", "alice").await;
    driver.click("#connect").await;
    driver
        .until(
            "the stream to connect",
            "return document.getElementById('status').textContent === 'connected';",
        )
        .await;

    // Join a room by typing a command, as in nc.
    driver.type_into("#input", "/join general\u{E007}").await;
    bob.expect(|v| v["type"] == "join" && v["nick"] == "alice")
        .await;
    driver
        .until(
            "#general to be on screen",
            "return document.getElementById('title').textContent === '#general';",
        )
        .await;
    driver
        .until(
            "bob in the member list",
            "return [...document.querySelectorAll('#members li')].some(e => e.textContent === 'bob');",
        )
        .await;

    // The browser says something; nc hears it.
    driver
        .type_into("#input", "hello from chromium\u{E007}")
        .await;
    let heard = bob
        .expect(|v| v["type"] == "message" && v["text"] == "hello from chromium")
        .await;
    assert_eq!(heard["nick"], "alice");
    driver
        .until("its own message", &log_has("hello from chromium"))
        .await;

    // nc says something; the browser shows it.
    bob.send("hello from nc").await;
    driver
        .until("bob's message", &log_has("hello from nc"))
        .await;

    // Markup from another user is text, not HTML.
    let evil = "<img src=x onerror=\"document.title='pwned'\">";
    bob.send(evil).await;
    driver
        .until("the markup as literal text", &log_has(evil))
        .await;
    assert_eq!(
        driver
            .eval("return document.querySelectorAll('#log img').length")
            .await,
        json!(0),
        "no element was created from user text"
    );
    assert_eq!(
        driver.eval("return document.title").await,
        json!("baby-discord")
    );

    // /me renders as an action; the room list shows member counts.
    driver.type_into("#input", "/me waves\u{E007}").await;
    driver.until("the action", &log_has("* alice waves")).await;
    driver
        .until(
            "#general (2) in the room list",
            "return [...document.querySelectorAll('#rooms li')].some(e => e.dataset.room === 'general' && e.querySelector('.count').textContent === '2');",
        )
        .await;

    // `BABY_SCREENSHOT=docs/browser.png cargo test --test browser` refreshes
    // the README's picture of this very conversation.
    if let Ok(path) = std::env::var("BABY_SCREENSHOT") {
        driver.screenshot(&path).await;
    }
    driver.quit().await;
}

/// Just enough base64 to save a screenshot, without a crate for it.
mod base64_png {
    pub fn decode(text: &str) -> Vec<u8> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        };
        let digits: Vec<u8> = text
            .bytes()
            .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
            .map(value)
            .collect();
        let mut out = Vec::with_capacity(digits.len() * 3 / 4);
        for chunk in digits.chunks(4) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
            let bytes = n.to_be_bytes();
            out.extend_from_slice(&bytes[1..chunk.len()]);
        }
        out
    }

    #[test]
    fn decodes() {
        assert_eq!(decode("aGVsbG8="), b"hello");
        assert_eq!(decode("aGk="), b"hi");
        assert_eq!(decode("YWJj"), b"abc");
    }
}
