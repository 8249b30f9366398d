//! A job's log: `JobService.Logs` as a stream of pages that resumes by
//! itself, from the last offset received, when the connection breaks, so
//! a follower misses nothing the server still keeps and sees nothing twice.

use futures::{StreamExt as _, stream::BoxStream};
use jobd_proto::{JobId, pb};

use crate::{
    JobClient,
    answer::LogPage,
    error::Error,
    retry::{RETRY_PAUSES, breaks_connection},
    wire,
};

impl JobClient {
    /// The log of job `id` from byte `offset` (0: the start): what it
    /// printed and logged, as pages of entries. Without `follow` the stream
    /// ends at the log's current end; with it, it carries on as the job
    /// writes, until the job has ended and everything it wrote was
    /// received (`kubectl logs -f`). A broken connection is resumed from
    /// the last page's `next_offset` (after the client's retry pauses);
    /// errors that are not a broken connection end the stream.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient, id: jobd_client::JobId) -> Result<(), jobd_client::Error> {
    /// use futures::StreamExt as _;
    /// use std::io::Write as _;
    ///
    /// let mut pages = client.logs(id, 0, true).await?;
    /// while let Some(page) = pages.next().await {
    ///     for entry in page?.entries {
    ///         std::io::stdout().write_all(&entry.data).ok();
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] for an unknown (or removed) job, or any error of
    /// the call.
    pub async fn logs(
        &self,
        id: JobId,
        offset: u64,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<LogPage, Error>>, Error> {
        let pages = self.logs_once(id, offset, follow).await?;
        let reader = Resuming {
            client: self.clone(),
            id,
            follow,
            next: offset,
            pages,
            failed_tries: 0,
            ended: false,
        };
        Ok(futures::stream::unfold(reader, |mut reader| async move {
            let item = reader.next().await?;
            Some((item, reader))
        })
        .boxed())
    }

    async fn logs_once(
        &self,
        id: JobId,
        offset: u64,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<LogPage, Error>>, Error> {
        let pages = self
            .rpc()
            .logs(pb::LogsRequest {
                job_id: id.to_string(),
                offset,
                follow,
            })
            .await?
            .into_inner();
        Ok(pages
            .map(|page| page.map(wire::log_page).map_err(Error::from))
            .boxed())
    }
}

struct Resuming {
    client: JobClient,
    id: JobId,
    follow: bool,
    /// Where the next page starts.
    next: u64,
    pages: BoxStream<'static, Result<LogPage, Error>>,
    /// Resume tries since the last page received.
    failed_tries: usize,
    ended: bool,
}

impl Resuming {
    async fn next(&mut self) -> Option<Result<LogPage, Error>> {
        if self.ended {
            return None;
        }
        loop {
            match self.pages.next().await {
                Some(Ok(page)) => {
                    self.next = page.next_offset;
                    self.failed_tries = 0;
                    return Some(Ok(page));
                }
                None => {
                    self.ended = true;
                    return None;
                }
                Some(Err(err)) if breaks_connection(&err) => match self.resume(err).await {
                    Ok(pages) => self.pages = pages,
                    Err(err) => {
                        self.ended = true;
                        return Some(Err(err));
                    }
                },
                Some(Err(err)) => {
                    self.ended = true;
                    return Some(Err(err));
                }
            }
        }
    }

    /// Asks again from the last offset, after each of the retry pauses.
    async fn resume(
        &mut self,
        broke: Error,
    ) -> Result<BoxStream<'static, Result<LogPage, Error>>, Error> {
        let mut error = broke;
        while let Some(&pause) = RETRY_PAUSES.get(self.failed_tries) {
            self.failed_tries += 1;
            tracing::debug!(%error, attempt = self.failed_tries, "log stream broke; resuming");
            tokio::time::sleep(pause).await;
            match self.client.logs_once(self.id, self.next, self.follow).await {
                Ok(pages) => return Ok(pages),
                Err(err) if breaks_connection(&err) => error = err,
                Err(err) => return Err(err),
            }
        }
        Err(error)
    }
}
