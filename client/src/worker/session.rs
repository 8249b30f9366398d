//! One worker process's life on the wire: the reconnect loop, and inside it
//! one `Session` stream at a time, with the rules of `worker.proto`:
//! credits, fencing, acknowledged reports, pushed cancels, drains.
//!
//! What must outlive a session lives in [`Runner`]: the jobs running here
//! (with their leases), the reports jobd has not acknowledged, the channel
//! jobs finish into, the progress board, and whether the worker is
//! stopping. A session only borrows them, so a broken stream loses nothing:
//! the next session re-attaches the running leases and sends the
//! unacknowledged reports again.
//!
//! The worker stops in one place: when the caller's shutdown future
//! resolves it sends `draining`, lets its jobs finish within the grace,
//! gives back (and cancels here) what still runs when the grace ends, and
//! returns once nothing is running and every report is acknowledged, or
//! the grace is over. Every path out of [`run`] cancels what still runs.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures::future::Fuse;
use jobd_proto::pb::{self, worker_service_client::WorkerServiceClient};
use tokio::{
    sync::mpsc,
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_util::sync::CancellationToken;
use tonic::{
    codec::Streaming,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use super::{
    ctx::{JobFailure, Lease, ProgressBoard},
    function::Function,
    jobs::{self, Ended, Finished, Launch},
    protocol::{self, Assignment, Attached, FromJobd, Held, Identity},
};
use crate::{
    connect::{CallCredentials, one_line},
    error::Error,
    retry::{self, Backoff},
};

/// Messages waiting to go out on one session; a full outbox holds the
/// session loop back until the stream takes them.
const OUTBOX: usize = 64;

/// How long jobd gets to answer `attach` with `attached`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a worker that closed its side of a session waits for jobd to
/// end it too, so that its last messages (give-backs) are read before the
/// connection goes.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What the worker is, as the builder made it.
pub(crate) struct Definition {
    pub(crate) name: String,
    pub(crate) slots: u32,
    pub(crate) labels: HashMap<String, String>,
    pub(crate) version: String,
    pub(crate) grace: Duration,
    pub(crate) max_result_bytes: usize,
    pub(crate) functions: BTreeMap<String, Function>,
}

/// How a session reaches jobd.
#[derive(Clone)]
pub(crate) enum Connection {
    /// A new connection for each session. Boxed: an endpoint is large, and
    /// the connection is cloned for every session.
    Endpoint(Box<Endpoint>),
    /// The caller's channel, shared by every session.
    Channel(Channel),
}

/// Runs the worker until `shutdown` resolves and it has drained, or jobd
/// refuses it.
pub(crate) async fn run<F>(
    definition: Definition,
    connection: Connection,
    credentials: CallCredentials,
    shutdown: F,
) -> Result<(), Error>
where
    F: Future<Output = ()>,
{
    let shutdown = std::pin::pin!(futures::FutureExt::fuse(shutdown));
    let mut runner = Runner::new(definition, connection, credentials);
    tracing::info!(
        name = %runner.definition.name,
        instance = %runner.instance,
        slots = runner.definition.slots,
        functions = ?runner.definition.functions.keys().collect::<Vec<_>>(),
        "worker starting"
    );
    let result = runner.run(shutdown).await;
    // Whichever way it ended, nothing keeps running on the worker's behalf.
    runner.abandon_all("the worker stopped");
    result
}

/// A job running here.
struct Running {
    lease: Lease,
    attempt: u32,
    cancel: CancellationToken,
}

/// Everything that outlives one session.
struct Runner {
    definition: Definition,
    /// This process, for jobd: the same across reconnects.
    instance: String,
    connection: Connection,
    credentials: CallCredentials,
    /// The jobs running here, by job id.
    jobs: HashMap<String, Running>,
    /// Reports not yet acknowledged (sent, or waiting for a session).
    unacked: BTreeMap<Lease, Finished>,
    finished_tx: mpsc::Sender<Finished>,
    finished_rx: mpsc::Receiver<Finished>,
    progress: Arc<ProgressBoard>,
    /// Set once the caller asked the worker to stop: when the grace ends.
    stop_by: Option<Instant>,
    backoff: Backoff,
}

/// Why a session (or an attempt to open one) ended.
enum End {
    /// The worker stopped (drained, or its grace ended): `run` returns.
    Stopped,
    /// jobd asked the worker to drain and the worker did: reconnect, since
    /// jobd comes back.
    Drained,
    /// The connection broke or jobd was unavailable: reconnect.
    Broken(String),
    /// jobd refused the worker: `run` fails with this.
    Fatal(Error),
}

/// A session's end, from the status that ended its stream.
fn ended_by(status: tonic::Status) -> End {
    if retry::reconnects_worker(&status) {
        End::Broken(format!(
            "jobd ended the session ({:?}): {}",
            status.code(),
            status.message()
        ))
    } else {
        End::Fatal(status.into())
    }
}

/// The sending side of one session, and when it last said anything.
struct Outbox {
    tx: mpsc::Sender<pb::WorkerMessage>,
    last_sent: Instant,
}

impl Outbox {
    async fn send(&mut self, message: pb::WorkerMessage) -> Result<(), End> {
        self.tx
            .send(message)
            .await
            .map_err(|_| End::Broken("the session's request stream closed".to_owned()))?;
        self.last_sent = Instant::now();
        Ok(())
    }
}

/// An open, attached session.
struct Session {
    out: Outbox,
    inbound: Streaming<pb::ServerMessage>,
    attached: Attached,
    /// The connection's client, kept for as long as the session lasts: when
    /// the last handle to a channel goes, so does its connection, and the
    /// session's stream with it.
    _rpc: WorkerServiceClient<InterceptedService<Channel, CallCredentials>>,
}

/// What one session keeps that the next one starts afresh.
struct SessionState {
    /// jobd sent `drain`: take nothing new, finish, then end the session.
    jobd_draining: bool,
    /// Slots freed and not yet offered to jobd (see [`Runner::flush_credit`]).
    owed_credit: u32,
    heartbeat: Duration,
}

/// Connects, sends `attach` and waits for `attached`.
async fn open(
    connection: Connection,
    credentials: CallCredentials,
    attach: pb::WorkerMessage,
) -> Result<Session, End> {
    let channel = match connection {
        Connection::Endpoint(endpoint) => endpoint
            .connect()
            .await
            .map_err(|error| End::Broken(format!("cannot connect: {}", one_line(&error))))?,
        Connection::Channel(channel) => channel,
    };
    let mut rpc = WorkerServiceClient::with_interceptor(channel, credentials);
    let (tx, mut rx) = mpsc::channel(OUTBOX);
    let mut out = Outbox {
        tx,
        last_sent: Instant::now(),
    };
    // The outbox is empty: this does not wait.
    out.send(attach).await?;
    let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let answer = async {
        let mut inbound = rpc.session(requests).await.map_err(ended_by)?.into_inner();
        match inbound.message().await {
            Ok(Some(message)) => match protocol::from_jobd(message) {
                FromJobd::Attached(attached) => Ok((inbound, attached)),
                other => Err(End::Broken(format!(
                    "jobd answered attach with {other:?} instead of attached"
                ))),
            },
            Ok(None) => Err(End::Broken(
                "jobd ended the session before it attached".to_owned(),
            )),
            Err(status) => Err(ended_by(status)),
        }
    };
    let (inbound, attached) = timeout(ATTACH_TIMEOUT, answer).await.map_err(|_| {
        End::Broken(format!(
            "jobd did not answer attach within {}s",
            ATTACH_TIMEOUT.as_secs()
        ))
    })??;
    Ok(Session {
        out,
        inbound,
        attached,
        _rpc: rpc,
    })
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Runner {
    fn new(definition: Definition, connection: Connection, credentials: CallCredentials) -> Self {
        // Each running job sends one `Finished`; jobs given back may send
        // theirs later, and wait for room.
        let (finished_tx, finished_rx) = mpsc::channel(definition.slots.max(1) as usize);
        Self {
            definition,
            instance: uuid::Uuid::new_v4().to_string(),
            connection,
            credentials,
            jobs: HashMap::new(),
            unacked: BTreeMap::new(),
            finished_tx,
            finished_rx,
            progress: Arc::default(),
            stop_by: None,
            backoff: Backoff::new(),
        }
    }

    /// The reconnect loop.
    async fn run<F>(&mut self, mut shutdown: Pin<&mut Fuse<F>>) -> Result<(), Error>
    where
        F: Future<Output = ()>,
    {
        // Breaks in a row, so that a jobd that stays away is logged once
        // and not every few seconds.
        let mut breaks = 0u32;
        loop {
            let opening = open(
                self.connection.clone(),
                self.credentials.clone(),
                self.attach(),
            );
            let Some(opened) = self.offline(opening, shutdown.as_mut()).await else {
                return Ok(());
            };
            let end = match opened {
                Ok(session) => {
                    breaks = 0;
                    self.backoff.reset();
                    self.serve(session, shutdown.as_mut()).await
                }
                Err(end) => end,
            };
            match end {
                End::Stopped => return Ok(()),
                End::Fatal(error) => return Err(error),
                End::Drained => {
                    tracing::info!("jobd drained this worker's session; reconnecting");
                }
                End::Broken(why) => {
                    breaks += 1;
                    if breaks == 1 {
                        tracing::warn!(%why, "worker session lost; reconnecting");
                    } else {
                        tracing::debug!(%why, breaks, "worker still cannot reach jobd");
                    }
                }
            }
            let pause = self.backoff.pause();
            if self
                .offline(sleep(pause), shutdown.as_mut())
                .await
                .is_none()
            {
                return Ok(());
            }
        }
    }

    /// Drives `work` (a pause, or opening a session) while no session is
    /// open: jobs that finish meanwhile wait for the next session as
    /// unacknowledged reports, and a shutdown starts the grace. `None` when
    /// the worker has stopped: nothing is left to report, or the grace
    /// ended first.
    async fn offline<T, F>(
        &mut self,
        work: impl Future<Output = T>,
        mut shutdown: Pin<&mut Fuse<F>>,
    ) -> Option<T>
    where
        F: Future<Output = ()>,
    {
        let mut work = std::pin::pin!(work);
        loop {
            if self.stopped() {
                return None;
            }
            tokio::select! {
                biased;
                () = shutdown.as_mut(), if self.stop_by.is_none() => self.begin_stop(),
                () = until(self.stop_by) => {
                    self.abandon_all("the grace ended before jobd could be reached");
                    return None;
                }
                Some(finished) = self.finished_rx.recv() => {
                    self.take_finished(finished);
                }
                out = &mut work => return Some(out),
            }
        }
    }

    /// Serves one attached session until it ends.
    async fn serve<F>(&mut self, session: Session, mut shutdown: Pin<&mut Fuse<F>>) -> End
    where
        F: Future<Output = ()>,
    {
        let Session {
            mut out,
            mut inbound,
            attached,
            _rpc,
        } = session;
        tracing::info!(session = %attached.session_id, "attached to jobd");
        for lease in &attached.lost {
            self.lose(lease);
        }
        let mut state = SessionState {
            jobd_draining: false,
            owed_credit: 0,
            heartbeat: attached.heartbeat_interval,
        };
        if let Err(end) = self.resume(&mut out).await {
            return end;
        }
        loop {
            let idle = self.jobs.is_empty() && self.unacked.is_empty();
            if self.stop_by.is_some() && idle {
                close(out, inbound).await;
                return End::Stopped;
            }
            if state.jobd_draining && idle {
                close(out, inbound).await;
                return End::Drained;
            }
            let heartbeat_due = out.last_sent + state.heartbeat;
            let step = tokio::select! {
                biased;
                () = shutdown.as_mut(), if self.stop_by.is_none() => {
                    self.begin_stop();
                    out.send(protocol::draining()).await
                }
                () = until(self.stop_by) => {
                    self.give_up(&mut out).await;
                    close(out, inbound).await;
                    return End::Stopped;
                }
                () = sleep_until(heartbeat_due) => out.send(protocol::heartbeat()).await,
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        self.on_message(protocol::from_jobd(message), &mut out, &mut state).await
                    }
                    Ok(None) => Err(End::Broken("jobd ended the session".to_owned())),
                    Err(status) => Err(ended_by(status)),
                },
                // Before finished jobs: a job posts its last progress before
                // it ends, and that note should reach jobd before the report.
                () = self.progress.changed() => self.send_progress(&mut out).await,
                Some(finished) = self.finished_rx.recv() => {
                    self.on_finished(finished, &mut out, &mut state).await
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// The start of a session: say so if the worker is stopping, and send
    /// again every report not yet acknowledged.
    async fn resume(&self, out: &mut Outbox) -> Result<(), End> {
        if self.stop_by.is_some() {
            out.send(protocol::draining()).await?;
        }
        for finished in self.unacked.values() {
            out.send(protocol::report(finished)).await?;
        }
        Ok(())
    }

    async fn on_message(
        &mut self,
        message: FromJobd,
        out: &mut Outbox,
        state: &mut SessionState,
    ) -> Result<(), End> {
        match message {
            FromJobd::Attached(_) => Err(End::Broken(
                "jobd sent a second attached on one session".to_owned(),
            )),
            FromJobd::Assignment(assignment) => self.assigned(assignment, out, state).await,
            FromJobd::Cancel(lease) => {
                if let Some(running) = self.jobs.get(&lease.job_id)
                    && running.lease == lease
                {
                    tracing::debug!(job = %lease.job_id, "cancel");
                    running.cancel.cancel();
                }
                // At once, whether the job still runs here or not: its
                // report (if any) follows when it has stopped.
                out.send(protocol::cancel_ack(&lease)).await
            }
            FromJobd::Ack(ack) => {
                if self.unacked.remove(&ack.lease).is_some()
                    && let Some(reason) = ack.stale
                {
                    tracing::info!(job = %ack.lease.job_id, %reason, "jobd refused a report as stale");
                }
                self.flush_credit(out, state).await
            }
            FromJobd::Drain => {
                tracing::info!(
                    running = self.jobs.len(),
                    "jobd is shutting down: finishing the running jobs, taking no new one"
                );
                state.jobd_draining = true;
                state.owed_credit = 0;
                Ok(())
            }
            FromJobd::Unknown => {
                tracing::debug!("ignored a message from jobd this worker does not know");
                Ok(())
            }
        }
    }

    /// Starts an assigned job, or gives it back, or fails it at once.
    async fn assigned(
        &mut self,
        assignment: Assignment,
        out: &mut Outbox,
        state: &mut SessionState,
    ) -> Result<(), End> {
        let Assignment {
            lease,
            function,
            args,
            terms,
        } = assignment;
        if self.stop_by.is_some() || state.jobd_draining {
            // jobd assigned it before it read `draining`: it may go to
            // another worker at once.
            tracing::debug!(job = %lease.job_id, "draining: giving back a new job");
            return out.send(protocol::give_back(&lease)).await;
        }
        if let Some(running) = self.jobs.get(&lease.job_id) {
            if running.lease == lease {
                tracing::debug!(job = %lease.job_id, "ignored a repeated assignment");
                return Ok(());
            }
            // A newer lease on a job still running here under an older one:
            // the older one is no longer current, so that run is stopped
            // and its report (which jobd would refuse) dropped.
            if let Some(old) = self.jobs.remove(&lease.job_id) {
                old.cancel.cancel();
            }
        }
        if self.jobs.len() >= self.definition.slots as usize {
            tracing::warn!(job = %lease.job_id, "jobd assigned more jobs than this worker's credit; giving one back");
            return out.send(protocol::give_back(&lease)).await;
        }
        let failed = |message: String| Ended::Returned(Err(JobFailure::Failed(message)));
        let terms = match terms {
            Ok(terms) => terms,
            Err(why) => {
                let ended = failed(format!("the worker cannot run this job: {why}"));
                return self.report_now(Finished { lease, ended }, out, state).await;
            }
        };
        let Some(function) = self.definition.functions.get(&function) else {
            let ended = failed(format!("this worker does not serve function {function:?}"));
            return self.report_now(Finished { lease, ended }, out, state).await;
        };
        tracing::debug!(job = %lease.job_id, function = %function.name, attempt = terms.attempt, "running");
        let attempt = terms.attempt;
        let cancel = jobs::start(
            &function.body,
            args,
            Launch {
                terms,
                lease: lease.clone(),
                progress: Arc::clone(&self.progress),
                finished: self.finished_tx.clone(),
                max_result_bytes: self.definition.max_result_bytes,
            },
        );
        self.jobs.insert(
            lease.job_id.clone(),
            Running {
                lease,
                attempt,
                cancel,
            },
        );
        Ok(())
    }

    /// A job finished during the session: report it, and offer its slot.
    async fn on_finished(
        &mut self,
        finished: Finished,
        out: &mut Outbox,
        state: &mut SessionState,
    ) -> Result<(), End> {
        if self.jobs.get(&finished.lease.job_id).map(|r| &r.lease) != Some(&finished.lease) {
            // Given back, lost, or superseded: jobd would refuse its report.
            tracing::debug!(job = %finished.lease.job_id, "dropped the end of a job no longer ours");
            return Ok(());
        }
        // What the job wrote goes before its report: jobd stores it first.
        self.send_progress(out).await?;
        self.jobs.remove(&finished.lease.job_id);
        self.report_now(finished, out, state).await
    }

    /// Keeps `finished` until it is acknowledged, sends it, and offers the
    /// slot it held.
    async fn report_now(
        &mut self,
        finished: Finished,
        out: &mut Outbox,
        state: &mut SessionState,
    ) -> Result<(), End> {
        let message = protocol::report(&finished);
        self.unacked.insert(finished.lease.clone(), finished);
        out.send(message).await?;
        if self.stop_by.is_none() && !state.jobd_draining {
            state.owed_credit += 1;
        }
        self.flush_credit(out, state).await
    }

    /// The most reports that may wait for acknowledgement before the worker
    /// holds back its credits: a jobd that commits slowly then slows the
    /// worker down instead of making it keep unbounded results.
    fn max_unacked(&self) -> usize {
        (self.definition.slots as usize * 2).max(64)
    }

    /// Offers jobd the slots freed since the last credit, unless too many
    /// reports wait for acknowledgement.
    async fn flush_credit(&self, out: &mut Outbox, state: &mut SessionState) -> Result<(), End> {
        if state.owed_credit > 0 && self.unacked.len() < self.max_unacked() {
            let slots = std::mem::take(&mut state.owed_credit);
            out.send(protocol::credit(slots)).await?;
        }
        Ok(())
    }

    async fn send_progress(&self, out: &mut Outbox) -> Result<(), End> {
        for (lease, lines) in self.progress.take_logs() {
            // Lines of a job that has ended here would be refused.
            if self.jobs.get(&lease.job_id).map(|r| &r.lease) == Some(&lease) {
                out.send(protocol::log_lines(&lease, lines)).await?;
            }
        }
        for (lease, (fraction, note)) in self.progress.take() {
            // Progress of a job that has ended here is no news for jobd.
            if self.jobs.get(&lease.job_id).map(|r| &r.lease) == Some(&lease) {
                out.send(protocol::progress(&lease, fraction, &note))
                    .await?;
            }
        }
        Ok(())
    }

    /// A job that finished while no session was open: its report waits for
    /// the next one.
    fn take_finished(&mut self, finished: Finished) {
        if self.jobs.get(&finished.lease.job_id).map(|r| &r.lease) == Some(&finished.lease) {
            self.jobs.remove(&finished.lease.job_id);
            self.unacked.insert(finished.lease.clone(), finished);
        }
    }

    /// jobd no longer holds `lease` for this worker: stop the job and drop
    /// its report.
    fn lose(&mut self, lease: &Lease) {
        if self.jobs.get(&lease.job_id).map(|r| &r.lease) == Some(lease)
            && let Some(running) = self.jobs.remove(&lease.job_id)
        {
            running.cancel.cancel();
        }
        self.unacked.remove(lease);
        tracing::warn!(job = %lease.job_id, "jobd no longer holds this job's lease for the worker; stopped it here");
    }

    fn begin_stop(&mut self) {
        tracing::info!(
            running = self.jobs.len(),
            grace = ?self.definition.grace,
            "worker draining: taking no new job, letting the running ones finish"
        );
        self.stop_by = Some(Instant::now() + self.definition.grace);
    }

    /// True once the worker has stopped: asked to, and nothing is left.
    fn stopped(&self) -> bool {
        self.stop_by.is_some() && self.jobs.is_empty() && self.unacked.is_empty()
    }

    /// The grace ended with jobs still running: give them back to jobd (it
    /// runs them again elsewhere) and stop them here.
    async fn give_up(&mut self, out: &mut Outbox) {
        let running: Vec<Running> = self.jobs.drain().map(|(_, running)| running).collect();
        tracing::warn!(
            given_back = running.len(),
            unacknowledged = self.unacked.len(),
            "the grace ended: giving back the jobs still running"
        );
        for job in running {
            job.cancel.cancel();
            if out.send(protocol::give_back(&job.lease)).await.is_err() {
                break;
            }
        }
        self.unacked.clear();
    }

    /// Cancels every job still running here and forgets every report.
    fn abandon_all(&mut self, why: &str) {
        if !self.jobs.is_empty() || !self.unacked.is_empty() {
            tracing::warn!(
                running = self.jobs.len(),
                unacknowledged = self.unacked.len(),
                "{why}: stopping the jobs still running here"
            );
        }
        for (_, running) in self.jobs.drain() {
            running.cancel.cancel();
        }
        self.unacked.clear();
    }

    /// The `attach` for the next session: the running leases included.
    fn attach(&self) -> pb::WorkerMessage {
        let definition = &self.definition;
        protocol::attach(
            &Identity {
                name: &definition.name,
                instance: &self.instance,
                slots: definition.slots,
                labels: &definition.labels,
                version: &definition.version,
            },
            definition.functions.values(),
            self.jobs.values().map(|running| Held {
                lease: &running.lease,
                attempt: running.attempt,
            }),
        )
    }
}

/// Ends a session from the worker's side: closes the request stream, then
/// waits (a bounded time) for jobd to end the answers, so that what was
/// sent last is read before the connection goes.
async fn close(out: Outbox, mut inbound: Streaming<pb::ServerMessage>) {
    drop(out);
    let drained = async {
        // Anything jobd still says (an ack, a late assignment) changes
        // nothing now: the worker has reported all it will.
        while let Ok(Some(_)) = inbound.message().await {}
    };
    if timeout(CLOSE_WAIT, drained).await.is_err() {
        tracing::debug!("jobd did not end the session after the worker closed it");
    }
}
