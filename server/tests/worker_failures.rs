//! Remote workers' failure stories with real processes: the `jobd` binary
//! and `jobctl worker` processes, killed with SIGKILL, paused with SIGSTOP,
//! drained with SIGTERM, and a chaos run killing jobd and workers at random
//! while jobs flow. No acknowledged job is lost, each ends once, and the
//! accepted outcome is always the one of the job's current attempt.
//!
//! `jobctl` is the workspace's other binary: `cargo test --workspace`
//! builds it next to `jobd`.

#![allow(
    clippy::disallowed_methods,
    reason = "tests of real processes keep real time: their clocks are the system's"
)]

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use jobd_client::{JobClient, JobId, JobState, Submission};
use jobd_test_support::{JobdProcess, free_listen, jobd_binary};
use rand::Rng as _;
use serde_json::json;

/// Fast worker timings, so that losses show within a test's patience.
const TIMINGS: [&str; 4] = [
    "--worker-heartbeat-interval",
    "200ms",
    "--worker-lease-timeout",
    "2s",
];
const LEASE: Duration = Duration::from_secs(2);
/// Bounds every wait of these tests.
const PATIENCE: Duration = Duration::from_secs(30);

fn jobctl() -> PathBuf {
    let path = std::path::Path::new(jobd_binary!()).with_file_name("jobctl");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p jobd-client --bin jobctl` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// A `jobctl worker` process, killed if still running when dropped.
struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    /// `jobctl worker --name NAME --exec EXEC --concurrency 1` against `url`.
    fn start(url: &str, name: &str, exec: &str) -> Self {
        let child = Command::new(jobctl())
            .args([
                "--addr",
                url,
                "worker",
                "--name",
                name,
                "--concurrency",
                "1",
            ])
            .args(["--grace", "10", "--exec", exec])
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start jobctl worker");
        Self { child }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal}");
    }

    fn kill9(&mut self) {
        self.child.kill().expect("kill -9 the worker");
        self.child.wait().expect("reap the worker");
    }

    /// Waits (bounded) for the process to exit.
    fn exited(&mut self, limit: Duration) -> std::process::ExitStatus {
        jobd_test_support::wait_exit(&mut self.child, limit, "the worker")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // A stopped process cannot act on SIGKILL until continued.
            let _ = Command::new("kill")
                .args(["-CONT", &self.child.id().to_string()])
                .status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls jobd (bounded) until `check` holds for its attached workers.
async fn until_workers(
    client: &JobClient,
    what: &str,
    check: impl Fn(&[jobd_client::WorkerInfo]) -> bool,
) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(workers) = client.workers().await
            && check(&workers)
        {
            return;
        }
        assert!(Instant::now() < deadline, "never saw {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn attached(client: &JobClient, name: &str) {
    until_workers(client, &format!("worker {name} attached"), |w| {
        w.iter().any(|w| w.name == name && !w.draining)
    })
    .await;
}

async fn running_on(client: &JobClient, name: &str, job: JobId) {
    until_workers(client, &format!("job {job} running on {name}"), |w| {
        w.iter().any(|w| w.name == name && w.running.contains(&job))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_job_runs_again_on_another_within_the_lease() {
    let jobd = JobdProcess::start(jobd_binary!(), &TIMINGS);
    let client = JobClient::connect(jobd.url()).await.unwrap();
    let mut doomed =
        WorkerProcess::start(&jobd.url(), "doomed", "work=sh -c 'sleep 5; echo doomed'");
    attached(&client, "doomed").await;
    let job = client.submit("work", json!(null)).await.unwrap();
    running_on(&client, "doomed", job.id()).await;
    let _survivor = WorkerProcess::start(&jobd.url(), "survivor", "work=echo survivor");
    attached(&client, "survivor").await;

    doomed.kill9();
    let killed = Instant::now();
    let value = tokio::time::timeout(PATIENCE, job.result())
        .await
        .unwrap()
        .unwrap();
    let took = killed.elapsed();
    assert_eq!(value, json!("survivor"));
    // The lease, maintenance's second, and slack for a loaded machine.
    assert!(
        took < LEASE + Duration::from_secs(1 + 2),
        "rerun after {took:?}"
    );
    assert_eq!(job.status().await.unwrap().attempt, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_loses_its_job_and_its_late_outcome_changes_nothing() {
    let jobd = JobdProcess::start(jobd_binary!(), &TIMINGS);
    let client = JobClient::connect(jobd.url()).await.unwrap();
    let paused = WorkerProcess::start(&jobd.url(), "paused", "work=sh -c 'sleep 1; echo paused'");
    attached(&client, "paused").await;
    let job = client.submit("work", json!(null)).await.unwrap();
    running_on(&client, "paused", job.id()).await;

    paused.signal("STOP");
    let _other = WorkerProcess::start(&jobd.url(), "other", "work=echo other");
    let value = tokio::time::timeout(PATIENCE, job.result())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(value, json!("other"));

    // It wakes up with a finished run and a lease that is gone: it
    // re-attaches, learns the lease was lost, and its outcome is dropped.
    paused.signal("CONT");
    until_workers(&client, "the paused worker back and idle", |w| {
        w.iter().any(|w| w.name == "paused" && w.busy == 0)
    })
    .await;
    let status = job.status().await.unwrap();
    assert_eq!(status.attempt, 2);
    assert_eq!(job.result().await.unwrap(), json!("other"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker_its_running_job_finishes_and_it_exits_0() {
    let jobd = JobdProcess::start(jobd_binary!(), &TIMINGS);
    let client = JobClient::connect(jobd.url()).await.unwrap();
    let mut worker = WorkerProcess::start(
        &jobd.url(),
        "drained",
        "work=sh -c 'sleep 1; echo finished'",
    );
    attached(&client, "drained").await;
    let job = client.submit("work", json!(null)).await.unwrap();
    running_on(&client, "drained", job.id()).await;
    worker.signal("TERM");
    let status = worker.exited(PATIENCE);
    assert!(status.success(), "{status:?}");
    assert_eq!(job.result().await.unwrap(), json!("finished"));
    assert_eq!(job.status().await.unwrap().attempt, 1);
    until_workers(&client, "the drained worker gone", |w| w.is_empty()).await;
}

/// Chaos: jobs flow from a submitter while jobd (SQLite) and the workers
/// are killed with SIGKILL at random and restarted. Afterwards every job
/// whose submit was acknowledged exists, finished, once, with the outcome
/// of its current attempt (each run returns its `JOBD_ATTEMPT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_of_jobd_and_workers_lose_no_acknowledged_job() {
    const JOBS: usize = 60;
    const KILLS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let listen = free_listen();
    let url = format!("http://{listen}");
    let start_jobd = || JobdProcess::start_in(jobd_binary!(), dir.path(), &listen, &TIMINGS);
    let exec = "work=sh -c 'sleep 0.$(( $$ % 3 )); echo $JOBD_ATTEMPT'";
    let mut jobd = start_jobd();
    let mut workers: Vec<WorkerProcess> = (0..2)
        .map(|n| WorkerProcess::start(&url, &format!("w{n}"), exec))
        .collect();
    let client = JobClient::connect(&url).await.unwrap();
    attached(&client, "w0").await;

    // The submitter: each job has a request id, so a retry after a broken
    // connection cannot make two.
    let submitter = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut acked: HashMap<String, JobId> = HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            for n in 0..JOBS {
                let request_id = format!("chaos-{n}");
                loop {
                    assert!(Instant::now() < deadline, "the submitter never got through");
                    let Ok(client) = JobClient::connect(&url).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let submission = Submission::new("work", json!(n)).request_id(&request_id);
                    match client.submit_with(submission).await {
                        Ok(job) => {
                            acked.insert(request_id, job.id());
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            acked
        })
    };

    let mut rng = rand::rng();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..700))).await;
        if rng.random_bool(0.5) {
            jobd.kill9();
            jobd = start_jobd();
        } else {
            let n = rng.random_range(0..workers.len());
            workers[n].kill9();
            workers[n] = WorkerProcess::start(&url, &format!("w{n}"), exec);
        }
    }
    let acked = tokio::time::timeout(Duration::from_secs(90), submitter)
        .await
        .expect("the submitter finished")
        .expect("the submitter task");
    assert_eq!(acked.len(), JOBS);

    let client = JobClient::connect(&url).await.unwrap();
    for (request_id, id) in &acked {
        let job = client.job(*id);
        let outcome = tokio::time::timeout(PATIENCE * 2, job.outcome(None))
            .await
            .unwrap_or_else(|_| panic!("{request_id} ({id}) never finished"))
            .unwrap_or_else(|e| panic!("{request_id} ({id}) was lost: {e}"));
        assert_eq!(
            outcome.state,
            JobState::Succeeded,
            "{request_id}: {outcome:?}"
        );
        let status = job.status().await.unwrap();
        assert_eq!(
            outcome.result,
            Ok(json!(status.attempt)),
            "{request_id}: the accepted outcome is not its current attempt's"
        );
    }
    // One job per request id: a repeat of each names the same job.
    for (request_id, id) in &acked {
        let again = client
            .submit_with(Submission::new("work", json!(-1)).request_id(request_id))
            .await;
        match again {
            Ok(job) => assert_eq!(job.id(), *id, "{request_id} has two jobs"),
            // Different arguments under one request id are refused.
            Err(err) => assert_eq!(err.code(), Some(tonic::Code::AlreadyExists), "{err}"),
        }
    }
    drop(workers);
}
