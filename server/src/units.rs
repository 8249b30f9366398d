//! Quantities as people write them, in flags and in the functions file:
//! durations (`500ms`, `30s`, `2m`, `12h`, `7d`; a bare number is seconds)
//! and sizes (`512`, `64KiB`, `1MiB`, `2GiB`; powers of 1024).

use std::time::Duration;

/// Parses a duration.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(jobd::units::parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
/// assert_eq!(jobd::units::parse_duration("2m"), Ok(Duration::from_secs(120)));
/// assert!(jobd::units::parse_duration("soon").is_err());
/// ```
///
/// # Errors
///
/// A message naming the text and the units accepted.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, unit) = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((raw, "s"), |i| raw.split_at(i));
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {raw:?}: use ms, s, m, h or d"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{raw:?}: {e}"))
}

/// Parses a size in bytes.
///
/// ```
/// assert_eq!(jobd::units::parse_bytes("64KiB"), Ok(65_536));
/// assert_eq!(jobd::units::parse_bytes("1MiB"), Ok(1_048_576));
/// assert_eq!(jobd::units::parse_bytes("100"), Ok(100));
/// assert!(jobd::units::parse_bytes("1MB").is_err());
/// ```
///
/// # Errors
///
/// A message naming the text and the units accepted.
pub fn parse_bytes(raw: &str) -> Result<u64, String> {
    let raw = raw.trim();
    let (number, unit) = raw
        .find(|c: char| !c.is_ascii_digit())
        .map_or((raw, ""), |i| raw.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a size like 512, 64KiB or 1MiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {raw:?}: use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{raw:?} is too large"))
}
