//! The runner against real programs (Unix tools, `/bin/sh` as the program
//! under test where a script is the shortest way to a behaviour). Process
//! groups are checked from outside, by reading `/proc`, not through the
//! crate's own code; a test waits for a program to be ready by a line it
//! prints, never by sleeping.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use jobd_command::{
    CommandSpec, Ending, Exit, Finished, GroupCleanup, MAX_LINE, OutputLine, ResultMode, RunError,
    Signal, SpawnError, Stream, Template, run, split_command_line,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

/// Longest a test waits for anything; a hang fails instead of blocking CI.
const PATIENCE: Duration = Duration::from_secs(20);

/// `/bin/sh -c SCRIPT`.
fn sh(script: &str) -> CommandSpec {
    CommandSpec::new("/bin/sh").args(["-c", script])
}

/// A program found in this process's PATH, which the spec passes on.
fn tool(program: &str) -> CommandSpec {
    CommandSpec::new(program).inherit_path(true)
}

async fn run_to_end(spec: CommandSpec) -> Result<Finished, RunError> {
    timeout(PATIENCE, run(spec, &CancellationToken::new()))
        .await
        .expect("run did not finish")
}

/// A process seen in `/proc`.
struct Member {
    pid: u32,
    state: String,
    ppid: u32,
}

/// Every process of group `pgid`, zombies included, read from `/proc`.
fn group_members(pgid: u32) -> Vec<Member> {
    let mut members = Vec::new();
    for entry in fs::read_dir("/proc").unwrap() {
        let Ok(pid) = entry.unwrap().file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after_comm = &stat[stat.rfind(')').unwrap() + 1..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        if fields[2].parse::<u32>().unwrap() == pgid {
            members.push(Member {
                pid,
                state: fields[0].to_owned(),
                ppid: fields[1].parse().unwrap(),
            });
        }
    }
    members
}

/// Members as a failure message shows them.
fn describe(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| format!("pid {} ({}, parent {})", m.pid, m.state, m.ppid))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Group members still alive. Dead orphans wait as zombies for PID 1 to
/// reap them, which only PID 1 can do; they are not running processes.
fn live_members(pgid: u32) -> Vec<Member> {
    group_members(pgid)
        .into_iter()
        .filter(|member| member.state != "Z" && member.state != "X")
        .collect()
}

/// Asserts that nothing of group `pgid` is alive and that no zombie of it
/// is this process's child (the runner reaped its program).
fn assert_group_gone(pgid: u32) {
    let live = live_members(pgid);
    assert!(
        live.is_empty(),
        "alive in group {pgid}: {}",
        describe(&live)
    );
    let ours: Vec<Member> = group_members(pgid)
        .into_iter()
        .filter(|member| member.ppid == std::process::id())
        .collect();
    assert!(
        ours.is_empty(),
        "unreaped children of the runner: {}",
        describe(&ours)
    );
}

/// Waits for a line starting with `prefix` on the sink, and returns it.
async fn line_starting(lines: &mut mpsc::Receiver<OutputLine>, prefix: &str) -> String {
    timeout(PATIENCE, async {
        loop {
            let line = lines
                .recv()
                .await
                .expect("the program ended before its line");
            if line.bytes.starts_with(prefix.as_bytes()) {
                return String::from_utf8(line.bytes).unwrap();
            }
        }
    })
    .await
    .expect("the program never printed its line")
}

#[tokio::test]
async fn cat_echoes_stdin_larger_than_a_pipe() {
    // Larger than a pipe's buffer both ways: stdin must be written while
    // stdout is read, or this deadlocks.
    let input: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let finished = run_to_end(tool("cat").stdin(input.clone())).await.unwrap();
    assert_eq!(finished.ending, Ending::Exited(0));
    assert_eq!(finished.stdout, input);
    assert_eq!(finished.group, GroupCleanup::Empty);
    assert!(finished.output_complete);
}

#[tokio::test]
async fn tr_from_a_command_line() {
    let argv = split_command_line("tr a-z A-Z").unwrap();
    let spec = CommandSpec::from_argv(argv).unwrap().inherit_path(true);
    let finished = run_to_end(spec.stdin("hello, world\n")).await.unwrap();
    assert_eq!(finished.stdout, b"HELLO, WORLD\n");
    assert_eq!(
        finished.into_outcome(ResultMode::Text).unwrap(),
        json!("HELLO, WORLD")
    );
}

#[tokio::test]
async fn a_program_that_ignores_its_stdin_is_not_an_error() {
    let finished = run_to_end(tool("true").stdin(vec![b'x'; 1 << 20]))
        .await
        .unwrap();
    assert_eq!(finished.ending, Ending::Exited(0));
}

#[tokio::test]
async fn non_zero_exit_fails_with_the_code_and_the_stderr_tail() {
    let finished = run_to_end(sh("echo partial; echo oops >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(finished.ending, Ending::Exited(3));
    assert_eq!(finished.stderr_tail, b"oops\n");
    let failure = finished.into_outcome(ResultMode::Json).unwrap_err();
    assert_eq!(failure.message, "exited with code 3: oops");
    assert_eq!(failure.stderr, "oops");
    assert_eq!(failure.ending, Ending::Exited(3));
}

#[tokio::test]
async fn stderr_keeps_its_last_bytes() {
    let finished = run_to_end(
        sh("head -c 9000 /dev/zero | tr '\\0' a >&2; echo END >&2; exit 1").inherit_path(true),
    )
    .await
    .unwrap();
    assert_eq!(finished.stderr_total, 9004);
    assert_eq!(finished.stderr_tail.len(), 4096);
    assert!(finished.stderr_tail.ends_with(b"aaaEND\n"));
    let failure = finished.into_outcome(ResultMode::None).unwrap_err();
    assert!(
        failure.message.starts_with("exited with code 1: aaa") && failure.message.ends_with("END"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn a_signal_is_named_in_the_failure() {
    let finished = run_to_end(sh("echo dying >&2; kill -USR1 $$"))
        .await
        .unwrap();
    let Ending::Signalled(signal) = finished.ending else {
        panic!("{:?}", finished.ending)
    };
    assert_eq!(signal.name(), Some("SIGUSR1"));
    let failure = finished.into_outcome(ResultMode::Json).unwrap_err();
    assert_eq!(
        failure.message,
        format!("killed by signal SIGUSR1 ({}): dying", signal.number())
    );
}

#[tokio::test]
async fn programs_that_cannot_start_are_spawn_errors() {
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("data.txt");
    fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&not_executable, fs::Permissions::from_mode(0o644)).unwrap();

    // The spec, a part of the program's name the error must show, and the
    // reason expected.
    type Case = (CommandSpec, &'static str, fn(&SpawnError) -> bool);
    let cases: [Case; 5] = [
        (
            tool("jobd-no-such-program"),
            "jobd-no-such-program",
            |reason| matches!(reason, SpawnError::NotInPath),
        ),
        (
            // A clean environment has no PATH to look a bare name up in.
            CommandSpec::new("cat"),
            "cat",
            |reason| matches!(reason, SpawnError::NoPath),
        ),
        (
            CommandSpec::new("/nonexistent/jobd-tool"),
            "/nonexistent/jobd-tool",
            |reason| matches!(reason, SpawnError::NotFound(_)),
        ),
        (CommandSpec::new(&not_executable), "data.txt", |reason| {
            matches!(reason, SpawnError::NotExecutable(_))
        }),
        (
            CommandSpec::new("/bin/sh").current_dir(dir.path().join("missing")),
            "/bin/sh",
            |reason| matches!(reason, SpawnError::WorkingDir { .. }),
        ),
    ];
    for (spec, name, expected) in cases {
        match run_to_end(spec).await {
            Err(error @ RunError::Spawn { .. }) => {
                let message = error.to_string();
                let RunError::Spawn { program, reason } = error else {
                    unreachable!()
                };
                assert!(expected(&reason), "{name}: {reason:?}");
                assert!(program.contains(name), "{program}");
                assert!(message.contains(name), "{message}");
            }
            other => panic!("{name}: expected a spawn error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_environment_is_clean_unless_the_spec_says_otherwise() {
    let finished = run_to_end(CommandSpec::new("/usr/bin/env").env("GREETING", "hi"))
        .await
        .unwrap();
    assert_eq!(finished.stdout, b"GREETING=hi\n");

    let finished = run_to_end(tool("env").env("GREETING", "hi")).await.unwrap();
    let mut got: Vec<String> = String::from_utf8(finished.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    got.sort();
    let path = std::env::var("PATH").unwrap();
    assert_eq!(got, ["GREETING=hi".to_owned(), format!("PATH={path}")]);

    // The spec's own PATH wins over the inherited one.
    let finished = run_to_end(tool("env").env("PATH", "/usr/bin:/bin"))
        .await
        .unwrap();
    assert_eq!(finished.stdout, b"PATH=/usr/bin:/bin\n");
}

#[tokio::test]
async fn the_working_directory_is_used_for_the_program_too() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("where");
    fs::write(&script, "#!/bin/sh\npwd\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let finished = run_to_end(CommandSpec::new("./where").current_dir(dir.path()))
        .await
        .unwrap();
    let printed = String::from_utf8(finished.stdout).unwrap();
    assert_eq!(
        fs::canonicalize(printed.trim_end()).unwrap(),
        fs::canonicalize(dir.path()).unwrap()
    );
}

#[tokio::test]
async fn output_over_the_cap_is_counted_and_fails_the_outcome() {
    let spec = tool("head")
        .args(["-c", "100000", "/dev/zero"])
        .max_output(1000);
    let finished = run_to_end(spec).await.unwrap();
    assert_eq!(finished.ending, Ending::Exited(0));
    assert_eq!(finished.stdout.len(), 1000);
    assert_eq!(finished.stdout_dropped, 99_000);
    assert!(finished.stdout_truncated());
    let failure = finished.into_outcome(ResultMode::Text).unwrap_err();
    assert_eq!(
        failure.message,
        "output too long: kept 1000 bytes, dropped 99000"
    );
}

#[tokio::test]
async fn non_utf8_output_is_lossy_text_and_exact_bytes_in_the_line_sink() {
    let (sink, mut lines) = mpsc::channel(16);
    let spec = tool("printf").arg(r"caf\351\n\377\n").lines(sink);
    let finished = run_to_end(spec).await.unwrap();
    assert_eq!(finished.stdout, b"caf\xe9\n\xff\n");
    assert_eq!(
        finished.into_outcome(ResultMode::Text).unwrap(),
        json!("caf\u{fffd}\n\u{fffd}")
    );
    let mut got = Vec::new();
    while let Ok(line) = lines.try_recv() {
        got.push(line);
    }
    let stdout = |bytes: &[u8]| OutputLine {
        stream: Stream::Stdout,
        bytes: bytes.to_vec(),
    };
    assert_eq!(got, [stdout(b"caf\xe9"), stdout(b"\xff")]);
}

#[tokio::test]
async fn the_line_sink_gets_both_streams_split_and_counts_what_it_drops() {
    let (sink, mut lines) = mpsc::channel(16);
    let script = "echo out1; echo err1 >&2; echo out2; printf 'no newline' >&2";
    let finished = run_to_end(sh(script).lines(sink)).await.unwrap();
    let mut got = BTreeSet::new();
    while let Ok(line) = lines.try_recv() {
        got.insert((line.stream == Stream::Stdout, line.bytes));
    }
    assert_eq!(
        got,
        BTreeSet::from([
            (true, b"out1".to_vec()),
            (true, b"out2".to_vec()),
            (false, b"err1".to_vec()),
            (false, b"no newline".to_vec()),
        ])
    );
    assert_eq!(finished.lines_dropped, 0);

    // A long line is split; a full sink drops (and counts) lines but never
    // holds up the program or the kept output.
    let (sink, mut lines) = mpsc::channel(2);
    let spec = tool("head")
        .args(["-c", &(MAX_LINE * 3).to_string(), "/dev/zero"])
        .lines(sink);
    let finished = run_to_end(spec).await.unwrap();
    assert_eq!(finished.stdout.len(), MAX_LINE * 3);
    assert_eq!(finished.lines_dropped, 1);
    assert_eq!(lines.recv().await.unwrap().bytes.len(), MAX_LINE);
    assert_eq!(lines.recv().await.unwrap().bytes.len(), MAX_LINE);
}

#[tokio::test]
async fn template_values_stay_one_argument_each() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let values = [
        "; rm -rf /".to_owned(),
        "$(id)".to_owned(),
        "`id`".to_owned(),
        "-rf".to_owned(),
        "two words and 'single' \"double\" quotes".to_owned(),
        "*".to_owned(),
        "line\nbreak".to_owned(),
        format!("; touch {}", marker.display()),
        format!("$(touch {})", marker.display()),
    ];
    let names: Vec<String> = (0..values.len()).map(|i| format!("v{i}")).collect();
    // printf '%s\0' prints each argument once, NUL-terminated, so even a
    // value with a newline is seen whole.
    let mut argv = vec!["printf".to_owned(), r"%s\0".to_owned()];
    argv.extend(names.iter().map(|name| format!("{{{name}}}")));
    let template = Template::parse(&argv, &names).unwrap();
    let args: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .cloned()
        .zip(values.iter().map(|value| json!(value)))
        .collect();
    let rendered = template.render(&args.into()).unwrap();
    assert_eq!(rendered.len(), 2 + values.len());

    let spec = CommandSpec::from_argv(rendered)
        .unwrap()
        .inherit_path(true)
        .current_dir(dir.path());
    let finished = run_to_end(spec).await.unwrap();
    assert_eq!(finished.ending, Ending::Exited(0));
    let printed: Vec<String> = finished
        .stdout
        .split(|&byte| byte == 0)
        .map(|arg| String::from_utf8(arg.to_vec()).unwrap())
        .collect();
    // One element per value, then the empty rest after the last NUL.
    let mut expected = values.to_vec();
    expected.push(String::new());
    assert_eq!(printed, expected);
    assert!(!marker.exists(), "a value ran as a command");
}

#[tokio::test]
async fn cancel_stops_the_whole_process_group() {
    let (sink, mut lines) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let spec = sh("sleep 1000 & echo \"ready $$\"; sleep 1000").lines(sink);
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { run(spec, &cancel).await }
    });

    let ready = line_starting(&mut lines, "ready ").await;
    let pgid: u32 = ready["ready ".len()..].parse().unwrap();
    // The shell and its background sleep (and maybe the foreground one):
    // the count that must drop to zero.
    assert!(
        live_members(pgid).len() >= 2,
        "{}",
        describe(&group_members(pgid))
    );

    cancel.cancel();
    let finished = timeout(PATIENCE, task).await.unwrap().unwrap().unwrap();
    assert_group_gone(pgid);
    assert_eq!(finished.pid, pgid);
    assert_eq!(
        finished.ending,
        Ending::Cancelled {
            exit: Some(Exit::Signal(Signal::TERM))
        }
    );
    assert_eq!(finished.group, GroupCleanup::Terminated);
    assert_eq!(
        finished.into_outcome(ResultMode::Json).unwrap_err().message,
        "cancelled"
    );
}

#[tokio::test]
async fn a_group_that_ignores_sigterm_is_killed_after_the_grace() {
    let grace = Duration::from_millis(300);
    let (sink, mut lines) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    // The ignored SIGTERM is inherited by the sleep, too.
    let spec = sh("trap '' TERM; sleep 1000 & echo \"ready $$\"; sleep 1000")
        .kill_grace(grace)
        .lines(sink);
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { run(spec, &cancel).await }
    });
    let ready = line_starting(&mut lines, "ready ").await;
    let pgid: u32 = ready["ready ".len()..].parse().unwrap();

    let cancelled_at = Instant::now();
    cancel.cancel();
    let finished = timeout(PATIENCE, task).await.unwrap().unwrap().unwrap();
    let took = cancelled_at.elapsed();
    assert!(took >= grace, "SIGKILL before the grace was over: {took:?}");
    assert!(
        took < grace + Duration::from_secs(1),
        "took {took:?} for a grace of {grace:?}"
    );
    assert_group_gone(pgid);
    assert_eq!(
        finished.ending,
        Ending::Cancelled {
            exit: Some(Exit::Signal(Signal::KILL))
        }
    );
    assert_eq!(finished.group, GroupCleanup::Killed);
}

#[tokio::test]
async fn a_timeout_stops_the_group_and_says_timed_out() {
    let limit = Duration::from_millis(200);
    let spec = sh("sleep 1000 & sleep 1000").timeout(limit);
    let finished = run_to_end(spec).await.unwrap();
    assert_group_gone(finished.pid);
    assert_eq!(
        finished.ending,
        Ending::TimedOut {
            after: limit,
            exit: Some(Exit::Signal(Signal::TERM))
        }
    );
    assert_eq!(finished.group, GroupCleanup::Terminated);
    assert!(finished.elapsed >= limit, "{:?}", finished.elapsed);
    assert_eq!(
        finished.into_outcome(ResultMode::Json).unwrap_err().message,
        "timed out after 200ms"
    );
}

#[tokio::test]
async fn processes_left_behind_by_a_finished_program_are_stopped() {
    // The background sleep keeps stdout open: without the cleanup, reading
    // to the end of it would wait for the sleep.
    let finished = run_to_end(sh("sleep 1000 & echo \"left $!\""))
        .await
        .unwrap();
    assert_eq!(finished.ending, Ending::Exited(0));
    assert_eq!(finished.group, GroupCleanup::Terminated);
    assert!(finished.output_complete);
    assert!(String::from_utf8_lossy(&finished.stdout).starts_with("left "));
    assert_group_gone(finished.pid);
}

#[tokio::test]
async fn a_process_that_left_the_group_is_not_waited_for() {
    // `setsid` takes the sleep out of the group (out of reach of killpg),
    // but it still holds stdout open: the run must end anyway, bounded,
    // and say the output may be incomplete. The escaped process says when
    // it has left the group (through a fifo the script waits on), so the
    // script cannot end, and its group be stopped, before it has.
    let script = r#"f=$(mktemp -u); mkfifo "$f"
setsid sh -c 'echo "escaped $$"; echo > "$1"; exec sleep 1000' sh "$f" &
read _ < "$f"; rm -f "$f""#;
    let finished = run_to_end(sh(script).inherit_path(true)).await.unwrap();
    let printed = String::from_utf8_lossy(&finished.stdout).into_owned();
    let escaped: i32 = printed.trim()["escaped ".len()..].parse().unwrap();
    // The test started it, so the test ends it, before any assertion.
    let pid = rustix::process::Pid::from_raw(escaped).unwrap();
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);

    assert_eq!(finished.ending, Ending::Exited(0));
    assert!(!finished.output_complete);
    assert!(
        finished.elapsed < Duration::from_secs(5),
        "{:?}",
        finished.elapsed
    );
    let failure = finished.into_outcome(ResultMode::Json).unwrap_err();
    assert!(
        failure.message.starts_with("output incomplete"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn dropping_the_run_kills_the_group() {
    let (sink, mut lines) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let spec = sh("sleep 1000 & echo \"ready $$\"; sleep 1000").lines(sink);
    let pgid: u32 = {
        let running = run(spec, &cancel);
        tokio::select! {
            result = running => panic!("the program ended by itself: {result:?}"),
            ready = line_starting(&mut lines, "ready ") => ready["ready ".len()..].parse().unwrap(),
        }
        // `running` is dropped here, before the group is looked at.
    };
    // SIGKILL was sent when the run was dropped; death is not instant,
    // and an outside observer has no event for it, so look until the
    // group is gone (bounded).
    let deadline = Instant::now() + PATIENCE;
    while !live_members(pgid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{}",
            describe(&live_members(pgid))
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn into_outcome_modes() {
    let cases = [
        (
            "echo '{\"a\": [1, 2]}'",
            ResultMode::Json,
            json!({"a": [1, 2]}),
        ),
        ("echo 42", ResultMode::Json, json!(42)),
        ("echo not json", ResultMode::Json, json!("not json")),
        ("echo 42", ResultMode::Text, json!("42")),
        (
            "printf 'two\\nlines\\n\\n'",
            ResultMode::Text,
            json!("two\nlines\n"),
        ),
        ("echo ignored", ResultMode::None, json!(null)),
        ("true", ResultMode::Json, json!("")),
    ];
    for (script, mode, expected) in cases {
        let finished = run_to_end(sh(script)).await.unwrap();
        assert_eq!(finished.into_outcome(mode).unwrap(), expected, "{script}");
    }
}
