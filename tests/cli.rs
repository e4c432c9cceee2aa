//! The command line as a user types it: the real binary, started the way
//! `main` parses its arguments, and the benchmark script's arguments.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Daemon, temp_dir};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_baby-discord");

/// Runs `program args` to completion within `limit`; (exit code, stdout, stderr).
async fn run(program: &str, args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
    let child = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the program starts");
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {limit:?}"))
        .expect("wait works");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn serve_obeys_its_flags() {
    let dir = temp_dir();
    let file = dir.path().join("served.db");
    let db = format!("sqlite://{}", file.display());
    let d = Daemon::start_argv(&[
        "serve",
        "--tcp",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--db",
        &db,
        "--instance",
        "flagged",
    ])
    .await;
    assert_ne!(d.tcp.port(), 9001, "--tcp was ignored");
    assert_ne!(d.http.port(), 3001, "--http was ignored");
    assert!(
        file.exists(),
        "--db was ignored: {} missing",
        file.display()
    );
    let mut client = common::Client::json(d.tcp, "probe").await;
    client.send("/quit").await;
    let bye = client.expect(|v| v["type"] == "reply").await;
    assert_eq!(bye["command"], "quit");
    drop(client);
    let logs = d.logs();
    assert!(logs.contains("flagged"), "--instance was ignored: {logs}");
}

#[tokio::test]
async fn help_names_the_redis_bus() {
    for args in [&["--help"][..], &["serve", "--help"][..]] {
        let (code, out, _) = run(BIN, args, Duration::from_secs(10)).await;
        assert_eq!(code, Some(0));
        assert!(out.contains("redis://HOST:PORT[/DB]"), "{out}");
    }
}

#[tokio::test]
async fn unreachable_postgres_fails_fast_and_says_why() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let db = format!("postgres://baby@127.0.0.1:{port}/nowhere");
    let started = Instant::now();
    let (code, _, err) = run(
        BIN,
        &["--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--db", &db],
        Duration::from_secs(25),
    )
    .await;
    let took = started.elapsed();
    assert_ne!(code, Some(0), "{err}");
    assert!(took < Duration::from_secs(8), "took {took:?}: {err}");
    let lower = err.to_lowercase();
    assert!(lower.contains("refused"), "{err}");
    assert!(!lower.contains("pool timed out"), "{err}");
}

#[tokio::test]
async fn bench_script_help_prints_usage_and_starts_nothing() {
    let (code, out, _) = run(
        "bash",
        &["scripts/bench.sh", "--help"],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(code, Some(0));
    assert!(out.starts_with("usage: scripts/bench.sh"), "{out}");
    assert!(!out.contains("== building"), "{out}");
    let (code, _, err) = run(
        "bash",
        &["scripts/bench.sh", "--runs", "1"],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unexpected argument"), "{err}");
}

#[tokio::test]
async fn a_session_logs_its_start_and_end_under_its_id() {
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let d = Daemon::start(&["--db", &db]).await;
    let mut client = common::Client::json(d.tcp, "logged").await;
    client.send("/quit").await;
    assert_eq!(client.line().await.map(|l| l.contains("quit")), Some(true));
    assert_eq!(client.line().await, None, "the connection closes after bye");
    // The disconnect line is written as the connection ends: wait for it.
    let deadline = Instant::now() + common::WAIT;
    while !d.logs().contains("disconnected") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = d.logs();
    let mine: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("connected") && l.contains("peer=127.0.0.1:"))
        .collect();
    assert_eq!(mine.len(), 2, "{logs}");
    assert!(
        mine.iter()
            .all(|l| l.contains("INFO") && l.contains("session=s")),
        "{logs}"
    );
    assert!(
        mine[1].contains("disconnected") && mine[1].contains("reason=\"quit\""),
        "{logs}"
    );
}

/// `--durability sync` means "stored before delivered", which the redis bus
/// does not do: the daemon says so and stops instead of ignoring the flag.
#[tokio::test]
async fn sync_durability_on_the_redis_bus_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("chat.db").display());
    let (code, _, err) = run(
        BIN,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--db",
            &db,
            "--bus",
            "redis://127.0.0.1:1",
            "--durability",
            "sync",
        ],
        Duration::from_secs(25),
    )
    .await;
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("--durability sync does not apply"), "{err}");
}
