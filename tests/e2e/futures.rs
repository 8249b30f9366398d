//! The many-jobs API end to end: Wait with each `return_when`, timeouts and
//! deadlines; `as_completed`; ListJobs filters and pagination while jobs
//! are added; DeleteJob. Store-dependent behaviour runs on both stores.
//!
//! Jobs that must not finish yet are held back by pausing the pools (they
//! stay pending) or are `async_started` jobs, which signal when they run;
//! tests release them with a resume or a cancel, never with a sleep.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use jobd_client::{JobClient, JobHandle, JobId, JobState, ListFilter, ReturnWhen, Submission};
use jobd_proto::pb;
use serde_json::json;
use tonic::Code;

use crate::harness::{self, Fixtures, TestServer, config, registry};

/// Finished jobs kept in memory by the durable server here: small, so that
/// listings and deletes also meet jobs that are only on disk.
const CACHE_FINISHED: usize = 20;

/// Both stores, with a tiny finished-job cache so that listing also reads
/// jobs back from disk.
async fn on_both_stores<F, Fut>(test: F)
where
    F: Fn(TestServer, Fixtures) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let config = jobd::EngineConfig {
        cache_finished: CACHE_FINISHED,
        ..config(256, 2, 10_000)
    };
    harness::on_both_stores(config, test).await;
}

/// Starts a Wait in the background, so the test can change the jobs while
/// the server waits on them.
fn spawn_wait(
    client: &JobClient,
    jobs: Vec<JobHandle>,
    return_when: ReturnWhen,
    timeout: Option<Duration>,
) -> tokio::task::JoinHandle<jobd_client::WaitResult> {
    let client = client.clone();
    tokio::spawn(async move { client.wait(&jobs, return_when, timeout).await.unwrap() })
}

fn ids(handles: &[JobHandle]) -> Vec<JobId> {
    handles.iter().map(JobHandle::id).collect()
}

/// Submits `n` no-op jobs in one batch and waits until all have finished.
async fn finished_noops(client: &JobClient, n: usize) -> Vec<JobId> {
    let batch = (0..n).map(|i| Submission::new("noop", json!(i))).collect();
    let jobs: Vec<JobHandle> = client
        .submit_batch(batch)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for chunk in jobs.chunks(1000) {
        let split = client
            .wait(chunk, ReturnWhen::AllCompleted, None)
            .await
            .unwrap();
        assert!(split.not_done.is_empty());
    }
    ids(&jobs)
}

#[tokio::test]
async fn first_completed_returns_as_soon_as_one_job_ends() {
    let (registry, mut fx) = registry();
    let server = TestServer::start(
        registry,
        jobd::EngineConfig {
            paused: true,
            ..config(64, 2, 100)
        },
    )
    .await;
    let client = server.client().await;
    let slow = client.submit("async_started", json!("slow")).await.unwrap();
    let quick = client.submit("hello", json!("Ann")).await.unwrap();
    let waiting = spawn_wait(
        &client,
        vec![slow.clone(), quick.clone()],
        ReturnWhen::FirstCompleted,
        None,
    );
    // Both are pending and the Wait waits on both; only now may they run.
    server.until_waiters(2).await;
    server.engine.set_paused(false);
    let split = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("FIRST_COMPLETED returned when the first job ended")
        .unwrap();
    assert_eq!(ids(&split.done), [quick.id()]);
    assert_eq!(ids(&split.not_done), [slow.id()]);
    assert_eq!(fx.started.recv().await.unwrap(), json!("slow"));

    // A job that is already done satisfies it at once.
    let split = client
        .wait([slow.id(), quick.id()], ReturnWhen::FirstCompleted, None)
        .await
        .unwrap();
    assert_eq!(ids(&split.done), [quick.id()]);
    slow.cancel().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn first_exception_returns_on_the_first_failure_not_on_a_cancel() {
    let (registry, mut fx) = registry();
    let server = TestServer::start(
        registry,
        jobd::EngineConfig {
            paused: true,
            ..config(64, 2, 100)
        },
    )
    .await;
    let client = server.client().await;
    let slow = client.submit("async_started", json!("slow")).await.unwrap();
    let cancelled = client.submit("hello", json!(null)).await.unwrap();
    assert!(cancelled.cancel().await.unwrap().cancelled);
    let failing = client.submit("fail", json!("x")).await.unwrap();
    let jobs = vec![slow.clone(), cancelled.clone(), failing.clone()];
    let waiting = spawn_wait(&client, jobs.clone(), ReturnWhen::FirstException, None);
    // A cancelled job is done, but it is not an exception: still waiting.
    server.until_waiters(2).await;
    server.engine.set_paused(false);
    let split = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("FIRST_EXCEPTION returned on the failure")
        .unwrap();
    assert_eq!(ids(&split.done), [cancelled.id(), failing.id()]);
    assert_eq!(ids(&split.not_done), [slow.id()]);
    fx.started.recv().await.unwrap();

    // With no failure, a cancel does not end the wait: only the timeout does.
    let running = client.submit("async_started", json!("r")).await.unwrap();
    fx.started.recv().await.unwrap();
    let start = Instant::now();
    let waiting = spawn_wait(
        &client,
        vec![slow.clone(), running.clone()],
        ReturnWhen::FirstException,
        Some(Duration::from_millis(600)),
    );
    server.until_waiters(2).await;
    running.cancel().await.unwrap();
    let split = waiting.await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(600), "{split:?}");
    assert_eq!(ids(&split.done), [running.id()]);
    assert_eq!(ids(&split.not_done), [slow.id()]);
    slow.cancel().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn all_completed_with_a_timeout_returns_the_split_at_that_moment() {
    let (server, mut fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let slow = client.submit("async_started", json!("slow")).await.unwrap();
    fx.started.recv().await.unwrap();
    let quick = client.submit("hello", json!("Bo")).await.unwrap();
    let start = Instant::now();
    // Repeats count once; unspecified is ALL_COMPLETED.
    let split = client
        .wait(
            [quick.id(), slow.id(), quick.id()],
            ReturnWhen::AllCompleted,
            Some(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(ids(&split.done), [quick.id()]);
    assert_eq!(ids(&split.not_done), [slow.id()]);
    let answer = client
        .rpc()
        .wait(pb::WaitRequest {
            job_ids: vec![quick.id().to_string()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.done, [quick.id().to_string()]);
    assert!(answer.not_done.is_empty());

    // A zero timeout answers at once with what is done.
    let split = client
        .wait([&slow], ReturnWhen::AllCompleted, Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(ids(&split.not_done), [slow.id()]);

    // When everything finishes, ALL_COMPLETED returns without the timeout.
    let start = Instant::now();
    let waiting = spawn_wait(
        &client,
        vec![slow.clone(), quick.clone()],
        ReturnWhen::AllCompleted,
        Some(Duration::from_secs(60)),
    );
    server.until_waiters(1).await;
    slow.cancel().await.unwrap();
    let split = waiting.await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(ids(&split.done), [slow.id(), quick.id()]);
    server.shutdown().await;
}

#[tokio::test]
async fn the_callers_deadline_ends_a_wait_with_a_normal_answer() {
    let (server, mut fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let slow = client.submit("async_started", json!("slow")).await.unwrap();
    fx.started.recv().await.unwrap();
    let mut request = tonic::Request::new(pb::WaitRequest {
        job_ids: vec![slow.id().to_string()],
        return_when: pb::ReturnWhen::AllCompleted.into(),
        timeout: None,
    });
    // Long enough that the server's slack (a tenth) covers a busy machine.
    request.set_timeout(Duration::from_secs(2));
    let start = Instant::now();
    let answer = client.rpc().wait(request).await.unwrap().into_inner();
    // The server answers a little before the deadline (grpc/deadline.rs).
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert!(answer.done.is_empty());
    assert_eq!(answer.not_done, [slow.id().to_string()]);
    slow.cancel().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn bad_waits_are_refused() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let job = client.submit("hello", json!(null)).await.unwrap();
    let wait = |job_ids: Vec<String>, return_when: i32, timeout| {
        let mut rpc = client.rpc();
        async move {
            rpc.wait(pb::WaitRequest {
                job_ids,
                return_when,
                timeout,
            })
            .await
            .unwrap_err()
            .code()
        }
    };
    let good = job.id().to_string();
    assert_eq!(wait(vec![], 0, None).await, Code::InvalidArgument);
    assert_eq!(
        wait(vec!["nope".into()], 0, None).await,
        Code::InvalidArgument
    );
    let too_many = (0..1001).map(|_| JobId::new().to_string()).collect();
    assert_eq!(wait(too_many, 0, None).await, Code::InvalidArgument);
    assert_eq!(
        wait(vec![good.clone()], 99, None).await,
        Code::InvalidArgument
    );
    let negative = prost_types::Duration {
        seconds: -1,
        nanos: 0,
    };
    assert_eq!(
        wait(vec![good.clone()], 0, Some(negative)).await,
        Code::InvalidArgument
    );
    assert_eq!(
        wait(vec![good, JobId::new().to_string()], 0, None).await,
        Code::NotFound
    );
    server.shutdown().await;
}

#[tokio::test]
async fn as_completed_yields_jobs_in_the_order_they_finish() {
    let (server, mut fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let slow = client.submit("async_started", json!("slow")).await.unwrap();
    fx.started.recv().await.unwrap();
    let quick = client.submit("hello", json!(null)).await.unwrap();
    let mut finished = Box::pin(client.as_completed(vec![slow.clone(), quick.clone()]));
    let first = tokio::time::timeout(Duration::from_secs(10), finished.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.id(), quick.id());
    slow.cancel().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), finished.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.id(), slow.id());
    assert_eq!(
        second.outcome(None).await.unwrap().state,
        JobState::Cancelled
    );
    assert!(finished.next().await.is_none());
    // An unknown job is an error in its place, not the end of the stream.
    let unknown = client.job(JobId::new());
    let results: Vec<_> = client.as_completed(vec![unknown]).collect().await;
    assert_eq!(results.len(), 1);
    assert_eq!(
        results[0].as_ref().unwrap_err().code(),
        Some(Code::NotFound)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_walks_every_job_once_while_jobs_are_added() {
    on_both_stores(|server, _fx| async move {
        let client = server.client().await;
        let existing: HashSet<JobId> = finished_noops(&client, 300).await.into_iter().collect();
        // Jobs keep arriving during the whole walk.
        let adder = {
            let client = client.clone();
            tokio::spawn(async move {
                let mut added = Vec::new();
                for round in 0..20 {
                    let batch = (0..10)
                        .map(|i| Submission::new("noop", json!([round, i])))
                        .collect();
                    for job in client.submit_batch(batch).await.unwrap() {
                        added.push(job.unwrap().id());
                    }
                    tokio::task::yield_now().await;
                }
                added
            })
        };
        let mut walked = Vec::new();
        let mut token = None;
        for _ in 0..1000 {
            let page = client
                .list_jobs(&ListFilter::default(), 7, token)
                .await
                .unwrap();
            assert!(page.jobs.len() <= 7);
            walked.extend(page.jobs.iter().map(|j| j.id));
            match page.next_page_token {
                Some(next) => token = Some(next),
                None => {
                    token = None;
                    break;
                }
            }
        }
        assert!(token.is_none(), "the walk never ended");
        let added = adder.await.unwrap();
        let unique: HashSet<JobId> = walked.iter().copied().collect();
        assert_eq!(unique.len(), walked.len(), "a job was listed twice");
        assert!(walked.windows(2).all(|w| w[0] > w[1]), "not newest first");
        for id in &existing {
            assert!(unique.contains(id), "job {id} was skipped");
        }
        // Whatever else was listed was added during the walk.
        let added: HashSet<JobId> = added.into_iter().collect();
        assert!(
            unique
                .iter()
                .all(|id| existing.contains(id) || added.contains(id))
        );

        // The helper that walks every page sees the same, and more.
        let all: Vec<JobId> = client
            .list_all(ListFilter::default())
            .map_ok(|job| job.id)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(all.len(), 500);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_state_function_labels_and_time() {
    on_both_stores(|server, mut fx| async move {
        let client = server.client().await;
        let a = client
            .submit_with(Submission::new("hello", json!("a")).label("team", "a"))
            .await
            .unwrap();
        a.result().await.unwrap();
        let b = client
            .submit_with(
                Submission::new("echo", json!("b"))
                    .label("team", "b")
                    .label("tier", "gold"),
            )
            .await
            .unwrap();
        b.result().await.unwrap();
        let c = client.submit("fail", json!("c")).await.unwrap();
        c.outcome(None).await.unwrap();
        // Enough finished jobs that a, b and c leave the durable server's
        // memory and are read from disk.
        finished_noops(&client, 2 * CACHE_FINISHED).await;
        let running = client.submit("async_started", json!("r")).await.unwrap();
        fx.started.recv().await.unwrap();

        let list = |filter: ListFilter| {
            let client = client.clone();
            async move {
                let jobs: Vec<JobId> = client
                    .list_all(filter)
                    .map_ok(|job| job.id)
                    .try_collect()
                    .await
                    .unwrap();
                jobs
            }
        };
        let f = ListFilter::default;
        assert_eq!(list(f().function("hello")).await, [a.id()]);
        assert_eq!(list(f().label("team", "b")).await, [b.id()]);
        assert_eq!(
            list(f().label("team", "b").label("tier", "silver")).await,
            []
        );
        assert_eq!(list(f().state(JobState::Failed)).await, [c.id()]);
        assert_eq!(
            list(f().state(JobState::Failed).function("hello")).await,
            []
        );
        // The running job's claim may not be on disk yet: the server's
        // memory is the fresher source, and listing follows it.
        assert_eq!(list(f().state(JobState::Running)).await, [running.id()]);
        assert_eq!(list(f().state(JobState::Pending)).await, []);
        let mut both = f().state(JobState::Failed);
        both.states.push(JobState::Running);
        assert_eq!(list(both).await, [running.id(), c.id()]);

        let a_time = a.status().await.unwrap().submitted_at.unwrap();
        let b_time = b.status().await.unwrap().submitted_at.unwrap();
        let window = ListFilter {
            submitted_after: Some(a_time),
            submitted_before: Some(b_time + Duration::from_micros(1)),
            ..f()
        };
        assert_eq!(list(window).await, [b.id()]);
        let before_b = ListFilter {
            submitted_before: Some(b_time),
            ..f()
        };
        assert_eq!(list(before_b).await, [a.id()]);

        // Pages carry the whole job.
        let page = client
            .list_jobs(&f().function("echo"), 0, None)
            .await
            .unwrap();
        assert_eq!(page.jobs.len(), 1);
        assert_eq!(page.jobs[0].args, json!("b"));
        assert_eq!(page.jobs[0].state, JobState::Succeeded);
        assert!(page.next_page_token.is_none());
        running.cancel().await.unwrap();
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn page_sizes_and_tokens_follow_aip_158() {
    let (registry, _fx) = registry();
    let server = TestServer::start(registry, config(256, 2, 10_000)).await;
    let client = server.client().await;
    finished_noops(&client, 1001).await;
    // 0 is the default of 100; above the maximum is coerced to 1,000.
    let page = client
        .list_jobs(&ListFilter::default(), 0, None)
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 100);
    let page = client
        .list_jobs(&ListFilter::default(), 5000, None)
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 1000);
    let token = page.next_page_token.expect("one more job");
    let last = client
        .list_jobs(&ListFilter::default(), 1000, Some(token.clone()))
        .await
        .unwrap();
    assert_eq!(last.jobs.len(), 1);
    assert!(last.next_page_token.is_none());

    let mut rpc = client.rpc();
    let refused = |request: pb::ListJobsRequest| {
        let mut rpc = rpc.clone();
        async move { rpc.list_jobs(request).await.unwrap_err() }
    };
    let status = refused(pb::ListJobsRequest {
        page_size: -1,
        ..Default::default()
    })
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("page_size"), "{status:?}");
    for garbage in ["x", "zz", &"0".repeat(48), &token[..40]] {
        let status = refused(pb::ListJobsRequest {
            page_token: garbage.to_owned(),
            ..Default::default()
        })
        .await;
        assert_eq!(status.code(), Code::InvalidArgument, "{garbage:?}");
    }
    // A token is only good with the filters it was made for.
    let status = refused(pb::ListJobsRequest {
        function: "noop".into(),
        page_token: token.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("filters"), "{status:?}");
    let status = refused(pb::ListJobsRequest {
        states: vec![0],
        ..Default::default()
    })
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    // The page size may change from page to page.
    let answer = rpc
        .list_jobs(pb::ListJobsRequest {
            page_size: 1,
            page_token: token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.jobs.len(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_forgets_finished_jobs_and_refuses_unfinished_ones() {
    on_both_stores(|server, mut fx| async move {
        let client = server.client().await;
        let old = client
            .submit_with(Submission::new("hello", json!("old")).request_id("del-1"))
            .await
            .unwrap();
        old.result().await.unwrap();
        // `old` leaves the durable server's memory: deleted from disk.
        finished_noops(&client, 2 * CACHE_FINISHED).await;
        let recent = client.submit("hello", json!("recent")).await.unwrap();
        recent.result().await.unwrap();

        for job in [&old, &recent] {
            job.delete().await.unwrap();
            let err = job.status().await.unwrap_err();
            assert_eq!(err.code(), Some(Code::NotFound), "{err}");
            assert!(err.to_string().contains("was deleted"), "{err}");
            // A wait on it answers at once; it never hangs.
            let err = tokio::time::timeout(Duration::from_secs(10), job.result())
                .await
                .expect("Result on a deleted job answered")
                .unwrap_err();
            assert!(err.to_string().contains("was deleted"), "{err}");
            let err = client
                .wait([job.id()], ReturnWhen::AllCompleted, None)
                .await
                .unwrap_err();
            assert_eq!(err.code(), Some(Code::NotFound), "{err}");
            let err = job.delete().await.unwrap_err();
            assert!(err.to_string().contains("was deleted"), "{err}");
        }
        let listed: HashSet<JobId> = client
            .list_all(ListFilter::default())
            .map_ok(|job| job.id)
            .try_collect()
            .await
            .unwrap();
        assert!(!listed.contains(&old.id()) && !listed.contains(&recent.id()));
        // Its request id is free again.
        let again = client
            .submit_with(Submission::new("hello", json!("old")).request_id("del-1"))
            .await
            .unwrap();
        assert_ne!(again.id(), old.id());

        let running = client.submit("async_started", json!("r")).await.unwrap();
        fx.started.recv().await.unwrap();
        // Both blocking workers busy, so the next blocking job stays pending.
        let mut blockers = Vec::new();
        for n in 0..2 {
            blockers.push(client.submit("polite_started", json!(n)).await.unwrap());
            fx.started.recv().await.unwrap();
        }
        let pending = client
            .submit("return_future", json!(["p", 0]))
            .await
            .unwrap();
        for job in [&running, &pending] {
            let err = job.delete().await.unwrap_err();
            assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
            assert!(err.to_string().contains("cancel it first"), "{err}");
            assert!(
                !job.done().await.unwrap(),
                "a refused delete changed the job"
            );
        }
        running.cancel().await.unwrap();
        running.delete().await.unwrap();
        for blocker in &blockers {
            blocker.cancel().await.unwrap();
        }
        assert_eq!(pending.result().await.unwrap(), json!("p"));

        let err = client.job(JobId::new()).delete().await.unwrap_err();
        assert_eq!(err.code(), Some(Code::NotFound), "{err}");
        assert!(!err.to_string().contains("deleted"), "{err}");
        let err = client
            .rpc()
            .delete_job(pb::DeleteJobRequest {
                job_id: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        server.shutdown().await;
    })
    .await;
}
