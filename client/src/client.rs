//! The connection to a jobd server and the calls that are not about one job.

use std::collections::HashMap;

use jobd_proto::{JobId, JobState, pb};
use serde::Serialize;
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use crate::{CallCredentials, ConnectOptions, Error, handle::JobHandle, retry, wire};

/// The generated stub as [`JobClient`] holds it: every call goes through
/// [`CallCredentials`], which adds the bearer token when there is one.
pub type RpcClient =
    pb::job_service_client::JobServiceClient<InterceptedService<Channel, CallCredentials>>;

/// A connection to one jobd server. Cheap to clone: clones share the
/// underlying HTTP/2 connection, and calls on it run concurrently.
#[derive(Debug, Clone)]
pub struct JobClient {
    rpc: RpcClient,
}

/// A submission with every option; [`JobClient::submit`] covers the common
/// case.
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

/// One function the server can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionInfo {
    /// The name to submit it by.
    pub name: String,
    /// The pool it runs on ("async" or "blocking").
    pub pool: String,
    /// What it does and how to call it.
    pub description: String,
    /// The JSON Schema its argument must match, if it declared one; the
    /// server refuses a submission that does not match it.
    pub args_schema: Option<serde_json::Value>,
    /// What it returns, in words, if it said.
    pub returns: Option<String>,
}

impl JobClient {
    /// Connects to a server. `addr` is a URI such as `http://127.0.0.1:50051`;
    /// a bare `host:port` is taken as `http://host:port`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`] or [`Error::Transport`].
    pub async fn connect(addr: impl AsRef<str>) -> Result<Self, Error> {
        Self::connect_with(addr, ConnectOptions::new()).await
    }

    /// Connects with TLS settings and a bearer token (see
    /// [`ConnectOptions`]). `addr` as for [`JobClient::connect`]; use
    /// `https://` for a server that serves TLS.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use jobd_client::{ConnectOptions, JobClient};
    ///
    /// let options = ConnectOptions::new()
    ///     .ca_certificate_pem(std::fs::read("ca.pem")?)
    ///     .client_identity_pem(std::fs::read("me.pem")?, std::fs::read("me.key")?)
    ///     .bearer_token(std::fs::read_to_string("token")?);
    /// let client = JobClient::connect_with("https://jobd.example:50051", options).await?;
    /// println!("{} functions", client.functions().await?.len());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`], [`Error::InvalidOptions`] (bad PEM, a token
    /// that cannot be a header, TLS settings on an `http://` address), or
    /// [`Error::Transport`] (unreachable, or the TLS handshake failed).
    pub async fn connect_with(
        addr: impl AsRef<str>,
        options: ConnectOptions,
    ) -> Result<Self, Error> {
        let credentials = options.credentials()?;
        let channel = options.endpoint(addr.as_ref())?.connect().await?;
        Ok(Self::from_channel_with(channel, credentials))
    }

    /// Wraps an existing channel (to share it, or to configure timeouts
    /// yourself), sending no token.
    #[must_use]
    pub fn from_channel(channel: Channel) -> Self {
        Self::from_channel_with(channel, CallCredentials::none())
    }

    /// Wraps an existing channel, sending `credentials` with every call.
    #[must_use]
    pub fn from_channel_with(channel: Channel, credentials: CallCredentials) -> Self {
        Self {
            rpc: pb::job_service_client::JobServiceClient::with_interceptor(channel, credentials),
        }
    }

    /// The generated gRPC stub, for calls this library does not wrap. It
    /// sends the client's token, if any.
    #[must_use]
    pub fn rpc(&self) -> RpcClient {
        self.rpc.clone()
    }

    /// Submits `function` with `args` and returns a handle to the job.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] for an unknown function, [`Error::InvalidArgument`],
    /// or [`Error::Rpc`] (e.g. `RESOURCE_EXHAUSTED` when the pool's queue is
    /// full).
    pub async fn submit(
        &self,
        function: &str,
        args: serde_json::Value,
    ) -> Result<JobHandle, Error> {
        self.submit_with(Submission::new(function, args)).await
    }

    /// Submits with arguments serialized from any `Serialize` type.
    ///
    /// # Errors
    ///
    /// As [`JobClient::submit`], plus [`Error::Json`].
    pub async fn submit_json<T: Serialize + ?Sized>(
        &self,
        function: &str,
        args: &T,
    ) -> Result<JobHandle, Error> {
        self.submit(function, serde_json::to_value(args)?).await
    }

    /// Submits with every option.
    ///
    /// # Errors
    ///
    /// As [`JobClient::submit`].
    pub async fn submit_with(&self, submission: Submission) -> Result<JobHandle, Error> {
        let (handle, _) = self.submit_raw(submission).await?;
        Ok(handle)
    }

    /// As [`JobClient::submit_with`], also returning the state the job was in
    /// when the server answered: normally pending, though a fast job may
    /// already be running or finished.
    ///
    /// # Errors
    ///
    /// As [`JobClient::submit`], plus [`Error::Protocol`] for a state this
    /// client does not know (the job was submitted all the same).
    pub async fn submit_with_state(
        &self,
        submission: Submission,
    ) -> Result<(JobHandle, JobState), Error> {
        let (handle, state) = self.submit_raw(submission).await?;
        Ok((handle, wire::parse_state(state)?))
    }

    /// Submits and returns the raw wire state, so that [`Self::submit_with`]
    /// never fails over a state it does not look at.
    async fn submit_raw(&self, submission: Submission) -> Result<(JobHandle, i32), Error> {
        let request = wire::submit_request(submission);
        // Safe to repeat: every submission carries a request id, so a retry
        // of one that did reach the server returns the same job instead of
        // creating a second one.
        let answer = retry::with_retries(|| {
            let (mut rpc, request) = (self.rpc.clone(), request.clone());
            async move { rpc.submit(request).await }
        })
        .await?
        .into_inner();
        let id = wire::parse_id(&answer.job_id)?;
        Ok((self.job(id), answer.state))
    }

    /// Submits many jobs in one call. The outer `Result` is the call's; each
    /// inner one says whether that submission was accepted, in order.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// use jobd_client::Submission;
    /// let batch = (0..100).map(|n| Submission::new("noop", n.into())).collect();
    /// for item in client.submit_batch(batch).await? {
    ///     let job = item?;
    ///     println!("{}", job.id());
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty batch or one over 10,000;
    /// transport errors. Per item: as [`JobClient::submit`].
    pub async fn submit_batch(
        &self,
        submissions: Vec<Submission>,
    ) -> Result<Vec<Result<JobHandle, Error>>, Error> {
        let request = pb::SubmitBatchRequest {
            requests: submissions.into_iter().map(wire::submit_request).collect(),
        };
        let answer = retry::with_retries(|| {
            let (mut rpc, request) = (self.rpc.clone(), request.clone());
            async move { rpc.submit_batch(request).await }
        })
        .await?
        .into_inner();
        Ok(answer
            .results
            .into_iter()
            .map(|result| wire::batch_item(result).map(|id| self.job(id)))
            .collect())
    }

    /// A handle to an existing job, by id. No request is made.
    #[must_use]
    pub fn job(&self, id: JobId) -> JobHandle {
        JobHandle::new(self.clone(), id)
    }

    /// The functions the server can run, sorted by name.
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] or [`Error::Rpc`].
    pub async fn functions(&self) -> Result<Vec<FunctionInfo>, Error> {
        let answer = self
            .rpc
            .clone()
            .list_functions(pb::ListFunctionsRequest {})
            .await?
            .into_inner();
        Ok(answer
            .functions
            .into_iter()
            .map(wire::function_info)
            .collect())
    }
}
