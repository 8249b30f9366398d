//! The worker SDK's protocol behaviour, against a FAKE jobd: a small tonic
//! `WorkerService` served in this process on 127.0.0.1:0 and scripted by
//! each test, message by message. The real server side is written
//! separately; these tests pin down what the worker does on the wire
//! (attach, credits, heartbeats, cancels, reports kept across reconnects,
//! drains) so that both sides can be held to `worker.proto`.
//!
//! Tests whose subject is time run on tokio's paused clock: a message's
//! arrival time at the fake says when the worker sent it, and a test that
//! must see something happen "at once" checks that the clock did not move.
//! Those connect the worker to the fake through an in-memory pipe
//! ([`Fake::in_memory`]): on a real socket the paused clock auto-advances
//! while bytes are in flight (tokio's time driver does not count socket
//! readiness as work), so arrival times would say nothing. The other tests
//! use a real TCP connection ([`Fake::start`]), as a worker does.

use std::{
    collections::HashMap,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use jobd_client::{Ctx, Error, JobFailure, Worker};
use jobd_proto::{
    JobId,
    pb::{
        self, server_message, worker_failure, worker_message,
        worker_service_server::{WorkerService, WorkerServiceServer},
    },
    value,
};
use serde_json::{Value, json};
use tokio::io::DuplexStream;
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tonic::{
    Request, Response, Status, Streaming,
    codegen::{Service as TowerService, http::Uri},
    transport::{Channel, Endpoint},
};

/// Bounds every wait for the worker, so that a worker that never sends what
/// a test expects fails the test instead of hanging it. On the paused clock
/// this is simulated time, far beyond any interval the tests use.
const LIMIT: Duration = Duration::from_secs(120);

/// The fake jobd: hands every session the worker opens to the test.
struct Fake {
    /// How a worker reaches it.
    reach: Reach,
    sessions: mpsc::Receiver<Session>,
    /// Stops serving when dropped.
    _stop: oneshot::Sender<()>,
}

enum Reach {
    /// A real TCP address.
    Url(String),
    /// A channel whose every connection is a new in-memory pipe.
    Memory(Channel),
}

/// One session as the fake sees it: the worker's messages, and a way to
/// answer.
struct Session {
    inbound: Streaming<pb::WorkerMessage>,
    outbound: mpsc::Sender<Result<pb::ServerMessage, Status>>,
}

struct Service {
    sessions: mpsc::Sender<Session>,
}

#[tonic::async_trait]
impl WorkerService for Service {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (outbound, mut answers) = mpsc::channel(64);
        self.sessions
            .send(Session {
                inbound: request.into_inner(),
                outbound,
            })
            .await
            .map_err(|_| Status::unavailable("the test is over"))?;
        let answers = futures::stream::poll_fn(move |cx| answers.poll_recv(cx));
        Ok(Response::new(Box::pin(answers)))
    }
}

impl Fake {
    /// Serves on 127.0.0.1:0, bound before serving, so that the worker can
    /// connect at once.
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        });
        Self::serve(incoming, Reach::Url(url))
    }

    /// Serves over in-memory pipes: each connection the worker's channel
    /// makes is a new one.
    fn in_memory() -> Self {
        let (pipes, accepted) = mpsc::channel::<DuplexStream>(8);
        let incoming = futures::stream::unfold(accepted, |mut accepted| async move {
            let pipe = accepted.recv().await?;
            Some((Ok::<_, io::Error>(pipe), accepted))
        });
        let channel = Endpoint::from_static("http://fake.jobd.invalid")
            .connect_with_connector_lazy(Pipes(pipes));
        Self::serve(incoming, Reach::Memory(channel))
    }

    fn serve<S, IO>(incoming: S, reach: Reach) -> Self
    where
        S: futures::Stream<Item = Result<IO, io::Error>> + Send + 'static,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
    {
        let (sessions_tx, sessions) = mpsc::channel(8);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(Service {
                    sessions: sessions_tx,
                }))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        Self {
            reach,
            sessions,
            _stop: stop,
        }
    }

    /// A worker that attaches to this fake.
    fn worker(&self) -> Worker {
        match &self.reach {
            Reach::Url(url) => Worker::new(url),
            Reach::Memory(channel) => Worker::from_channel(channel.clone()),
        }
    }

    /// The next session the worker opens.
    async fn session(&mut self) -> Session {
        tokio::time::timeout(LIMIT, self.sessions.recv())
            .await
            .expect("the worker opened no session in time")
            .expect("the fake stopped")
    }
}

/// The worker's connector to an in-memory fake: a new pipe per connection,
/// whose other end goes to the fake's server.
#[derive(Clone)]
struct Pipes(mpsc::Sender<DuplexStream>);

impl TowerService<Uri> for Pipes {
    type Response = hyper_util::rt::TokioIo<DuplexStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let pipes = self.0.clone();
        Box::pin(async move {
            let (worker_end, fake_end) = tokio::io::duplex(64 * 1024);
            pipes
                .send(fake_end)
                .await
                .map_err(|_| io::Error::other("the fake stopped"))?;
            Ok(hyper_util::rt::TokioIo::new(worker_end))
        })
    }
}

/// Shorthand for what the worker sends.
type Kind = worker_message::Kind;

impl Session {
    /// The worker's next message.
    async fn next(&mut self) -> Kind {
        match tokio::time::timeout(LIMIT, self.inbound.message()).await {
            Ok(Ok(Some(pb::WorkerMessage { kind: Some(kind) }))) => kind,
            other => panic!("expected a message from the worker, got {other:?}"),
        }
    }

    /// The worker's next message that is not a heartbeat, within [`LIMIT`]
    /// in all (a worker that only heartbeats must not hold a test forever).
    async fn next_said(&mut self) -> Kind {
        let said = async {
            loop {
                match self.next().await {
                    Kind::Heartbeat(_) => {}
                    kind => return kind,
                }
            }
        };
        tokio::time::timeout(LIMIT, said)
            .await
            .expect("the worker said nothing but heartbeats")
    }

    /// Waits (within [`LIMIT`] in all) for the worker to close its side of
    /// the session, then ends the session as jobd does.
    async fn closed(mut self) {
        let closed = async {
            loop {
                match self.inbound.message().await {
                    Ok(None) => return,
                    Ok(Some(pb::WorkerMessage {
                        kind: Some(Kind::Heartbeat(_)),
                    })) => {}
                    other => panic!("expected the worker to close the session, got {other:?}"),
                }
            }
        };
        tokio::time::timeout(LIMIT, closed)
            .await
            .expect("the worker did not close the session");
    }

    async fn attach(&mut self) -> pb::Attach {
        match self.next().await {
            Kind::Attach(attach) => attach,
            other => panic!("the first message was {other:?}, not attach"),
        }
    }

    async fn send(&self, kind: server_message::Kind) {
        self.outbound
            .send(Ok(pb::ServerMessage { kind: Some(kind) }))
            .await
            .expect("the worker left");
    }

    async fn fail(&self, status: Status) {
        self.outbound
            .send(Err(status))
            .await
            .expect("the worker left");
    }

    async fn attached(&self, heartbeat: Duration, lost: Vec<pb::HeldLease>) {
        self.send(server_message::Kind::Attached(pb::Attached {
            session_id: "s-1".to_owned(),
            heartbeat_interval: Some(heartbeat.try_into().expect("a duration")),
            lease_timeout: Some((heartbeat * 3).try_into().expect("a duration")),
            lost,
        }))
        .await;
    }

    async fn assign(&self, job: &Job, function: &str, args: Value) {
        self.send(server_message::Kind::Assignment(pb::Assignment {
            job_id: job.id.clone(),
            attempt: 1,
            fencing_token: job.token,
            function: function.to_owned(),
            args: Some(value::from_json(args)),
            deadline: None,
            max_attempts: 1,
        }))
        .await;
    }

    async fn cancel(&self, job: &Job) {
        self.send(server_message::Kind::Cancel(pb::CancelJob {
            job_id: job.id.clone(),
            fencing_token: job.token,
        }))
        .await;
    }

    async fn ack(&self, report: &pb::Report) {
        self.send(server_message::Kind::Ack(pb::ReportAck {
            job_id: report.job_id.clone(),
            fencing_token: report.fencing_token,
            result: pb::report_ack::Result::Accepted.into(),
            reason: String::new(),
        }))
        .await;
    }
}

/// A job as the fake assigns it.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    token: u64,
}

impl Job {
    fn new(token: u64) -> Self {
        Self {
            id: JobId::new().to_string(),
            token,
        }
    }

    fn held(&self) -> pb::HeldLease {
        pb::HeldLease {
            job_id: self.id.clone(),
            attempt: 1,
            fencing_token: self.token,
        }
    }
}

/// The value a report carries; panics on a failure.
fn value_of(report: &pb::Report) -> Value {
    match &report.outcome {
        Some(pb::report::Outcome::Value(v)) => value::to_json(v.clone()),
        other => panic!("expected a value, got {other:?}"),
    }
}

/// The failure kind and message a report carries; panics on a value.
fn failure_of(report: &pb::Report) -> (worker_failure::Kind, String) {
    match &report.outcome {
        Some(pb::report::Outcome::Failure(f)) => (f.kind(), f.message.clone()),
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn report(kind: Kind) -> pb::Report {
    match kind {
        Kind::Report(report) => report,
        other => panic!("expected a report, got {other:?}"),
    }
}

/// The worker, run in a task until the returned sender fires (or is
/// dropped).
fn spawn(worker: Worker) -> (oneshot::Sender<()>, JoinHandle<Result<(), Error>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    (stop, run)
}

async fn finished(run: JoinHandle<Result<(), Error>>) -> Result<(), Error> {
    tokio::time::timeout(LIMIT, run)
        .await
        .expect("the worker did not return in time")
        .expect("the worker panicked")
}

/// What the test functions tell the test: "started ID", "dropped ID".
type Events = mpsc::UnboundedReceiver<String>;

async fn expect_event(events: &mut Events, expected: &str) {
    let event = tokio::time::timeout(LIMIT, events.recv())
        .await
        .expect("no event in time")
        .expect("events closed");
    assert_eq!(event, expected);
}

/// Tells the test when it is dropped: an async job's future was dropped.
struct DropSignal(mpsc::UnboundedSender<String>, String);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(format!("dropped {}", self.1));
    }
}

/// A worker with three test functions: `quick` returns its argument;
/// `gated` waits for a permit of `gate` and then returns "done"; `stuck`
/// never returns. `gated` and `stuck` say when they start, and `stuck` when
/// its future is dropped.
fn test_worker(fake: &Fake, slots: u32) -> (Worker, Events, Arc<Semaphore>) {
    let (tx, events) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let (gated_tx, stuck_tx, gated_gate) = (tx.clone(), tx, Arc::clone(&gate));
    let worker = fake
        .worker()
        .name("test-worker")
        .slots(slots)
        .register_async("quick", "Returns its argument", |_ctx, args| async move {
            Ok(args)
        })
        .register_async("gated", "Waits for the test", move |ctx: Ctx, _args| {
            let (events, gate) = (gated_tx.clone(), Arc::clone(&gated_gate));
            async move {
                let _ = events.send(format!("started {}", ctx.job_id()));
                gate.acquire().await.expect("open").forget();
                Ok(json!("done"))
            }
        })
        .register_async("stuck", "Never returns", move |ctx: Ctx, _args| {
            let events = stuck_tx.clone();
            async move {
                let _guard = DropSignal(events.clone(), ctx.job_id().to_string());
                let _ = events.send(format!("started {}", ctx.job_id()));
                std::future::pending::<()>().await;
                Ok(Value::Null)
            }
        });
    (worker, events, gate)
}

/// Attach declares every function with its schema, description, returns
/// and retry safety, the slots, labels, name and version; a fresh instance
/// id; no running leases. A shutdown with nothing running then sends
/// `draining` and closes the session at once.
#[tokio::test(start_paused = true)]
async fn attach_declares_the_worker_and_a_shutdown_closes_it() {
    let mut fake = Fake::in_memory();
    let schema = json!({"type": "object", "required": ["path"]});
    let worker = fake
        .worker()
        .name("image-worker")
        .slots(3)
        .label("gpu", "true")
        .version("resizer 1.2")
        .register_blocking("square", "Squares a number", |_ctx, args| {
            let n: f64 = serde_json::from_value(args)?;
            Ok(json!(n * n))
        })
        .register_async("resize", "Resizes an image", |_ctx, args| async move {
            Ok(args)
        })
        .with_args_schema(schema.clone())
        .returns("the new size")
        .not_safe_to_retry();
    let (stop, run) = spawn(worker);

    let mut session = fake.session().await;
    let attach = session.attach().await;
    assert_eq!(attach.name, "image-worker");
    assert_eq!(attach.slots, 3);
    assert_eq!(
        attach.labels,
        HashMap::from([("gpu".to_owned(), "true".to_owned())])
    );
    assert_eq!(attach.version, "resizer 1.2");
    assert!(
        uuid::Uuid::parse_str(&attach.instance).is_ok(),
        "{attach:?}"
    );
    assert!(attach.running.is_empty());
    let functions: Vec<_> = attach
        .functions
        .iter()
        .map(|f| {
            (
                f.name.as_str(),
                f.description.as_str(),
                f.args_schema.clone().map(value::to_json),
                f.returns.as_str(),
                f.not_safe_to_retry,
            )
        })
        .collect();
    assert_eq!(
        functions,
        [
            (
                "resize",
                "Resizes an image",
                Some(schema),
                "the new size",
                true
            ),
            ("square", "Squares a number", None, "", false),
        ]
    );

    session.attached(Duration::from_secs(60), Vec::new()).await;
    // A heartbeat says the worker has read `attached` (a shutdown before
    // that would end the opening session without a word).
    assert!(matches!(session.next().await, Kind::Heartbeat(_)));
    let stopped = Instant::now();
    stop.send(()).expect("the worker runs");
    assert!(matches!(session.next().await, Kind::Draining(_)));
    session.closed().await;
    finished(run).await.expect("a clean stop");
    assert_eq!(
        stopped.elapsed(),
        Duration::ZERO,
        "nothing to drain, no wait"
    );
}

/// The fake assigns exactly as many jobs as the worker's credit allows
/// (`attach.slots`, then each `credit`); the functions count how many run
/// at once. The worker must never run more than its slots, must use all of
/// them (its credits are not short), and may only credit a slot after the
/// report of the job that held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_never_runs_more_jobs_than_its_credit_allows() {
    const SLOTS: u32 = 3;
    const JOBS: usize = 24;
    let mut fake = Fake::start().await;
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let count = |now: &Arc<AtomicUsize>, most: &Arc<AtomicUsize>| {
        let running = now.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(running, Ordering::SeqCst);
    };
    let (async_now, async_most) = (Arc::clone(&now), Arc::clone(&most));
    let (blocking_now, blocking_most) = (Arc::clone(&now), Arc::clone(&most));
    let worker = fake
        .worker()
        .slots(SLOTS)
        .register_async("nap", "Sleeps ARGS ms", move |_ctx, args| {
            let (now, most) = (Arc::clone(&async_now), Arc::clone(&async_most));
            async move {
                count(&now, &most);
                tokio::time::sleep(Duration::from_millis(args.as_u64().unwrap_or(0))).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(args)
            }
        })
        .register_blocking("grind", "Blocks ARGS ms", move |ctx, args| {
            count(&blocking_now, &blocking_most);
            ctx.sleep_blocking(Duration::from_millis(args.as_u64().unwrap_or(0)))?;
            blocking_now.fetch_sub(1, Ordering::SeqCst);
            Ok(args)
        });
    let (stop, run) = spawn(worker);

    let mut session = fake.session().await;
    let attach = session.attach().await;
    session.attached(Duration::from_secs(60), Vec::new()).await;
    let mut credit = attach.slots;
    let (mut assigned, mut reports, mut credited) = (0usize, 0usize, 0usize);
    let mut values = Vec::new();
    while reports < JOBS {
        while credit > 0 && assigned < JOBS {
            let function = if assigned % 2 == 0 { "nap" } else { "grind" };
            let millis = 20 + (assigned as u64 * 7) % 30;
            let job = Job::new(assigned as u64 + 1);
            session.assign(&job, function, json!(millis)).await;
            credit -= 1;
            assigned += 1;
        }
        match session.next_said().await {
            Kind::Report(report) => {
                reports += 1;
                values.push(value_of(&report));
                session.ack(&report).await;
            }
            Kind::Credit(pb::Credit { slots }) => {
                credited += slots as usize;
                assert!(
                    credited <= reports,
                    "{credited} slots credited after only {reports} reports"
                );
                credit += slots;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        SLOTS as usize,
        "slots used at once"
    );
    assert_eq!(values.len(), JOBS);

    stop.send(()).expect("the worker runs");
    // The last report's credit may come before `draining`; nothing else.
    loop {
        match session.next_said().await {
            Kind::Credit(_) => {}
            Kind::Draining(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    session.closed().await;
    finished(run).await.expect("a clean stop");
}

/// On the paused clock: an idle worker sends a heartbeat every interval,
/// not later (jobd would end the session) and not sooner; any other message
/// counts as one, so the next heartbeat is an interval after the last
/// message, whatever it was.
#[tokio::test(start_paused = true)]
async fn it_heartbeats_when_it_has_nothing_else_to_say() {
    let interval = Duration::from_secs(5);
    let mut fake = Fake::in_memory();
    let worker =
        fake.worker()
            .slots(1)
            .register_async("nap", "Sleeps ARGS s", |_ctx, args| async move {
                tokio::time::sleep(Duration::from_secs(args.as_u64().unwrap_or(0))).await;
                Ok(args)
            });
    let (stop, run) = spawn(worker);

    let mut session = fake.session().await;
    session.attach().await;
    let mut last = Instant::now();
    session.attached(interval, Vec::new()).await;
    for _ in 0..3 {
        assert!(matches!(session.next().await, Kind::Heartbeat(_)));
        assert_eq!(last.elapsed(), interval, "a heartbeat off its interval");
        last = Instant::now();
    }

    // A job of 7 s: a heartbeat at 5 s (the report is not due yet), then
    // the report and its credit at 7 s, and the next heartbeat 5 s later.
    let job = Job::new(1);
    session.assign(&job, "nap", json!(7)).await;
    let assigned = Instant::now();
    assert!(matches!(session.next().await, Kind::Heartbeat(_)));
    assert_eq!(assigned.elapsed(), interval);
    let done = report(session.next().await);
    assert_eq!(value_of(&done), json!(7));
    assert_eq!(assigned.elapsed(), Duration::from_secs(7));
    assert!(matches!(session.next().await, Kind::Credit(_)));
    let credited = Instant::now();
    assert!(matches!(session.next().await, Kind::Heartbeat(_)));
    assert_eq!(credited.elapsed(), interval);

    stop.send(()).expect("the worker runs");
    assert!(matches!(session.next().await, Kind::Draining(_)));
    // The report was never acknowledged: the stopping worker keeps
    // heartbeating (it waits for the ack within its grace) ...
    assert!(matches!(session.next().await, Kind::Heartbeat(_)));
    // ... and closes once it comes.
    session.ack(&done).await;
    session.closed().await;
    finished(run).await.expect("a clean stop");
}

/// A cancel stops an async job at once: `cancel_ack`, then a
/// KIND_CANCELLED report, with the paused clock still where it was when the
/// cancel was sent (nothing waited on a timer or a poll interval), and the
/// function's future dropped. Its slot is credited afterwards.
#[tokio::test(start_paused = true)]
async fn a_cancel_is_acknowledged_and_reported_at_once() {
    let mut fake = Fake::in_memory();
    let (worker, mut events, _gate) = test_worker(&fake, 2);
    let (_stop, _run) = spawn(worker);

    let mut session = fake.session().await;
    session.attach().await;
    session.attached(Duration::from_secs(60), Vec::new()).await;
    let job = Job::new(7);
    session.assign(&job, "stuck", Value::Null).await;
    expect_event(&mut events, &format!("started {}", job.id)).await;

    let sent = Instant::now();
    session.cancel(&job).await;
    match session.next().await {
        Kind::CancelAck(ack) => assert_eq!((ack.job_id, ack.fencing_token), (job.id.clone(), 7)),
        other => panic!("expected cancel_ack, got {other:?}"),
    }
    let cancelled = report(session.next().await);
    assert_eq!(
        (cancelled.job_id.as_str(), cancelled.fencing_token),
        (job.id.as_str(), 7)
    );
    assert_eq!(failure_of(&cancelled).0, worker_failure::Kind::Cancelled);
    assert_eq!(Instant::now(), sent, "the cancel waited on the clock");
    expect_event(&mut events, &format!("dropped {}", job.id)).await;
    assert!(matches!(
        session.next().await,
        Kind::Credit(pb::Credit { slots: 1 })
    ));
}

/// A blocking job cannot be interrupted: a cancel raises its context's
/// flag, which ends `Ctx::sleep_blocking` with `JobFailure::Cancelled`; the
/// worker acknowledges the cancel at once and reports the job cancelled
/// when the function returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_job_sees_the_cancel_in_its_context() {
    let mut fake = Fake::start().await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let worker =
        fake.worker()
            .slots(1)
            .register_blocking("sleepy", "Sleeps an hour", move |ctx, _args| {
                let _ = started_tx.send(ctx.job_id().to_string());
                ctx.sleep_blocking(Duration::from_secs(3600))?;
                Ok(json!("slept"))
            });
    let (_stop, _run) = spawn(worker);

    let mut session = fake.session().await;
    session.attach().await;
    session.attached(Duration::from_secs(60), Vec::new()).await;
    let job = Job::new(3);
    session.assign(&job, "sleepy", Value::Null).await;
    let id = tokio::time::timeout(LIMIT, started.recv())
        .await
        .expect("started");
    assert_eq!(id.as_deref(), Some(job.id.as_str()));
    session.cancel(&job).await;
    assert!(matches!(session.next().await, Kind::CancelAck(_)));
    let cancelled = report(session.next().await);
    assert_eq!(
        failure_of(&cancelled),
        (
            worker_failure::Kind::Cancelled,
            "job was cancelled".to_owned()
        )
    );
}

/// A report jobd has not acknowledged is sent again on the next session:
/// the fake breaks the stream (UNAVAILABLE, as a restarting jobd would),
/// the worker reconnects with the same instance and the leases of the jobs
/// still running, sends the report again, stops the job whose lease came
/// back as lost (without ever reporting it), and carries on with the other.
#[tokio::test]
async fn an_unacknowledged_report_survives_a_reconnect() {
    let mut fake = Fake::start().await;
    let (worker, mut events, gate) = test_worker(&fake, 3);
    // A grace longer than the test's limit: the stop below must end on the
    // acknowledgements, not on the grace.
    let (stop, run) = spawn(worker.grace(LIMIT * 2));

    let mut first = fake.session().await;
    let attach = first.attach().await;
    first.attached(Duration::from_secs(60), Vec::new()).await;
    let (quick, gated, stuck) = (Job::new(11), Job::new(12), Job::new(13));
    first.assign(&quick, "quick", json!({"n": 1})).await;
    first.assign(&gated, "gated", Value::Null).await;
    first.assign(&stuck, "stuck", Value::Null).await;
    let reported = report(first.next_said().await);
    assert_eq!(
        (reported.job_id.as_str(), value_of(&reported)),
        (quick.id.as_str(), json!({"n": 1}))
    );
    assert!(matches!(first.next_said().await, Kind::Credit(_)));
    let mut started = vec![
        tokio::time::timeout(LIMIT, events.recv())
            .await
            .expect("started"),
        tokio::time::timeout(LIMIT, events.recv())
            .await
            .expect("started"),
    ];
    started.sort();
    let mut expected = vec![
        Some(format!("started {}", gated.id)),
        Some(format!("started {}", stuck.id)),
    ];
    expected.sort();
    assert_eq!(started, expected);
    // No ack: jobd "restarts".
    first.fail(Status::unavailable("jobd is restarting")).await;
    drop(first);

    let mut second = fake.session().await;
    let again = second.attach().await;
    assert_eq!(
        again.instance, attach.instance,
        "a reconnect is the same worker"
    );
    let mut running: Vec<(String, u64)> = again
        .running
        .iter()
        .map(|held| (held.job_id.clone(), held.fencing_token))
        .collect();
    running.sort();
    let mut expected = vec![(gated.id.clone(), 12), (stuck.id.clone(), 13)];
    expected.sort();
    assert_eq!(running, expected, "the leases of the jobs still running");
    second
        .attached(Duration::from_secs(60), vec![stuck.held()])
        .await;

    let resent = report(second.next_said().await);
    assert_eq!(resent, reported, "the same report, sent again");
    expect_event(&mut events, &format!("dropped {}", stuck.id)).await;
    second.ack(&resent).await;
    gate.add_permits(1);
    // The next thing the worker says is the gated job's report: nothing
    // about the lost job, and no report of the quick one again.
    let gated_report = report(second.next_said().await);
    assert_eq!(
        (
            gated_report.job_id.as_str(),
            gated_report.fencing_token,
            value_of(&gated_report)
        ),
        (gated.id.as_str(), 12, json!("done"))
    );
    assert!(matches!(second.next_said().await, Kind::Credit(_)));
    second.ack(&gated_report).await;

    stop.send(()).expect("the worker runs");
    assert!(matches!(second.next_said().await, Kind::Draining(_)));
    second.closed().await;
    finished(run).await.expect("a clean stop");
}

/// A shutdown drains: `draining` first; a job jobd assigns after it (the
/// race a real jobd can lose) is given back, not run; the running job
/// finishes and is reported, with no credit after `draining`; once its
/// report is acknowledged the worker closes the stream and `run` returns.
#[tokio::test]
async fn a_shutdown_drains_the_worker() {
    let mut fake = Fake::start().await;
    let (worker, mut events, gate) = test_worker(&fake, 2);
    // Longer than the test's limit: the drain must end on the ack.
    let (stop, run) = spawn(worker.grace(LIMIT * 2));

    let mut session = fake.session().await;
    session.attach().await;
    session.attached(Duration::from_secs(60), Vec::new()).await;
    let (running, late) = (Job::new(1), Job::new(2));
    session.assign(&running, "gated", Value::Null).await;
    expect_event(&mut events, &format!("started {}", running.id)).await;

    stop.send(()).expect("the worker runs");
    assert!(matches!(session.next_said().await, Kind::Draining(_)));
    session.assign(&late, "gated", Value::Null).await;
    match session.next_said().await {
        Kind::GiveBack(back) => assert_eq!((back.job_id, back.fencing_token), (late.id.clone(), 2)),
        other => panic!("expected give_back, got {other:?}"),
    }
    gate.add_permits(1);
    let done = report(session.next_said().await);
    assert_eq!(
        (done.job_id.as_str(), value_of(&done)),
        (running.id.as_str(), json!("done"))
    );
    session.ack(&done).await;
    // No credit, nothing else: the stream ends.
    session.closed().await;
    finished(run).await.expect("a clean stop");
    assert!(events.try_recv().is_err(), "the late job ran");
}

/// On the paused clock: a job that outlives the grace is given back when
/// the grace ends (and stopped here), the worker heartbeats until then, and
/// `run` returns.
#[tokio::test(start_paused = true)]
async fn the_grace_ends_with_the_running_jobs_given_back() {
    let grace = Duration::from_secs(30);
    let mut fake = Fake::in_memory();
    let (worker, mut events, _gate) = test_worker(&fake, 1);
    let (stop, run) = spawn(worker.grace(grace));

    let mut session = fake.session().await;
    session.attach().await;
    session.attached(Duration::from_secs(10), Vec::new()).await;
    let job = Job::new(5);
    session.assign(&job, "stuck", Value::Null).await;
    expect_event(&mut events, &format!("started {}", job.id)).await;

    stop.send(()).expect("the worker runs");
    assert!(matches!(session.next().await, Kind::Draining(_)));
    let draining = Instant::now();
    let mut heartbeats = 0;
    loop {
        match session.next().await {
            Kind::Heartbeat(_) => heartbeats += 1,
            Kind::GiveBack(back) => {
                assert_eq!((back.job_id, back.fencing_token), (job.id.clone(), 5));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(draining.elapsed(), grace);
    assert_eq!(heartbeats, 2, "heartbeats at 10 s and 20 s of the grace");
    session.closed().await;
    expect_event(&mut events, &format!("dropped {}", job.id)).await;
    finished(run).await.expect("a clean stop");
}

/// A function that panics (async or blocking) fails its job as panicked,
/// with the panic's message, and the worker carries on with the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_function_fails_its_job_not_the_worker() {
    let mut fake = Fake::start().await;
    let worker = fake
        .worker()
        .slots(1)
        .register_async("boom", "Panics", |_ctx, _args| async move {
            panic!("async boom");
        })
        .register_blocking("crash", "Panics", |_ctx, _args| panic!("blocking boom"))
        .register_async("quick", "Returns its argument", |_ctx, args| async move {
            Ok(args)
        });
    let (_stop, _run) = spawn(worker);

    let mut session = fake.session().await;
    session.attach().await;
    session.attached(Duration::from_secs(60), Vec::new()).await;
    for (token, function, message) in [(1, "boom", "async boom"), (2, "crash", "blocking boom")] {
        session
            .assign(&Job::new(token), function, Value::Null)
            .await;
        let failed = report(session.next_said().await);
        assert_eq!(
            failure_of(&failed),
            (
                worker_failure::Kind::Panicked,
                format!("job panicked: {message}")
            )
        );
        assert!(matches!(session.next_said().await, Kind::Credit(_)));
    }
    session.assign(&Job::new(3), "quick", json!(42)).await;
    assert_eq!(value_of(&report(session.next_said().await)), json!(42));
}

/// Progress goes to jobd with the job's lease, and a job's last progress
/// note reaches jobd before its report.
#[tokio::test]
async fn progress_reaches_jobd_before_the_report() {
    let mut fake = Fake::start().await;
    let worker = fake.worker().slots(1).register_async(
        "halfway",
        "Reports progress",
        |ctx: Ctx, _args| async move {
            ctx.set_progress(0.5, "half done");
            Ok(json!("done"))
        },
    );
    let (_stop, _run) = spawn(worker);

    let mut session = fake.session().await;
    session.attach().await;
    session.attached(Duration::from_secs(60), Vec::new()).await;
    let job = Job::new(9);
    session.assign(&job, "halfway", Value::Null).await;
    match session.next_said().await {
        Kind::Progress(p) => assert_eq!(
            (p.job_id, p.fencing_token, p.fraction, p.message),
            (job.id.clone(), 9, 0.5, "half done".to_owned())
        ),
        other => panic!("expected progress, got {other:?}"),
    }
    assert_eq!(value_of(&report(session.next_said().await)), json!("done"));
}

/// A session that breaks (UNAVAILABLE) is reopened; one that jobd refuses
/// (PERMISSION_DENIED: a token without the `worker` capability) ends `run`
/// with that error, without trying again.
#[tokio::test]
async fn a_refusal_ends_the_worker_and_a_break_does_not() {
    let mut fake = Fake::start().await;
    let worker = fake
        .worker()
        .slots(1)
        .register_async("quick", "", |_ctx, args| async move { Ok(args) });
    let (_stop, run) = spawn(worker);

    let mut first = fake.session().await;
    first.attach().await;
    first.fail(Status::unavailable("jobd is starting")).await;
    let mut second = fake.session().await;
    second.attach().await;
    second
        .fail(Status::permission_denied(
            "this token cannot attach workers",
        ))
        .await;
    let refused = finished(run).await;
    match refused {
        Err(Error::Rpc(status)) => assert_eq!(status.code(), tonic::Code::PermissionDenied),
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert!(fake.sessions.try_recv().is_err(), "it tried again");
}

/// A function reached through the worker behaves as the worker's own type
/// says: arguments that do not parse fail the job (`From<serde_json::Error>`),
/// and a retryable failure is reported as KIND_RETRYABLE.
#[tokio::test]
async fn failures_keep_their_kind() {
    let mut fake = Fake::start().await;
    let worker = fake
        .worker()
        .slots(1)
        .register_async("add", "Adds two numbers", |_ctx, args| async move {
            let (a, b): (f64, f64) = serde_json::from_value(args)?;
            Ok(json!(a + b))
        })
        .register_async("flaky", "Fails, for now", |_ctx, _args| async move {
            Err::<Value, _>(JobFailure::retryable("the peer is busy"))
        });
    let (_stop, _run) = spawn(worker);

    let mut session = fake.session().await;
    session.attach().await;
    session.attached(Duration::from_secs(60), Vec::new()).await;
    session.assign(&Job::new(1), "add", json!("two")).await;
    let (kind, message) = failure_of(&report(session.next_said().await));
    assert_eq!(kind, worker_failure::Kind::Failed);
    assert!(message.starts_with("invalid arguments: "), "{message}");
    assert!(matches!(session.next_said().await, Kind::Credit(_)));
    session.assign(&Job::new(2), "flaky", Value::Null).await;
    assert_eq!(
        failure_of(&report(session.next_said().await)),
        (
            worker_failure::Kind::Retryable,
            "the peer is busy".to_owned()
        )
    );
}

/// jobd's own `drain` (it is shutting down): the worker takes nothing new
/// (a later assignment is given back), finishes and reports what runs,
/// closes the session once the report is acknowledged, and reconnects, as
/// the same instance, for the jobd that comes back.
#[tokio::test]
async fn a_drain_from_jobd_ends_the_session_and_the_worker_comes_back() {
    let mut fake = Fake::start().await;
    let (worker, mut events, gate) = test_worker(&fake, 2);
    let (stop, run) = spawn(worker);

    let mut first = fake.session().await;
    let attach = first.attach().await;
    first.attached(Duration::from_secs(60), Vec::new()).await;
    let (running, late) = (Job::new(1), Job::new(2));
    first.assign(&running, "gated", Value::Null).await;
    expect_event(&mut events, &format!("started {}", running.id)).await;
    first
        .send(server_message::Kind::Drain(pb::Drain {
            grace: Some(Duration::from_secs(30).try_into().expect("a duration")),
        }))
        .await;
    first.assign(&late, "gated", Value::Null).await;
    match first.next_said().await {
        Kind::GiveBack(back) => assert_eq!(back.job_id, late.id),
        other => panic!("expected give_back, got {other:?}"),
    }
    gate.add_permits(1);
    let done = report(first.next_said().await);
    assert_eq!(done.job_id, running.id);
    first.ack(&done).await;
    first.closed().await;

    let mut second = fake.session().await;
    let again = second.attach().await;
    assert_eq!(again.instance, attach.instance);
    assert!(again.running.is_empty());
    second.attached(Duration::from_secs(60), Vec::new()).await;
    // It takes jobs again (which also says it has read `attached`, so the
    // stop below finds it attached).
    let quick = Job::new(3);
    second.assign(&quick, "quick", json!("back")).await;
    let back = report(second.next_said().await);
    assert_eq!(value_of(&back), json!("back"));
    second.ack(&back).await;
    stop.send(()).expect("the worker runs");
    loop {
        match second.next_said().await {
            // The quick job's credit may come first.
            Kind::Credit(_) => {}
            Kind::Draining(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    second.closed().await;
    finished(run).await.expect("a clean stop");
    assert!(events.try_recv().is_err(), "the late job ran");
}

/// A jobd that assigns more jobs than the worker's credit (a bug, but not
/// the worker's to pay for) gets the extra ones back at once: the worker
/// never runs more than its slots.
#[tokio::test]
async fn an_assignment_beyond_the_credit_is_given_back() {
    let mut fake = Fake::start().await;
    let (worker, mut events, gate) = test_worker(&fake, 1);
    let (_stop, _run) = spawn(worker);

    let mut session = fake.session().await;
    session.attach().await;
    session.attached(Duration::from_secs(60), Vec::new()).await;
    let (first, extra) = (Job::new(1), Job::new(2));
    session.assign(&first, "gated", Value::Null).await;
    session.assign(&extra, "gated", Value::Null).await;
    match session.next_said().await {
        Kind::GiveBack(back) => assert_eq!(back.job_id, extra.id),
        other => panic!("expected give_back, got {other:?}"),
    }
    expect_event(&mut events, &format!("started {}", first.id)).await;
    gate.add_permits(1);
    assert_eq!(report(session.next_said().await).job_id, first.id);
    assert!(events.try_recv().is_err(), "the extra job ran");
}
