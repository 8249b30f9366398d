//! A finished run as a job's outcome: a JSON result, or a failure whose
//! message names the exit code or signal and carries the end of stderr.
//! The rules live here once, so a remote worker and jobd's own command
//! functions turn the same run into the same outcome.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use crate::ending::Ending;
use crate::run::Finished;

/// How a successful program's stdout becomes the job's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResultMode {
    /// Stdout parsed as JSON when it is JSON (surrounding whitespace
    /// allowed), else as [`ResultMode::Text`].
    #[default]
    Json,
    /// Stdout as a JSON string, with one trailing newline (`\n` or
    /// `\r\n`) removed. Bytes that are not UTF-8 become U+FFFD: the result
    /// is text, so undecodable bytes cannot survive in it (a line sink
    /// gets the exact bytes).
    Text,
    /// The result is `null`; stdout is ignored.
    None,
}

impl fmt::Display for ResultMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Json => "json",
            Self::Text => "text",
            Self::None => "none",
        })
    }
}

/// A word that names no [`ResultMode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown result mode {0:?} (expected json, text or none)")]
pub struct UnknownResultMode(String);

impl FromStr for ResultMode {
    type Err = UnknownResultMode;

    fn from_str(word: &str) -> Result<Self, Self::Err> {
        match word {
            "json" => Ok(Self::Json),
            "text" => Ok(Self::Text),
            "none" => Ok(Self::None),
            other => Err(UnknownResultMode(other.to_owned())),
        }
    }
}

/// A run that does not give a result: the program failed, was killed or
/// stopped, or its output could not be kept whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
#[non_exhaustive]
pub struct Failure {
    /// How the program ended.
    pub ending: Ending,
    /// The kept end of its stderr, whitespace-trimmed, as lossy UTF-8;
    /// empty when it wrote none.
    pub stderr: String,
    /// One message for a person: what happened (`exited with code 3`,
    /// `killed by signal SIGSEGV (11)`, `timed out after 5s`, ...), then
    /// the stderr tail after `: ` when there is one.
    pub message: String,
}

impl Finished {
    /// The job outcome of this run.
    ///
    /// Exit code 0 gives `Ok` with the result `mode` makes of stdout. Any
    /// other end gives a [`Failure`]: a non-zero code, a signal, a cancel,
    /// the time limit, and also, in the `Json` and `Text` modes, stdout
    /// cut at `max_output` or not read to its end, since a partial result
    /// would pass for a whole one.
    ///
    /// # Errors
    ///
    /// The [`Failure`] described above.
    ///
    /// # Examples
    ///
    /// ```
    /// use jobd_command::{CommandSpec, ResultMode, run};
    /// use serde_json::json;
    /// use tokio_util::sync::CancellationToken;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cancel = CancellationToken::new();
    /// let echo = CommandSpec::new("/bin/cat").stdin(r#"{"sum": 3}"#);
    /// let finished = run(echo, &cancel).await?;
    /// assert_eq!(finished.into_outcome(ResultMode::Json)?, json!({"sum": 3}));
    ///
    /// let fail = CommandSpec::new("/bin/sh").args(["-c", "echo no such file >&2; exit 2"]);
    /// let failure = run(fail, &cancel).await?.into_outcome(ResultMode::Json).unwrap_err();
    /// assert_eq!(failure.message, "exited with code 2: no such file");
    /// # Ok(()) }
    /// ```
    pub fn into_outcome(self, mode: ResultMode) -> Result<Value, Failure> {
        let stderr = lossy_tail(&self.stderr_tail);
        let fail = |what: String| {
            let message = if stderr.is_empty() {
                what
            } else {
                format!("{what}: {stderr}")
            };
            Failure {
                ending: self.ending,
                stderr: stderr.clone(),
                message,
            }
        };
        if !self.ending.success() {
            return Err(fail(self.ending.to_string()));
        }
        if mode != ResultMode::None {
            if self.stdout_truncated() {
                return Err(fail(format!(
                    "output too long: kept {} bytes, dropped {}",
                    self.stdout.len(),
                    self.stdout_dropped
                )));
            }
            if !self.output_complete {
                return Err(fail(
                    "output incomplete: a process outside the group held it open".to_owned(),
                ));
            }
        }
        Ok(match mode {
            ResultMode::Json => serde_json::from_slice(&self.stdout)
                .unwrap_or_else(|_| Value::String(text(&self.stdout))),
            ResultMode::Text => Value::String(text(&self.stdout)),
            ResultMode::None => Value::Null,
        })
    }
}

/// Stdout as text: lossy UTF-8 without one trailing newline.
fn text(stdout: &[u8]) -> String {
    let stdout = stdout
        .strip_suffix(b"\n")
        .map_or(stdout, |line| line.strip_suffix(b"\r").unwrap_or(line));
    String::from_utf8_lossy(stdout).into_owned()
}

/// The kept end of stderr as trimmed text. The cut that kept it may have
/// fallen inside a UTF-8 character: its leftover continuation bytes are
/// skipped rather than shown as U+FFFD.
fn lossy_tail(tail: &[u8]) -> String {
    let start = tail
        .iter()
        .take(3)
        .take_while(|&&byte| byte & 0xC0 == 0x80)
        .count();
    String::from_utf8_lossy(&tail[start..]).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_drops_one_trailing_newline() {
        assert_eq!(text(b"a\n\n"), "a\n");
        assert_eq!(text(b"a\r\n"), "a");
        assert_eq!(text(b"a"), "a");
        assert_eq!(text(b"\xffz\n"), "\u{fffd}z");
    }

    #[test]
    fn the_tail_skips_a_cut_character() {
        // "é" is C3 A9: a tail that starts at A9 starts mid-character.
        assert_eq!(lossy_tail(b"\xa9 oops \n"), "oops");
        assert_eq!(lossy_tail("é\n".as_bytes()), "é");
    }

    #[test]
    fn result_modes_parse_and_print() {
        for mode in [ResultMode::Json, ResultMode::Text, ResultMode::None] {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
        assert!("JSON".parse::<ResultMode>().is_err());
    }
}
