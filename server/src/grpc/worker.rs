//! The gRPC face of the remote worker pool: `jobd.v1.WorkerService`. One
//! `Session` stream per worker process; this module turns its messages into
//! calls on the engine's session (checked by [`decode`]) and the session's
//! outbox into messages, and ends the stream with a clear status when the
//! worker breaks the protocol, falls silent, or jobd stops.
//!
//! One task drives a session: it reads the worker's messages (only while
//! fewer reports than the worker has slots await their commit: the worker
//! is held back by HTTP/2 flow control, never buffered), answers each
//! report once it is durable, and writes what the engine tells the worker.
//! A session that ends for any reason is detached at once; its jobs keep
//! their leases until they lapse, or until the worker re-attaches.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt as _, future::BoxFuture, stream::FuturesUnordered};
use jobd_proto::{pb, value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::decode;
use crate::{
    Error,
    engine::{Ack, Engine, Session, ToWorker},
};

/// Messages written but not yet taken by the transport.
const RESPONSE_BUFFER: usize = 16;

/// Implements `jobd.v1.WorkerService` over an [`Engine`].
#[derive(Debug, Clone)]
pub struct WorkerService {
    engine: Engine,
}

impl WorkerService {
    /// Serves `engine`'s remote worker pool.
    #[must_use]
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }

    /// Wraps this service for `tonic::transport::Server::add_service`.
    #[must_use]
    pub fn into_server(self) -> pb::worker_service_server::WorkerServiceServer<Self> {
        pb::worker_service_server::WorkerServiceServer::new(self)
    }
}

type SessionStream = ReceiverStream<Result<pb::ServerMessage, Status>>;

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let config = self.engine.worker_config();
        let first = match tokio::time::timeout(config.lease_timeout, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no attach within the lease timeout",
                ));
            }
            Ok(first) => first?,
        };
        let attach = match first.and_then(|m| m.kind) {
            Some(pb::worker_message::Kind::Attach(attach)) => decode::worker_attach(attach, peer)?,
            Some(_) => {
                return Err(Error::OutOfOrder(
                    "the first message of a worker session must be attach".into(),
                )
                .into());
            }
            None => {
                return Err(Error::OutOfOrder(
                    "the stream ended (or sent an empty message) before attach".into(),
                )
                .into());
            }
        };
        let slots = attach.slots;
        let attached = self.engine.attach_worker(attach).await?;
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let hello = pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Attached(pb::Attached {
                session_id: attached.session.id().to_owned(),
                heartbeat_interval: wire_duration(config.heartbeat_interval),
                lease_timeout: wire_duration(config.lease_timeout),
                lost: attached
                    .lost
                    .iter()
                    .map(|held| pb::HeldLease {
                        job_id: held.job.to_string(),
                        attempt: held.attempt,
                        fencing_token: held.token,
                    })
                    .collect(),
            })),
        };
        // The buffer is empty: this cannot wait.
        let _ = tx.try_send(Ok(hello));
        let driver = Driver {
            engine: self.engine.clone(),
            session: attached.session,
            lease_timeout: config.lease_timeout,
            max_pending: usize::try_from(slots)
                .unwrap_or(usize::MAX)
                .saturating_mul(2)
                .saturating_add(16),
        };
        tokio::spawn(driver.run(inbound, attached.outbox, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Drives one session.
struct Driver {
    engine: Engine,
    session: Arc<Session>,
    lease_timeout: Duration,
    /// Reports and give-backs awaiting their commit at most: past it the
    /// worker's messages are not read.
    max_pending: usize,
}

/// An answer to send once a report is committed (`None`: nothing to send).
type Pending = BoxFuture<'static, Result<Option<pb::ServerMessage>, Status>>;

impl Driver {
    async fn run(
        self,
        mut inbound: Streaming<pb::WorkerMessage>,
        mut outbox: mpsc::Receiver<ToWorker>,
        tx: mpsc::Sender<Result<pb::ServerMessage, Status>>,
    ) {
        let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
        let mut heard = tokio::time::Instant::now();
        let ended: Result<(), Status> = loop {
            let silence = tokio::time::sleep_until(heard + self.lease_timeout);
            tokio::select! {
                () = self.session.closed().cancelled() => {
                    break Err(Status::unavailable(
                        "the session was closed: jobd is shutting down, or the worker attached again",
                    ));
                }
                () = tx.closed() => break Ok(()),
                () = silence => {
                    break Err(Status::deadline_exceeded(
                        "no message from the worker within the lease timeout",
                    ));
                }
                message = inbound.message(), if pending.len() < self.max_pending => match message {
                    Ok(Some(message)) => {
                        heard = tokio::time::Instant::now();
                        self.session.heard().await;
                        match self.handle(message) {
                            Ok(Some(answer)) => pending.push(answer),
                            Ok(None) => {}
                            Err(status) => break Err(status),
                        }
                    }
                    // The worker ended its side: answer what it is owed.
                    Ok(None) => break Ok(()),
                    Err(status) => {
                        tracing::debug!(session = self.session.id(), %status, "worker stream broke");
                        break Ok(());
                    }
                },
                Some(answer) = pending.next(), if !pending.is_empty() => match answer {
                    Ok(Some(message)) => {
                        if tx.send(Ok(message)).await.is_err() {
                            break Ok(());
                        }
                    }
                    Ok(None) => {}
                    Err(status) => break Err(status),
                },
                Some(out) = outbox.recv() => {
                    if tx.send(Ok(encode(out))).await.is_err() {
                        break Ok(());
                    }
                }
            }
        };
        // Answer the reports already being committed: the worker keeps
        // them until then, and a repeat would be answered the same.
        while let Some(answer) = pending.next().await {
            match answer {
                Ok(Some(message)) => {
                    if tx.send(Ok(message)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
        self.engine.detach_worker(&self.session);
        if let Err(status) = ended {
            let _ = tx.send(Err(status)).await;
        }
    }

    /// One message from the worker; an answer to send later, if any.
    fn handle(&self, message: pb::WorkerMessage) -> Result<Option<Pending>, Status> {
        use pb::worker_message::Kind;
        let session = Arc::clone(&self.session);
        match message.kind {
            None => Err(Error::invalid("kind", "a worker message needs a kind").into()),
            Some(Kind::Attach(_)) => {
                Err(Error::OutOfOrder("a session attaches once".into()).into())
            }
            Some(Kind::Credit(credit)) => {
                session.credit(credit.slots);
                Ok(None)
            }
            Some(Kind::Heartbeat(_)) => Ok(None),
            Some(Kind::Progress(progress)) => {
                let job = decode::job_id(&progress.job_id)?;
                session.progress(
                    job,
                    progress.fencing_token,
                    progress.fraction,
                    &progress.message,
                );
                Ok(None)
            }
            Some(Kind::Report(report)) => {
                let job = decode::job_id(&report.job_id)?;
                let token = report.fencing_token;
                let outcome = decode::worker_outcome(report.outcome)?;
                Ok(Some(Box::pin(async move {
                    let ack = session
                        .report(job, token, outcome)
                        .await
                        .map_err(|err| Status::from(Error::Store(err)))?;
                    Ok(Some(ack_message(job, token, ack)))
                })))
            }
            Some(Kind::CancelAck(ack)) => {
                tracing::debug!(session = session.id(), job = %ack.job_id, "worker is stopping a cancelled job");
                Ok(None)
            }
            Some(Kind::GiveBack(back)) => {
                let job = decode::job_id(&back.job_id)?;
                let token = back.fencing_token;
                Ok(Some(Box::pin(async move {
                    let ack = session
                        .give_back(job, token)
                        .await
                        .map_err(|err| Status::from(Error::Store(err)))?;
                    if let Ack::Stale(reason) = ack {
                        tracing::debug!(%job, %reason, "a worker gave back a job it no longer held");
                    }
                    Ok(None)
                })))
            }
            Some(Kind::Draining(_)) => {
                session.draining();
                Ok(None)
            }
        }
    }
}

fn ack_message(job: jobd_proto::JobId, token: u64, ack: Ack) -> pb::ServerMessage {
    let (result, reason) = match ack {
        Ack::Accepted => (pb::report_ack::Result::Accepted, String::new()),
        Ack::Stale(reason) => (pb::report_ack::Result::Stale, reason),
    };
    pb::ServerMessage {
        kind: Some(pb::server_message::Kind::Ack(pb::ReportAck {
            job_id: job.to_string(),
            fencing_token: token,
            result: result.into(),
            reason,
        })),
    }
}

fn encode(out: ToWorker) -> pb::ServerMessage {
    use pb::server_message::Kind;
    let kind = match out {
        ToWorker::Assign(assignment) => Kind::Assignment(pb::Assignment {
            job_id: assignment.job.to_string(),
            attempt: assignment.attempt,
            fencing_token: assignment.token,
            function: assignment.function.to_string(),
            args: Some(value::from_json(assignment.args)),
            deadline: assignment.deadline.map(Into::into),
            max_attempts: assignment.max_attempts,
        }),
        ToWorker::Cancel { job, token } => Kind::Cancel(pb::CancelJob {
            job_id: job.to_string(),
            fencing_token: token,
        }),
        ToWorker::Drain { grace } => Kind::Drain(pb::Drain {
            grace: wire_duration(grace),
        }),
    };
    pb::ServerMessage { kind: Some(kind) }
}

fn wire_duration(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}
