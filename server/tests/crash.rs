//! kill -9 under load: no acknowledged job is ever lost.
//!
//! Several tasks submit jobs (each with its own request id) while the real
//! `jobd` binary is killed with SIGKILL and restarted at random points. Every
//! Submit is recorded as acknowledged, refused, or unknown (the connection
//! broke mid-call). After a final restart and drain the database must hold
//! every acknowledged job, finished; no job may be stuck; no request id may
//! have two jobs. A second run with a deliberate bug (acknowledge before
//! commit) proves the test can see a loss.

#![allow(
    clippy::disallowed_methods,
    reason = "tests of the real jobd binary keep real time: its clock is the system's"
)]

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use jobd_proto::pb::{self, job_service_client::JobServiceClient};
use jobd_test_support::{JobdProcess, free_listen, jobd_binary};
use rand::Rng as _;
use tonic::transport::Endpoint;

const SUBMITTERS: usize = 4;
const KILLS: usize = 12;
/// The whole kill phase is bounded, whatever happens.
const KILL_PHASE_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Ledger {
    acked: HashMap<String, String>,
    refused: HashSet<String>,
    unknown: HashSet<String>,
}

/// Every count is printed; the ones not asserted on are context for a reader
/// of a failure.
#[derive(Debug)]
#[allow(dead_code)]
struct Report {
    kills: usize,
    acked: usize,
    refused: usize,
    unknown: usize,
    /// Acknowledged jobs absent from the database (or with another id).
    missing: usize,
    /// Jobs not finished after the drain.
    stuck: usize,
    /// Request ids with more than one job.
    duplicates: usize,
    /// Unknown-outcome submissions that did create a job.
    unknown_created: usize,
}

async fn submitter(url: String, task: usize, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    let channel = Endpoint::from_shared(url)
        .unwrap()
        .timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_millis(200))
        .connect_lazy();
    let mut rpc = JobServiceClient::new(channel);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let request_id = format!("t{task}-{n}");
        let request = pb::SubmitRequest {
            function: "noop".into(),
            args: Some(jobd_proto::value::from_json(serde_json::json!(n))),
            request_id: request_id.clone(),
            ..Default::default()
        };
        let result = rpc.submit(request).await;
        let broken = {
            let mut ledger = ledger.lock().unwrap();
            match result {
                Ok(answer) => {
                    ledger.acked.insert(request_id, answer.into_inner().job_id);
                    false
                }
                // The server answered with a refusal of its own: nothing created.
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
                    ) =>
                {
                    ledger.refused.insert(request_id);
                    false
                }
                // The call may or may not have reached the server.
                Err(_) => {
                    ledger.unknown.insert(request_id);
                    true
                }
            }
        };
        if broken {
            // The server is down; do not spin while it restarts.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn open_db(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join(jobd::store::DB_FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

fn unfinished_ids(dir: &Path) -> Vec<String> {
    let conn = open_db(dir);
    let mut stmt = conn
        .prepare("SELECT id FROM jobs WHERE state IN (1, 2)")
        .unwrap();
    stmt.query_map([], |row| row.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|id| uuid::Uuid::from_slice(&id.unwrap()).unwrap().to_string())
        .collect()
}

async fn crash_run(extra_args: &[&str]) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_listen();
    let url = format!("http://{listen}");
    let mut server = JobdProcess::start_in(jobd_binary!(), dir.path(), &listen, extra_args);

    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let tasks: Vec<_> = (0..SUBMITTERS)
        .map(|t| {
            tokio::spawn(submitter(
                url.clone(),
                t,
                Arc::clone(&stop),
                Arc::clone(&ledger),
            ))
        })
        .collect();

    let started = Instant::now();
    let mut kills = 0;
    while kills < KILLS && started.elapsed() < KILL_PHASE_LIMIT {
        let pause = rand::rng().random_range(100..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        server.kill9();
        kills += 1;
        server = JobdProcess::start_in(jobd_binary!(), dir.path(), &listen, extra_args);
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    // Drain: wait (server-side, no polling) for every unfinished job.
    let mut rpc =
        JobServiceClient::new(Endpoint::from_shared(url).unwrap().connect().await.unwrap());
    for _ in 0..3 {
        let unfinished = unfinished_ids(dir.path());
        if unfinished.is_empty() {
            break;
        }
        for job_id in unfinished {
            let request = pb::ResultRequest {
                job_id,
                timeout: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
            };
            rpc.result(request)
                .await
                .expect("an unfinished job finishes");
        }
    }
    server.terminate();
    let status = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "final shutdown: {status}");

    let conn = open_db(dir.path());
    let rows: HashMap<String, (String, i64)> = conn
        .prepare("SELECT request_id, id, state FROM jobs")
        .unwrap()
        .query_map([], |row| {
            let id: Vec<u8> = row.get(1)?;
            Ok((
                row.get::<_, String>(0)?,
                (
                    uuid::Uuid::from_slice(&id).unwrap().to_string(),
                    row.get(2)?,
                ),
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let duplicates: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM (SELECT request_id FROM jobs GROUP BY request_id HAVING COUNT(*) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let ledger = ledger.lock().unwrap();
    let missing = ledger
        .acked
        .iter()
        .filter(|(rid, job)| rows.get(*rid).is_none_or(|(id, _)| id != *job))
        .count();
    Report {
        kills,
        acked: ledger.acked.len(),
        refused: ledger.refused.len(),
        unknown: ledger.unknown.len(),
        missing,
        stuck: rows
            .values()
            .filter(|(_, state)| matches!(state, 1 | 2))
            .count(),
        duplicates: usize::try_from(duplicates).unwrap(),
        unknown_created: ledger
            .unknown
            .iter()
            .filter(|rid| rows.contains_key(*rid))
            .count(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_job() {
    let report = crash_run(&[]).await;
    eprintln!("{report:?}");
    assert!(report.kills >= 10, "{report:?}");
    assert!(
        report.acked > 100,
        "too little load to mean anything: {report:?}"
    );
    assert_eq!(report.missing, 0, "acknowledged jobs lost: {report:?}");
    assert_eq!(report.stuck, 0, "jobs never finished: {report:?}");
    assert_eq!(
        report.duplicates, 0,
        "request ids with two jobs: {report:?}"
    );
}

/// The mutation check: with Submit acknowledged before its commit, the same
/// test must see acknowledged jobs go missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crash_test_detects_acknowledging_before_commit() {
    let report = crash_run(&["--unsafe-ack-before-commit"]).await;
    eprintln!("{report:?}");
    assert!(report.kills >= 10, "{report:?}");
    assert!(
        report.missing > 0,
        "the crash test failed to detect a broken store: {report:?}"
    );
}
