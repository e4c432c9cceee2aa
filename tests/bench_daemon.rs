//! `baby-discord bench` against the real daemon on port 0: a short fan-out
//! loses nothing, and SSE receivers either work or fail with a clear message.

mod common;

use std::time::Duration;

use common::{Daemon, sqlite_url, temp_dir};
use serde_json::Value;

/// Runs `baby-discord bench ARGS --json` and returns its report (or its stderr).
async fn bench(args: &[&str]) -> Result<Value, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_baby-discord"))
            .arg("bench")
            .args(args)
            .arg("--json")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the bench finishes within 60 s")
    .expect("the bench runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("one JSON report"))
}

#[tokio::test]
async fn a_short_fanout_loses_nothing() {
    let dir = temp_dir();
    let daemon = Daemon::start(&["--db", &sqlite_url(&dir)]).await;
    let target = daemon.tcp.to_string();
    let report = bench(&[
        "fanout",
        "--target",
        &target,
        "--members",
        "30",
        "--rate",
        "20",
        "--duration",
        "1",
    ])
    .await
    .unwrap_or_else(|e| panic!("bench failed: {e}\n{}", daemon.logs()));
    let r = &report["outcome"];
    assert_eq!(report["workload"], "fanout");
    assert_eq!(r["kind"], "load");
    assert_eq!(
        r["senders"], 4,
        "20 msg/s at 5 per sender, under the default limit"
    );
    assert_eq!(r["sent"], 20, "{report}");
    assert_eq!(r["expected"], 600, "{report}");
    assert_eq!(r["lost"], 0, "{report}");
    assert_eq!(r["duplicates"], 0, "{report}");
    assert_eq!(r["delivered"], 600, "{report}");
    assert_eq!(r["errors"]["rate_limited"], 0, "{report}");
    assert!(r["latency"]["p99_ms"].as_f64().unwrap() > 0.0, "{report}");
}

#[tokio::test]
async fn sse_receivers_work_or_say_the_http_adapter_is_unavailable() {
    let dir = temp_dir();
    let daemon = Daemon::start(&["--db", &sqlite_url(&dir)]).await;
    let (tcp, http) = (daemon.tcp.to_string(), daemon.http.to_string());
    let args = [
        "fanout",
        "--target",
        &tcp,
        "--http-target",
        &http,
        "--receivers",
        "sse",
        "--members",
        "5",
        "--rate",
        "10",
        "--duration",
        "1",
    ];
    match bench(&args).await {
        Ok(report) => assert_eq!(report["outcome"]["lost"], 0, "{report}"),
        Err(stderr) => assert!(
            stderr.contains("503") && stderr.contains("HTTP adapter"),
            "a failing SSE run says why: {stderr}"
        ),
    }
}
