//! The real `jobd` binary as a child process: on 127.0.0.1 port 0, reading
//! the address it prints, and killed when dropped so no test leaks a
//! server. The binary is the one Cargo built for the calling package's
//! tests ([`jobd_binary!`](crate::jobd_binary)).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use jobd_proto::pb::{self, job_service_client::JobServiceClient};
use tonic::transport::{Channel, Endpoint};

/// A `jobd` child process.
pub struct JobdProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The data directory this test owns, when it did not pass its own.
    data_dir: Option<tempfile::TempDir>,
}

impl JobdProcess {
    /// Starts `BIN --listen 127.0.0.1:0 ARGS...` with a fresh data directory
    /// and waits for its `listening on ADDR` line, which it prints once the
    /// socket is bound.
    pub fn start(bin: &str, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut process = Self::start_in(bin, dir.path(), "127.0.0.1:0", args);
        process.data_dir = Some(dir);
        process
    }

    /// Starts jobd on `dir` and `listen` (restart tests reuse both).
    pub fn start_in(bin: &str, dir: &Path, listen: &str, args: &[&str]) -> Self {
        let mut child = Command::new(bin)
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
            data_dir: None,
        }
    }

    /// The data directory of a server started with [`JobdProcess::start`].
    pub fn data_dir(&self) -> &Path {
        self.data_dir
            .as_ref()
            .expect("started with its own data dir")
            .path()
    }

    /// `http://127.0.0.1:PORT`.
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

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (through kill(1): the workspace forbids unsafe code).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends `SIG` (`STOP`, `CONT`, ...) through kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGKILL: the crash that durability is about.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9 jobd");
        self.child.wait().expect("reap jobd");
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        wait_exit(&mut self.child, limit, "jobd")
    }
}

/// Waits for `child` (`what`, for the panic) to exit, at most `limit`.
/// Polls: a child's exit has no signal a test can await without unsafe
/// code.
pub fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
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
/// test makes.
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

/// Runs `BIN ARGS...` expecting it to refuse to start with a one-line
/// error (see [`refused_start_output`]), and returns that line.
pub fn refused_start(bin: &str, args: &[&str]) -> String {
    let stderr = refused_start_output(bin, args);
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    stderr
}

/// Runs `BIN ARGS...` expecting it to refuse to start, with
/// `--listen 127.0.0.1:0` and a fresh `--data-dir` unless ARGS give their
/// own, and logs off since the point is the error a user sees: a failed
/// exit, nothing on stdout (so no `listening on`), and no panic. Returns
/// stderr, which for a usage error is clap's several lines.
pub fn refused_start_output(bin: &str, args: &[&str]) -> String {
    let data = tempfile::tempdir().expect("temp dir");
    let mut jobd = Command::new(bin);
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

/// The seed example against a real server, in real time: two
/// `return_future` jobs (on `pool`, or the function's own) are both not
/// done at 1 s, and both done with their messages at about 3 s, not 6:
/// they ran at once. Returns them, for checks of their own.
pub async fn seed_example(
    client: &jobd_client::JobClient,
    pool: Option<&str>,
) -> [jobd_client::JobHandle; 2] {
    let submit = |message: &'static str| {
        let mut submission =
            jobd_client::Submission::new("return_future", serde_json::json!(message));
        submission.pool = pool.map(str::to_owned);
        client.submit_with(submission)
    };
    let start = Instant::now();
    let hello = submit("hello").await.unwrap();
    let world = submit("world").await.unwrap();
    // The example's own pause, not a synchronisation: at 1 s neither may
    // be done.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!hello.done().await.unwrap());
    assert!(!world.done().await.unwrap());
    let (a, b) = tokio::join!(hello.result(), world.result());
    assert_eq!(
        (a.unwrap(), b.unwrap()),
        (serde_json::json!("hello"), serde_json::json!("world"))
    );
    let elapsed = start.elapsed();
    assert!(
        (Duration::from_millis(2900)..Duration::from_secs(5)).contains(&elapsed),
        "{elapsed:?}"
    );
    [hello, world]
}
