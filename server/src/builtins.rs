//! The job functions the `jobd` binary ships with: a greeting, an echo, the
//! benchmark no-op, an async sleep, a counter that reports progress and logs
//! its steps, the blocking `return_future` of the concurrent.futures
//! example, and a CPU-bound hash.
//!
//! Embedders may start from [`registry`] and add their own.

use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Ctx, JobError, Registry};

/// The longest `sleep` or `return_future` delay accepted, so a typo cannot
/// park a worker for a year.
pub const MAX_BUILTIN_DELAY: Duration = Duration::from_secs(24 * 3600);

/// The most rounds `sha256` runs.
pub const MAX_SHA256_ROUNDS: u64 = 100_000_000;

/// A registry holding every built-in function.
///
/// ```
/// let registry = jobd::builtins::registry();
/// assert!(registry.get("hello").is_some());
/// ```
#[must_use]
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    let max_delay = MAX_BUILTIN_DELAY.as_secs();
    let delay = json!({"type": "number", "minimum": 0, "maximum": max_delay});
    registry
        .register_async(
            "hello",
            "Greets someone: args \"Ann\", [\"Ann\"], {\"name\": \"Ann\"} or none; returns \"Hello, Ann!\"",
            |_ctx, args| async move { hello(&args) },
        )
        .with_args_schema(json!({
            "description": "who to greet: a name, [name], {\"name\": name}, or null for the world",
            "type": ["null", "string", "array", "object"],
            "items": {"type": "string"},
            "maxItems": 1,
            "properties": {"name": {"type": ["string", "null"]}},
            "additionalProperties": false
        }))
        .returns("the greeting, a string: \"Hello, Ann!\"")
        .register_async("echo", "Returns its arguments unchanged", |_ctx, args| async move {
            Ok(args)
        })
        .with_args_schema(json!({"description": "any JSON value"}))
        .returns("its argument, unchanged")
        .register_async(
            "noop",
            "Returns its argument at once: the benchmark workload",
            |_ctx, args| std::future::ready(Ok(args)),
        )
        .with_args_schema(json!({"description": "any JSON value"}))
        .returns("its argument, unchanged")
        .register_async(
            "sleep",
            "Sleeps asynchronously: args seconds (e.g. 5 or 0.5, or {\"seconds\": 5}); returns the seconds; cancellable mid-sleep",
            |_ctx, args| async move {
                let delay = seconds(&args, "seconds", None)?;
                tokio::time::sleep(delay).await;
                Ok(json!(delay.as_secs_f64()))
            },
        )
        .with_args_schema(json!({
            "description": "how long to sleep: seconds, or {\"seconds\": seconds}",
            "type": ["number", "object"],
            "minimum": 0,
            "maximum": max_delay,
            "properties": {"seconds": delay},
            "required": ["seconds"],
            "additionalProperties": false
        }))
        .returns("the seconds slept, a number")
        .register_async(
            "count",
            "Counts to steps over seconds, reporting progress and logging a line after each step: args {\"steps\": 10, \"seconds\": 2} or a number of steps (defaults: 10 steps, 1 s); returns the steps; cancellable",
            |ctx, args| async move { count(&ctx, &args).await },
        )
        .with_args_schema(json!({
            "description": "how many steps over how long: a number of steps, or {\"steps\": 10, \"seconds\": 2} (defaults: 10 steps, 1 s)",
            "type": ["null", "integer", "object"],
            "minimum": 1,
            "maximum": MAX_COUNT_STEPS,
            "properties": {
                "steps": {"type": "integer", "minimum": 1, "maximum": MAX_COUNT_STEPS},
                "seconds": delay
            },
            "additionalProperties": false
        }))
        .returns("the number of steps, once all are done")
        .register_blocking(
            "return_future",
            "Blocks a pool thread for a delay, then returns the message: args \"msg\", [\"msg\", 3] or {\"message\": \"msg\", \"delay\": 3}; delay defaults to 3 s",
            return_future,
        )
        .with_args_schema(json!({
            "description": "the message and the delay in seconds (default 3): \"msg\", [\"msg\", 3] or {\"message\": \"msg\", \"delay\": 3}",
            "type": ["string", "array", "object"],
            "prefixItems": [{"type": "string"}, delay],
            "minItems": 1,
            "maxItems": 2,
            "properties": {"message": {"type": "string"}, "delay": delay},
            "required": ["message"],
            "additionalProperties": false
        }))
        .returns("the message, a string")
        .register_blocking(
            "sha256",
            "CPU-bound: hashes the text repeatedly: args {\"text\": \"abc\", \"rounds\": 100000} or \"abc\"; returns the hex digest; honours cancel",
            sha256,
        )
        .with_args_schema(json!({
            "description": "the text to hash once, or {\"text\": text, \"rounds\": n}",
            "type": ["string", "object"],
            "properties": {
                "text": {"type": "string"},
                "rounds": {"type": "integer", "minimum": 0, "maximum": MAX_SHA256_ROUNDS}
            },
            "additionalProperties": false
        }))
        .returns("the hex digest after the last round, a string");
    #[cfg(feature = "fault-injection")]
    faults::register(&mut registry);
    registry
}

/// Functions that misbehave on purpose, for the process pool's tests: they
/// crash, leak, loop or leave processes behind, which only a child process
/// may do. Registered for the process pool only, and compiled into test
/// builds only (the `fault-injection` feature).
#[cfg(feature = "fault-injection")]
mod faults {
    use std::{
        io::Write as _,
        process::{Command, Stdio},
    };

    use serde_json::{Value, json};

    use crate::{JobError, Registry};

    pub(super) fn register(registry: &mut Registry) {
        registry
            .register_process(
                "test.abort",
                "TEST ONLY: aborts its process (SIGABRT)",
                |_ctx, _args| std::process::abort(),
            )
            .register_process(
                "test.segfault",
                "TEST ONLY: its process receives SIGSEGV, as from a bad pointer",
                |_ctx, _args| {
                    let me = rustix::process::getpid();
                    // Rust's runtime catches SIGSEGV (to report stack
                    // overflows); for a fault that is not one it restores
                    // the default action, so the next SIGSEGV is fatal, as
                    // a real fault's retry would be.
                    loop {
                        let _ = rustix::process::kill_process(me, rustix::process::Signal::SEGV);
                        std::thread::park_timeout(std::time::Duration::from_millis(10));
                    }
                },
            )
            .register_process(
                "test.stack_overflow",
                "TEST ONLY: recurses until its thread's stack overflows",
                |_ctx, _args| Ok(json!(deeper(0))),
            )
            .register_process(
                "test.exit",
                "TEST ONLY: exits its process with code args (default 3) mid-job",
                |_ctx, args| {
                    let code = args.as_i64().and_then(|c| i32::try_from(c).ok()).unwrap_or(3);
                    std::process::exit(code)
                },
            )
            .register_process(
                "test.memory_hog",
                "TEST ONLY: allocates and touches args MiB (default 1024) in 16 MiB blocks, then returns the MiB held",
                |ctx, args| {
                    const BLOCK: usize = 16 << 20;
                    let mib = args.as_u64().unwrap_or(1024);
                    let mut held: Vec<Vec<u8>> = Vec::new();
                    while (held.len() * 16) < usize::try_from(mib).unwrap_or(usize::MAX) {
                        // Touched, so the pages are really there.
                        held.push(vec![1; BLOCK]);
                        ctx.log(format!("holding {} MiB", held.len() * 16));
                    }
                    Ok(json!(held.len() * 16))
                },
            )
            .register_process(
                "test.spin",
                "TEST ONLY: a runaway loop: burns CPU until it is killed",
                |ctx, _args| {
                    ctx.log("spinning");
                    let mut x = 0_u64;
                    loop {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                },
            )
            .register_process(
                "test.spawn_sleepers",
                "TEST ONLY: starts `sleep 1000` twice, directly and through a shell that leaves it behind, logs their pids; with args true then blocks until killed, else returns the pids",
                |ctx, args| {
                    let direct = Command::new("sleep")
                        .arg("1000")
                        .stdin(Stdio::null())
                        .spawn()
                        .map_err(JobError::failed)?;
                    // The shell exits at once: its `sleep` is an orphan,
                    // which the child adopts as its subreaper.
                    let orphan = Command::new("sh")
                        .args(["-c", "sleep 1000 >/dev/null 2>&1 & echo $!"])
                        .stdin(Stdio::null())
                        .output()
                        .map_err(JobError::failed)?;
                    let orphan: u32 = String::from_utf8_lossy(&orphan.stdout)
                        .trim()
                        .parse()
                        .map_err(JobError::failed)?;
                    let pids = json!([direct.id(), orphan]);
                    ctx.log(format!("sleepers {pids}"));
                    if args == Value::Bool(true) {
                        loop {
                            std::thread::park();
                        }
                    }
                    Ok(pids)
                },
            )
            .register_process(
                "test.pid",
                "TEST ONLY: returns the pid of the process that runs it",
                |_ctx, _args| Ok(json!(std::process::id())),
            )
            .register_process(
                "test.print",
                "TEST ONLY: prints args on stdout and on stderr (the last without a newline), logs it, returns null",
                |ctx, args| {
                    let text = args.as_str().unwrap_or("hello").to_owned();
                    println!("out: {text}");
                    let _ = write!(std::io::stderr(), "err: {text}");
                    ctx.log(format!("log: {text}"));
                    Ok(Value::Null)
                },
            );
    }

    /// A recursion with 4 KiB frames that the compiler can neither flatten
    /// nor turn into a loop: it ends only when the stack does.
    fn deeper(depth: u64) -> u64 {
        let frame = std::hint::black_box([depth; 512]);
        if std::hint::black_box(depth) == u64::MAX {
            return frame[0];
        }
        deeper(depth + 1).wrapping_add(frame[511])
    }
}

fn hello(args: &Value) -> Result<Value, JobError> {
    let name = match args {
        Value::Null => "world",
        Value::String(name) => name,
        Value::Array(items) => match items.as_slice() {
            [] => "world",
            [Value::String(name)] => name,
            _ => return Err(JobError::bad_args("hello takes at most one name")),
        },
        Value::Object(map) => match map.get("name") {
            None | Some(Value::Null) => "world",
            Some(Value::String(name)) => name,
            Some(_) => return Err(JobError::bad_args("\"name\" must be a string")),
        },
        _ => return Err(JobError::bad_args("expected a name (a string)")),
    };
    Ok(json!(format!("Hello, {name}!")))
}

/// Reads a delay in seconds from a number, or from `field` of an object, with
/// an optional default; refuses negative, non-finite and huge values.
fn seconds(args: &Value, field: &str, default: Option<f64>) -> Result<Duration, JobError> {
    let raw = match args {
        Value::Number(n) => n.as_f64(),
        Value::Object(map) => match map.get(field) {
            Some(v) => Some(v.as_f64().ok_or_else(|| {
                JobError::bad_args(format!("\"{field}\" must be a number of seconds"))
            })?),
            None => default,
        },
        Value::Null => default,
        _ => None,
    };
    let secs = raw.ok_or_else(|| JobError::bad_args(format!("expected {field} (a number)")))?;
    if !(0.0..=MAX_BUILTIN_DELAY.as_secs_f64()).contains(&secs) {
        return Err(JobError::bad_args(format!(
            "{field} must be between 0 and {} seconds",
            MAX_BUILTIN_DELAY.as_secs()
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The most steps `count` takes.
pub const MAX_COUNT_STEPS: u64 = 10_000;

/// Counts to `steps` in even sleeps over `seconds`, reporting progress
/// ("3 of 10") after each step.
async fn count(ctx: &Ctx, args: &Value) -> Result<Value, JobError> {
    const DEFAULT_STEPS: u64 = 10;
    let steps = match args {
        Value::Null => DEFAULT_STEPS,
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::Object(map) => match map.get("steps") {
            None => DEFAULT_STEPS,
            Some(v) => v.as_u64().unwrap_or(0),
        },
        _ => 0,
    };
    if !(1..=MAX_COUNT_STEPS).contains(&steps) {
        return Err(JobError::bad_args(format!(
            "steps must be a whole number from 1 to {MAX_COUNT_STEPS}"
        )));
    }
    let total = match args {
        Value::Object(_) => seconds(args, "seconds", Some(1.0))?,
        _ => Duration::from_secs(1),
    };
    let step = total.div_f64(steps as f64);
    for done in 1..=steps {
        tokio::time::sleep(step).await;
        ctx.set_progress(done as f64 / steps as f64, &format!("{done} of {steps}"));
        ctx.log(format!("step {done} of {steps}"));
    }
    Ok(json!(steps))
}

/// The concurrent.futures example: sleep (really blocking the thread, and
/// deliberately deaf to cancel, as `time.sleep` is), then return the message.
fn return_future(ctx: Ctx, args: Value) -> Result<Value, JobError> {
    const DEFAULT_DELAY: f64 = 3.0;
    let (message, delay) = match &args {
        Value::String(msg) => (
            msg.clone(),
            seconds(&Value::Null, "delay", Some(DEFAULT_DELAY))?,
        ),
        Value::Array(items) => match items.as_slice() {
            [Value::String(msg)] => (msg.clone(), Duration::from_secs_f64(DEFAULT_DELAY)),
            [Value::String(msg), delay] => (msg.clone(), seconds(delay, "delay", None)?),
            _ => return Err(JobError::bad_args("expected [message] or [message, delay]")),
        },
        Value::Object(map) => {
            let msg = map
                .get("message")
                .and_then(Value::as_str)
                .ok_or_else(|| JobError::bad_args("\"message\" (a string) is required"))?;
            (
                msg.to_owned(),
                seconds(&args, "delay", Some(DEFAULT_DELAY))?,
            )
        }
        _ => return Err(JobError::bad_args("expected a message")),
    };
    ctx.sleep_blocking_uninterruptible(delay);
    Ok(Value::String(message))
}

fn sha256(ctx: Ctx, args: Value) -> Result<Value, JobError> {
    let (text, rounds) = match &args {
        Value::String(text) => (text.clone(), 1),
        Value::Object(map) => (
            map.get("text")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            map.get("rounds")
                .map_or(Some(1), Value::as_u64)
                .ok_or_else(|| JobError::bad_args("\"rounds\" must be a non-negative integer"))?,
        ),
        _ => {
            return Err(JobError::bad_args(
                "expected a string or {\"text\", \"rounds\"}",
            ));
        }
    };
    if rounds > MAX_SHA256_ROUNDS {
        return Err(JobError::bad_args(format!(
            "rounds must be at most {MAX_SHA256_ROUNDS}"
        )));
    }
    let mut digest = Sha256::digest(text.as_bytes());
    for round in 1..rounds {
        // Checking every round would cost more than the hash; this is often
        // enough to stop within a millisecond.
        if round % 4096 == 0 && ctx.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        digest = Sha256::digest(digest);
    }
    Ok(Value::String(hex(&digest)))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_accepts_every_documented_shape() {
        assert_eq!(hello(&Value::Null).unwrap(), json!("Hello, world!"));
        assert_eq!(hello(&json!("Ann")).unwrap(), json!("Hello, Ann!"));
        assert_eq!(hello(&json!(["Ann"])).unwrap(), json!("Hello, Ann!"));
        assert_eq!(
            hello(&json!({"name": "Ann"})).unwrap(),
            json!("Hello, Ann!")
        );
        assert!(hello(&json!(42)).is_err());
        assert!(hello(&json!(["a", "b"])).is_err());
    }

    #[test]
    fn every_builtin_declares_a_schema_that_matches_its_documented_arguments() {
        let registry = registry();
        let accepts = |name: &str, args: Value| registry.get(name).unwrap().check_args(&args);
        for (name, good) in [
            (
                "hello",
                vec![
                    Value::Null,
                    json!("Ann"),
                    json!(["Ann"]),
                    json!({"name": "Ann"}),
                ],
            ),
            ("echo", vec![Value::Null, json!({"any": [1, 2]})]),
            ("noop", vec![json!(1)]),
            ("sleep", vec![json!(0.5), json!({"seconds": 2})]),
            (
                "return_future",
                vec![
                    json!("m"),
                    json!(["m"]),
                    json!(["m", 0]),
                    json!({"message": "m", "delay": 1}),
                ],
            ),
            (
                "sha256",
                vec![json!("abc"), json!({"text": "abc", "rounds": 3})],
            ),
        ] {
            assert!(
                registry.get(name).unwrap().args_schema().is_some(),
                "{name}"
            );
            assert!(registry.get(name).unwrap().returns().is_some(), "{name}");
            for args in good {
                assert_eq!(accepts(name, args.clone()), vec![], "{name} {args}");
            }
        }
        for (name, bad, field) in [
            ("hello", json!(42), "args"),
            ("hello", json!({"name": 5}), "args.name"),
            ("hello", json!({"nmae": "Ann"}), "args"),
            ("hello", json!(["a", "b"]), "args"),
            ("sleep", json!(-1), "args"),
            ("sleep", json!({"seconds": "x"}), "args.seconds"),
            ("return_future", json!(["m", -1]), "args[1]"),
            ("return_future", json!({"delay": 1}), "args"),
            ("sha256", json!({"rounds": 1.5}), "args.rounds"),
        ] {
            let violations = accepts(name, bad.clone());
            assert!(!violations.is_empty(), "{name} {bad}");
            assert_eq!(violations[0].field, field, "{name} {bad}: {violations:?}");
        }
    }

    #[test]
    fn seconds_are_bounded() {
        assert_eq!(
            seconds(&json!(0.5), "s", None).unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            seconds(&json!({"s": 2}), "s", None).unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(
            seconds(&Value::Null, "s", Some(3.0)).unwrap(),
            Duration::from_secs(3)
        );
        assert!(seconds(&json!(-1), "s", None).is_err());
        assert!(seconds(&json!(1e12), "s", None).is_err());
        assert!(seconds(&json!("x"), "s", None).is_err());
    }

    #[test]
    fn sha256_matches_a_known_digest() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
