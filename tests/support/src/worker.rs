//! A worker that speaks the worker protocol message by message, for tests
//! of jobd's side of it: each test decides exactly what the worker says and
//! when, including what a well-behaved worker never would.

use std::time::Duration;

use jobd_proto::{
    pb::{self, worker_message::Kind, worker_service_client::WorkerServiceClient},
    value,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming, metadata::MetadataValue, transport::Channel};

/// How long a test waits for jobd's next message before it fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// A scripted worker session.
pub struct RawWorker {
    tx: mpsc::Sender<pb::WorkerMessage>,
    rx: Streaming<pb::ServerMessage>,
    /// jobd's answer to the attach.
    pub attached: pb::Attached,
}

/// An attach of worker `name` serving `functions` (no schemas) with `slots`.
pub fn attach(name: &str, functions: &[&str], slots: u32) -> pb::Attach {
    pb::Attach {
        name: name.to_owned(),
        instance: format!("{name}-{}", jobd_proto::JobId::new()),
        functions: functions
            .iter()
            .map(|f| pb::FunctionDeclaration {
                name: (*f).to_owned(),
                description: format!("{f}, served by a test worker"),
                ..Default::default()
            })
            .collect(),
        slots,
        ..Default::default()
    }
}

impl RawWorker {
    /// Opens a session on `channel` (with `token` as its bearer token, if
    /// any) and sends `attach`; fails with jobd's status if it refuses.
    pub async fn open(
        channel: Channel,
        attach: pb::Attach,
        token: Option<&str>,
    ) -> Result<Self, Status> {
        let (tx, outgoing) = mpsc::channel(64);
        tx.send(message(Kind::Attach(attach)))
            .await
            .expect("the stream is open");
        let mut request = Request::new(ReceiverStream::new(outgoing));
        if let Some(token) = token {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii");
            request.metadata_mut().insert("authorization", value);
        }
        let mut rx = WorkerServiceClient::new(channel)
            .session(request)
            .await?
            .into_inner();
        let attached = match rx.message().await? {
            Some(pb::ServerMessage {
                kind: Some(pb::server_message::Kind::Attached(attached)),
            }) => attached,
            other => panic!("expected Attached, got {other:?}"),
        };
        Ok(Self { tx, rx, attached })
    }

    /// Sends one message (false if the stream is gone).
    pub async fn send(&self, kind: Kind) -> bool {
        self.tx.send(message(kind)).await.is_ok()
    }

    /// jobd's next message, or how the stream ended; fails the test after
    /// ten seconds of silence.
    pub async fn next(&mut self) -> Result<Option<pb::server_message::Kind>, Status> {
        tokio::time::timeout(PATIENCE, self.rx.message())
            .await
            .expect("jobd said nothing for 10 s")
            .map(|m| m.and_then(|m| m.kind))
    }

    /// jobd's next message, which must be an assignment.
    pub async fn assignment(&mut self) -> pb::Assignment {
        match self.next().await {
            Ok(Some(pb::server_message::Kind::Assignment(a))) => a,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    /// jobd's next message, which must be a report's acknowledgement.
    pub async fn ack(&mut self) -> pb::ReportAck {
        match self.next().await {
            Ok(Some(pb::server_message::Kind::Ack(ack))) => ack,
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    /// Reports `value` as `assignment`'s result.
    pub async fn succeed(&self, assignment: &pb::Assignment, value: serde_json::Value) {
        self.send(Kind::Report(pb::Report {
            job_id: assignment.job_id.clone(),
            fencing_token: assignment.fencing_token,
            outcome: Some(pb::report::Outcome::Value(value::from_json(value))),
        }))
        .await;
    }

    /// Frees `slots` slots.
    pub async fn credit(&self, slots: u32) {
        self.send(Kind::Credit(pb::Credit { slots })).await;
    }

    /// Sends a heartbeat every `every` until the returned task is aborted or
    /// the session is closed, for a test worker that must stay attached
    /// while it waits for an assignment.
    pub fn heartbeats(&self, every: Duration) -> tokio_util::task::AbortOnDropHandle<()> {
        // A weak sender, so the heartbeats never keep a closed session open.
        let tx = self.tx.downgrade();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(tx) = tx.upgrade() else { return };
                if tx
                    .send(message(Kind::Heartbeat(pb::Heartbeat {})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }))
    }

    /// Ends the worker's side of the stream.
    pub fn close(self) -> Streaming<pb::ServerMessage> {
        drop(self.tx);
        self.rx
    }
}

fn message(kind: Kind) -> pb::WorkerMessage {
    pb::WorkerMessage { kind: Some(kind) }
}
