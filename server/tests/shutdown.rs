//! SIGTERM under load: while submitters are running, jobd stops accepting,
//! lets the running jobs finish within `--shutdown-grace`, exits 0, and (with
//! the durable store) loses no acknowledged job.
//!
//! Four tasks submit short async (`sleep`) and blocking (`return_future`)
//! jobs as fast as jobd answers. Once a marker job is seen running and enough
//! submissions are acknowledged, jobd gets SIGTERM. Then: it must exit 0
//! well within the grace; no job may be left RUNNING on disk (each running
//! one finished, the others were never started); and after a restart on the
//! same data directory every acknowledged id must be there.

#![allow(
    clippy::disallowed_methods,
    reason = "tests of the real jobd binary keep real time: its clock is the system's"
)]

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use jobd_proto::{
    JobState,
    pb::{self, job_service_client::JobServiceClient},
};
use jobd_test_support::{JobdProcess, jobd_binary};
use serde_json::json;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};

const SUBMITTERS: usize = 4;
/// Each submitter's cap, whatever happens.
const MAX_SUBMITS_PER_TASK: usize = 2_000;
/// Acknowledged submissions before SIGTERM.
const ACKED_BEFORE_SIGTERM: usize = 200;
/// Every phase of the test is bounded by this.
const PHASE_LIMIT: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(10);

fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

/// Submits until the server stops answering (or the caps are reached);
/// returns nothing, records each acknowledged job id in `acked`.
async fn submitter(
    url: String,
    task: usize,
    acked: Arc<Mutex<Vec<String>>>,
    count: Arc<AtomicUsize>,
    progress: Arc<Notify>,
    sigterm_sent: Arc<AtomicBool>,
) -> (usize, usize) {
    let mut rpc = JobServiceClient::new(channel(&url));
    let started = Instant::now();
    let (mut refused_before, mut refused_after) = (0, 0);
    for n in 0..MAX_SUBMITS_PER_TASK {
        if started.elapsed() > 2 * PHASE_LIMIT {
            break;
        }
        let (function, args) = if n % 2 == 0 {
            ("sleep", json!(0.2))
        } else {
            ("return_future", json!(["x", 0.05]))
        };
        let request = pb::SubmitRequest {
            function: function.into(),
            args: Some(jobd_proto::value::from_json(args)),
            request_id: format!("t{task}-{n}"),
            ..Default::default()
        };
        match rpc.submit(request).await {
            Ok(answer) => {
                acked.lock().unwrap().push(answer.into_inner().job_id);
                count.fetch_add(1, Ordering::Relaxed);
                progress.notify_one();
            }
            Err(_) if sigterm_sent.load(Ordering::Relaxed) => {
                // Draining (UNAVAILABLE) or gone: jobd stopped accepting.
                refused_after += 1;
                if refused_after > 20 {
                    break;
                }
            }
            Err(status) => {
                refused_before += 1;
                assert!(
                    refused_before < 10,
                    "submits fail before SIGTERM: {status:?}"
                );
            }
        }
    }
    (refused_before, refused_after)
}

async fn get_state(
    rpc: &mut JobServiceClient<Channel>,
    id: &str,
) -> Result<JobState, tonic::Status> {
    let job = rpc
        .get_job(pb::GetJobRequest {
            job_id: id.to_owned(),
        })
        .await?
        .into_inner()
        .job
        .expect("a job");
    Ok(JobState::try_from(job.state).expect("a known state"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_loses_no_acknowledged_job() {
    let dir = tempfile::tempdir().unwrap();
    let grace = format!("{}s", GRACE.as_secs());
    let mut server = JobdProcess::start_in(
        jobd_binary!(),
        dir.path(),
        "127.0.0.1:0",
        &["--shutdown-grace", &grace, "--blocking-workers", "2"],
    );
    let url = server.url();
    let mut rpc = JobServiceClient::new(channel(&url));

    // A job that is certainly running when SIGTERM arrives, and must be
    // allowed to finish.
    let marker = rpc
        .submit(pb::SubmitRequest {
            function: "sleep".into(),
            args: Some(jobd_proto::value::from_json(json!(1.5))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;

    let acked = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let sigterm_sent = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..SUBMITTERS)
        .map(|task| {
            tokio::spawn(submitter(
                url.clone(),
                task,
                Arc::clone(&acked),
                Arc::clone(&count),
                Arc::clone(&progress),
                Arc::clone(&sigterm_sent),
            ))
        })
        .collect();

    // Wait for load, on the submitters' own signal.
    tokio::time::timeout(PHASE_LIMIT, async {
        while count.load(Ordering::Relaxed) < ACKED_BEFORE_SIGTERM {
            progress.notified().await;
        }
    })
    .await
    .expect("submissions are acknowledged");
    // The marker (1.5 s) was submitted before all of them: it runs now.
    assert_eq!(
        get_state(&mut rpc, &marker).await.unwrap(),
        JobState::Running
    );

    sigterm_sent.store(true, Ordering::Relaxed);
    let signalled = Instant::now();
    server.terminate();
    let status = tokio::task::spawn_blocking(move || {
        let status = server.wait_exit(GRACE + Duration::from_secs(10));
        (server, status)
    });
    let (server, status) = status.await.unwrap();
    let took = signalled.elapsed();
    assert!(status.success(), "jobd exited with {status} after SIGTERM");
    // The running jobs are short: draining takes them, not the whole grace.
    assert!(took < GRACE, "shutdown took {took:?}");

    let mut refused_after = 0;
    for task in tasks {
        let (_, after) = tokio::time::timeout(PHASE_LIMIT, task)
            .await
            .expect("submitters stop once jobd is gone")
            .unwrap();
        refused_after += after;
    }
    assert!(refused_after > 0, "no submission was refused after SIGTERM");
    drop(server);

    // On disk: nothing left running. Every job that had started finished;
    // the rest were never started.
    let conn = rusqlite::Connection::open_with_flags(
        dir.path().join(jobd::store::DB_FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let by_state: HashMap<i64, i64> = conn
        .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let code = |state: JobState| i64::from(pb::JobState::from(state) as i32);
    assert_eq!(by_state.get(&code(JobState::Running)), None, "{by_state:?}");
    assert!(
        by_state
            .get(&code(JobState::Succeeded))
            .copied()
            .unwrap_or(0)
            > 0
    );
    drop(conn);

    // After a restart (paused, so states stay as they were left) every
    // acknowledged job is there.
    let restarted = JobdProcess::start_in(jobd_binary!(), dir.path(), "127.0.0.1:0", &["--paused"]);
    let mut rpc = JobServiceClient::new(channel(&restarted.url()));
    assert_eq!(
        get_state(&mut rpc, &marker).await.unwrap(),
        JobState::Succeeded
    );
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= ACKED_BEFORE_SIGTERM);
    let mut missing = Vec::new();
    for id in &acked {
        match get_state(&mut rpc, id).await {
            Ok(state) => assert!(
                matches!(state, JobState::Pending | JobState::Succeeded),
                "{id}: {state}"
            ),
            Err(status) => missing.push((id.clone(), status.code())),
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged jobs lost: {missing:?}",
        missing.len()
    );
}
