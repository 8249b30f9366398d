//! Job logs in memory: the wake-ups of callers following a log (both
//! stores), and the capped logs themselves (the memory store's; the SQLite
//! store keeps them on disk).
//!
//! A job's log is one sequence of entries across its attempts, addressed by
//! byte offset: an entry's offset counts every byte written before it,
//! kept or not, so that a reader resumes exactly where it stopped and can
//! tell how much the cap dropped meanwhile. The cap keeps the newest
//! entries: those starting at most `cap` bytes before the log's end.

use std::{collections::VecDeque, sync::Arc};

use dashmap::DashMap;
use jobd_proto::JobId;
use tokio::sync::watch;

use crate::job::{LogEntry, LogPage};

/// Who is following which log: one channel per followed job, carrying the
/// log's end offset, made by the first follower and dropped with the last.
#[derive(Default)]
pub(crate) struct LogFeeds {
    feeds: DashMap<JobId, watch::Sender<u64>>,
}

/// A follower's subscription to one job's log.
pub(crate) struct LogFeed {
    feeds: Arc<LogFeeds>,
    job: JobId,
    rx: watch::Receiver<u64>,
}

impl LogFeeds {
    /// Subscribes to `job`'s log. Subscribe before reading, so that no
    /// entry committed after the read goes unnoticed.
    pub(crate) fn follow(self: &Arc<Self>, job: JobId) -> LogFeed {
        let rx = self
            .feeds
            .entry(job)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        LogFeed {
            feeds: Arc::clone(self),
            job,
            rx,
        }
    }

    /// Wakes the followers of `job`, whose log now ends at `end`.
    pub(crate) fn grew(&self, job: JobId, end: u64) {
        if let Some(feed) = self.feeds.get(&job) {
            feed.send_replace(end);
        }
    }
}

impl LogFeed {
    /// Resolves once the log has grown since the subscription (or the last
    /// call).
    pub(crate) async fn grown(&mut self) {
        // The sender lives as long as this subscription does.
        let _ = self.rx.changed().await;
    }
}

impl Drop for LogFeed {
    fn drop(&mut self) {
        // This subscription is the last one when it is the only receiver.
        self.feeds
            .feeds
            .remove_if(&self.job, |_, feed| feed.receiver_count() <= 1);
    }
}

/// One job's capped log, in memory.
#[derive(Debug, Default)]
pub(crate) struct JobLog {
    entries: VecDeque<LogEntry>,
    end: u64,
}

impl JobLog {
    /// Where the next entry starts.
    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    /// Appends `entry` (whose offset must be [`JobLog::end`]) and drops the
    /// entries that start more than `cap` bytes before the new end.
    pub(crate) fn push(&mut self, entry: LogEntry, cap: u64) {
        debug_assert_eq!(entry.offset, self.end);
        self.end = entry.end();
        self.entries.push_back(entry);
        let keep_from = self.end.saturating_sub(cap);
        while self
            .entries
            .front()
            .is_some_and(|first| first.offset < keep_from)
        {
            self.entries.pop_front();
        }
    }

    /// The entries that end after `from`, up to about `max_bytes` (at least
    /// one entry when there is one).
    pub(crate) fn read(&self, from: u64, max_bytes: usize) -> LogPage {
        let start = self.entries.partition_point(|e| e.end() <= from);
        let mut entries = Vec::new();
        let mut bytes = 0;
        for entry in self.entries.iter().skip(start) {
            if !entries.is_empty() && bytes + entry.data.len() > max_bytes {
                break;
            }
            bytes += entry.data.len();
            entries.push(entry.clone());
        }
        LogPage::new(entries, from)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::job::LogStream;

    fn entry(log: &JobLog, text: &str) -> LogEntry {
        LogEntry {
            offset: log.end(),
            attempt: 1,
            stream: LogStream::Stdout,
            at: SystemTime::UNIX_EPOCH,
            data: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_cap_keeps_the_newest_entries_and_a_reader_learns_what_it_missed() {
        let mut log = JobLog::default();
        for line in ["aaaa\n", "bbbb\n", "cccc\n", "dddd\n"] {
            let e = entry(&log, line);
            log.push(e, 12);
        }
        // 20 bytes written; entries starting at or after 8 are kept.
        let page = log.read(0, usize::MAX);
        assert_eq!(page.skipped, 10);
        let texts: Vec<&[u8]> = page.entries.iter().map(|e| e.data.as_slice()).collect();
        assert_eq!(texts, [b"cccc\n", b"dddd\n"]);
        assert_eq!(page.end, 20);
        // From the middle of an entry: that whole entry again, nothing missed.
        let page = log.read(12, usize::MAX);
        assert_eq!((page.skipped, page.entries[0].offset), (0, 10));
        // At the end: nothing yet, and the resume point stays.
        let page = log.read(20, usize::MAX);
        assert!(page.entries.is_empty());
        assert_eq!(page.end, 20);
        // A small page still carries one entry.
        assert_eq!(log.read(0, 1).entries.len(), 1);
    }
}
