//! The one seam through which jobd reads time.
//!
//! Stored times (when a job was submitted, started, finished; retention
//! cutoffs; due times of delayed jobs) come from [`Clock::now`], and timers
//! run on tokio's clock. Nothing else reads the system clock (`clippy.toml`
//! bans `SystemTime::now` and `Instant::now` outside this module), so a test
//! can run the engine on tokio's paused clock ([`Clock::tokio`] with
//! `tokio::time::pause()`): a 3-second job then takes no real time, and
//! stored times move with the virtual clock.
//!
//! Times are kept in whole microseconds, the resolution the durable store
//! writes: a time read here is the same time after a round trip through the
//! disk, so a job looks the same before and after a restart, and a time
//! filter compares what clients are shown.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where "now" comes from.
///
/// ```
/// let clock = jobd::Clock::system();
/// let now = clock.now();
/// // Whole microseconds, as stored.
/// assert_eq!(now.duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() % 1000, 0);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Clock(Source);

#[derive(Debug, Clone, Default)]
enum Source {
    /// The operating system's wall clock (production).
    #[default]
    System,
    /// The wall time at `wall`, moved on by tokio's clock since `at`: a
    /// paused runtime's `advance` moves it too.
    Tokio {
        wall: SystemTime,
        at: tokio::time::Instant,
    },
}

impl Clock {
    /// The system's wall clock: what a server uses.
    #[must_use]
    pub fn system() -> Self {
        Self(Source::System)
    }

    /// A clock that follows tokio's, starting from the wall time now: under
    /// `tokio::time::pause()` it stands still until the runtime advances
    /// time, so tests of timeouts, delays, retries and retention take no
    /// real time. Create it inside the runtime whose clock it follows.
    #[must_use]
    #[allow(
        clippy::disallowed_methods,
        reason = "the seam itself: anchors tokio's clock to the wall once"
    )]
    pub fn tokio() -> Self {
        Self(Source::Tokio {
            wall: SystemTime::now(),
            at: tokio::time::Instant::now(),
        })
    }

    /// Now, in whole microseconds.
    #[must_use]
    #[allow(
        clippy::disallowed_methods,
        reason = "the seam itself: the one place the wall clock is read"
    )]
    pub fn now(&self) -> SystemTime {
        let now = match &self.0 {
            Source::System => SystemTime::now(),
            Source::Tokio { wall, at } => *wall + at.elapsed(),
        };
        truncate_to_micros(now)
    }

    /// Resolves at `at` (at once if it is past), on tokio's clock.
    pub async fn sleep_until(&self, at: SystemTime) {
        if let Ok(wait) = at.duration_since(self.now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// `t` with its sub-microsecond part dropped (times before the epoch are
/// left as they are).
#[must_use]
pub(crate) fn truncate_to_micros(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(since) => UNIX_EPOCH + Duration::from_micros(micros_of(since)),
        Err(_) => t,
    }
}

/// Microseconds since the epoch (times before it count as 0), as the
/// durable store writes them.
#[must_use]
pub(crate) fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The smallest whole number of microseconds at or after `t`.
#[must_use]
pub(crate) fn micros_ceil(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => {
            let whole = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
            if d.subsec_nanos() % 1000 == 0 {
                whole
            } else {
                whole.saturating_add(1)
            }
        }
        Err(_) => 0,
    }
}

/// The time `us` microseconds after the epoch (negative counts as 0).
#[must_use]
pub(crate) fn from_micros(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

fn micros_of(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_to_whole_microseconds_both_ways() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(micros(t), 1_700_000_000_123_456);
        assert_eq!(micros_ceil(t), 1_700_000_000_123_457);
        let whole = truncate_to_micros(t);
        assert_eq!(micros_ceil(whole), micros(whole));
        assert_eq!(from_micros(micros(t)), whole);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_only_with_tokio_time() {
        let clock = Clock::tokio();
        let start = clock.now();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            clock.now().duration_since(start).unwrap(),
            Duration::from_secs(3)
        );
        let due = clock.now() + Duration::from_secs(2);
        clock.sleep_until(due).await;
        assert!(clock.now() >= due);
    }
}
