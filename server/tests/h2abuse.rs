//! HTTP/2-level abuse of the real `jobd` binary (issue 6), by a Python
//! script (`h2abuse/abuse.py`) that speaks HTTP/2 through the `h2` library
//! and misbehaves: rapid reset (CVE-2023-44487), streams the server must
//! reset for protocol errors, thousands of `Result` waiters that never read
//! their answers, and a flood of connections past the cap. Each time the
//! abusive connection is cut off (or the extra ones closed), the server's
//! memory stays bounded, and a well-behaved client on its own connection
//! keeps working throughout.
//!
//! Needs python3 with `h2` (`python3 -m pip install h2`; `.ci/run` installs
//! it). Without them the tests say so loudly and pass, except under
//! `CI=true`, where a missing tool fails the run.

#![allow(
    clippy::disallowed_methods,
    reason = "tests of the real jobd binary keep real time: its clock is the system's"
)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use jobd_proto::pb::{self, job_service_client::JobServiceClient};
use jobd_test_support::{JobdProcess, jobd_binary, submit_noop, tools::require_h2};
use serde_json::Value;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// HTTP/2's ENHANCE_YOUR_CALM: the GOAWAY code of h2's abuse limits.
const ENHANCE_YOUR_CALM: u64 = 0xb;

fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2abuse/abuse.py")
}

/// One round of ordinary calls; panics if any fails.
async fn behave(channel: &Channel) {
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(status, 1, "SERVING");
    let mut jobs = JobServiceClient::new(channel.clone());
    let id = submit_noop(&mut jobs).await;
    jobs.done(pb::DoneRequest { job_id: id })
        .await
        .expect("done");
}

/// Runs the script in `mode` to completion while a well-behaved client
/// keeps calling on its own connection; returns the script's report.
async fn abuse_while_behaving(server: &JobdProcess, channel: &Channel, mode: &str) -> Value {
    let port = server.addr.port().to_string();
    let child = Command::new("python3")
        .arg(script())
        .args([mode, "127.0.0.1", &port, "5000"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output());
    tokio::pin!(output);
    let mut rounds = 0;
    let output = loop {
        tokio::select! {
            output = &mut output => break output.unwrap().expect("python3 ran"),
            () = behave(channel) => rounds += 1,
        }
    };
    assert!(output.status.success(), "{mode}: {output:?}");
    assert!(
        rounds > 0,
        "the well-behaved client made no call during the abuse"
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("one JSON report");
    eprintln!("{mode}: {report} ({rounds} well-behaved rounds meanwhile)");
    report
}

#[tokio::test]
async fn reset_floods_are_cut_off_while_other_clients_keep_working() {
    require_h2();
    let server = JobdProcess::start(
        jobd_binary!(),
        &[
            "--store",
            "memory",
            "--paused",
            "--max-pending-accept-resets",
            "20",
            "--max-local-error-resets",
            "100",
        ],
    );
    let channel = server.channel().await;
    behave(&channel).await;

    let rapid = abuse_while_behaving(&server, &channel, "rapid-reset").await;
    assert_eq!(rapid["goaway"], true, "{rapid}");
    assert_eq!(rapid["error_code"], ENHANCE_YOUR_CALM, "{rapid}");
    assert!(
        rapid["sent"].as_u64().unwrap() < 5000,
        "cut off early: {rapid}"
    );

    let resets = abuse_while_behaving(&server, &channel, "error-resets").await;
    assert_eq!(resets["goaway"], true, "{resets}");
    assert_eq!(resets["error_code"], ENHANCE_YOUR_CALM, "{resets}");
    let reset_by_server = resets["resets_received"].as_u64().unwrap();
    assert!(
        (1..=100).contains(&reset_by_server),
        "at most --max-local-error-resets streams reset before the GOAWAY: {resets}"
    );

    behave(&channel).await;
}

/// The server's resident set size, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

/// What the server's RSS may grow by while 2,000 waiters and a connection
/// flood sit on it (measured: see README, *Limits*).
const RSS_GROWTH_BOUND_KIB: u64 = 32 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_that_never_read_and_a_connection_flood_keep_memory_bounded() {
    require_h2();
    const WAITERS: usize = 2000;
    let server = JobdProcess::start(
        jobd_binary!(),
        &[
            "--store",
            "memory",
            "--paused",
            "--max-waiters",
            &WAITERS.to_string(),
            "--max-connections",
            "64",
        ],
    );
    let channel = server.channel().await;
    behave(&channel).await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let pending = submit_noop(&mut jobs).await;
    let baseline = rss_kib(server.pid());

    // 10 connections x 250 Result calls (under the 256 streams a
    // connection may have): 2,500 sent for 2,000 waiter slots. The probe
    // below holds a slot while it runs, and a waiter refused meanwhile is
    // not sent again: the spare 500 make sure the slots still fill when a
    // probe is slow on a starved machine (with 50 spare, one was not).
    let mut child = Command::new("python3")
        .arg(script())
        .args([
            "waiters",
            "127.0.0.1",
            &server.addr.port().to_string(),
            &pending,
            "10",
            "250",
            "300",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_report = move || -> Value {
        let line = lines
            .next()
            .expect("a report line")
            .expect("read the script");
        serde_json::from_str(&line).expect("JSON")
    };
    let sent = tokio::task::block_in_place(&mut next_report);
    assert_eq!(sent["streams"], 2500, "{sent}");

    // Every waiter slot taken: a zero-timeout Result is refused at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let code = jobs
            .result(pb::ResultRequest {
                job_id: pending.clone(),
                timeout: Some(prost_types::Duration::default()),
            })
            .await
            .unwrap_err()
            .code();
        if code == Code::ResourceExhausted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the waiters never filled the {WAITERS} slots"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let with_waiters = rss_kib(server.pid());

    let flood = tokio::task::block_in_place(&mut next_report);
    eprintln!("connection flood: {flood}");
    // 64 slots: the well-behaved client's and the script's 10 connections
    // hold 11; every connection past the other 53 is closed at once.
    let held = flood["held"].as_u64().unwrap();
    let closed = flood["closed_by_server"].as_u64().unwrap();
    assert!(held <= 53, "{flood}");
    assert_eq!(
        held + closed + flood["refused"].as_u64().unwrap(),
        300,
        "{flood}"
    );
    let with_flood = rss_kib(server.pid());
    // The existing connection is unaffected.
    behave(&channel).await;

    let growth = with_waiters.max(with_flood).saturating_sub(baseline);
    eprintln!(
        "RSS: {baseline} KiB at rest, {with_waiters} KiB with {WAITERS} waiters, \
         {with_flood} KiB with the flood too: +{growth} KiB"
    );
    assert!(
        growth < RSS_GROWTH_BOUND_KIB,
        "RSS grew by {growth} KiB (bound {RSS_GROWTH_BOUND_KIB} KiB)"
    );

    child.stdin.take().unwrap().write_all(b"done\n").unwrap();
    let done = tokio::task::block_in_place(&mut next_report);
    assert_eq!(done["mode"], "done");
    assert!(child.wait().unwrap().success());
    behave(&channel).await;
}
