//! Reading a job's log, once or following it while the job runs: pages of
//! entries from an offset, so that a reader that lost its connection
//! resumes exactly where it stopped.
//!
//! A follower never polls: it subscribes to the log's growth before each
//! read and sleeps until the log grows or the job ends. Everything a job
//! wrote is durable before its outcome is visible, so once the job is seen
//! terminal one more read finds the rest, and the stream ends.

use std::sync::Arc;

use futures::{StreamExt as _, stream::BoxStream};
use jobd_proto::JobId;

use super::{Engine, Inner, found};
use crate::{Error, job::LogPage};

/// The most bytes of entries one page carries (at least one entry).
const PAGE_BYTES: usize = 256 * 1024;

struct Reader {
    inner: Arc<Inner>,
    id: JobId,
    from: u64,
    /// Held by a follower: following counts as a watcher.
    follow: Option<tokio::sync::OwnedSemaphorePermit>,
    ended: bool,
}

impl Engine {
    /// `id`'s log from byte offset `from` (0: the start), as pages of
    /// entries. Without `follow` the stream ends at the log's current end;
    /// with it, it waits for more until the job has ended and every entry
    /// has been sent (following takes one of the `max_watchers` places,
    /// like a `Watch`).
    ///
    /// # Errors
    ///
    /// `JobNotFound`, `JobGone` (at once, or as the stream's item if the
    /// job is removed meanwhile), `TooManyWatchers`, `ShuttingDown`,
    /// `Store`.
    pub async fn logs(
        &self,
        id: JobId,
        from: u64,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<LogPage, Error>>, Error> {
        let inner = &self.inner;
        if !inner.accepting.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let follow = if follow {
            Some(inner.stream_slot()?)
        } else {
            None
        };
        // An unknown job is refused now, not as the stream's first item.
        found(id, inner.store.state(id).await)?;
        let reader = Reader {
            inner: Arc::clone(inner),
            id,
            from,
            follow,
            ended: false,
        };
        Ok(futures::stream::unfold(reader, |mut reader| async move {
            let item = reader.next().await?;
            Some((item, reader))
        })
        .boxed())
    }
}

impl Reader {
    /// The next page, or `None` once everything has been sent.
    async fn next(&mut self) -> Option<Result<LogPage, Error>> {
        if self.ended {
            return None;
        }
        let answer = self.read().await;
        if !matches!(answer, Some(Ok(_))) {
            self.ended = true;
        }
        answer
    }

    async fn read(&mut self) -> Option<Result<LogPage, Error>> {
        let inner = Arc::clone(&self.inner);
        let store = &inner.store;
        let mut job_ended = false;
        loop {
            let mut grown = self.follow.is_some().then(|| store.follow_log(self.id));
            let page = match found(
                self.id,
                store.read_log(self.id, self.from, PAGE_BYTES).await,
            ) {
                Ok(page) => page,
                Err(err) => return Some(Err(err)),
            };
            if !page.entries.is_empty() || page.skipped > 0 {
                self.from = page.end;
                return Some(Ok(page));
            }
            // Not following: the log's current end is the stream's.
            let grown = grown.as_mut()?;
            if job_ended {
                return None;
            }
            let state = match found(self.id, store.state(self.id).await) {
                Ok(state) => state,
                Err(err) => return Some(Err(err)),
            };
            if state.is_terminal() {
                // Written before the outcome was visible: one more read
                // finds what came between the read above and now.
                job_ended = true;
                continue;
            }
            tokio::select! {
                () = grown.grown() => {}
                _ = store.wait(self.id) => {}
                () = inner.stopped.cancelled() => return Some(Err(Error::ShuttingDown)),
            }
        }
    }
}
