//! How jobs are listed: the filter a listing applies and the page it
//! returns. Domain types, shared by every store (which must all match a job
//! the same way) and by the engine, which hands them to its callers.

use std::{collections::BTreeMap, time::SystemTime};

use jobd_proto::{JobId, JobState};

use crate::job::JobRecord;

/// Which jobs a listing returns; every condition given must hold. The
/// default matches every job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only jobs in one of these states; empty means any.
    pub states: Vec<JobState>,
    /// Only jobs of this function.
    pub function: Option<String>,
    /// Only jobs carrying all of these labels with these values.
    pub labels: BTreeMap<String, String>,
    /// Only jobs submitted strictly after this time.
    pub submitted_after: Option<SystemTime>,
    /// Only jobs submitted strictly before this time.
    pub submitted_before: Option<SystemTime>,
}

impl ListFilter {
    /// True when `record` passes every condition. Times compare exactly:
    /// a job's submission time is whole microseconds (as stored and as
    /// shown), so a job shown as submitted at T is after `T - 1ns` and
    /// before `T + 1ns`, whether it is read from memory or from disk.
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    /// let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_001);
    /// let filter = jobd::ListFilter {
    ///     submitted_after: Some(t - Duration::from_nanos(1)),
    ///     submitted_before: Some(t + Duration::from_nanos(1)),
    ///     ..Default::default()
    /// };
    /// assert!(filter.matches_submitted_at(t));
    /// ```
    #[must_use]
    pub fn matches(&self, record: &JobRecord) -> bool {
        (self.states.is_empty() || self.states.contains(&record.state))
            && self
                .function
                .as_deref()
                .is_none_or(|f| *record.function == *f)
            && self
                .labels
                .iter()
                .all(|(key, value)| record.labels.get(key) == Some(value))
            && self.matches_submitted_at(record.submitted_at)
    }

    /// The time conditions alone.
    #[must_use]
    pub fn matches_submitted_at(&self, submitted_at: SystemTime) -> bool {
        self.submitted_after.is_none_or(|t| submitted_at > t)
            && self.submitted_before.is_none_or(|t| submitted_at < t)
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    /// The jobs, newest first.
    pub jobs: Vec<JobRecord>,
    /// Where the next page starts (it holds ids below this one); `None` at
    /// the end.
    pub next: Option<JobId>,
}
