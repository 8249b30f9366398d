//! Reads the caller's gRPC deadline (the `grpc-timeout` header), so waits can
//! end with our own `DEADLINE_EXCEEDED` answer just before the caller gives up,
//! instead of being cut off by the transport.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// How much earlier than the caller's deadline a wait gives up, so that the
/// answer is on the wire before the caller stops listening, even on a busy
/// machine (a few milliseconds proved too tight under load).
const SLACK: Duration = Duration::from_millis(50);

/// The time left before the caller's deadline, less a small slack; `None`
/// when the caller set no deadline or the header is malformed (the transport
/// rejects malformed headers on its own).
pub(crate) fn remaining(metadata: &MetadataMap) -> Option<Duration> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    parse(raw).map(|d| d.saturating_sub(SLACK))
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
}
