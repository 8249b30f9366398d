//! The command line as clap sees it, and what its raw words mean as values.
//!
//! Everything that can be wrong with the words alone (a malformed job id, a
//! label without `=`, a negative timeout) is rejected here, so clap reports it
//! as a usage error with exit code 2 before any connection is made.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use jobd_client::{JobId, Submission};

const LONG_ABOUT: &str = "\
jobctl: submit jobs to a jobd server and wait for their results.

jobd runs named job functions (see `jobctl functions`) on its async and
blocking pools, like Python's concurrent.futures across the network. `submit`
answers with a job id at once; `result`, `done`, `status` and `cancel` ask
about that job later, from any shell.

Examples:
  jobctl submit hello Ann              prints the new job's id
  jobctl result <id>                   waits, then prints: Hello, Ann!
  jobctl submit --wait hello Ann       submits and waits in one step
  jobctl submit echo a 1 '{\"x\":2}'     several arguments become [\"a\",1,{\"x\":2}]
  jobctl submit sleep 30 --label team=infra
  jobctl done <id>                     true or false, without waiting
  jobctl result <id> --timeout 0.5     gives up (exit 3) if not done in 0.5 s
  jobctl cancel <id>
  jobctl -o json status <id>           the whole job as one JSON object
  JOBD_ADDR=http://10.0.0.7:50051 jobctl functions";

const AFTER_LONG_HELP: &str = "\
Exit codes:
    0  success
    1  the job failed or was cancelled (the reason is on stderr), or the
       answer could not be written
    2  usage error: bad flags, a malformed job id or label, a bad --addr
    3  the request failed: jobd unreachable, unknown job or function, timeout
  130  interrupted by Ctrl-C while waiting (the job keeps running)

Logging goes to stderr and follows RUST_LOG (default: warn).";

#[derive(Debug, Parser)]
#[command(
    name = "jobctl",
    version,
    about = "Submit jobs to a jobd server and wait for their results",
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP,
    propagate_version = true
)]
pub(crate) struct Cli {
    /// The jobd server to talk to: a URI such as http://127.0.0.1:50051, or
    /// a bare host:port.
    #[arg(
        long,
        env = "JOBD_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub(crate) addr: String,

    /// How to print answers: `text` for people, `json` for scripts (one
    /// compact JSON object per line).
    #[arg(short, long, value_enum, default_value_t = Format::Text, global = true)]
    pub(crate) output: Format,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The output format, chosen once for the whole invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Plain lines: the id, the raw result, aligned tables.
    Text,
    /// One compact JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Submit a job and print its id (or, with --wait, its result).
    ///
    /// Each ARG is taken as JSON if it parses as JSON, else as a string:
    /// `jobctl submit hello Ann` sends "Ann", `jobctl submit sleep 1.5` sends
    /// the number 1.5, and `jobctl submit echo '"42"'` the string "42". No
    /// ARG sends null, one ARG sends that value, several ARGs are sent as a
    /// JSON array.
    Submit(Submit),

    /// Wait for a job to finish and print its result.
    ///
    /// A string result is printed raw (no quotes), any other value as compact
    /// JSON. A job that failed or was cancelled exits with code 1 and its
    /// reason on stderr.
    Result {
        /// The job id that `submit` printed.
        id: JobId,
        /// Give up after this many seconds (fractions allowed, e.g. 0.5; 0
        /// answers at once) and exit with code 3. The job keeps running.
        // Hyphen values are let through so that `-1` is refused as a negative
        // timeout, not mistaken for a flag.
        #[arg(long, value_name = "SECS", value_parser = parse_seconds, allow_hyphen_values = true)]
        timeout: Option<Duration>,
    },

    /// Print whether a job has finished (true or false), without waiting.
    Done {
        /// The job id that `submit` printed.
        id: JobId,
    },

    /// Print everything the server knows about a job.
    ///
    /// State, function, pool, arguments, labels, request id, submit, start
    /// and finish times, attempt, and the result or error once finished.
    Status {
        /// The job id that `submit` printed.
        id: JobId,
    },

    /// Ask the server to cancel a job and print what happened.
    ///
    /// `cancelled`: it was still pending and will never run. `aborted`: it
    /// was running on the async pool and was stopped. `requested`: it is
    /// running on the blocking pool, which cannot be interrupted; it ends
    /// cancelled only if its function honours the request. `already done`:
    /// it had finished; nothing changed.
    Cancel {
        /// The job id that `submit` printed.
        id: JobId,
    },

    /// List the job functions the server can run, with their pools.
    Functions,
}

#[derive(Debug, Args)]
pub(crate) struct Submit {
    /// The job function to run, e.g. hello, echo, sleep (see `jobctl
    /// functions`).
    pub(crate) function: String,

    /// The function's arguments: JSON where they parse as JSON, else strings.
    /// Put `--` before arguments that start with a dash (negative numbers
    /// work without it).
    #[arg(value_name = "ARG", allow_negative_numbers = true)]
    pub(crate) args: Vec<String>,

    /// Wait for the job to finish and print its result, as `jobctl result`
    /// does, instead of its id.
    #[arg(long)]
    pub(crate) wait: bool,

    /// With --wait: give up after this many seconds (fractions allowed) and
    /// exit with code 3. The job keeps running.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds, allow_hyphen_values = true, requires = "wait")]
    pub(crate) timeout: Option<Duration>,

    /// Require the job to run on this pool ("async" or "blocking"); by
    /// default it runs on the function's own.
    #[arg(long)]
    pub(crate) pool: Option<String>,

    /// A request id of your choosing, stored with the job and shown by
    /// `status`.
    #[arg(long, value_name = "ID")]
    pub(crate) request_id: Option<String>,

    /// A label stored with the job and shown by `status`; repeat for more
    /// labels, e.g. --label team=infra --label ticket=42.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
}

impl Submit {
    /// The submission these words describe.
    pub(crate) fn submission(&self) -> Submission {
        let mut submission = Submission::new(&self.function, json_args(&self.args));
        submission.pool.clone_from(&self.pool);
        submission.request_id.clone_from(&self.request_id);
        submission.labels.extend(self.labels.iter().cloned());
        submission
    }
}

/// Turns command-line words into the job's one JSON argument, so that the
/// common cases need no JSON quoting in the shell.
fn json_args(words: &[String]) -> serde_json::Value {
    let value = |word: &String| {
        serde_json::from_str(word).unwrap_or_else(|_| serde_json::Value::String(word.clone()))
    };
    match words {
        [] => serde_json::Value::Null,
        [one] => value(one),
        many => many.iter().map(value).collect(),
    }
}

fn parse_seconds(raw: &str) -> Result<Duration, String> {
    let secs: f64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a number of seconds, such as 5 or 0.5"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| {
        format!("{raw:?} is not a usable timeout: it must be a finite number of seconds, 0 or more")
    })
}

fn parse_label(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!(
            "{raw:?} is not a label: write KEY=VALUE, e.g. team=infra"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use serde_json::json;

    use super::*;

    fn words(ws: &[&str]) -> Vec<String> {
        ws.iter().map(|&w| w.to_owned()).collect()
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn words_become_one_json_argument() {
        assert_eq!(json_args(&[]), json!(null));
        assert_eq!(json_args(&words(&["Ann"])), json!("Ann"));
        assert_eq!(json_args(&words(&["1.5"])), json!(1.5));
        assert_eq!(json_args(&words(&["\"42\""])), json!("42"));
        assert_eq!(
            json_args(&words(&["a", "1", r#"{"x":2}"#])),
            json!(["a", 1, {"x": 2}])
        );
        // Almost-JSON stays a string rather than failing.
        assert_eq!(json_args(&words(&["{oops"])), json!("{oops"));
    }

    #[test]
    fn timeouts_are_non_negative_seconds() {
        assert_eq!(parse_seconds("0.2"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("NaN").is_err());
        assert!(parse_seconds("5s").is_err());
    }

    #[test]
    fn labels_need_a_key_and_an_equals_sign() {
        assert_eq!(
            parse_label("team=infra"),
            Ok(("team".to_owned(), "infra".to_owned()))
        );
        assert_eq!(
            parse_label("expr=a=b"),
            Ok(("expr".to_owned(), "a=b".to_owned()))
        );
        assert_eq!(
            parse_label("empty="),
            Ok(("empty".to_owned(), String::new()))
        );
        assert!(parse_label("team").is_err());
        assert!(parse_label("=infra").is_err());
    }

    #[test]
    fn negative_numbers_are_arguments_not_flags() {
        let cli = Cli::try_parse_from(["jobctl", "submit", "echo", "-1", "x"]).unwrap();
        let Command::Submit(submit) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(submit.submission().args, json!([-1, "x"]));
    }
}
