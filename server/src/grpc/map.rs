//! The `Map` stream: one function over a stream of arguments, as Python's
//! `Executor.map` across the network.
//!
//! Each argument becomes a real job through the engine's submit path; the
//! stream answers one result per argument, in order or as completed. One
//! task drives a map: it reads arguments only while fewer than
//! `max_in_flight` are unanswered (so a fast client is held back by HTTP/2
//! flow control, never buffered), submits each (checked and queued in
//! argument order, committed concurrently), and waits for the jobs on the
//! server. Results wait in a bounded channel for the client to read them;
//! while it does not, the task stops and, in turn, stops reading.
//!
//! A client that goes away (the response stream is dropped) abandons the
//! map: every job it still waits for is cancelled, as
//! `Executor.shutdown(cancel_futures=True)` would. A later request that
//! cannot be taken (too large, undecodable, or breaking the rules) ends the
//! reading: the arguments accepted before it are answered, then the stream
//! ends with that request's error status, never OK.

use std::collections::VecDeque;

use futures::{
    StreamExt as _,
    future::BoxFuture,
    stream::{FuturesOrdered, FuturesUnordered},
};
use jobd_proto::{JobId, pb, value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::{decode, item_error, wire_outcome, wire_state};
use crate::{
    Error,
    engine::{Engine, SubmitSpec},
    job::Finished,
    limits::InFlightPermit,
};

/// Answers written but not yet taken by the transport. Small: the bound on
/// what a map holds is `max_in_flight`, and this only smooths the hand-off.
const RESPONSE_BUFFER: usize = 16;

/// The response stream of one Map call.
pub(crate) type MapStream = ReceiverStream<Result<pb::MapResponse, Status>>;

/// Reads the first request, checks it, and starts the task that drives the
/// map. Errors in the first request fail the call itself.
pub(super) async fn start(
    engine: Engine,
    permit: Option<InFlightPermit>,
    mut inputs: Streaming<pb::MapRequest>,
) -> Result<MapStream, Status> {
    let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
    let Some(first) = inputs.message().await? else {
        // Closed before asking for anything: nothing to answer.
        return Ok(ReceiverStream::new(rx));
    };
    let plan = decode::MapPlan::try_from(decode::Received(first.start, engine.clock().now()))?;
    engine.check(&plan.template)?;
    let map = Map {
        engine,
        plan,
        abandon: CancellationToken::new(),
        next_index: 0,
    };
    tokio::spawn(map.drive(first.args.into(), inputs, tx, permit));
    Ok(ReceiverStream::new(rx))
}

struct Map {
    engine: Engine,
    plan: decode::MapPlan,
    /// Fired when the client goes away: each job still awaited is cancelled.
    abandon: CancellationToken,
    next_index: u64,
}

/// What became of one argument.
enum Answer {
    Finished {
        index: u64,
        id: JobId,
        finished: Finished,
    },
    Rejected {
        index: u64,
        err: Error,
    },
    /// The server is shutting down: the job's outcome cannot be learnt, or
    /// the argument cannot be accepted. The stream ends with this error.
    Lost(Error),
    /// The client went away; the job was cancelled.
    Abandoned,
}

/// The unanswered arguments, in the order their answers go out.
enum InFlight {
    Ordered(FuturesOrdered<BoxFuture<'static, Answer>>),
    AsCompleted(FuturesUnordered<BoxFuture<'static, Answer>>),
}

impl InFlight {
    fn push(&mut self, answer: BoxFuture<'static, Answer>) {
        match self {
            Self::Ordered(set) => set.push_back(answer),
            Self::AsCompleted(set) => set.push(answer),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Ordered(set) => set.len(),
            Self::AsCompleted(set) => set.len(),
        }
    }

    async fn next(&mut self) -> Option<Answer> {
        match self {
            Self::Ordered(set) => set.next().await,
            Self::AsCompleted(set) => set.next().await,
        }
    }
}

/// How a map's loop ended.
enum End {
    /// Every argument was answered after the client half-closed.
    Done,
    /// The client went away, or the stream must end with an error.
    Abandoned,
}

impl Map {
    async fn drive(
        mut self,
        mut backlog: VecDeque<prost_types::Value>,
        mut inputs: Streaming<pb::MapRequest>,
        tx: mpsc::Sender<Result<pb::MapResponse, Status>>,
        _permit: Option<InFlightPermit>,
    ) {
        let mut in_flight = if self.plan.ordered {
            InFlight::Ordered(FuturesOrdered::new())
        } else {
            InFlight::AsCompleted(FuturesUnordered::new())
        };
        let mut reading = true;
        // A later request that could not be taken: what the stream ends
        // with once every argument accepted before it is answered.
        let mut refused: Option<Status> = None;
        let end = loop {
            while in_flight.len() < self.plan.max_in_flight
                && let Some(args) = backlog.pop_front()
            {
                in_flight.push(self.submit(args));
            }
            if !reading && backlog.is_empty() && in_flight.len() == 0 {
                if let Some(status) = refused.take() {
                    // Never OK: the client must learn that arguments after
                    // the answered ones were not taken.
                    let _ = tx.send(Err(status)).await;
                }
                break End::Done;
            }
            // Read only when every argument read so far is submitted and
            // there is room: this is the backpressure.
            let read = reading && backlog.is_empty() && in_flight.len() < self.plan.max_in_flight;
            tokio::select! {
                () = tx.closed() => break End::Abandoned,
                request = inputs.message(), if read => match request {
                    Ok(Some(request)) => match decode::map_args(request) {
                        Ok(args) => backlog.extend(args),
                        Err(err) => {
                            reading = false;
                            refused = Some(err.into());
                        }
                    },
                    Ok(None) => reading = false,
                    // A request too large or undecodable, or a broken
                    // stream. Stop reading either way; a client that went
                    // away also drops the response stream (`tx.closed()`,
                    // which abandons the map), while one that is still
                    // reading gets the answers of what it sent before, then
                    // this status.
                    Err(status) => {
                        tracing::debug!(%status, "map request stream failed; no more arguments");
                        reading = false;
                        refused = Some(status);
                    }
                },
                Some(answer) = in_flight.next(), if in_flight.len() > 0 => {
                    let response = match answer {
                        Answer::Finished { index, id, finished } => {
                            let (value, error) = wire_outcome(finished.outcome);
                            Ok(pb::MapResponse {
                                index,
                                job_id: id.to_string(),
                                state: wire_state(finished.state),
                                value,
                                error,
                                rejected: None,
                            })
                        }
                        Answer::Rejected { index, err } => Ok(pb::MapResponse {
                            index,
                            rejected: Some(item_error(err)),
                            ..pb::MapResponse::default()
                        }),
                        Answer::Lost(err) => Err(Status::from(err)),
                        Answer::Abandoned => continue,
                    };
                    let failed = response.is_err();
                    if tx.send(response).await.is_err() || failed {
                        break End::Abandoned;
                    }
                }
            }
        };
        if let End::Abandoned = end {
            // Each unanswered argument cancels its own job once submitted;
            // drive them until all have.
            self.abandon.cancel();
            let mut cancelled = 0_usize;
            while in_flight.next().await.is_some() {
                cancelled += 1;
            }
            tracing::debug!(
                unanswered = cancelled,
                "map abandoned; its unfinished jobs were cancelled"
            );
        }
    }

    /// Submits one argument now (it takes its place in the queue at once)
    /// and returns the future of its answer.
    fn submit(&mut self, args: prost_types::Value) -> BoxFuture<'static, Answer> {
        let index = self.next_index;
        self.next_index += 1;
        let spec = SubmitSpec {
            args: value::to_json(args),
            ..self.plan.template.clone()
        };
        let admission = self.engine.submit_in_order(spec);
        let engine = self.engine.clone();
        let abandon = self.abandon.clone();
        Box::pin(async move {
            let id = match admission.await {
                Ok((id, _)) => id,
                // Draining: no later argument can be accepted either, so the
                // stream ends instead of refusing each in turn.
                Err(Error::ShuttingDown) => return Answer::Lost(Error::ShuttingDown),
                Err(err) => return Answer::Rejected { index, err },
            };
            tokio::select! {
                biased;
                () = abandon.cancelled() => {
                    if let Err(err) = engine.cancel(id).await {
                        tracing::debug!(%id, %err, "could not cancel an abandoned map's job");
                    }
                    Answer::Abandoned
                }
                finished = engine.wait(id) => match finished {
                    Ok(finished) => Answer::Finished { index, id, finished },
                    Err(err) => Answer::Lost(err),
                },
            }
        })
    }
}
