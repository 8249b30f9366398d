//! Job ids: UUIDv7, so that ids sort by submission time and leak nothing but
//! that time.

use std::{fmt, str::FromStr};

/// A job's identity, assigned by the server at Submit.
///
/// On the wire it is the hyphenated lowercase UUID string.
///
/// ```
/// use jobd_proto::JobId;
/// let id = JobId::new();
/// let parsed: JobId = id.to_string().parse().unwrap();
/// assert_eq!(id, parsed);
/// assert!("not-a-job-id".parse::<JobId>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(uuid::Uuid);

impl JobId {
    /// A fresh, time-ordered id.
    #[must_use]
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// The underlying UUID.
    #[must_use]
    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<uuid::Uuid> for JobId {
    fn from(uuid: uuid::Uuid) -> Self {
        Self(uuid)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0.hyphenated())
    }
}

/// Why a string is not a job id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseJobIdError {
    /// The string was empty.
    #[error("job id is empty")]
    Empty,
    /// The string is longer than any job id can be.
    #[error("job id is too long ({0} bytes; a job id is a 36-character UUID)")]
    TooLong(usize),
    /// The string is not a UUID.
    #[error("job id {0:?} is not a UUID")]
    Malformed(String),
}

impl FromStr for JobId {
    type Err = ParseJobIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Anything longer than the 45-character URN form cannot be a UUID; do
        // not echo it back in full.
        const MAX_LEN: usize = 45;
        if s.is_empty() {
            return Err(ParseJobIdError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(ParseJobIdError::TooLong(s.len()));
        }
        uuid::Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| ParseJobIdError::Malformed(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_creation_time() {
        let ids: Vec<JobId> = (0..100).map(|_| JobId::new()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
    }

    #[test]
    fn rejects_bad_ids_with_reasons() {
        assert_eq!("".parse::<JobId>(), Err(ParseJobIdError::Empty));
        assert!(matches!(
            "x".repeat(1000).parse::<JobId>(),
            Err(ParseJobIdError::TooLong(1000))
        ));
        assert!(matches!(
            "nope".parse::<JobId>(),
            Err(ParseJobIdError::Malformed(_))
        ));
    }
}
