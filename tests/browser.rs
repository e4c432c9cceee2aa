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
            // A chromedriver still starting may accept and close unanswered.
            let status = http.try_get("/status").await;
            match &status {
                Ok(status) if status.status == 200 && status.json()["value"]["ready"] == true => {
                    break;
                }
                _ => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start: {:?}",
                status.map(|s| s.text())
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

    /// Reloads the page, as F5 does.
    async fn refresh(&self) {
        self.call(Method::POST, "/refresh", Some(json!({}))).await;
    }

    /// Opens a new tab and makes it the current one; returns its handle.
    async fn new_tab(&self) -> String {
        let v = self
            .call(Method::POST, "/window/new", Some(json!({"type": "tab"})))
            .await;
        let handle = v["handle"].as_str().expect("a window handle").to_owned();
        self.switch_to(&handle).await;
        handle
    }

    /// The current tab's handle.
    async fn tab(&self) -> String {
        let v = self.call(Method::GET, "/window", None).await;
        v.as_str().expect("a window handle").to_owned()
    }

    /// How many tabs are open.
    async fn tabs(&self) -> usize {
        let v = self.call(Method::GET, "/window/handles", None).await;
        v.as_array().expect("a list of handles").len()
    }

    async fn switch_to(&self, handle: &str) {
        self.call(Method::POST, "/window", Some(json!({"handle": handle})))
            .await;
    }

    /// Closes the current tab (its page sees `pagehide`, as when a user closes it).
    async fn close_tab(&self) {
        self.call(Method::DELETE, "/window", None).await;
    }

    /// Sends a Chrome DevTools command to the current tab.
    async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.call(
            Method::POST,
            "/goog/cdp/execute",
            Some(json!({"cmd": cmd, "params": params})),
        )
        .await
    }

    /// Cuts the tab off the network (`true`) or lets it back (`false`).
    async fn offline(&self, offline: bool) {
        self.cdp("Network.enable", json!({})).await;
        self.cdp(
            "Network.emulateNetworkConditions",
            json!({"offline": offline, "latency": 0,
                   "downloadThroughput": -1, "uploadThroughput": -1}),
        )
        .await;
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

/// chromium and chromedriver, or `None` after saying why the test skips.
fn browser() -> Option<(String, String)> {
    let (Some(chromium), Some(chromedriver)) = (
        find(&["chromium", "chromium-browser", "google-chrome"]),
        find(&["chromedriver"]),
    ) else {
        let why = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)";
        if services_required() {
            panic!("the browser test is required (BABY_REQUIRE_SERVICES=1): {why}");
        }
        eprintln!("SKIPPED: {why}");
        return None;
    };
    Some((chromium, chromedriver))
}

/// Where to save a screenshot, if asked to:
/// `BABY_SCREENSHOT=docs/browser.png cargo test --test browser` refreshes the
/// README's pictures, the desktop one at that path and the 360 px one beside
/// it with `-narrow` in its name (`docs/browser-narrow.png`).
fn screenshot_path(narrow: bool) -> Option<String> {
    let path = std::env::var("BABY_SCREENSHOT").ok()?;
    if !narrow {
        return Some(path);
    }
    let stem = path.strip_suffix(".png").unwrap_or(&path);
    Some(format!("{stem}-narrow.png"))
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
    let Some((chromium, chromedriver)) = browser() else {
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

    // Even markup that did get in could not run: the CSP allows only the
    // page's own script, by hash.
    let injected = driver
        .eval(
            "const s = document.createElement('script'); \
             s.textContent = \"document.title = 'pwned'\"; \
             document.body.appendChild(s); return document.title;",
        )
        .await;
    assert_eq!(injected, json!("baby-discord"), "an injected script ran");

    // /me renders as an action; the room list shows member counts.
    driver.type_into("#input", "/me waves\u{E007}").await;
    driver.until("the action", &log_has("* alice waves")).await;
    driver
        .until(
            "#general (2) in the room list",
            "return [...document.querySelectorAll('#rooms li')].some(e => e.dataset.room === 'general' && e.querySelector('.count').textContent === '2');",
        )
        .await;

    driver.quit().await;
}

/// JS: the status line says the stream is up.
const CONNECTED: &str = "return document.getElementById('status').textContent === 'connected';";

/// JS: the seqs of the messages on screen, top to bottom.
const SEQS: &str =
    "return [...document.querySelectorAll('#log [data-seq]')].map(e => Number(e.dataset.seq));";

/// JS: the page has no horizontal scroll.
const NO_SIDEWAYS_SCROLL: &str =
    "return document.documentElement.scrollWidth <= window.innerWidth;";

/// JS: `room` is the conversation on screen.
fn viewing(room: &str) -> String {
    format!(
        "return document.getElementById('title').textContent === {};",
        json!(format!("#{room}"))
    )
}

/// JS: the unread badge of the side-list entry `css` reads `count` (`None`: no badge).
fn badge(css: &str, count: Option<u32>) -> String {
    let want = count.map_or(Value::Null, |n| json!(n.to_string()));
    format!(
        "const b = document.querySelector({} + ' .badge'); return (b ? b.textContent : null) === {want};",
        json!(css)
    )
}

/// Opens the page in the current tab, connects as `nick` and joins `room`.
async fn join_as(driver: &Driver, http: SocketAddr, nick: &str, room: &str) {
    driver.goto(&format!("http://{http}/")).await;
    driver.type_into("#nick", nick).await;
    driver.click("#connect").await;
    driver.until("the stream to connect", CONNECTED).await;
    driver
        .type_into("#input", &format!("/join {room}\u{E007}"))
        .await;
    driver
        .until(&format!("#{room} on screen"), &viewing(room))
        .await;
}

/// The session token the page keeps for this tab.
async fn stored_token(driver: &Driver) -> Value {
    driver
        .eval("return JSON.parse(sessionStorage.getItem('baby-discord')).token;")
        .await
}

fn is_join_or_leave(v: &Value) -> bool {
    v["type"] == "join" || v["type"] == "leave"
}

#[tokio::test]
async fn a_reload_keeps_the_session_and_two_tabs_are_two_users() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let d = Daemon::start(&["--db", db.as_str()]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    let driver = Driver::start(&chromium, &chromedriver).await;
    join_as(&driver, d.http, "alice", "general").await;
    bob.expect(|v| v["type"] == "join" && v["nick"] == "alice")
        .await;
    driver
        .type_into("#input", "before the reload\u{E007}")
        .await;
    bob.expect(|v| v["type"] == "message" && v["text"] == "before the reload")
        .await;
    let token = stored_token(&driver).await;
    assert!(token.is_string(), "the page keeps its token: {token}");

    // F5: the page comes back on the same session, nick, room and conversation.
    driver.refresh().await;
    driver.until("the page to reattach", CONNECTED).await;
    assert_eq!(stored_token(&driver).await, token, "the same session");
    driver
        .until("#general on screen", &viewing("general"))
        .await;
    driver
        .until("the conversation", &log_has("before the reload"))
        .await;
    let me = driver
        .eval("return document.getElementById('me').textContent;")
        .await;
    assert!(me.as_str().unwrap().starts_with("you are alice"), "{me}");
    bob.send("after the reload").await;
    driver
        .until("a live message", &log_has("after the reload"))
        .await;

    // A copy of the tab (window.open and "Duplicate tab" copy sessionStorage)
    // does not take the session over: it starts without one.
    let first = driver.tab().await;
    driver
        .eval("window.open(location.href); return null;")
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while driver.tabs().await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no copy opened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let handles = driver.call(Method::GET, "/window/handles", None).await;
    let copy = handles
        .as_array()
        .unwrap()
        .iter()
        .find(|h| **h != first)
        .and_then(Value::as_str)
        .unwrap()
        .to_owned();
    driver.switch_to(&copy).await;
    driver
        .until(
            "the copy to start without the session",
            "return document.getElementById('status').textContent.includes('copy of another');",
        )
        .await;
    driver.close_tab().await;
    driver.switch_to(&first).await;
    bob.send("still yours").await;
    driver
        .until("the first tab still live", &log_has("still yours"))
        .await;
    assert_eq!(driver.eval(CONNECTED).await, true);

    // A second tab is a second user.
    driver.new_tab().await;
    join_as(&driver, d.http, "carol", "general").await;
    let seen = bob.expect(is_join_or_leave).await;
    assert_eq!(
        (&seen["type"], &seen["nick"]),
        (&json!("join"), &json!("carol")),
        "alice did not leave on the reload: {seen}"
    );
    driver
        .type_into("#input", "hi from the second tab\u{E007}")
        .await;
    let heard = bob
        .expect(|v| v["type"] == "message" && v["text"] == "hi from the second tab")
        .await;
    assert_eq!(heard["nick"], "carol");

    // Closing it frees carol at once (well within the linger minute)...
    driver.close_tab().await;
    driver.switch_to(&first).await;
    driver
        .until(
            "carol's line in alice's tab",
            &log_has("hi from the second tab"),
        )
        .await;
    let seen = bob.expect(is_join_or_leave).await;
    assert_eq!(
        (&seen["type"], &seen["nick"]),
        (&json!("leave"), &json!("carol")),
        "{seen}"
    );
    // ... and alice, whose reload said goodbye before carol's close did, is still here.
    driver.type_into("#input", "still here\u{E007}").await;
    let next = bob
        .expect(|v| v["type"] == "message" || v["type"] == "leave")
        .await;
    assert_eq!(
        (&next["type"], &next["nick"], &next["text"]),
        (&json!("message"), &json!("alice"), &json!("still here")),
        "{next}"
    );
    driver.quit().await;
}

#[tokio::test]
async fn after_a_server_restart_the_page_rejoins_and_restores_what_it_missed() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let first = Daemon::start(&["--db", db.as_str()]).await;
    let http = first.http;
    let addr = http.to_string();
    let restart = async |rate: &str| {
        let d = Daemon::start(&["--db", &db, "--http", &addr, "--rate", rate]).await;
        assert_eq!(d.http, http, "the same address");
        d
    };
    let mut bob = Client::in_room(first.tcp, "bob", "general").await;
    let driver = Driver::start(&chromium, &chromedriver).await;
    join_as(&driver, http, "alice", "busy").await;
    driver.type_into("#input", "/join general\u{E007}").await;
    driver
        .until("#general on screen", &viewing("general"))
        .await;
    bob.send("one").await;
    driver.until("bob's first line", &log_has("one")).await;

    // The tab loses the network; the server restarts on the same address
    // (every session is gone) and bob says more meanwhile.
    driver.offline(true).await;
    drop(bob);
    assert_eq!(first.terminate().await, Some(0));
    let second = restart("0").await;
    let mut bob = Client::in_room(second.tcp, "bob", "general").await;
    for text in ["two", "three", "four", "five"] {
        bob.send(text).await;
    }
    // More in #busy than one replay gives back (1,000): the rest is found in history.
    bob.send("/join busy").await;
    for i in 1..=1003 {
        bob.send(&format!("busy {i}")).await;
    }
    bob.expect(|v| v["type"] == "message" && v["text"] == "busy 1003")
        .await;
    drop(bob);
    // Storage then loses two of them (as after a crash, or to retention),
    // and the server restarts again.
    assert_eq!(second.terminate().await, Some(0));
    {
        use sqlx::Connection;
        let mut db = sqlx::SqliteConnection::connect(&db).await.unwrap();
        sqlx::query("DELETE FROM messages WHERE room = 'general' AND seq IN (3, 4)")
            .execute(&mut db)
            .await
            .unwrap();
    }
    let third = restart("10").await;
    let mut bob = Client::in_room(third.tcp, "bob", "general").await;

    // Back online: a new session with the same nick, the room re-joined from
    // the last seq seen, and a notice saying exactly what that gave back.
    driver.offline(false).await;
    driver
        .until(
            "the reconnect notice",
            &log_has(
                "reconnected as alice; #busy: 1003 missed messages restored; \
                 #general: messages 3–4 are no longer available, 2 missed messages restored",
            ),
        )
        .await;
    bob.expect(|v| v["type"] == "join" && v["nick"] == "alice")
        .await;
    let texts = driver
        .eval("return [...document.querySelectorAll('#log .line .text')].map(e => e.textContent).filter(t => /^(one|two|five|messages)/.test(t));")
        .await;
    assert_eq!(
        texts,
        json!(["one", "two", "messages 3–4 are no longer available", "five"]),
        "in seq order, the loss where it falls"
    );
    assert_eq!(driver.eval(SEQS).await, json!([1, 2, 5]));
    let busy = "#rooms li[data-room=\"busy\"]";
    driver
        .until("1003 unread in #busy", &badge(busy, Some(1003)))
        .await;
    driver.click(busy).await;
    driver.until("#busy on screen", &viewing("busy")).await;
    let all: Vec<u64> = (1..=1003).collect();
    assert_eq!(
        driver.eval(SEQS).await,
        json!(all),
        "all of #busy, in order"
    );
    driver.click("#rooms li[data-room=\"general\"]").await;
    driver
        .until("#general on screen", &viewing("general"))
        .await;
    driver.type_into("#input", "back\u{E007}").await;
    let heard = bob
        .expect(|v| v["type"] == "message" && v["text"] == "back")
        .await;
    assert_eq!(heard["nick"], "alice");
    driver.quit().await;
}

#[tokio::test]
async fn scrolling_up_loads_older_history_in_order() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let d = Daemon::start(&["--db", db.as_str(), "--rate", "0"]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    for i in 1..=130 {
        bob.send(&format!("m{i}")).await;
    }
    bob.expect(|v| v["type"] == "message" && v["text"] == "m130")
        .await;
    let driver = Driver::start(&chromium, &chromedriver).await;
    join_as(&driver, d.http, "alice", "general").await;
    driver.until("the last message", &log_has("m130")).await;
    driver
        .until(
            "the first message, by scrolling up",
            "const log = document.getElementById('log'); log.scrollTop = 0; \
             return log.querySelector('[data-seq=\"1\"]') !== null;",
        )
        .await;
    let all: Vec<u64> = (1..=130).collect();
    assert_eq!(driver.eval(SEQS).await, json!(all), "in order, once each");
    let first = driver
        .eval("return document.querySelector('#log [data-seq=\"1\"] .text').textContent;")
        .await;
    assert_eq!(first, "m1");
    driver
        .until(
            "the top to say so",
            "return document.querySelector('#log .edge').textContent === 'the beginning of #general';",
        )
        .await;

    // /history when all of it is on screen already: said, not silent, and
    // nothing duplicated or reordered.
    driver.type_into("#input", "/history 15\u{E007}").await;
    driver
        .until(
            "the history notice",
            &log_has("history: messages 116–130 (15)"),
        )
        .await;
    assert_eq!(driver.eval(SEQS).await, json!(all));
    driver.quit().await;
}

#[tokio::test]
async fn unread_counts_links_keys_leave_and_change_nick() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let d = Daemon::start(&["--db", db.as_str()]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    let driver = Driver::start(&chromium, &chromedriver).await;
    join_as(&driver, d.http, "alice", "general").await;
    driver.type_into("#input", "/join random\u{E007}").await;
    driver.until("#random on screen", &viewing("random")).await;

    // Unread counts, per room and per DM.
    for text in ["one", "two", "three"] {
        bob.send(text).await;
    }
    let general = "#rooms li[data-room=\"general\"]";
    driver
        .until("3 unread in #general", &badge(general, Some(3)))
        .await;
    bob.send("/msg alice psst").await;
    let dm = "#peers li[data-peer=\"bob\"]";
    driver.until("1 unread from bob", &badge(dm, Some(1))).await;
    driver.click(general).await;
    driver
        .until("#general on screen", &viewing("general"))
        .await;
    driver
        .until("no badge once read", &badge(general, None))
        .await;
    driver.until("the messages", &log_has("three")).await;

    // http(s) URLs are links; a javascript: URL stays text.
    let url = format!("http://{}/healthz", d.http);
    let text = format!("see {url}, not javascript:alert(1) or [x](javascript:alert(2))");
    bob.send(&text).await;
    driver.until("the link line", &log_has(&text)).await;
    let links = driver
        .eval("return [...document.querySelectorAll('#log a')].map(a => [a.href, a.rel, a.target, a.textContent]);")
        .await;
    assert_eq!(
        links,
        json!([[url, "noopener noreferrer", "_blank", url]]),
        "one link, and not the javascript: ones"
    );
    driver.click("#log a").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while driver.tabs().await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the link opened no tab"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Enter sends; Up brings back the last line; Alt+Down goes to the next room.
    driver.type_into("#input", "hello\u{E007}").await;
    bob.expect(|v| v["type"] == "message" && v["text"] == "hello")
        .await;
    driver.until("alice's line", &log_has("hello")).await;
    // The README's picture: a conversation, a link, an unread DM (the
    // pointer away from the lines, whose times show on hover).
    driver.click("#input").await;
    if let Some(path) = screenshot_path(false) {
        driver.screenshot(&path).await;
    }
    driver.type_into("#input", "\u{E013}").await;
    assert_eq!(
        driver
            .eval("return document.getElementById('input').value;")
            .await,
        "hello"
    );
    driver
        .eval("document.getElementById('input').value = ''; return null;")
        .await;
    driver.type_into("#input", "\u{E00A}\u{E015}\u{E000}").await;
    driver
        .until("Alt+Down to #random", &viewing("random"))
        .await;

    // The leave button.
    driver.click("#rooms li[data-room=\"random\"] .leave").await;
    driver
        .until(
            "#random left",
            "return document.querySelector('#rooms li[data-room=\"random\"] .leave') === null;",
        )
        .await;
    driver.until("back in #general", &viewing("general")).await;

    // Once connected, the nick field changes the nick.
    assert_eq!(
        driver
            .eval("return document.getElementById('connect').textContent;")
            .await,
        "Change nick"
    );
    driver.type_into("#nick", "alicia").await;
    driver.click("#connect").await;
    bob.expect(|v| v["type"] == "nick" && v["old"] == "alice" && v["new"] == "alicia")
        .await;
    driver
        .until(
            "the new nick on the page",
            "return document.getElementById('me').textContent.startsWith('you are alicia');",
        )
        .await;
    driver.quit().await;
}

#[tokio::test]
async fn a_360_pixel_screen_has_no_sideways_scroll() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let d = Daemon::start(&["--db", db.as_str()]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    let driver = Driver::start(&chromium, &chromedriver).await;
    driver
        .cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 360, "height": 740, "deviceScaleFactor": 1, "mobile": true}),
        )
        .await;
    driver.goto(&format!("http://{}/", d.http)).await;
    assert_eq!(driver.eval("return window.innerWidth;").await, 360);
    assert_eq!(driver.eval(NO_SIDEWAYS_SCROLL).await, true);

    join_as(&driver, d.http, "alice", "general").await;
    bob.send("hello from nc").await;
    bob.send(&format!(
        "a long line: {} and a link http://{}/rooms/general/history?limit=100&before=123456789",
        "w".repeat(120),
        d.http
    ))
    .await;
    bob.send("/me waves").await;
    driver.until("bob's action", &log_has("* bob waves")).await;
    driver
        .type_into("#input", "hi bob, from a phone\u{E007}")
        .await;
    driver
        .until("its own line", &log_has("hi bob, from a phone"))
        .await;
    assert_eq!(driver.eval(NO_SIDEWAYS_SCROLL).await, true);
    // Everything that matters is on screen and reachable.
    for css in [
        "#connect",
        "#input",
        "#say button",
        "#show-rooms",
        "#show-members",
    ] {
        let inside = driver
            .eval(&format!(
                "const r = document.querySelector({}).getBoundingClientRect(); \
                 return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth;",
                json!(css)
            ))
            .await;
        assert_eq!(inside, true, "{css} is on screen");
    }
    if let Some(path) = screenshot_path(true) {
        driver.screenshot(&path).await;
    }

    // The room list opens over the conversation, and closes on a choice.
    driver.click("#show-rooms").await;
    let nav = "return getComputedStyle(document.querySelector('nav')).display !== 'none';";
    assert_eq!(driver.eval(nav).await, true);
    assert_eq!(driver.eval(NO_SIDEWAYS_SCROLL).await, true);
    driver.click("#rooms li[data-room=\"general\"]").await;
    driver
        .until(
            "the list to close",
            "return getComputedStyle(document.querySelector('nav')).display === 'none';",
        )
        .await;
    driver.click("#show-members").await;
    driver
        .until(
            "bob among the members",
            "return [...document.querySelectorAll('#members li')].some(e => e.textContent === 'bob');",
        )
        .await;
    assert_eq!(driver.eval(NO_SIDEWAYS_SCROLL).await, true);
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
