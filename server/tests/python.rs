//! The Python package's test suite (`client/python/tests`), run with pytest
//! against the `jobd` binary this build made, so that `cargo test` covers
//! the Python executor, asyncio client and workers too.
//!
//! It needs the `jobd` Python package and pytest (the README's test command
//! installs both). Without them this test fails and says how to install
//! them: a suite that cannot run must never look like a suite that passed.

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

/// What installs the package and pytest, from the repository root.
const INSTALL: &str = "python3 -m pip install './client/python[test]'";

/// The suite takes well under a minute; past this it is stuck, and is
/// stopped so that `cargo test` reports it instead of hanging.
const LIMIT: Duration = Duration::from_secs(600);

#[test]
fn python_suite_passes_against_this_jobd() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the server crate lives in the repository");
    let probe = Command::new("python3")
        .args(["-c", "import jobd, jobd.v1, pytest"])
        .current_dir(repo)
        .output();
    match probe {
        Err(err) => panic!("cannot run python3 ({err}); the Python suite needs it: {INSTALL}"),
        Ok(out) if !out.status.success() => panic!(
            "the jobd Python package or pytest cannot be imported:\n{}\nInstall them from the repository root: {INSTALL}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
    }

    let mut child = Command::new("python3")
        .args(["-m", "pytest", "client/python/tests", "-q"])
        .env("JOBD_BIN", jobd_test_support::jobd_binary!())
        .current_dir(repo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pytest");
    let stdout = read_all(child.stdout.take().expect("piped stdout"));
    let stderr = read_all(child.stderr.take().expect("piped stderr"));
    // pytest's output ends when it exits: wait for that, within the limit.
    let (done, finished) = mpsc::channel();
    let stdout = thread::spawn(move || {
        let text = stdout.join().expect("read stdout");
        let _ = done.send(());
        text
    });
    let timed_out = finished.recv_timeout(LIMIT).is_err();
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait for pytest");
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    assert!(
        !timed_out,
        "pytest ran longer than {LIMIT:?} and was stopped:\n{stdout}\n{stderr}"
    );
    assert!(
        status.success(),
        "the Python suite failed ({status}):\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
}

/// Reads a pipe to its end on a thread of its own.
fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}
