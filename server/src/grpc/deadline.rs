//! Reads the caller's gRPC deadline (the `grpc-timeout` header), so waits can
//! end with our own `DEADLINE_EXCEEDED` answer just before the caller gives up,
//! instead of being cut off by the transport.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// How much earlier than the caller's deadline a wait gives up, so that the
/// answer is on the wire before the caller stops listening, even on a busy
/// machine: a tenth of the deadline, at least `MIN_SLACK` (a few
/// milliseconds proved too tight under load, and 50 ms too tight on a
/// machine loaded several times over) and at most `MAX_SLACK` (a long wait
/// should not end noticeably early).
const MIN_SLACK: Duration = Duration::from_millis(50);
const MAX_SLACK: Duration = Duration::from_millis(500);

/// The time left before the caller's deadline, less the slack; `None`
/// when the caller set no deadline or the header is malformed (the transport
/// rejects malformed headers on its own).
pub(crate) fn remaining(metadata: &MetadataMap) -> Option<Duration> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    parse(raw).map(less_slack)
}

fn less_slack(deadline: Duration) -> Duration {
    deadline.saturating_sub((deadline / 10).clamp(MIN_SLACK, MAX_SLACK))
}

/// Parses `grpc-timeout`: up to 8 ASCII digits and a unit (H, M, S, m, u, n).
fn parse(raw: &str) -> Option<Duration> {
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_junk() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("9n"), Some(Duration::from_nanos(9)));
        for junk in ["", "S", "123456789S", "5x", "-5S", "5 S"] {
            assert_eq!(parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn the_slack_is_a_tenth_of_the_deadline_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(less_slack(ms(30)), ms(0));
        assert_eq!(less_slack(ms(300)), ms(250));
        assert_eq!(less_slack(ms(2000)), ms(1800));
        assert_eq!(less_slack(ms(60_000)), ms(59_500));
    }
}
