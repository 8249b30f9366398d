//! The conformance suite: the same tests against every store, so that each
//! keeps the interface's promises the same way (a PostgreSQL store will run
//! them too). Each test is written once, against `&dyn JobStore`, and
//! instantiated per store by `for_each_store!`; time is tokio's paused clock,
//! moved on explicitly. The last test is a model test: random sequences of
//! the operations executors and clients perform, checked against a small
//! model of a job's life.

use std::{collections::BTreeMap, num::NonZeroUsize, sync::Arc, time::Duration};

use futures::{FutureExt as _, StreamExt as _};
use jobd_proto::{JobId, JobState};
use serde_json::json;

use super::{
    CancelResult, ClaimRequest, Claimed, Deleted, EventItem, EventKind, Fenced, Gone, JobStore,
    LeaseState, ListFilter, Maintenance, Missing, NewJob, Purge, QueueName, StoreConfig,
    StoreOptions, Submitted,
};
use crate::{
    clock::Clock,
    job::{JobError, PoolName},
};

/// A store under test, with what keeps it alive.
struct Subject {
    store: Arc<dyn JobStore>,
    clock: Clock,
    _dir: Option<tempfile::TempDir>,
}

fn options(clock: &Clock, max_queued: usize) -> StoreOptions {
    StoreOptions {
        pools: vec![
            PoolName::from("async"),
            PoolName::from("blocking"),
            PoolName::from("worker"),
        ],
        routed: vec![PoolName::from("worker")],
        max_queued,
        priority_aging: Duration::ZERO,
        event_history: NonZeroUsize::new(1024).unwrap(),
        cache_finished: 2,
        clock: clock.clone(),
        #[cfg(feature = "fault-injection")]
        faults: super::Faults::default(),
    }
}

fn memory(max_queued: usize) -> Subject {
    let clock = Clock::tokio();
    Subject {
        store: super::open(&StoreConfig::Memory, options(&clock, max_queued)).unwrap(),
        clock,
        _dir: None,
    }
}

fn sqlite(max_queued: usize) -> Subject {
    let clock = Clock::tokio();
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    Subject {
        store: super::open(&config, options(&clock, max_queued)).unwrap(),
        clock,
        _dir: Some(dir),
    }
}

/// One test per store: `memory::NAME` and `sqlite::NAME`, each on a paused
/// clock, with queues of `QUEUE` places (100 unless given).
macro_rules! for_each_store {
    ($($name:ident $(($queue:expr))?),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(start_paused = true)]
                async fn $name() {
                    super::$name(super::memory(for_each_store!(@queue $($queue)?))).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(start_paused = true)]
                async fn $name() {
                    super::$name(super::sqlite(for_each_store!(@queue $($queue)?))).await;
                }
            )*
        }
    };
    (@queue $queue:expr) => { $queue };
    (@queue) => { 100 };
}

for_each_store!(
    claims_follow_priority_then_submission_and_hand_out_increasing_leases,
    a_request_id_admits_one_job_and_tells_same_content_from_different,
    a_full_queue_and_a_closed_store_refuse_and_claims_end(2),
    only_the_current_lease_completes_and_a_terminal_job_never_changes,
    a_retry_waits_for_its_time_and_supersedes_the_old_lease,
    a_released_job_runs_again_at_once,
    cancel_records_the_request_and_says_what_it_found,
    a_lapsed_lease_puts_the_job_back_and_refuses_its_holder,
    a_job_that_keeps_losing_its_holder_fails_and_one_not_safe_to_retry_fails_at_once,
    delete_refuses_unfinished_jobs_and_leaves_a_tombstone,
    retention_removes_jobs_finished_before_the_cutoff,
    listing_filters_compare_exact_times_and_pages_cover_every_job,
    a_delayed_job_is_claimable_only_once_due,
    the_event_stream_numbers_changes_in_order_and_coalesces_progress,
    a_waiter_wakes_when_the_job_finishes,
);

fn job(function: &str) -> NewJob {
    NewJob {
        function: Arc::from(function),
        pool: PoolName::from("async"),
        args: json!(null),
        labels: BTreeMap::new(),
        worker_labels: BTreeMap::new(),
        request_id: None,
        priority: 0,
        not_before: None,
        timeout: None,
        max_attempts: 1,
        retry_safe: true,
    }
}

async fn submit(store: &dyn JobStore, job: NewJob) -> JobId {
    match store.submit(job).await.unwrap() {
        Submitted::New(id) => id,
        other => panic!("expected a new job, got {other:?}"),
    }
}

fn request(ttl: Option<Duration>) -> ClaimRequest {
    ClaimRequest {
        queue: QueueName::pool(&PoolName::from("async")),
        holder: Arc::from("test"),
        ttl,
    }
}

/// A claim that does not wait: the job due now, if any.
async fn try_claim(store: &dyn JobStore, ttl: Option<Duration>) -> Option<Claimed> {
    store
        .claim(&request(ttl))
        .now_or_never()
        .and_then(|claimed| claimed.unwrap())
}

async fn claim(store: &dyn JobStore) -> Claimed {
    try_claim(store, None).await.expect("a job is due")
}

async fn state(store: &dyn JobStore, id: JobId) -> JobState {
    store.flush().await.unwrap();
    store.state(id).await.unwrap().unwrap()
}

async fn claims_follow_priority_then_submission_and_hand_out_increasing_leases(s: Subject) {
    let store = &*s.store;
    let low = submit(store, job("a")).await;
    let high = submit(
        store,
        NewJob {
            priority: 5,
            ..job("b")
        },
    )
    .await;
    let low_too = submit(store, job("c")).await;
    assert_eq!(state(store, low).await, JobState::Pending);
    let order: Vec<Claimed> = vec![claim(store).await, claim(store).await, claim(store).await];
    let ids: Vec<JobId> = order.iter().map(|c| c.lease.job).collect();
    assert_eq!(ids, [high, low, low_too]);
    assert!(
        order
            .windows(2)
            .all(|w| w[0].lease.token < w[1].lease.token)
    );
    assert!(order.iter().all(|c| c.lease.attempt == 1));
    assert_eq!(&*order[0].function, "b");
    assert_eq!(state(store, high).await, JobState::Running);
    assert!(try_claim(store, None).await.is_none(), "nothing left");
}

async fn a_request_id_admits_one_job_and_tells_same_content_from_different(s: Subject) {
    let store = &*s.store;
    let with_id = |args| NewJob {
        request_id: Some("order-7".into()),
        args,
        ..job("charge")
    };
    let first = submit(store, with_id(json!({"a": 1, "b": 2}))).await;
    // Key order does not matter: the same content.
    assert_eq!(
        store
            .submit(with_id(json!({"b": 2, "a": 1})))
            .await
            .unwrap(),
        Submitted::Existing {
            id: first,
            same_content: true
        }
    );
    assert_eq!(
        store.submit(with_id(json!({"a": 2}))).await.unwrap(),
        Submitted::Existing {
            id: first,
            same_content: false
        }
    );
    assert_eq!(claim(store).await.lease.job, first);
    assert!(try_claim(store, None).await.is_none(), "one job only");
}

async fn a_full_queue_and_a_closed_store_refuse_and_claims_end(s: Subject) {
    // A queue of two places: the bound is the store's, per pool.
    let store = &*s.store;
    submit(store, job("a")).await;
    submit(store, job("b")).await;
    assert_eq!(
        store.submit(job("c")).await.unwrap(),
        Submitted::QueueFull { capacity: 2 }
    );
    // A claim frees a place.
    claim(store).await;
    submit(store, job("c")).await;
    store.close();
    assert_eq!(store.submit(job("d")).await.unwrap(), Submitted::Closed);
    assert!(
        store.claim(&request(None)).await.unwrap().is_none(),
        "a claim on a closed store ends"
    );
}

async fn only_the_current_lease_completes_and_a_terminal_job_never_changes(s: Subject) {
    let store = &*s.store;
    let id = submit(store, job("a")).await;
    let claimed = claim(store).await;
    let mut stale = claimed.lease.clone();
    stale.token.0 -= 1;
    assert_eq!(
        store.complete(&stale, Ok(json!("no"))).await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        store.complete(&claimed.lease, Ok(json!(42))).await.unwrap(),
        Fenced::Applied
    );
    assert_eq!(state(store, id).await, JobState::Succeeded);
    // Every later write with that lease is a repeat (a report sent again),
    // with the stale one it is stale, and nothing changes.
    assert_eq!(
        store
            .complete(&claimed.lease, Err(JobError::failed("late")))
            .await
            .unwrap(),
        Fenced::Repeated
    );
    assert_eq!(
        store.retry(&claimed.lease, s.clock.now()).await.unwrap(),
        Fenced::Repeated
    );
    assert_eq!(
        store.release(&claimed.lease).await.unwrap(),
        Fenced::Repeated
    );
    assert_eq!(store.release(&stale).await.unwrap(), Fenced::Stale);
    assert_eq!(store.cancel(id).await.unwrap(), CancelResult::AlreadyDone);
    store.flush().await.unwrap();
    let record = store.get(id).await.unwrap().unwrap();
    assert_eq!(record.state, JobState::Succeeded);
    assert_eq!(record.outcome, Some(Ok(json!(42))));
    assert_eq!(record.attempt, 1);
    assert!(record.finished_at.is_some() && record.started_at.is_some());
}

async fn a_retry_waits_for_its_time_and_supersedes_the_old_lease(s: Subject) {
    let store = &*s.store;
    let id = submit(store, job("a")).await;
    let first = claim(store).await;
    let due = s.clock.now() + Duration::from_secs(5);
    assert_eq!(
        store.retry(&first.lease, due).await.unwrap(),
        Fenced::Applied
    );
    assert_eq!(state(store, id).await, JobState::Pending);
    assert!(try_claim(store, None).await.is_none(), "not due yet");
    tokio::time::advance(Duration::from_secs(5)).await;
    let second = claim(store).await;
    assert_eq!(second.lease.job, id);
    assert_eq!(second.lease.attempt, 2);
    assert!(second.lease.token > first.lease.token);
    // The first attempt's end was recorded (the retry): its lease can
    // only repeat, and changes nothing.
    assert_eq!(
        store.complete(&first.lease, Ok(json!(1))).await.unwrap(),
        Fenced::Repeated
    );
    assert_eq!(
        store.complete(&second.lease, Ok(json!(2))).await.unwrap(),
        Fenced::Applied
    );
    store.flush().await.unwrap();
    let record = store.get(id).await.unwrap().unwrap();
    assert_eq!((record.attempt, record.outcome), (2, Some(Ok(json!(2)))));
}

async fn a_released_job_runs_again_at_once(s: Subject) {
    let store = &*s.store;
    let id = submit(store, job("a")).await;
    let first = claim(store).await;
    assert_eq!(store.release(&first.lease).await.unwrap(), Fenced::Applied);
    assert_eq!(state(store, id).await, JobState::Pending);
    let second = claim(store).await;
    assert_eq!((second.lease.job, second.lease.attempt), (id, 2));
    assert_eq!(store.release(&first.lease).await.unwrap(), Fenced::Repeated);
}

async fn cancel_records_the_request_and_says_what_it_found(s: Subject) {
    let store = &*s.store;
    let pending = submit(store, job("a")).await;
    let running = submit(store, job("b")).await;
    assert_eq!(
        store.cancel(pending).await.unwrap(),
        CancelResult::Cancelled
    );
    assert_eq!(state(store, pending).await, JobState::Cancelled);
    let claimed = claim(store).await;
    assert_eq!(
        claimed.lease.job, running,
        "the cancelled job is never claimed"
    );
    match store.cancel(running).await.unwrap() {
        CancelResult::Requested {
            lease,
            holder,
            pool,
        } => {
            assert_eq!(lease, claimed.lease);
            assert_eq!(&*holder, "test");
            assert_eq!(pool.as_str(), "async");
        }
        other => panic!("expected Requested, got {other:?}"),
    }
    // Recorded, not acted on: still running, and its holder can see it.
    assert_eq!(state(store, running).await, JobState::Running);
    assert!(matches!(
        store
            .renew(&claimed.lease, Duration::from_secs(1))
            .await
            .unwrap(),
        LeaseState::CancelRequested { .. }
    ));
    // The holder honours it.
    assert_eq!(
        store
            .complete(&claimed.lease, Err(JobError::Cancelled))
            .await
            .unwrap(),
        Fenced::Applied
    );
    assert_eq!(state(store, running).await, JobState::Cancelled);
    assert_eq!(
        store.cancel(running).await.unwrap(),
        CancelResult::AlreadyDone
    );
    assert_eq!(
        store.cancel(JobId::new()).await.unwrap(),
        CancelResult::Missing(Missing::Unknown)
    );
}

async fn a_lapsed_lease_puts_the_job_back_and_refuses_its_holder(s: Subject) {
    let store = &*s.store;
    let id = submit(store, job("a")).await;
    let ttl = Some(Duration::from_secs(10));
    let lost = try_claim(store, ttl).await.unwrap();
    // Renewed in time: it holds.
    tokio::time::advance(Duration::from_secs(8)).await;
    assert!(matches!(
        store
            .renew(&lost.lease, Duration::from_secs(10))
            .await
            .unwrap(),
        LeaseState::Live { .. }
    ));
    tokio::time::advance(Duration::from_secs(8)).await;
    let expire = Maintenance {
        expire_leases: true,
        purge: None,
    };
    assert_eq!(store.maintain(expire).await.unwrap().requeued, 0);
    // Not renewed: it lapses, and the job runs again.
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(store.maintain(expire).await.unwrap().requeued, 1);
    assert_eq!(state(store, id).await, JobState::Pending);
    let again = try_claim(store, ttl).await.unwrap();
    assert_eq!((again.lease.job, again.lease.attempt), (id, 2));
    // The old holder's late writes are refused (fencing).
    assert_eq!(
        store
            .renew(&lost.lease, Duration::from_secs(10))
            .await
            .unwrap(),
        LeaseState::Lost
    );
    assert_eq!(
        store
            .complete(&lost.lease, Ok(json!("late")))
            .await
            .unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        store
            .complete(&again.lease, Ok(json!("on time")))
            .await
            .unwrap(),
        Fenced::Applied
    );
    store.flush().await.unwrap();
    let record = store.get(id).await.unwrap().unwrap();
    assert_eq!(record.outcome, Some(Ok(json!("on time"))));
}

async fn a_job_that_keeps_losing_its_holder_fails_and_one_not_safe_to_retry_fails_at_once(
    s: Subject,
) {
    let store = &*s.store;
    let ttl = Some(Duration::from_secs(1));
    let expire = Maintenance {
        expire_leases: true,
        purge: None,
    };
    let poison = submit(store, job("poison")).await;
    for lost in 1..=super::POISON_LIMIT {
        let claimed = try_claim(store, ttl).await.expect("it runs again");
        assert_eq!(claimed.lease.attempt, lost);
        tokio::time::advance(Duration::from_secs(2)).await;
        store.maintain(expire).await.unwrap();
    }
    assert_eq!(state(store, poison).await, JobState::Failed);
    let record = store.get(poison).await.unwrap().unwrap();
    assert!(
        matches!(&record.outcome, Some(Err(JobError::WorkerLost(m))) if m.contains("poison pill")),
        "{:?}",
        record.outcome
    );

    let unsafe_job = submit(
        store,
        NewJob {
            retry_safe: false,
            ..job("charge")
        },
    )
    .await;
    try_claim(store, ttl).await.unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(store.maintain(expire).await.unwrap().failed, 1);
    assert_eq!(state(store, unsafe_job).await, JobState::Failed);
}

async fn delete_refuses_unfinished_jobs_and_leaves_a_tombstone(s: Subject) {
    let store = &*s.store;
    let id = submit(store, job("a")).await;
    assert_eq!(
        store.delete(id).await.unwrap(),
        Deleted::Unfinished(JobState::Pending)
    );
    let claimed = claim(store).await;
    assert_eq!(
        store.delete(id).await.unwrap(),
        Deleted::Unfinished(JobState::Running)
    );
    store.complete(&claimed.lease, Ok(json!(1))).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(store.delete(id).await.unwrap(), Deleted::Removed);
    let gone = Missing::Gone(Gone::Deleted);
    assert_eq!(store.get(id).await.unwrap().unwrap_err(), gone);
    assert_eq!(store.state(id).await.unwrap().unwrap_err(), gone);
    assert_eq!(store.wait(id).await.unwrap().unwrap_err(), gone);
    assert_eq!(store.delete(id).await.unwrap(), Deleted::Missing(gone));
    assert_eq!(
        store.delete(JobId::new()).await.unwrap(),
        Deleted::Missing(Missing::Unknown)
    );
}

async fn retention_removes_jobs_finished_before_the_cutoff(s: Subject) {
    let store = &*s.store;
    let old = submit(store, job("a")).await;
    let claimed = claim(store).await;
    store.complete(&claimed.lease, Ok(json!(1))).await.unwrap();
    store.flush().await.unwrap();
    tokio::time::advance(Duration::from_secs(60)).await;
    let recent = submit(store, job("b")).await;
    let claimed = claim(store).await;
    store.complete(&claimed.lease, Ok(json!(2))).await.unwrap();
    let pending = submit(store, job("c")).await;
    store.flush().await.unwrap();
    let purge = |cutoff| Maintenance {
        expire_leases: false,
        purge: Some(Purge {
            finished_before: cutoff,
            tombstones_before: std::time::UNIX_EPOCH,
            limit: 100,
        }),
    };
    let done = store
        .maintain(purge(s.clock.now() - Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!((done.purged, done.more), (1, false));
    assert_eq!(
        store.get(old).await.unwrap().unwrap_err(),
        Missing::Gone(Gone::Expired)
    );
    assert_eq!(state(store, recent).await, JobState::Succeeded);
    assert_eq!(state(store, pending).await, JobState::Pending);
}

async fn listing_filters_compare_exact_times_and_pages_cover_every_job(s: Subject) {
    let store = &*s.store;
    let mut ids = Vec::new();
    for n in 0..7 {
        let mut labels = BTreeMap::new();
        labels.insert("even".to_owned(), (n % 2 == 0).to_string());
        ids.push(
            submit(
                store,
                NewJob {
                    labels,
                    ..job(if n < 4 { "a" } else { "b" })
                },
            )
            .await,
        );
    }
    store.flush().await.unwrap();
    let records: Vec<_> = futures::future::join_all(ids.iter().map(|&id| store.get(id)))
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    // Submitted in one instant of the paused clock, yet each job has its
    // own time, increasing with its id.
    assert!(
        records
            .windows(2)
            .all(|w| w[0].submitted_at < w[1].submitted_at)
    );
    let list = |filter: ListFilter, before, limit| async move {
        store.list(&filter, before, limit).await.unwrap()
    };
    let t = records[3].submitted_at;
    let ns = Duration::from_nanos(1);
    let after = list(
        ListFilter {
            submitted_after: Some(t - ns),
            ..ListFilter::default()
        },
        None,
        100,
    )
    .await;
    assert_eq!(after.jobs.len(), 4, "T - 1ns includes the job at T");
    let before = list(
        ListFilter {
            submitted_before: Some(t + ns),
            ..ListFilter::default()
        },
        None,
        100,
    )
    .await;
    assert_eq!(before.jobs.len(), 4, "T + 1ns includes the job at T");
    let exactly_after = list(
        ListFilter {
            submitted_after: Some(t),
            ..ListFilter::default()
        },
        None,
        100,
    )
    .await;
    assert_eq!(exactly_after.jobs.len(), 3);
    let filtered = list(
        ListFilter {
            function: Some("a".into()),
            labels: [("even".to_owned(), "true".to_owned())].into(),
            states: vec![JobState::Pending],
            ..ListFilter::default()
        },
        None,
        100,
    )
    .await;
    let found: Vec<JobId> = filtered.jobs.iter().map(|r| r.id).collect();
    assert_eq!(found, [ids[2], ids[0]], "newest first");
    // Pages of 3 walk every job once, newest first.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = list(ListFilter::default(), cursor, 3).await;
        seen.extend(page.jobs.iter().map(|r| r.id));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
}

async fn a_delayed_job_is_claimable_only_once_due(s: Subject) {
    let store = &*s.store;
    let later = submit(
        store,
        NewJob {
            not_before: Some(s.clock.now() + Duration::from_secs(30)),
            ..job("later")
        },
    )
    .await;
    let now = submit(store, job("now")).await;
    assert_eq!(claim(store).await.lease.job, now);
    assert!(try_claim(store, None).await.is_none());
    // A claim waits for it, and gets it when it is due.
    let waiting = request(None);
    let claimed = tokio::time::timeout(Duration::from_secs(31), store.claim(&waiting))
        .await
        .expect("claimed when due")
        .unwrap()
        .unwrap();
    assert_eq!(claimed.lease.job, later);
    assert!(s.clock.now() >= claimed.started_at);
}

async fn the_event_stream_numbers_changes_in_order_and_coalesces_progress(s: Subject) {
    let store = &*s.store;
    let head = store.event_head();
    let mut events = store.events(head.seq);
    let mut next = async || match events.next().await {
        Some(Ok(EventItem::Event(event))) => event,
        other => panic!("expected an event, got {other:?}"),
    };
    let id = submit(store, job("a")).await;
    let claimed = claim(store).await;
    store.progress(&claimed.lease, 0.25, "a quarter");
    // Within 100 ms of the last: coalesced, announced when the window ends.
    store.progress(&claimed.lease, 0.5, "half");
    store.progress(&claimed.lease, 0.75, "three quarters");
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next().await);
    }
    // The coalesced report comes once the window has passed.
    tokio::time::advance(Duration::from_millis(150)).await;
    seen.push(next().await);
    store.complete(&claimed.lease, Ok(json!(1))).await.unwrap();
    seen.push(next().await);
    for (n, event) in seen.iter().enumerate() {
        assert_eq!(event.id, id);
        assert_eq!(event.seq, head.seq + 1 + n as u64, "numbered without gaps");
    }
    let seen: Vec<_> = seen
        .into_iter()
        .map(|event| {
            let progress = event.progress.as_ref().map(|p| p.message().to_owned());
            (event.kind, event.state, progress)
        })
        .collect();
    let progress = |m: &str| (EventKind::Progress, JobState::Running, Some(m.to_owned()));
    assert_eq!(
        seen,
        [
            (EventKind::State, JobState::Pending, None),
            (EventKind::State, JobState::Running, None),
            progress("a quarter"),
            progress("three quarters"),
            (
                EventKind::State,
                JobState::Succeeded,
                Some("three quarters".to_owned())
            ),
        ]
    );
    assert_eq!(store.event_head().epoch, head.epoch);
}

async fn a_waiter_wakes_when_the_job_finishes(s: Subject) {
    let store = &*s.store;
    let id = submit(store, job("a")).await;
    let waiter = store.wait(id);
    tokio::pin!(waiter);
    assert!(futures::poll!(waiter.as_mut()).is_pending());
    let claimed = claim(store).await;
    assert!(futures::poll!(waiter.as_mut()).is_pending());
    store
        .complete(&claimed.lease, Ok(json!("done")))
        .await
        .unwrap();
    let finished = waiter.await.unwrap().unwrap();
    assert_eq!(finished.state, JobState::Succeeded);
    assert_eq!(finished.outcome, Ok(json!("done")));
    assert_eq!(
        store.wait(JobId::new()).await.unwrap().unwrap_err(),
        Missing::Unknown
    );
}

#[tokio::test(start_paused = true)]
async fn a_reopened_durable_store_keeps_every_job_and_reruns_interrupted_ones() {
    let clock = Clock::tokio();
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    let (finished, running, pending) = {
        let store = super::open(&config, options(&clock, 100)).unwrap();
        let finished = submit(&*store, job("a")).await;
        let claimed = claim(&*store).await;
        store
            .complete(&claimed.lease, Ok(json!("kept")))
            .await
            .unwrap();
        let running = submit(&*store, job("b")).await;
        claim(&*store).await;
        let pending = submit(&*store, job("c")).await;
        store.flush().await.unwrap();
        (finished, running, pending)
    };
    let store = super::open(&config, options(&clock, 100)).unwrap();
    let record = store.get(finished).await.unwrap().unwrap();
    assert_eq!(record.outcome, Some(Ok(json!("kept"))));
    // The interrupted job runs again first (it was submitted first), as its
    // next attempt, with a token above any the first run handed out.
    let rerun = claim(&*store).await;
    assert_eq!((rerun.lease.job, rerun.lease.attempt), (running, 2));
    assert_eq!(claim(&*store).await.lease.job, pending);
}

/// The model test: random sequences of operations on one job, against a
/// model of its life (pending, running under the latest lease, terminal).
/// Terminal states never change, a write with any lease but the current one
/// is refused and changes nothing, every claim hands out a higher token and
/// the next attempt. Cases: `PROPTEST_CASES` (default 64 per store).
mod model {
    use proptest::prelude::*;

    use super::*;
    use crate::store::{FencingToken, Lease};

    #[derive(Debug, Clone)]
    enum Op {
        Claim,
        /// Complete with the current lease, or with the `n`-th most recent
        /// lease (stale unless it is the current one).
        Complete {
            lease: usize,
            ok: bool,
        },
        Retry {
            lease: usize,
        },
        Release {
            lease: usize,
        },
        Cancel,
        /// The holder vanishes: its lease lapses.
        Lapse,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Claim),
            4 => (0usize..3, any::<bool>()).prop_map(|(lease, ok)| Op::Complete { lease, ok }),
            2 => (0usize..3).prop_map(|lease| Op::Retry { lease }),
            1 => (0usize..3).prop_map(|lease| Op::Release { lease }),
            1 => Just(Op::Cancel),
            1 => Just(Op::Lapse),
        ]
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Phase {
        Pending,
        Running,
        Done(JobState),
    }

    struct Model {
        phase: Phase,
        leases: Vec<Lease>,
        lost: u32,
        /// The token of the last lease whose end was recorded.
        settled: Option<FencingToken>,
    }

    impl Model {
        /// The lease `n` back from the newest, if there is one.
        fn lease(&self, n: usize) -> Option<&Lease> {
            self.leases.iter().rev().nth(n)
        }

        fn is_current(&self, lease: &Lease) -> bool {
            self.phase == Phase::Running && self.leases.last() == Some(lease)
        }
    }

    async fn run(subject: Subject, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let store = &*subject.store;
        let ttl = Some(Duration::from_secs(10));
        let id = submit(store, job("f")).await;
        let mut model = Model {
            phase: Phase::Pending,
            leases: Vec::new(),
            lost: 0,
            settled: None,
        };
        for op in &ops {
            let before = {
                store.flush().await.unwrap();
                store.get(id).await.unwrap().unwrap()
            };
            match *op {
                Op::Claim => {
                    let claimed = try_claim(store, ttl).await;
                    prop_assert_eq!(claimed.is_some(), model.phase == Phase::Pending, "{:?}", op);
                    if let Some(claimed) = claimed {
                        prop_assert_eq!(claimed.lease.attempt, before.attempt + 1);
                        if let Some(last) = model.leases.last() {
                            prop_assert!(claimed.lease.token > last.token);
                        }
                        model.leases.push(claimed.lease);
                        model.phase = Phase::Running;
                    }
                }
                Op::Complete { lease, .. } | Op::Retry { lease } | Op::Release { lease }
                    if model.lease(lease).is_some() =>
                {
                    let lease = model.lease(lease).unwrap().clone();
                    let current = model.is_current(&lease);
                    let applied = match *op {
                        Op::Complete { ok, .. } => {
                            let outcome = if ok {
                                Ok(json!(lease.attempt))
                            } else {
                                Err(JobError::failed("no"))
                            };
                            let applied = store.complete(&lease, outcome).await.unwrap();
                            if current {
                                model.phase = Phase::Done(if ok {
                                    JobState::Succeeded
                                } else {
                                    JobState::Failed
                                });
                            }
                            applied
                        }
                        Op::Retry { .. } => {
                            let applied = store.retry(&lease, subject.clock.now()).await.unwrap();
                            if current {
                                model.phase = Phase::Pending;
                            }
                            applied
                        }
                        _ => {
                            let applied = store.release(&lease).await.unwrap();
                            if current {
                                model.phase = Phase::Pending;
                            }
                            applied
                        }
                    };
                    let expected = if current {
                        model.settled = Some(lease.token);
                        Fenced::Applied
                    } else if model.settled == Some(lease.token) {
                        Fenced::Repeated
                    } else {
                        Fenced::Stale
                    };
                    prop_assert_eq!(applied, expected, "{:?}", op);
                }
                Op::Complete { .. } | Op::Retry { .. } | Op::Release { .. } => {}
                Op::Cancel => {
                    let result = store.cancel(id).await.unwrap();
                    match model.phase {
                        Phase::Pending => {
                            prop_assert_eq!(result, CancelResult::Cancelled);
                            model.phase = Phase::Done(JobState::Cancelled);
                        }
                        Phase::Running => {
                            let is_requested = matches!(&result, CancelResult::Requested { lease, .. } if Some(lease) == model.leases.last());
                            prop_assert!(is_requested, "{:?}", result);
                        }
                        Phase::Done(_) => prop_assert_eq!(result, CancelResult::AlreadyDone),
                    }
                }
                Op::Lapse => {
                    tokio::time::advance(Duration::from_secs(11)).await;
                    let done = store
                        .maintain(Maintenance {
                            expire_leases: true,
                            purge: None,
                        })
                        .await
                        .unwrap();
                    if model.phase == Phase::Running {
                        model.lost += 1;
                        if model.lost >= super::super::POISON_LIMIT {
                            prop_assert_eq!(done.failed, 1);
                            model.phase = Phase::Done(JobState::Failed);
                        } else {
                            prop_assert_eq!(done.requeued, 1);
                            model.phase = Phase::Pending;
                        }
                    } else {
                        prop_assert_eq!((done.requeued, done.failed), (0, 0));
                    }
                }
            }
            store.flush().await.unwrap();
            let after = store.get(id).await.unwrap().unwrap();
            let expected = match model.phase {
                Phase::Pending => JobState::Pending,
                Phase::Running => JobState::Running,
                Phase::Done(state) => state,
            };
            prop_assert_eq!(after.state, expected, "after {:?}", op);
            prop_assert_eq!(after.attempt as usize, model.leases.len());
            prop_assert_eq!(after.state.is_terminal(), after.outcome.is_some());
            if before.state.is_terminal() {
                prop_assert_eq!(
                    &after.outcome,
                    &before.outcome,
                    "{:?} changed a finished job",
                    op
                );
                prop_assert_eq!(after.finished_at, before.finished_at);
            }
            if after.state == JobState::Succeeded {
                // Only the current attempt can finish a job: the value
                // records the attempt that produced it.
                prop_assert_eq!(
                    after.outcome.clone().unwrap().unwrap(),
                    json!(after.attempt)
                );
            }
        }
        Ok(())
    }

    fn check(subject: fn() -> Subject, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async { run(subject(), ops).await })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64)
        ))]

        #[test]
        fn memory_store_follows_the_model(ops in prop::collection::vec(op(), 1..40)) {
            check(|| memory(100), ops)?;
        }

        #[test]
        fn sqlite_store_follows_the_model(ops in prop::collection::vec(op(), 1..40)) {
            check(|| sqlite(100), ops)?;
        }
    }
}
