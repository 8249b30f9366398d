//! The connection to a jobd server and the calls that are not about one job.

use jobd_proto::{JobId, JobState, pb};
use serde::Serialize;
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use crate::{
    answer::{FunctionInfo, WorkerInfo},
    connect::{CallCredentials, ConnectOptions},
    error::Error,
    handle::JobHandle,
    request::Submission,
    retry, wire,
};

/// **The raw generated gRPC client**, as [`JobClient`] holds it: every call
/// goes through [`CallCredentials`], which adds the bearer token when there
/// is one.
///
/// This and [`JobClient::rpc`] are the library's one escape hatch to the
/// generated code: its requests and answers are the `pb` types of the
/// `jobd-proto` crate, not this library's own, and follow the wire contract
/// (`proto/jobd/v1/jobd.proto`) rather than this library's API. Depend on
/// `jobd-proto` to build them.
pub type RpcClient =
    pb::job_service_client::JobServiceClient<InterceptedService<Channel, CallCredentials>>;

/// A connection to one jobd server. Cheap to clone: clones share the
/// underlying HTTP/2 connection, and calls on it run concurrently.
#[derive(Debug, Clone)]
pub struct JobClient {
    rpc: RpcClient,
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

    /// **The raw generated gRPC client** ([`RpcClient`]), for calls this
    /// library does not wrap or for sending hand-made requests. It shares
    /// this client's connection and sends its token, if any. Its types are
    /// `jobd_proto::pb`'s, not this library's.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), Box<dyn std::error::Error>> {
    /// use jobd_proto::pb;
    ///
    /// let answer = client.rpc().list_functions(pb::ListFunctionsRequest {}).await?;
    /// println!("{} functions", answer.into_inner().functions.len());
    /// # Ok(()) }
    /// ```
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

    /// The remote worker sessions attached to the server now, oldest first:
    /// who they are, what they serve and how busy they are (see
    /// [`Worker`](crate::Worker) for serving functions from a process of
    /// your own).
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// for worker in client.workers().await? {
    ///     println!("{} serves {:?}: {} of {} slots busy", worker.name, worker.functions, worker.busy, worker.slots);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] or [`Error::Rpc`]; [`Error::Protocol`] for a
    /// running job id the client cannot read.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, Error> {
        let answer = self
            .rpc
            .clone()
            .list_workers(pb::ListWorkersRequest {})
            .await?
            .into_inner();
        answer.workers.into_iter().map(wire::worker_info).collect()
    }
}
