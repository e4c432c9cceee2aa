//! The test harness's own fault injection works as the fault tests assume:
//! a paused proxy holds bytes without closing, a cut closes, a resume
//! forwards again. Checked against a tiny echo server, no daemon.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on a free port.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    stream.write_all(bytes).await.unwrap();
    let mut got = vec![0u8; bytes.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
        .await
        .expect("echo within 5 s")
        .unwrap();
    got
}

#[tokio::test]
async fn a_paused_proxy_holds_bytes_and_a_resumed_one_delivers_them() {
    let proxy = Proxy::start(echo_server().await).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut stream, b"one").await, b"one");

    proxy.pause();
    stream.write_all(b"two").await.unwrap();
    let mut got = [0u8; 3];
    let held = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut got)).await;
    assert!(held.is_err(), "nothing crosses a paused proxy");

    proxy.resume();
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
        .await
        .expect("held bytes arrive after resume")
        .unwrap();
    assert_eq!(&got, b"two");
}

#[tokio::test]
async fn a_cut_closes_connections_and_refuses_new_ones_until_resumed() {
    let proxy = Proxy::start(echo_server().await).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut stream, b"hi").await, b"hi");

    proxy.cut();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("a cut closes within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "the cut connection reads end of stream");

    let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf))
        .await
        .expect("a new connection is closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);

    proxy.resume();
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut again, b"back").await, b"back");
}

#[tokio::test]
async fn url_for_points_a_service_url_at_the_proxy() {
    let proxy = Proxy::start(echo_server().await).await;
    assert_eq!(
        proxy.url_for("postgres://postgres@127.0.0.1:5432/db1"),
        format!("postgres://postgres@{}/db1", proxy.addr())
    );
    assert_eq!(
        proxy.url_for("redis://127.0.0.1:6379"),
        format!("redis://{}", proxy.addr())
    );
}

#[tokio::test]
async fn a_frozen_daemon_is_silent_until_thawed_and_kill9_ends_it() {
    let dir = common::temp_dir();
    let db = common::sqlite_url(&dir);
    let mut daemon = common::Daemon::start(&["--db", &db]).await;
    daemon.freeze();
    let mut stream = TcpStream::connect(daemon.tcp).await.unwrap();
    let mut buf = [0u8; 64];
    let silent = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await;
    assert!(silent.is_err(), "a frozen daemon sends nothing");
    daemon.thaw();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the welcome arrives after SIGCONT")
        .unwrap();
    assert!(n > 0);
    daemon.kill9().await;
    assert!(
        TcpStream::connect(daemon.tcp).await.is_err(),
        "nothing listens after SIGKILL"
    );
}
