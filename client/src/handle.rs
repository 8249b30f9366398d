//! A handle to one remote job: the network's `concurrent.futures.Future`.

use std::{
    future::{Future, IntoFuture},
    pin::Pin,
    time::{Duration, Instant},
};

use jobd_proto::{JobId, JobState, pb};
use serde::de::DeserializeOwned;

use crate::{
    answer::{CancelReport, JobInfo, JobOutcome, Progress},
    client::JobClient,
    error::Error,
    retry::cut_short,
    wire,
};

/// A submitted job. Ask it whether it is [`done`](Self::done), wait for its
/// [`result`](Self::result), or `.await` it directly.
///
/// ```no_run
/// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
/// let job = client.submit("sleep", serde_json::json!(0.1)).await?;
/// assert!(!job.done().await?);
/// let slept: f64 = job.result_as().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct JobHandle {
    client: JobClient,
    id: JobId,
}

impl JobHandle {
    pub(crate) fn new(client: JobClient, id: JobId) -> Self {
        Self { client, id }
    }

    /// The job's id.
    #[must_use]
    pub fn id(&self) -> JobId {
        self.id
    }

    /// True once the job has finished, without waiting.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] and transport errors.
    pub async fn done(&self) -> Result<bool, Error> {
        Ok(self.state().await?.is_terminal())
    }

    /// The job's current state, without waiting.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] and transport errors.
    pub async fn state(&self) -> Result<JobState, Error> {
        let answer = self
            .client
            .rpc()
            .done(pb::DoneRequest {
                job_id: self.id.to_string(),
            })
            .await?
            .into_inner();
        wire::parse_state(answer.state)
    }

    /// Everything the server knows about the job.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] and transport errors.
    pub async fn status(&self) -> Result<JobInfo, Error> {
        let job = self
            .client
            .rpc()
            .get_job(pb::GetJobRequest {
                job_id: self.id.to_string(),
            })
            .await?
            .into_inner()
            .job
            .ok_or_else(|| Error::Protocol("GetJob answered without a job".to_owned()))?;
        wire::job_info(job)
    }

    /// The job's latest progress report (`GetJob`), or `None` if it has
    /// reported none (or its attempt has just started). To follow progress
    /// live, [`JobClient::watch`] the job instead of polling this.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// let job = client.submit("count", serde_json::json!({"steps": 10, "seconds": 5})).await?;
    /// if let Some(p) = job.progress().await? {
    ///     println!("{:.0}% done: {}", p.fraction * 100.0, p.message);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] and transport errors.
    pub async fn progress(&self) -> Result<Option<Progress>, Error> {
        Ok(self.status().await?.progress)
    }

    /// Waits for the job to finish and returns its value.
    ///
    /// # Errors
    ///
    /// [`Error::JobFailed`], [`Error::Cancelled`], [`Error::NotFound`],
    /// transport errors.
    pub async fn result(&self) -> Result<serde_json::Value, Error> {
        self.outcome(None).await?.into_value(self.id)
    }

    /// As [`JobHandle::result`], giving up after `timeout` with
    /// [`Error::Timeout`] (the job keeps running).
    ///
    /// # Errors
    ///
    /// As [`JobHandle::result`], plus [`Error::Timeout`].
    pub async fn result_timeout(&self, timeout: Duration) -> Result<serde_json::Value, Error> {
        self.outcome(Some(timeout)).await?.into_value(self.id)
    }

    /// Waits for the value and deserializes it into `R`.
    ///
    /// # Errors
    ///
    /// As [`JobHandle::result`], plus [`Error::Json`].
    pub async fn result_as<R: DeserializeOwned>(&self) -> Result<R, Error> {
        Ok(serde_json::from_value(self.result().await?)?)
    }

    /// Waits (at most `timeout`, if given) for the job to finish and returns
    /// how it ended, with failure and cancellation as data.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], [`Error::NotFound`], transport errors.
    ///
    /// The server caps how long one `Result` call waits (`jobd
    /// --max-wait`, 60 s by default); when it cuts a call short of
    /// `timeout` (or of forever), this asks again, so the cap never shows.
    pub async fn outcome(&self, timeout: Option<Duration>) -> Result<JobOutcome, Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let answer = loop {
            let asked = Instant::now();
            let call = self
                .client
                .rpc()
                .result(pb::ResultRequest {
                    job_id: self.id.to_string(),
                    timeout: deadline
                        .map(|d| d.saturating_duration_since(Instant::now()))
                        .map(wire::duration),
                })
                .await;
            match call {
                Ok(answer) => break answer.into_inner(),
                Err(status)
                    if status.code() == tonic::Code::DeadlineExceeded
                        && cut_short(asked, deadline) => {}
                Err(status) => return Err(status.into()),
            }
        };
        wire::result_outcome(answer)
    }

    /// Forgets the finished job on the server: its record and result.
    /// Afterwards the server answers [`Error::NotFound`] for it, saying it
    /// was deleted (and a wait for it ends with that error, never hangs).
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// let job = client.submit("hello", serde_json::json!("Ann")).await?;
    /// job.result().await?;
    /// job.delete().await?;
    /// assert!(job.status().await.is_err());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FAILED_PRECONDITION` while the job is pending or
    /// running (cancel it first); [`Error::NotFound`]; transport errors.
    pub async fn delete(&self) -> Result<(), Error> {
        self.client
            .rpc()
            .delete_job(pb::DeleteJobRequest {
                job_id: self.id.to_string(),
            })
            .await?;
        Ok(())
    }

    /// Asks the server to cancel the job; see [`CancelReport`].
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] and transport errors.
    pub async fn cancel(&self) -> Result<CancelReport, Error> {
        let answer = self
            .client
            .rpc()
            .cancel(pb::CancelRequest {
                job_id: self.id.to_string(),
            })
            .await?
            .into_inner();
        wire::cancel_report(answer)
    }
}

impl IntoFuture for JobHandle {
    type Output = Result<serde_json::Value, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    /// Awaiting a handle waits for its result, like `future.result()`.
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.result().await })
    }
}
