//! What a caller asks for, as the client's own types: a submission, a map's
//! options, a list filter, a wait's `return_when`, a watch. Each is plain
//! data with builder methods.
//!
//! No calls and no wire types: `wire` turns these into requests, and the
//! modules that make calls take them. Keeping them apart from both is what
//! keeps the module graph a DAG.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use jobd_proto::{JobId, JobState};

use crate::answer::ResumePoint;

/// A submission with every option;
/// [`JobClient::submit`](crate::JobClient::submit) covers the common case.
///
/// ```
/// use jobd_client::Submission;
/// let s = Submission::new("hello", serde_json::json!("Ann"))
///     .label("team", "infra")
///     .request_id("order-42");
/// assert_eq!(s.function, "hello");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Submission {
    /// The registered function to run.
    pub function: String,
    /// Its argument, any JSON value.
    pub args: serde_json::Value,
    /// The pool to require ("async" or "blocking"); `None` for the
    /// function's own.
    pub pool: Option<String>,
    /// A client request id (AIP-155), stored with the job. Submitting twice
    /// with one request id and the same function and arguments returns the
    /// first job; with different content the server answers ALREADY_EXISTS.
    /// When `None`, the client makes one up, so its own retries are safe.
    pub request_id: Option<String>,
    /// Labels stored with the job.
    pub labels: HashMap<String, String>,
    /// Priority within the job's pool, -1000 to 1000 (default 0): a higher
    /// one starts first, equal ones in submission order.
    pub priority: i32,
    /// Do not start the job before this time (at most 30 days ahead; the
    /// past means at once). Wins over `delay` when both are set.
    pub not_before: Option<std::time::SystemTime>,
    /// Do not start the job until this long after the server accepts it (at
    /// most 30 days).
    pub delay: Option<std::time::Duration>,
    /// Running-time limit of each attempt (more than 0, at most 30 days):
    /// past it the job ends FAILED with error kind TIMED_OUT.
    pub timeout: Option<std::time::Duration>,
    /// How many attempts the job may make in all (1 to 100; 0 means 1):
    /// when the function fails with a retryable error it runs again after
    /// an exponential backoff with jitter, while attempts remain.
    pub max_attempts: u32,
    /// Only remote workers carrying all of these labels may run the job
    /// (for functions served by workers).
    pub worker_labels: HashMap<String, String>,
}

impl Submission {
    /// A submission of `function` with `args` and no options.
    pub fn new(function: impl Into<String>, args: serde_json::Value) -> Self {
        Self {
            function: function.into(),
            args,
            ..Self::default()
        }
    }

    /// Requires the job to run on `pool`.
    #[must_use]
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }

    /// Sets the client request id.
    #[must_use]
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// Adds a label.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Requires a worker label: only remote workers carrying `key=value`
    /// may run the job.
    #[must_use]
    pub fn worker_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.worker_labels.insert(key.into(), value.into());
        self
    }

    /// Sets the priority (-1000 to 1000; the server refuses others with
    /// INVALID_ARGUMENT).
    #[must_use]
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Starts the job no sooner than `delay` after the server accepts it
    /// (the job is pending meanwhile, and can be cancelled).
    #[must_use]
    pub fn delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Limits how long each attempt may run; see [`Submission::timeout`]'s
    /// field.
    #[must_use]
    pub fn timeout(mut self, limit: std::time::Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Allows up to `n` attempts in all for retryable failures.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Starts the job no sooner than `at`.
    #[must_use]
    pub fn not_before(mut self, at: std::time::SystemTime) -> Self {
        self.not_before = Some(at);
        self
    }
}

/// What to map and how: the function, the options every job shares, and
/// how results come back. [`JobClient::map`](crate::JobClient::map) covers
/// the common case.
///
/// ```
/// use jobd_client::MapOptions;
/// let options = MapOptions::new("sha256")
///     .unordered()
///     .max_in_flight(16)
///     .priority(5)
///     .label("batch", "nightly");
/// assert!(!options.ordered);
/// ```
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// The registered function to run on each argument.
    pub function: String,
    /// The pool to require ("async" or "blocking"); `None` for the
    /// function's own.
    pub pool: Option<String>,
    /// Labels stored with every job.
    pub labels: HashMap<String, String>,
    /// Priority of every job, -1000 to 1000.
    pub priority: i32,
    /// Running-time limit of each attempt of each job.
    pub timeout: Option<Duration>,
    /// Attempts per job for retryable failures (0 or 1 for one attempt).
    pub max_attempts: u32,
    /// True (the default): results in argument order, as `Executor.map`.
    /// False: each result as soon as its job finishes.
    pub ordered: bool,
    /// How many arguments may be submitted and unanswered at once; 0 for
    /// the server's default (64). The server coerces larger values to its
    /// maximum (1,024).
    pub max_in_flight: u32,
}

impl MapOptions {
    /// Maps `function`, ordered, with the server's default in-flight bound.
    pub fn new(function: impl Into<String>) -> Self {
        Self {
            function: function.into(),
            pool: None,
            labels: HashMap::new(),
            priority: 0,
            timeout: None,
            max_attempts: 0,
            ordered: true,
            max_in_flight: 0,
        }
    }

    /// Results as the jobs finish, not in argument order.
    #[must_use]
    pub fn unordered(mut self) -> Self {
        self.ordered = false;
        self
    }

    /// At most `n` arguments submitted and unanswered at once.
    #[must_use]
    pub fn max_in_flight(mut self, n: u32) -> Self {
        self.max_in_flight = n;
        self
    }

    /// Requires the jobs to run on `pool`.
    #[must_use]
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }

    /// Adds a label to every job.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets every job's priority.
    #[must_use]
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Limits how long each attempt of each job may run.
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Allows up to `n` attempts per job for retryable failures.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }
}

/// When [`JobClient::wait`](crate::JobClient::wait) answers, as
/// `concurrent.futures.wait`'s `return_when`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReturnWhen {
    /// As soon as any job is done (at once if one already is).
    FirstCompleted,
    /// As soon as any job ends failed; a cancelled job does not count, as in
    /// Python. With no failure, when all are done.
    FirstException,
    /// When every job is done (Python's default).
    #[default]
    AllCompleted,
}

/// Which jobs [`JobClient::list_jobs`](crate::JobClient::list_jobs) returns;
/// every condition given must hold, and the default matches every job.
///
/// ```
/// use jobd_client::{JobState, ListFilter};
/// let filter = ListFilter::default()
///     .state(JobState::Failed)
///     .function("sha256")
///     .label("team", "infra");
/// assert_eq!(filter.states, [JobState::Failed]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only jobs in one of these states; empty means any state.
    pub states: Vec<JobState>,
    /// Only jobs of this function.
    pub function: Option<String>,
    /// Only jobs carrying all of these labels with these values.
    pub labels: HashMap<String, String>,
    /// Only jobs submitted strictly after this time.
    pub submitted_after: Option<SystemTime>,
    /// Only jobs submitted strictly before this time.
    pub submitted_before: Option<SystemTime>,
}

impl ListFilter {
    /// Also accepts jobs in `state`.
    #[must_use]
    pub fn state(mut self, state: JobState) -> Self {
        self.states.push(state);
        self
    }

    /// Only jobs of `function`.
    #[must_use]
    pub fn function(mut self, function: impl Into<String>) -> Self {
        self.function = Some(function.into());
        self
    }

    /// Only jobs with label `key` set to `value`.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// What to watch: job ids, or a filter (function, states, labels), not
/// both; and optionally where to resume.
///
/// ```
/// use jobd_client::{JobState, Watch};
/// let finished_resizes = Watch::all()
///     .function("resize")
///     .state(JobState::Succeeded)
///     .state(JobState::Failed)
///     .label("team", "media");
/// assert_eq!(finished_resizes.states.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watch {
    /// The jobs to watch (1 to 1,000); empty to watch by filter.
    pub ids: Vec<JobId>,
    /// Only jobs of this function.
    pub function: Option<String>,
    /// Only events whose new state is one of these (progress events are
    /// `Running`).
    pub states: Vec<JobState>,
    /// Only jobs carrying all of these labels with these values.
    pub labels: HashMap<String, String>,
    /// Resume after this event (see
    /// [`JobEvent::resume_point`](crate::JobEvent::resume_point)).
    pub resume: Option<ResumePoint>,
    /// Reconnect by itself when the stream breaks (see
    /// [`Watch::auto_resume`]).
    pub auto_resume: bool,
}

impl Watch {
    /// Watches these jobs: a snapshot of each first (a finished job's final
    /// event at once), then every change; the stream ends after the final
    /// event of the last one.
    pub fn ids(ids: impl IntoIterator<Item = JobId>) -> Self {
        Self {
            ids: ids.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Watches every job's events from now on (narrow it with the filter
    /// methods); the stream runs until dropped.
    #[must_use]
    pub fn all() -> Self {
        Self::default()
    }

    /// Only jobs of `function`.
    #[must_use]
    pub fn function(mut self, function: impl Into<String>) -> Self {
        self.function = Some(function.into());
        self
    }

    /// Also events that move a job into `state`.
    #[must_use]
    pub fn state(mut self, state: JobState) -> Self {
        self.states.push(state);
        self
    }

    /// Only jobs with label `key` set to `value`.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Resumes after `point`: the server replays the matching events since
    /// then from its history, without snapshots.
    #[must_use]
    pub fn resume_after(mut self, point: ResumePoint) -> Self {
        self.resume = Some(point);
        self
    }

    /// With `true`, a stream that breaks (a transport error or
    /// `UNAVAILABLE`) resumes by itself: the client watches again with the
    /// last event's [`ResumePoint`] (and, for a watch of ids, only the ids
    /// whose final event it has not had yet), so the stream goes on with
    /// no gap and no repeat. It tries up to 3 times per break, pausing
    /// 50 ms, 200 ms, then 800 ms before each try (a resumed stream that
    /// breaks again before any event draws on the same 3), and then yields
    /// the error: so a server that shut down still ends the stream, about a
    /// second later. A server that restarted meanwhile refuses the resume with
    /// `FAILED_PRECONDITION`: that error ends the stream, since the caller
    /// must re-read the jobs' state.
    /// [`JobEventKind::Lagged`](crate::JobEventKind::Lagged) events pass
    /// through as they come.
    ///
    /// It cannot resume a break before the stream's first event (there is
    /// no resume point yet, unless [`Watch::resume_after`] gave one), nor
    /// one in the middle of a watch of ids' snapshots (resuming sends no
    /// snapshots, so those not received would be lost): then the error
    /// ends the stream as without this option.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// use futures::StreamExt as _;
    /// use jobd_client::Watch;
    ///
    /// let mut events = client
    ///     .watch(Watch::all().function("resize").auto_resume(true))
    ///     .await?;
    /// while let Some(event) = events.next().await {
    ///     // A dropped connection does not end the loop; a restarted
    ///     // server does (FAILED_PRECONDITION).
    ///     let event = event?;
    ///     println!("{} {:?} {:?}", event.seq, event.job, event.state);
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn auto_resume(mut self, on: bool) -> Self {
        self.auto_resume = on;
        self
    }
}
