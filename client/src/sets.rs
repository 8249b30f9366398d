//! Calls about many jobs at once: [`JobClient::wait`] and
//! [`JobClient::as_completed`] (`concurrent.futures.wait` and
//! `as_completed` across the network), and listing jobs page by page.
//!
//! Waiting happens on the server: `wait` is one `Wait` call, and
//! `as_completed` keeps one `Result` call open per unfinished job, so
//! neither polls.

use std::time::{Duration, Instant};

use futures::{Stream, TryStreamExt as _, stream::FuturesUnordered};
use jobd_proto::JobId;

use crate::{
    answer::{JobInfo, JobPage},
    client::JobClient,
    error::Error,
    handle::JobHandle,
    request::{ListFilter, ReturnWhen},
    retry::cut_short,
    wire,
};

/// What [`JobClient::wait`] found: Python's `(done, not_done)` pair, each in
/// the order the jobs were given, without repeats.
#[derive(Debug, Clone)]
pub struct WaitResult {
    /// Jobs that have finished (succeeded, failed or were cancelled).
    pub done: Vec<JobHandle>,
    /// Jobs still pending or running.
    pub not_done: Vec<JobHandle>,
}

/// Page size of [`JobClient::list_all`]: the server's maximum, so a walk
/// takes as few calls as it can.
const LIST_ALL_PAGE_SIZE: u32 = 1000;

impl JobClient {
    /// Waits on the server until `return_when` holds for `jobs` or
    /// `timeout` passes, and says which are done at that moment, like
    /// `concurrent.futures.wait`. Running out of time is not an error.
    /// `jobs` are [`JobHandle`]s (or references to them) or [`JobId`]s,
    /// 1 to 1,000 of them.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// use std::time::Duration;
    /// use jobd_client::ReturnWhen;
    /// let jobs = vec![
    ///     client.submit("sleep", serde_json::json!(1)).await?,
    ///     client.submit("sleep", serde_json::json!(5)).await?,
    /// ];
    /// let split = client
    ///     .wait(&jobs, ReturnWhen::FirstCompleted, Some(Duration::from_secs(10)))
    ///     .await?;
    /// println!("{} done, {} not yet", split.done.len(), split.not_done.len());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] if a job is unknown (or was deleted),
    /// [`Error::InvalidArgument`] for no jobs or more than 1,000, transport
    /// errors.
    pub async fn wait<I>(
        &self,
        jobs: I,
        return_when: ReturnWhen,
        timeout: Option<Duration>,
    ) -> Result<WaitResult, Error>
    where
        I: IntoIterator,
        I::Item: Into<JobId>,
    {
        let job_ids: Vec<String> = jobs.into_iter().map(|job| job.into().to_string()).collect();
        let deadline = timeout.map(|t| Instant::now() + t);
        // The server caps one Wait (`jobd --max-wait`) and then answers its
        // split; while that split does not satisfy `return_when` and time
        // remains, ask again. A FIRST_EXCEPTION split with jobs left cannot
        // tell a failure from the cap, so it is asked once more: a failure
        // is then answered at once, which ends the loop.
        let (done, not_done) = loop {
            let asked = Instant::now();
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let request = wire::wait_request(&job_ids, return_when, remaining);
            let (done, not_done) = wire::wait_split(self.rpc().wait(request).await?.into_inner())?;
            let satisfied = match return_when {
                ReturnWhen::FirstCompleted => !done.is_empty(),
                ReturnWhen::FirstException | ReturnWhen::AllCompleted => not_done.is_empty(),
            };
            if satisfied || !cut_short(asked, deadline) {
                break (done, not_done);
            }
        };
        let handles = |ids: Vec<JobId>| ids.into_iter().map(|id| self.job(id)).collect();
        Ok(WaitResult {
            done: handles(done),
            not_done: handles(not_done),
        })
    }

    /// Yields each job as it finishes, in the order they finish (jobs
    /// already finished come first), like `concurrent.futures.as_completed`.
    /// A failed or cancelled job is yielded like any other; ask the handle
    /// for its outcome. An error (an unknown job, a lost connection) is
    /// yielded in that job's place. Holds one server-side `Result` wait per
    /// unfinished job, all on this client's connection.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// use futures::StreamExt as _;
    /// let mut jobs = Vec::new();
    /// for seconds in [3, 1, 2] {
    ///     jobs.push(client.submit("sleep", serde_json::json!(seconds)).await?);
    /// }
    /// let mut finished = client.as_completed(jobs);
    /// while let Some(job) = finished.next().await {
    ///     let job = job?;
    ///     println!("{} finished: {:?}", job.id(), job.outcome(None).await?.result);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn as_completed(
        &self,
        jobs: impl IntoIterator<Item = JobHandle>,
    ) -> impl Stream<Item = Result<JobHandle, Error>> + Send + 'static {
        jobs.into_iter()
            .map(|job| async move {
                // The outcome itself is not needed: the caller asks the
                // handle, and most callers want only some of them.
                job.outcome(None).await.map(|_| job)
            })
            .collect::<FuturesUnordered<_>>()
    }

    /// One page of jobs matching `filter`, newest first. Start with
    /// `page_token` `None`, then pass each page's `next_page_token` (with
    /// the same filter) until it is `None`. `page_size` 0 means the server's
    /// default (100); above 1,000 it is coerced to 1,000.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// use jobd_client::{JobState, ListFilter};
    /// let failed = ListFilter::default().state(JobState::Failed);
    /// let mut token = None;
    /// loop {
    ///     let page = client.list_jobs(&failed, 50, token).await?;
    ///     for job in &page.jobs {
    ///         println!("{} {}", job.id, job.function);
    ///     }
    ///     match page.next_page_token {
    ///         Some(next) => token = Some(next),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a malformed filter or a token made for
    /// another filter; transport errors.
    pub async fn list_jobs(
        &self,
        filter: &ListFilter,
        page_size: u32,
        page_token: Option<String>,
    ) -> Result<JobPage, Error> {
        let request = wire::list_request(filter, page_size, page_token.unwrap_or_default());
        wire::job_page(self.rpc().list_jobs(request).await?.into_inner())
    }

    /// Every job matching `filter`, newest first, fetched a page at a time
    /// as the stream is read; every job that existed when the walk began is
    /// yielded once. Take what you need and drop the stream.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// use futures::{StreamExt as _, TryStreamExt as _};
    /// use jobd_client::ListFilter;
    /// let newest: Vec<_> = client
    ///     .list_all(ListFilter::default().function("hello"))
    ///     .take(10)
    ///     .try_collect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn list_all(
        &self,
        filter: ListFilter,
    ) -> impl Stream<Item = Result<JobInfo, Error>> + Send + 'static {
        let client = self.clone();
        // State: the token of the next page, or `None` once the last page
        // was fetched.
        futures::stream::try_unfold(Some(String::new()), move |token| {
            let (client, filter) = (client.clone(), filter.clone());
            async move {
                let Some(token) = token else {
                    return Ok(None);
                };
                let page = client
                    .list_jobs(&filter, LIST_ALL_PAGE_SIZE, Some(token))
                    .await?;
                let jobs = futures::stream::iter(page.jobs.into_iter().map(Ok));
                Ok::<_, Error>(Some((jobs, page.next_page_token)))
            }
        })
        .try_flatten()
    }
}

/// A job id from anything that names a job, so [`JobClient::wait`] takes
/// handles and ids alike.
impl From<&JobHandle> for JobId {
    fn from(job: &JobHandle) -> Self {
        job.id()
    }
}

impl From<JobHandle> for JobId {
    fn from(job: JobHandle) -> Self {
        job.id()
    }
}
