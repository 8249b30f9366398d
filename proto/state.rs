//! The job state machine's states, and their one mapping to the wire enum.

use std::fmt;

use crate::pb;

/// Where a job is in its life.
///
/// `Pending -> Running -> {Succeeded, Failed, Cancelled}`, and `Pending ->
/// Cancelled`. The three terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Queued, not started.
    Pending,
    /// Being executed by a pool worker.
    Running,
    /// Returned a value.
    Succeeded,
    /// Returned an error or panicked.
    Failed,
    /// Cancelled before or while running.
    Cancelled,
}

impl JobState {
    /// True for the three terminal states (what `Future.done()` reports).
    ///
    /// ```
    /// use jobd_proto::JobState;
    /// assert!(JobState::Failed.is_terminal());
    /// assert!(!JobState::Running.is_terminal());
    /// ```
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The lowercase name used in logs and CLI output.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<JobState> for pb::JobState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Pending => Self::Pending,
            JobState::Running => Self::Running,
            JobState::Succeeded => Self::Succeeded,
            JobState::Failed => Self::Failed,
            JobState::Cancelled => Self::Cancelled,
        }
    }
}

impl TryFrom<pb::JobState> for JobState {
    /// The wire's `UNSPECIFIED` value has no domain meaning.
    type Error = pb::JobState;

    fn try_from(state: pb::JobState) -> Result<Self, Self::Error> {
        match state {
            pb::JobState::Pending => Ok(Self::Pending),
            pb::JobState::Running => Ok(Self::Running),
            pb::JobState::Succeeded => Ok(Self::Succeeded),
            pb::JobState::Failed => Ok(Self::Failed),
            pb::JobState::Cancelled => Ok(Self::Cancelled),
            pb::JobState::Unspecified => Err(state),
        }
    }
}

impl TryFrom<i32> for JobState {
    /// The raw value, when it is unspecified or unknown to this version.
    type Error = i32;

    fn try_from(raw: i32) -> Result<Self, Self::Error> {
        pb::JobState::try_from(raw)
            .ok()
            .and_then(|s| Self::try_from(s).ok())
            .ok_or(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_wire() {
        for s in [
            JobState::Pending,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            let wire = pb::JobState::from(s) as i32;
            assert_eq!(JobState::try_from(wire), Ok(s));
        }
        assert_eq!(JobState::try_from(0), Err(0));
        assert_eq!(JobState::try_from(99), Err(99));
    }
}
