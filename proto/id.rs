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

    /// A fresh id minted at `at` (what a server reads from its clock): a
    /// UUIDv7 whose 12 bits after the millisecond hold the microsecond
    /// within it (RFC 9562, method 3), then 62 random bits. Ids minted at
    /// different microseconds sort by time; a server that gives each job its
    /// own microsecond gets ids in submission order, whatever other clocks
    /// in the process say.
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    /// use jobd_proto::JobId;
    /// let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_001);
    /// let a = JobId::minted_at(t);
    /// assert!(a < JobId::minted_at(t + Duration::from_micros(1)));
    /// assert!(a > JobId::minted_at(t - Duration::from_micros(1)));
    /// assert_ne!(a, JobId::minted_at(t));
    /// assert_eq!(a.as_uuid().get_version_num(), 7);
    /// ```
    #[must_use]
    pub fn minted_at(at: std::time::SystemTime) -> Self {
        let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let millis = u64::try_from(since.as_millis()).unwrap_or(u64::MAX) & 0xFFFF_FFFF_FFFF;
        let micros_in_milli = u16::try_from(since.subsec_micros() % 1000).unwrap_or(0);
        let random = *uuid::Uuid::new_v4().as_bytes();
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
        bytes[6..8].copy_from_slice(&micros_in_milli.to_be_bytes());
        bytes[8..].copy_from_slice(&random[8..]);
        Self(
            uuid::Builder::from_bytes(bytes)
                .with_variant(uuid::Variant::RFC4122)
                .with_version(uuid::Version::SortRand)
                .into_uuid(),
        )
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
