//! Job options on Submit: priority order as the job functions themselves see
//! it, on both stores and across a restart, and the bounds on priority.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use jobd::{EngineConfig, Registry, StoreConfig};
use jobd_client::{ErrorKind, JobHandle, Submission};
use jobd_proto::pb;
use serde_json::json;
use tonic::Code;

use crate::harness::{TestServer, config, registry};

/// The order in which `record_order` jobs ran, by their argument.
type Seen = Arc<Mutex<Vec<String>>>;

/// The fixture registry plus a blocking `record_order` function that
/// appends its (string) argument to the returned list when it starts.
fn recording_registry() -> (Registry, Seen) {
    let (mut registry, _fx) = registry();
    let seen = Seen::default();
    let log = Arc::clone(&seen);
    registry.register_blocking(
        "record_order",
        "appends its argument to the test's list",
        move |_ctx, args| {
            let name = args.as_str().unwrap_or_default().to_owned();
            log.lock().unwrap().push(name);
            Ok(json!(null))
        },
    );
    (registry, seen)
}

/// One blocking worker and both pools paused, so every job is queued before
/// any starts and the start order is the queue's order alone.
fn paused_single_worker() -> EngineConfig {
    EngineConfig {
        paused: true,
        ..config(4, 1, 100)
    }
}

/// Submits `record_order` jobs named and prioritised as given, in order.
async fn submit_all(server: &TestServer, jobs: &[(&str, i32)]) -> Vec<JobHandle> {
    let client = server.client().await;
    let mut handles = Vec::new();
    for &(name, priority) in jobs {
        let submission = Submission::new("record_order", json!(name)).priority(priority);
        handles.push(client.submit_with(submission).await.unwrap());
    }
    handles
}

async fn finish_all(handles: &[JobHandle]) {
    for handle in handles {
        handle
            .result_timeout(Duration::from_secs(30))
            .await
            .unwrap();
    }
}

/// Submitted low first; must start highest first, FIFO among equals.
const MIXED: [(&str, i32); 7] = [
    ("a0", 0),
    ("b5", 5),
    ("c0", 0),
    ("d-3", -3),
    ("e5", 5),
    ("f1000", 1000),
    ("g-1000", -1000),
];
const MIXED_ORDER: [&str; 7] = ["f1000", "b5", "e5", "a0", "c0", "d-3", "g-1000"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_starts_first_and_equal_ones_in_submission_order() {
    let dir = tempfile::tempdir().unwrap();
    for store in [
        StoreConfig::Memory,
        StoreConfig::Sqlite {
            dir: dir.path().to_owned(),
        },
    ] {
        let (registry, seen) = recording_registry();
        let server = TestServer::start_on(
            registry,
            paused_single_worker(),
            Duration::from_secs(5),
            &store,
        )
        .await;
        let handles = submit_all(&server, &MIXED).await;
        // GetJob shows the priority each job was given.
        for (handle, &(_, priority)) in handles.iter().zip(&MIXED) {
            assert_eq!(handle.status().await.unwrap().priority, priority);
        }
        assert!(seen.lock().unwrap().is_empty(), "paused, yet jobs started");
        server.engine.set_paused(false);
        finish_all(&handles).await;
        assert_eq!(*seen.lock().unwrap(), MIXED_ORDER, "store {store:?}");
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    let (registry, seen) = recording_registry();
    let server = TestServer::start_on(
        registry,
        paused_single_worker(),
        Duration::from_secs(5),
        &store,
    )
    .await;
    let ids: Vec<_> = submit_all(&server, &MIXED)
        .await
        .iter()
        .map(JobHandle::id)
        .collect();
    // Paused, so nothing ran: every job is still pending on disk.
    server.shutdown().await;
    assert!(seen.lock().unwrap().is_empty());

    let (registry, seen) = recording_registry();
    let server = TestServer::start_on(
        registry,
        paused_single_worker(),
        Duration::from_secs(5),
        &store,
    )
    .await;
    let client = server.client().await;
    let handles: Vec<_> = ids.into_iter().map(|id| client.job(id)).collect();
    for (handle, &(_, priority)) in handles.iter().zip(&MIXED) {
        assert_eq!(handle.status().await.unwrap().priority, priority);
    }
    server.engine.set_paused(false);
    finish_all(&handles).await;
    assert_eq!(*seen.lock().unwrap(), MIXED_ORDER);
    server.shutdown().await;
}

#[tokio::test]
async fn priority_out_of_range_is_invalid_argument() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let mut rpc = server.client().await.rpc();
    for priority in [1001, -1001, i32::MAX, i32::MIN] {
        let status = rpc
            .submit(pb::SubmitRequest {
                function: "hello".into(),
                priority,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{priority}: {status:?}"
        );
        assert!(status.message().contains("priority"), "{status:?}");
    }
    assert_eq!(server.engine.job_count(), 0);
    for priority in [-1000, 1000] {
        let request = pb::SubmitRequest {
            function: "hello".into(),
            priority,
            ..Default::default()
        };
        rpc.submit(request).await.unwrap();
    }
    server.shutdown().await;
}

/// Submits one `record_order` job with `options` applied.
async fn submit_one(
    server: &TestServer,
    name: &str,
    options: impl FnOnce(Submission) -> Submission,
) -> JobHandle {
    let client = server.client().await;
    client
        .submit_with(options(Submission::new("record_order", json!(name))))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_waits_for_its_time_and_others_overtake_it() {
    let (registry, seen) = recording_registry();
    let server = TestServer::start(registry, config(4, 1, 100)).await;
    let delay = Duration::from_millis(300);
    let late = submit_one(&server, "late", |s| s.delay(delay)).await;
    let info = late.status().await.unwrap();
    assert_eq!(info.state, jobd_client::JobState::Pending);
    let not_before = info.not_before.expect("GetJob shows not_before");
    let submitted = info.submitted_at.unwrap();
    // The delay counts from validation, a moment before submitted_at.
    let ahead = not_before.duration_since(submitted).unwrap_or_default();
    assert!(
        ahead <= delay && ahead > delay - Duration::from_millis(100),
        "{ahead:?}"
    );
    // Submitted after it, yet runs first: the delayed job is not queued.
    let now = submit_one(&server, "now", |s| s).await;
    finish_all(&[now, late.clone()]).await;
    assert_eq!(*seen.lock().unwrap(), ["now", "late"]);
    let started = late.status().await.unwrap().started_at.unwrap();
    assert!(
        started >= not_before,
        "started {started:?} before {not_before:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_delayed_job_can_be_cancelled_and_gives_its_slot_back() {
    let (registry, seen) = recording_registry();
    let server = TestServer::start(registry, config(4, 1, 1)).await;
    let job = submit_one(&server, "never", |s| s.delay(Duration::from_secs(600))).await;
    assert_eq!(
        server.engine.queued("blocking"),
        1,
        "the delayed job holds its slot"
    );
    let report = job.cancel().await.unwrap();
    assert!(report.cancelled, "{report:?}");
    assert_eq!(
        job.status().await.unwrap().state,
        jobd_client::JobState::Cancelled
    );
    assert_eq!(server.engine.queued("blocking"), 0);
    // The one slot is free again.
    let next = submit_one(&server, "next", |s| s).await;
    finish_all(&[next]).await;
    assert_eq!(*seen.lock().unwrap(), ["next"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_before_in_the_past_is_queued_at_once() {
    let (registry, seen) = recording_registry();
    let server = TestServer::start(registry, paused_single_worker()).await;
    let past = std::time::SystemTime::now() - Duration::from_secs(3600);
    let first = submit_one(&server, "past", |s| s.not_before(past)).await;
    let second = submit_one(&server, "plain", |s| s).await;
    server.engine.set_paused(false);
    finish_all(&[first, second]).await;
    assert_eq!(*seen.lock().unwrap(), ["past", "plain"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_stays_delayed_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    let (registry, _seen) = recording_registry();
    let server =
        TestServer::start_on(registry, config(4, 1, 100), Duration::from_secs(5), &store).await;
    let id = submit_one(&server, "late", |s| s.delay(Duration::from_millis(500)))
        .await
        .id();
    server.shutdown().await;

    let (registry, seen) = recording_registry();
    let server =
        TestServer::start_on(registry, config(4, 1, 100), Duration::from_secs(5), &store).await;
    let client = server.client().await;
    let late = client.job(id);
    let not_before = late.status().await.unwrap().not_before.expect("kept");
    let now = submit_one(&server, "now", |s| s).await;
    finish_all(&[now, late.clone()]).await;
    assert_eq!(*seen.lock().unwrap(), ["now", "late"]);
    let started = late.status().await.unwrap().started_at.unwrap();
    assert!(
        started >= not_before,
        "started {started:?} before {not_before:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn bad_delays_are_invalid_argument() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let mut rpc = server.client().await.rpc();
    let secs = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let cases = [
        pb::SubmitRequest {
            delay: secs(-1),
            ..Default::default()
        },
        pb::SubmitRequest {
            delay: secs(31 * 86_400),
            ..Default::default()
        },
        pb::SubmitRequest {
            delay: secs(1),
            not_before: Some(std::time::SystemTime::now().into()),
            ..Default::default()
        },
        pb::SubmitRequest {
            not_before: Some(
                (std::time::SystemTime::now() + Duration::from_secs(40 * 86_400)).into(),
            ),
            ..Default::default()
        },
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let request = pb::SubmitRequest {
            function: "hello".into(),
            ..case
        };
        let status = rpc.submit(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "case {i}: {status:?}");
    }
    assert_eq!(server.engine.job_count(), 0);
    server.shutdown().await;
}

/// Waits (bounded) for the job and returns its failure kind and message.
async fn failure(job: &JobHandle) -> (ErrorKind, String) {
    match job.result_timeout(Duration::from_secs(30)).await {
        Err(jobd_client::Error::JobFailed { kind, message, .. }) => (kind, message),
        other => panic!("expected a failed job, got {other:?}"),
    }
}

#[tokio::test]
async fn a_timeout_aborts_an_async_job() {
    let (server, mut fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let job = client
        .submit_with(
            Submission::new("async_started", json!("a")).timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    fx.started.recv().await.unwrap();
    let (kind, message) = failure(&job).await;
    assert_eq!(kind, ErrorKind::TimedOut, "{message}");
    let info = job.status().await.unwrap();
    assert_eq!(info.state, jobd_client::JobState::Failed);
    assert_eq!(info.timeout, Some(Duration::from_millis(200)));
    // Aborted: the task is gone, so shutdown has nothing to wait for.
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_fails_a_blocking_job_at_the_limit() {
    let (server, mut fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    // Ignores its cancel token and sleeps 3 s: the job fails at the limit
    // anyway, long before the function returns.
    let stubborn = client
        .submit_with(
            Submission::new("blocking_started", json!(3000)).timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    fx.started.recv().await.unwrap();
    let begun = std::time::Instant::now();
    let (kind, message) = failure(&stubborn).await;
    assert_eq!(kind, ErrorKind::TimedOut, "{message}");
    assert!(
        begun.elapsed() < Duration::from_millis(2500),
        "{:?}",
        begun.elapsed()
    );
    // Honours its cancel token, so it returns "cancelled" at once: that late
    // outcome does not replace the timeout.
    let polite = client
        .submit_with(
            Submission::new("polite_started", json!("p")).timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    fx.started.recv().await.unwrap();
    let (kind, message) = failure(&polite).await;
    assert_eq!(kind, ErrorKind::TimedOut, "{message}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    let paused = EngineConfig {
        paused: true,
        ..config(4, 1, 100)
    };
    let (first, _fx) = registry();
    let server = TestServer::start_on(first, paused.clone(), Duration::from_secs(5), &store).await;
    let limit = Duration::from_millis(200);
    let id = server
        .client()
        .await
        .submit_with(Submission::new("async_started", json!("r")).timeout(limit))
        .await
        .unwrap()
        .id();
    server.shutdown().await;

    let (second, mut fx) = registry();
    let server = TestServer::start_on(second, paused, Duration::from_secs(5), &store).await;
    let job = server.client().await.job(id);
    assert_eq!(job.status().await.unwrap().timeout, Some(limit));
    server.engine.set_paused(false);
    fx.started.recv().await.unwrap();
    let (kind, message) = failure(&job).await;
    assert_eq!(kind, ErrorKind::TimedOut, "{message}");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_timeouts_are_invalid_argument() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let mut rpc = server.client().await.rpc();
    for seconds in [-1, 0, 31 * 86_400] {
        let request = pb::SubmitRequest {
            function: "hello".into(),
            timeout: Some(prost_types::Duration { seconds, nanos: 0 }),
            ..Default::default()
        };
        let status = rpc.submit(request).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{seconds}: {status:?}"
        );
        assert!(status.message().contains("timeout"), "{status:?}");
    }
    server.shutdown().await;
}

/// A registry with `flaky`: fails with a retryable error until it has been
/// called `args` times, then succeeds; the returned counter counts calls.
fn flaky_registry() -> (Registry, Arc<std::sync::atomic::AtomicU32>) {
    use std::sync::atomic::{AtomicU32, Ordering};
    let (mut registry, _fx) = registry();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    registry.register_async(
        "flaky",
        "retryable until the n-th call",
        move |ctx, args| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let succeed_at = u32::try_from(args.as_u64().unwrap_or(u64::MAX)).unwrap_or(u32::MAX);
            async move {
                assert_eq!(ctx.attempt(), n, "one call per attempt");
                if n >= succeed_at {
                    Ok(json!(n))
                } else {
                    Err(jobd::JobError::Retryable(format!("call {n} failed")))
                }
            }
        },
    );
    (registry, calls)
}

/// The in-memory store on tokio's paused clock: the backoffs between
/// attempts pass in virtual time, and are checked.
#[tokio::test(start_paused = true)]
async fn retryable_failures_retry_up_to_max_attempts_in_memory() {
    retries_on(&StoreConfig::Memory, jobd::Clock::tokio()).await;
}

/// The SQLite store in real time (its writer answers from a thread of its
/// own, which a paused runtime cannot wait for); the backoffs are short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_retry_up_to_max_attempts_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    retries_on(&store, jobd::Clock::system()).await;
}

async fn retries_on(store: &StoreConfig, clock: jobd::Clock) {
    use std::sync::atomic::Ordering;
    // Succeeds on the 3rd call, within 5 attempts.
    let (registry, calls) = flaky_registry();
    let server = TestServer::start_on(
        registry,
        jobd::EngineConfig {
            clock,
            ..config(4, 1, 100)
        },
        Duration::from_secs(5),
        store,
    )
    .await;
    let client = server.client().await;
    let submitted = tokio::time::Instant::now();
    let job = client
        .submit_with(Submission::new("flaky", json!(3)).max_attempts(5))
        .await
        .unwrap();
    assert_eq!(
        job.result_timeout(Duration::from_secs(30)).await.unwrap(),
        json!(3)
    );
    // Two backoffs: after attempt 1 at least 50 ms (100 ms with jitter in
    // [0.5, 1)), after attempt 2 at least 100 ms.
    let waited = submitted.elapsed();
    assert!(
        waited >= Duration::from_millis(150),
        "retried without backing off: {waited:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let info = job.status().await.unwrap();
    assert_eq!((info.attempt, info.max_attempts), (3, 5));

    // Never succeeds: exactly 3 attempts, then FAILED with the last error.
    calls.store(0, Ordering::SeqCst);
    let job = client
        .submit_with(Submission::new("flaky", json!(1000)).max_attempts(3))
        .await
        .unwrap();
    let (kind, message) = failure(&job).await;
    assert_eq!(kind, ErrorKind::Failed);
    assert_eq!(message, "call 3 failed");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(job.status().await.unwrap().attempt, 3);

    // Without max_attempts a retryable error is final.
    calls.store(0, Ordering::SeqCst);
    let job = client.submit("flaky", json!(2)).await.unwrap();
    failure(&job).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn max_attempts_out_of_range_is_invalid_argument() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let mut rpc = server.client().await.rpc();
    let request = pb::SubmitRequest {
        function: "hello".into(),
        max_attempts: 101,
        ..Default::default()
    };
    let status = rpc.submit(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    server.shutdown().await;
}
