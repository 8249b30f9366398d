//! Admission: what a submission must pass before the store records it (the
//! function exists, runs on the pool asked for, and takes the argument), and
//! what the store's answer means to the caller.
//!
//! Every check here runs before the store is asked, so a refused argument
//! never costs a queue slot or a write.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::FutureExt as _;
use jobd_proto::{JobId, JobState};

use super::Inner;
use crate::{
    Error,
    function::{Function, PoolKind},
    job::{PoolName, json_len},
    store::{NewJob, QueueName, Submitted},
};

/// A validated submission.
#[derive(Debug, Clone, Default)]
pub struct SubmitSpec {
    /// The registered function to run.
    pub function: String,
    /// Its argument.
    pub args: serde_json::Value,
    /// The pool the client asked for, if any: the function's own, or
    /// `process` for an async or blocking function of this server (see
    /// [`Function::runs_on`](crate::function::Function::runs_on)).
    pub pool: Option<PoolName>,
    /// The client's request id, if any.
    pub request_id: Option<String>,
    /// Labels to store with the job.
    pub labels: BTreeMap<String, String>,
    /// Higher starts first within the pool; equal priorities in submission
    /// order. The gRPC layer accepts -1000 to 1000; the engine takes any.
    pub priority: i32,
    /// Not started before this time; `None` (or a time past) for at once.
    pub not_before: Option<SystemTime>,
    /// The running-time limit of each attempt, if any.
    pub timeout: Option<Duration>,
    /// How many attempts retryable failures may use in all; 0 counts as 1.
    pub max_attempts: u32,
    /// Labels a remote worker must carry to run the job (only for
    /// functions served by workers).
    pub worker_labels: BTreeMap<String, String>,
}

impl Inner {
    /// Checks a submission; the job the store is to record.
    pub(super) fn prepare(&self, spec: SubmitSpec) -> Result<NewJob, Error> {
        if !self.accepting.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let (function, pool) = self.function_for(&spec)?;
        let args_bytes = json_len(&spec.args);
        if args_bytes > self.max_args_bytes {
            return Err(Error::invalid(
                "args",
                format!(
                    "is {args_bytes} bytes of JSON; the server takes at most {} (--max-args-bytes)",
                    self.max_args_bytes
                ),
            ));
        }
        let violations = function.check_args(&spec.args);
        if !violations.is_empty() {
            return Err(Error::ArgsRejected {
                function: spec.function,
                violations,
            });
        }
        let pool = PoolName::of(pool);
        if function.pool() != PoolKind::Worker && !spec.worker_labels.is_empty() {
            return Err(Error::invalid(
                "worker_labels",
                format!(
                    "function {:?} runs on the {pool} pool; worker labels are for functions served by remote workers",
                    spec.function
                ),
            ));
        }
        Ok(NewJob {
            function: Arc::clone(function.name()),
            pool,
            args: spec.args,
            labels: spec.labels,
            worker_labels: spec.worker_labels,
            request_id: spec.request_id,
            priority: spec.priority,
            not_before: spec.not_before,
            timeout: spec.timeout,
            max_attempts: spec.max_attempts.max(1),
            retry_safe: function.retry_safe(),
        })
    }

    /// The function `spec` names (one of jobd's, or one a remote worker
    /// declared), if it exists and may run on the pool asked for; and the
    /// pool the job goes to.
    pub(super) fn function_for(
        &self,
        spec: &SubmitSpec,
    ) -> Result<(FunctionRef<'_>, PoolKind), Error> {
        let function = match self.registry.get(&spec.function) {
            Some(function) => FunctionRef::Local(function),
            None => FunctionRef::Declared(
                self.workers
                    .function(&spec.function)
                    .ok_or_else(|| Error::UnknownFunction(spec.function.clone()))?,
            ),
        };
        let home = function.pool();
        let Some(requested) = &spec.pool else {
            return Ok((function, home));
        };
        match PoolKind::from_name(requested.as_str()) {
            Some(kind) if function.runs_on(kind) => Ok((function, kind)),
            Some(kind) => {
                let also = if function.runs_on(PoolKind::Process) && kind != PoolKind::Process {
                    " (or the process pool)"
                } else {
                    ""
                };
                Err(Error::invalid(
                    "pool",
                    format!(
                        "function {:?} runs on the {home} pool{also}, not the {requested} pool",
                        spec.function
                    ),
                ))
            }
            None => Err(Error::invalid(
                "pool",
                format!(
                    "this server has no pool {:?} (its pools are \"async\", \"blocking\", \"worker\" and \"process\"; function {:?} runs on the {home} pool)",
                    requested.as_str(),
                    spec.function
                ),
            )),
        }
    }

    /// Hands a checked job to the store, which takes its queue place now;
    /// the future says what became of it. Safe to drop mid-way (a client
    /// that hangs up): once the store has the job it queues it itself.
    pub(super) fn admit(
        self: &Arc<Self>,
        job: NewJob,
    ) -> impl Future<Output = Result<(JobId, JobState), Error>> + Send + 'static {
        let pool = job.pool.clone();
        let request_id = job.request_id.clone();
        // A job for remote workers waits in the queue of its function and
        // worker labels, which a dispatcher (lane) serves. The lane starts
        // once the store has taken the job, so a refused job (a full queue,
        // one label set too many) leaves no lane behind.
        let lane = (pool == PoolName::of(PoolKind::Worker))
            .then(|| QueueName::routed(&pool, &job.function, &job.worker_labels));
        let submitted = self.store.submit(job);
        let inner = Arc::clone(self);
        submitted.map(move |submitted| (inner, submitted)).then(
            move |(inner, submitted)| async move {
                let submitted = submitted.map_err(Error::Store)?;
                if let (Some(queue), Submitted::New(_) | Submitted::Existing { .. }) =
                    (&lane, &submitted)
                {
                    inner.workers.ensure_lane(queue);
                }
                match submitted {
                    Submitted::New(id) => Ok((id, JobState::Pending)),
                    Submitted::Existing {
                        id,
                        same_content: true,
                    } => Ok((id, inner.state(id).await?)),
                    Submitted::Existing {
                        id,
                        same_content: false,
                    } => Err(Error::DuplicateRequest {
                        request_id: request_id.unwrap_or_default(),
                        existing: id,
                    }),
                    Submitted::QueueFull { capacity } => Err(Error::QueueFull { pool, capacity }),
                    Submitted::TooManyQueues { max } => Err(Error::invalid(
                        "worker_labels",
                        format!(
                            "the worker pool holds its most queues ({max} distinct functions and worker label sets); use fewer label sets"
                        ),
                    )),
                    Submitted::Closed => Err(Error::ShuttingDown),
                }
            },
        )
    }
}

/// A function found by name: one of jobd's own, or one a remote worker
/// declared (held by reference count, as workers may replace it).
pub(super) enum FunctionRef<'a> {
    Local(&'a Function),
    Declared(Arc<Function>),
}

impl std::ops::Deref for FunctionRef<'_> {
    type Target = Function;

    fn deref(&self) -> &Function {
        match self {
            Self::Local(function) => function,
            Self::Declared(function) => function,
        }
    }
}
