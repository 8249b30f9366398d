//! `Watch` end to end: snapshots and final events, filters, lag, resume,
//! progress, the watcher cap and shutdown, over the real client.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt as _, stream::BoxStream};
use jobd::EngineConfig;
use jobd_client::{
    Error, ErrorKind, JobEvent, JobEventKind, JobState, ResumePoint, Submission, Watch,
};
use jobd_proto::pb;
use serde_json::json;

use crate::harness::{TestServer, config, on_both_stores, registry, submit_noops};

/// Generous bound on any one read, so a broken stream fails the test
/// instead of hanging it (never used to wait for something to happen).
const READ_LIMIT: Duration = Duration::from_secs(20);

type Events = BoxStream<'static, Result<JobEvent, Error>>;

async fn next(events: &mut Events) -> JobEvent {
    tokio::time::timeout(READ_LIMIT, events.next())
        .await
        .expect("an event in time")
        .expect("the stream goes on")
        .expect("an event, not an error")
}

/// Every event up to the end of a stream that ends (a watch of ids).
async fn to_end(events: Events) -> Vec<JobEvent> {
    tokio::time::timeout(READ_LIMIT, events.map(|e| e.expect("an event")).collect())
        .await
        .expect("the stream ends in time")
}

/// The status code a watch was refused with (`None` if it was not).
fn refusal(watch: Result<Events, Error>) -> Option<tonic::Code> {
    watch.err().and_then(|err| err.code())
}

fn paused() -> EngineConfig {
    EngineConfig {
        paused: true,
        ..config(8, 2, 1000)
    }
}

#[tokio::test]
async fn a_watched_job_goes_pending_running_succeeded_with_rising_seqs() {
    on_both_stores(paused(), |server, _fx| async move {
        let client = server.client().await;
        let job = client.submit("echo", json!({"n": 7})).await.unwrap();
        let events = client.watch(Watch::ids([job.id()])).await.unwrap();
        server.engine.set_paused(false);
        let events = to_end(events).await;
        let states: Vec<_> = events.iter().map(|e| (e.kind, e.state)).collect();
        assert_eq!(
            states,
            [
                (JobEventKind::Snapshot, Some(JobState::Pending)),
                (JobEventKind::State, Some(JobState::Running)),
                (JobEventKind::State, Some(JobState::Succeeded)),
            ]
        );
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq), "{events:?}");
        assert!(events.iter().all(|e| e.job == Some(job.id())));
        assert!(
            events
                .iter()
                .all(|e| e.epoch == server.engine.stream_epoch())
        );
        let last = events.last().unwrap();
        assert_eq!(last.attempt, 1);
        assert_eq!(last.function, "echo");
        assert_eq!(
            last.outcome.as_ref().unwrap().result,
            Ok(json!({"n": 7})),
            "the final event carries the value"
        );
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_watcher_that_connects_after_the_end_gets_the_final_event_at_once() {
    on_both_stores(config(8, 2, 1000), |server, _fx| async move {
        let client = server.client().await;
        let ok = client.submit("hello", json!("Ann")).await.unwrap();
        let failed = client.submit("fail", json!(1)).await.unwrap();
        for job in [&ok, &failed] {
            job.outcome(None).await.unwrap();
        }
        let events = to_end(
            client
                .watch(Watch::ids([ok.id(), failed.id()]))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(events.len(), 2, "{events:?}");
        for event in &events {
            assert_eq!(event.kind, JobEventKind::Snapshot);
            let outcome = event.outcome.clone().unwrap();
            if event.job == Some(ok.id()) {
                assert_eq!(outcome.result, Ok(json!("Hello, Ann!")));
            } else {
                assert_eq!(event.job, Some(failed.id()));
                assert_eq!(outcome.state, JobState::Failed);
                let (kind, message) = outcome.result.unwrap_err();
                assert_eq!(kind, ErrorKind::Failed);
                assert!(message.contains("failed on purpose"), "{message}");
            }
        }
        // An unknown id is refused up front.
        let unknown = client.watch(Watch::ids([jobd_client::JobId::new()])).await;
        assert!(matches!(unknown.err(), Some(Error::NotFound(_))));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_filter_watch_sees_only_matching_jobs() {
    on_both_stores(config(8, 2, 1000), |server, _fx| async move {
        let client = server.client().await;
        let mut by_filter = client
            .watch(Watch::all().function("echo").label("team", "a"))
            .await
            .unwrap();
        let mut finished_only = client
            .watch(Watch::all().state(JobState::Succeeded))
            .await
            .unwrap();
        // Jobs that must not show up, all finished before the one that must.
        for (function, team) in [("echo", "b"), ("hello", "a"), ("echo", "")] {
            let mut submission = Submission::new(function, json!(null));
            if !team.is_empty() {
                submission = submission.label("team", team);
            }
            client
                .submit_with(submission)
                .await
                .unwrap()
                .result()
                .await
                .unwrap();
        }
        let wanted = client
            .submit_with(Submission::new("echo", json!("me")).label("team", "a"))
            .await
            .unwrap();
        wanted.result().await.unwrap();
        let mut seen = Vec::new();
        loop {
            let event = next(&mut by_filter).await;
            assert_eq!(
                event.job,
                Some(wanted.id()),
                "only the matching job: {event:?}"
            );
            seen.push(event.state.unwrap());
            if event.state == Some(JobState::Succeeded) {
                break;
            }
        }
        assert_eq!(
            seen,
            [JobState::Pending, JobState::Running, JobState::Succeeded]
        );
        // The state filter: four successes, nothing else, in order.
        for _ in 0..4 {
            let event = next(&mut finished_only).await;
            assert_eq!(event.state, Some(JobState::Succeeded), "{event:?}");
            assert_eq!(event.kind, JobEventKind::State);
        }
        server.shutdown().await;
    })
    .await;
}

/// A raw stub on a connection with a tiny HTTP/2 receive window: when the
/// test stops reading, the server stops being able to send within ~1 KiB,
/// as with a slow watcher on a real network.
async fn tight_window_stub(
    server: &TestServer,
) -> pb::job_service_client::JobServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(1024)
        .initial_connection_window_size(1024)
        .connect()
        .await
        .unwrap();
    pb::job_service_client::JobServiceClient::new(channel)
}

fn small_history(events: usize) -> EngineConfig {
    EngineConfig {
        event_history: NonZeroUsize::new(events).unwrap(),
        ..config(64, 2, 10_000)
    }
}

#[tokio::test]
async fn a_slow_filter_watcher_is_told_it_lagged_and_memory_stays_bounded() {
    let (registry, _fx) = registry();
    let server = TestServer::start(registry, small_history(16)).await;
    let mut stub = tight_window_stub(&server).await;
    let mut events = stub
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let client = server.client().await;
    // 300 jobs, 900 events, while the watcher reads nothing.
    let jobs = submit_noops(&client, 300).await;
    for job in &jobs {
        job.result().await.unwrap();
    }
    let (held, watchers) = server.engine.event_stats();
    assert!(
        held <= 16,
        "the history holds at most its size, held {held}"
    );
    assert_eq!(watchers, 1);
    // Now read: some events that were in flight, then the lag notice, then
    // the rest from the oldest event held, with no silent hole anywhere.
    let mut last_seq = 0;
    let mut lagged = 0;
    let mut received = 0;
    while last_seq < 900 {
        let event = tokio::time::timeout(READ_LIMIT, events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if event.kind == i32::from(pb::WatchEventKind::Lagged) {
            assert!(event.missed > 0);
            assert!(event.job_id.is_empty());
            lagged += event.missed;
            assert_eq!(event.seq, last_seq + event.missed, "missed counts the hole");
        } else {
            received += 1;
            assert_eq!(event.seq, last_seq + 1, "no silent gap");
        }
        last_seq = event.seq;
    }
    assert!(lagged > 0, "the watcher must have lagged");
    assert_eq!(received + lagged, 900);
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_id_watcher_still_gets_every_final_event() {
    let (registry, _fx) = registry();
    let server = TestServer::start(registry, small_history(16)).await;
    let client = server.client().await;
    server.engine.set_paused(true);
    let ids: Vec<String> = submit_noops(&client, 400)
        .await
        .iter()
        .map(|job| job.id().to_string())
        .collect();
    let mut stub = tight_window_stub(&server).await;
    let mut events = stub
        .watch(pb::WatchRequest {
            job_ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    server.engine.set_paused(false);
    for id in &ids {
        client.job(id.parse().unwrap()).result().await.unwrap();
    }
    let mut finished = std::collections::HashSet::new();
    let mut lagged = false;
    while let Some(event) = tokio::time::timeout(READ_LIMIT, events.message())
        .await
        .unwrap()
        .unwrap()
    {
        lagged |= event.kind == i32::from(pb::WatchEventKind::Lagged);
        if event.state == i32::from(pb::JobState::Succeeded) {
            finished.insert(event.job_id);
        }
    }
    assert!(lagged, "400 jobs through a 16-event history must lag");
    assert_eq!(
        finished.len(),
        400,
        "every final event arrives, once the stream ends"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_resumed_watch_gets_exactly_the_missed_events() {
    on_both_stores(config(8, 2, 1000), |server, _fx| async move {
        let client = server.client().await;
        let mut events = client.watch(Watch::all()).await.unwrap();
        let first = client.submit("noop", json!(1)).await.unwrap();
        let point = loop {
            let event = next(&mut events).await;
            if event.job == Some(first.id()) && event.state == Some(JobState::Succeeded) {
                break event.resume_point();
            }
        };
        drop(events);
        // Missed while disconnected.
        let a = client.submit("noop", json!(2)).await.unwrap();
        let b = client.submit("noop", json!(3)).await.unwrap();
        a.result().await.unwrap();
        b.result().await.unwrap();
        let mut events = client
            .watch(Watch::all().resume_after(point.clone()))
            .await
            .unwrap();
        let mut replayed = Vec::new();
        for n in 1..=6 {
            let event = next(&mut events).await;
            assert_eq!(event.seq, point.seq + n, "contiguous from after_seq");
            assert_eq!(event.kind, JobEventKind::State);
            replayed.push((event.job.unwrap(), event.state.unwrap()));
        }
        // Six events, the whole lives of a and b, and nothing else happened
        // on the server since: these are exactly the missed ones.
        for job in [&a, &b] {
            let states: Vec<_> = replayed
                .iter()
                .filter(|(id, _)| *id == job.id())
                .map(|(_, s)| *s)
                .collect();
            assert_eq!(
                states,
                [JobState::Pending, JobState::Running, JobState::Succeeded]
            );
        }
        // Resuming a watch of ids: the missed final event, then the end.
        let ids = to_end(
            client
                .watch(Watch::ids([b.id()]).resume_after(point))
                .await
                .unwrap(),
        )
        .await;
        let states: Vec<_> = ids.iter().map(|e| e.state.unwrap()).collect();
        assert_eq!(
            states,
            [JobState::Pending, JobState::Running, JobState::Succeeded]
        );
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn resuming_too_late_or_elsewhere_is_answered_clearly() {
    let (registry, _fx) = registry();
    let server = TestServer::start(registry, small_history(8)).await;
    let client = server.client().await;
    let epoch = server.engine.stream_epoch().to_owned();
    // Events are numbered from the first watch on; this one only starts that.
    drop(client.watch(Watch::all()).await.unwrap());
    for job in submit_noops(&client, 20).await {
        job.result().await.unwrap();
    }
    // 60 events so far; the history holds the last 8 (53..=60).
    let mut events = client
        .watch(Watch::all().resume_after(ResumePoint {
            epoch: epoch.clone(),
            seq: 1,
        }))
        .await
        .unwrap();
    let gap = next(&mut events).await;
    assert_eq!(gap.kind, JobEventKind::Lagged);
    assert_eq!(gap.missed, 51, "events 2..=52 are gone");
    assert_eq!(next(&mut events).await.seq, 53, "then the oldest held");
    // Another server process's numbering.
    let elsewhere = client
        .watch(Watch::all().resume_after(ResumePoint {
            epoch: "another-process".into(),
            seq: 1,
        }))
        .await;
    assert_eq!(refusal(elsewhere), Some(tonic::Code::FailedPrecondition));
    // A number never handed out.
    let ahead = client
        .watch(Watch::all().resume_after(ResumePoint { epoch, seq: 1000 }))
        .await;
    assert_eq!(refusal(ahead), Some(tonic::Code::OutOfRange));
    server.shutdown().await;
}

#[tokio::test]
async fn progress_shows_in_get_job_and_in_watch_events() {
    let (mut registry, _fx) = registry();
    registry.register_blocking(
        "report_then_wait",
        "reports progress once, then waits for a cancel",
        |ctx, _args| {
            ctx.set_progress(7.0, "clamped");
            ctx.sleep_blocking(Duration::from_secs(60))?;
            Ok(json!(null))
        },
    );
    let server = TestServer::start(registry, config(8, 2, 100)).await;
    let client = server.client().await;
    let steps = client
        .submit("count", json!({"steps": 4, "seconds": 0.8}))
        .await
        .unwrap();
    let events = to_end(client.watch(Watch::ids([steps.id()])).await.unwrap()).await;
    let reports: Vec<f64> = events
        .iter()
        .filter(|e| e.kind == JobEventKind::Progress)
        .map(|e| e.progress.as_ref().unwrap().fraction)
        .collect();
    assert!(!reports.is_empty(), "progress events: {events:?}");
    assert!(reports.windows(2).all(|w| w[0] < w[1]), "{reports:?}");
    let last = events.last().unwrap();
    assert_eq!(last.state, Some(JobState::Succeeded));
    let final_progress = last.progress.as_ref().unwrap();
    assert_eq!(
        (final_progress.fraction, final_progress.message.as_str()),
        (1.0, "4 of 4")
    );
    let info = steps.status().await.unwrap();
    assert_eq!(info.progress.unwrap().message, "4 of 4");

    // GetJob shows a running job's latest report (clamped into 0..=1).
    let waiting = client
        .submit("report_then_wait", json!(null))
        .await
        .unwrap();
    let mut watch = client.watch(Watch::ids([waiting.id()])).await.unwrap();
    let report = loop {
        let event = next(&mut watch).await;
        if let Some(progress) = event.progress {
            break progress;
        }
    };
    assert_eq!((report.fraction, report.message.as_str()), (1.0, "clamped"));
    let latest = waiting.progress().await.unwrap().unwrap();
    assert_eq!((latest.fraction, latest.message.as_str()), (1.0, "clamped"));
    waiting.cancel().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn progress_in_a_tight_loop_is_coalesced_and_the_last_report_arrives() {
    let (mut registry, _fx) = registry();
    registry.register_blocking("spin", "reports progress 200,000 times", |ctx, _args| {
        let n = 200_000;
        for i in 1..=n {
            ctx.set_progress(f64::from(i) / f64::from(n), "spinning");
        }
        // Outlive the coalescing window, so the trailing report must come
        // from the flush, not from the final state.
        ctx.sleep_blocking(Duration::from_millis(300))?;
        Ok(json!(null))
    });
    let server = TestServer::start(registry, config(8, 2, 100)).await;
    let client = server.client().await;
    server.engine.set_paused(true);
    let job = client.submit("spin", json!(null)).await.unwrap();
    let events = client.watch(Watch::ids([job.id()])).await.unwrap();
    server.engine.set_paused(false);
    let events = to_end(events).await;
    let info = job.status().await.unwrap();
    let ran = info
        .finished_at
        .unwrap()
        .duration_since(info.started_at.unwrap())
        .unwrap();
    let progress: Vec<_> = events
        .iter()
        .filter(|e| e.kind == JobEventKind::Progress)
        .collect();
    // At most one per 100 ms window (plus the first and a trailing flush).
    let bound = usize::try_from(ran.as_millis() / 100).unwrap() + 2;
    assert!(
        !progress.is_empty() && progress.len() <= bound,
        "{} progress events in {ran:?}",
        progress.len()
    );
    let last = progress.last().unwrap().progress.as_ref().unwrap();
    assert_eq!(
        last.fraction, 1.0,
        "the latest report is flushed to watchers"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn watchers_past_the_cap_are_refused_and_slots_come_back() {
    let (registry, _fx) = registry();
    let server = TestServer::start(
        registry,
        EngineConfig {
            max_watchers: 2,
            ..config(8, 2, 100)
        },
    )
    .await;
    let client = server.client().await;
    let first = client.watch(Watch::all()).await.unwrap();
    let _second = client.watch(Watch::all()).await.unwrap();
    let third = client.watch(Watch::all()).await;
    assert_eq!(refusal(third), Some(tonic::Code::ResourceExhausted));
    // A watcher whose client goes away gives its slot back.
    drop(first);
    until_watchers(&server, 1).await;
    assert!(client.watch(Watch::all()).await.is_ok());
    server.shutdown().await;
}

/// Waits (bounded) until the server counts `n` open watch streams: the
/// server learns of a client's reset asynchronously.
async fn until_watchers(server: &TestServer, n: usize) {
    for _ in 0..2000 {
        if server.engine.event_stats().1 == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "never saw {n} watchers (saw {})",
        server.engine.event_stats().1
    );
}

#[tokio::test]
async fn shutdown_ends_watch_streams_with_unavailable() {
    on_both_stores(config(8, 2, 100), |server, _fx| async move {
        let client = server.client().await;
        let mut all = client.watch(Watch::all()).await.unwrap();
        let engine = server.engine.clone();
        // The drain must not wait for open watch streams.
        tokio::time::timeout(READ_LIMIT, server.shutdown())
            .await
            .expect("shutdown does not hang on watchers");
        let end = tokio::time::timeout(READ_LIMIT, all.next())
            .await
            .expect("the stream ends");
        match end {
            Some(Err(err)) => assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}"),
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
        assert_eq!(engine.event_stats().1, 0, "no watcher left behind");
    })
    .await;
}

/// A TCP proxy between a client and a server, so a test can break a watch
/// stream while the server process lives on: `cut` drops every open
/// connection; while `hold` is on, new connections are accepted but wait
/// (their count is observable) until `release`; `redirect` sends new
/// connections to another server.
struct Proxy {
    addr: std::net::SocketAddr,
    upstream: Arc<Mutex<std::net::SocketAddr>>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    open: tokio::sync::watch::Sender<bool>,
    accepted: tokio::sync::watch::Receiver<usize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Arc::new(Mutex::new(upstream));
        let links = Arc::new(Mutex::new(Vec::new()));
        let (open, _) = tokio::sync::watch::channel(true);
        let (count, accepted) = tokio::sync::watch::channel(0);
        let accept = tokio::spawn({
            let (upstream, links, open) = (Arc::clone(&upstream), Arc::clone(&links), open.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    count.send_modify(|n| *n += 1);
                    let mut open = open.subscribe();
                    let upstream = Arc::clone(&upstream);
                    links.lock().unwrap().push(tokio::spawn(async move {
                        if open.wait_for(|open| *open).await.is_err() {
                            return;
                        }
                        let to = *upstream.lock().unwrap();
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    }));
                }
            }
        });
        Self {
            addr,
            upstream,
            links,
            open,
            accepted,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection open now (both directions at once).
    fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn hold(&self) {
        self.open.send_replace(false);
    }

    fn release(&self) {
        self.open.send_replace(true);
    }

    fn redirect(&self, upstream: std::net::SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }

    fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }

    /// Returns once `n` connections in all have come in.
    async fn until_accepted(&mut self, n: usize) {
        tokio::time::timeout(READ_LIMIT, self.accepted.wait_for(|&seen| seen >= n))
            .await
            .expect("the client reconnects in time")
            .unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Seqs that go up by one from event to event: no gap, no repeat.
fn assert_contiguous(events: &[JobEvent]) {
    for pair in events.windows(2) {
        assert_eq!(
            pair[1].seq,
            pair[0].seq + 1,
            "contiguous seqs: {:?}",
            events.iter().map(|e| e.seq).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn an_auto_resuming_filter_watch_gets_exactly_the_events_missed_while_cut_off() {
    let (registry, _fx) = registry();
    let server = TestServer::start(registry, config(8, 2, 1000)).await;
    let direct = server.client().await;
    let mut proxy = Proxy::start(server.addr).await;
    let through = jobd_client::JobClient::connect(proxy.url()).await.unwrap();
    let mut events = through.watch(Watch::all().auto_resume(true)).await.unwrap();
    let first = direct.submit("noop", json!(1)).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(next(&mut events).await);
    }
    assert_eq!(seen[2].job, Some(first.id()));
    assert_eq!(seen[2].state, Some(JobState::Succeeded));
    // Break the connection; the client's reconnection (made as the stream
    // is read) waits at the proxy while two more jobs live their whole
    // lives on the server.
    proxy.hold();
    proxy.cut();
    let reader = tokio::spawn(async move {
        let mut rest = Vec::new();
        while rest.len() < 6 {
            rest.push(next(&mut events).await);
        }
        rest
    });
    proxy.until_accepted(2).await;
    let a = direct.submit("noop", json!(2)).await.unwrap();
    let b = direct.submit("noop", json!(3)).await.unwrap();
    a.result().await.unwrap();
    b.result().await.unwrap();
    proxy.release();
    seen.extend(reader.await.unwrap());
    assert_contiguous(&seen);
    for job in [&first, &a, &b] {
        let states: Vec<_> = seen
            .iter()
            .filter(|e| e.job == Some(job.id()))
            .map(|e| (e.kind, e.state.unwrap()))
            .collect();
        assert_eq!(
            states,
            [
                (JobEventKind::State, JobState::Pending),
                (JobEventKind::State, JobState::Running),
                (JobEventKind::State, JobState::Succeeded)
            ]
        );
    }
    assert_eq!(proxy.accepted(), 2, "one reconnection");
    server.shutdown().await;
}

#[tokio::test]
async fn an_auto_resuming_id_watch_resumes_the_unfinished_ids_and_still_ends() {
    let (registry, _fx) = registry();
    let server = TestServer::start(registry, paused()).await;
    let direct = server.client().await;
    // Nothing starts yet: `done` finishes by being cancelled while queued.
    let done = direct.submit("noop", json!(1)).await.unwrap();
    done.cancel().await.unwrap();
    let later = direct.submit("noop", json!(2)).await.unwrap();
    let mut proxy = Proxy::start(server.addr).await;
    let through = jobd_client::JobClient::connect(proxy.url()).await.unwrap();
    let mut events = through
        .watch(Watch::ids([done.id(), later.id()]).auto_resume(true))
        .await
        .unwrap();
    let snapshots = [next(&mut events).await, next(&mut events).await];
    let by_job = |id| snapshots.iter().find(|e| e.job == Some(id)).unwrap();
    assert_eq!(by_job(done.id()).state, Some(JobState::Cancelled));
    assert_eq!(by_job(later.id()).state, Some(JobState::Pending));
    proxy.hold();
    proxy.cut();
    let reader = tokio::spawn(to_end(events));
    proxy.until_accepted(2).await;
    // While cut off: `later` runs to the end, and `done` is deleted (a
    // resume that still named it would be refused as NOT_FOUND).
    done.delete().await.unwrap();
    server.engine.set_paused(false);
    later.result().await.unwrap();
    proxy.release();
    let rest = reader.await.unwrap();
    let states: Vec<_> = rest
        .iter()
        .map(|e| (e.kind, e.job, e.state.unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            (JobEventKind::State, Some(later.id()), JobState::Running),
            (JobEventKind::State, Some(later.id()), JobState::Succeeded)
        ]
    );
    assert_eq!(
        rest[0].seq,
        snapshots[1].seq + 1,
        "no gap after the snapshots"
    );
    assert_contiguous(&rest);
    assert_eq!(proxy.accepted(), 2, "one reconnection");
    server.shutdown().await;
}

#[tokio::test]
async fn an_auto_resuming_watch_surfaces_a_server_restart_as_failed_precondition() {
    let (registry, _fx) = registry();
    let old = TestServer::start(registry, config(8, 2, 1000)).await;
    let (registry, _fx) = crate::harness::registry();
    let new = TestServer::start(registry, config(8, 2, 1000)).await;
    let proxy = Proxy::start(old.addr).await;
    let through = jobd_client::JobClient::connect(proxy.url()).await.unwrap();
    let mut events = through.watch(Watch::all().auto_resume(true)).await.unwrap();
    let job = old.client().await.submit("noop", json!(1)).await.unwrap();
    job.result().await.unwrap();
    for _ in 0..3 {
        assert_eq!(next(&mut events).await.job, Some(job.id()));
    }
    // The "restarted" server answers from now on, with its own numbering.
    proxy.redirect(new.addr);
    old.shutdown().await;
    let end = tokio::time::timeout(READ_LIMIT, events.next())
        .await
        .expect("the stream ends in time");
    match end {
        Some(Err(err)) => assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}"),
        other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
    }
    assert!(events.next().await.is_none(), "nothing after the error");
    assert!(proxy.accepted() >= 2, "the client did try to resume");
    drop(events);
    new.shutdown().await;
}
