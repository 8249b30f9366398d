//! `jobctl` against a jobd that serves TLS and requires tokens (in-process,
//! on 127.0.0.1:0, certificates made at test time): `--ca-cert` with
//! `--token-file` or `JOBD_TOKEN` works; a missing token, a read-only token
//! submitting, an untrusted server and unreadable files fail with one line
//! and the documented exit code.

use std::{os::unix::fs::PermissionsExt as _, path::PathBuf, sync::Arc, time::Duration};

use assert_cmd::Command;
use jobd::{Security, auth::TokenSet, tls::TlsConfig};
use jobd_test_support::{BlockingServer, TestServer, pki::Pki};
use predicates::prelude::*;

const WRITER: &str = "jobctl-writer-token-0123456789";
const READER: &str = "jobctl-reader-token-0123456789";

/// The workspace's test server with TLS and two tokens.
struct SecureServer {
    addr: String,
    pki: Pki,
    server: Option<BlockingServer>,
}

impl SecureServer {
    fn start() -> Self {
        let pki = Pki::new();
        let server = pki.pair("server");
        let tls = TlsConfig::from_files(&server.cert, &server.key, None).unwrap();
        let tokens = TokenSet::parse(
            "inline",
            &format!("{WRITER}\n{READER} name=reader readonly\n"),
        )
        .unwrap();
        let security = Security {
            tls: Some(tls),
            tokens: Some(Arc::new(tokens)),
            auth_reflection: false,
        };
        let server = BlockingServer::start(|| TestServer::start_secure(security));
        Self {
            addr: server.server().https_url(),
            pki,
            server: Some(server),
        }
    }

    /// `jobctl --addr ADDR --ca-cert CA`, with no token from the
    /// environment unless the test adds one.
    fn jobctl(&self) -> Command {
        let mut command = Command::cargo_bin("jobctl").unwrap();
        for var in [
            "JOBD_ADDR",
            "JOBD_TOKEN",
            "JOBD_TOKEN_FILE",
            "JOBD_CA_CERT",
            "JOBD_CLIENT_CERT",
            "JOBD_CLIENT_KEY",
        ] {
            command.env_remove(var);
        }
        command
            .args(["--addr", &self.addr, "--ca-cert"])
            .arg(self.pki.ca())
            .timeout(Duration::from_secs(60));
        command
    }

    fn token_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.pki.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }
}

impl Drop for SecureServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
    }
}

/// One line on stderr, no panic or backtrace.
fn one_line() -> impl Predicate<str> {
    predicate::function(|stderr: &str| stderr.trim().lines().count() == 1)
        .and(predicate::str::contains("panicked").not())
}

#[test]
fn token_file_and_environment_token_over_tls() {
    let server = SecureServer::start();
    // jobd's own token-file format works: the first word is the token.
    let file = server.token_file("token", &format!("# mine\n{WRITER} name=ci\n"));
    server
        .jobctl()
        .arg("--token-file")
        .arg(&file)
        .args(["submit", "--wait", "hello", "Ann"])
        .assert()
        .success()
        .stdout("Hello, Ann!\n");
    server
        .jobctl()
        .env("JOBD_TOKEN", WRITER)
        .args(["submit", "--wait", "hello", "Bea"])
        .assert()
        .success()
        .stdout("Hello, Bea!\n");
    // A read-only token lists what the others made.
    server
        .jobctl()
        .env("JOBD_TOKEN", READER)
        .args(["-o", "json", "list"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("Hello, Ann!").and(predicate::str::contains("Hello, Bea!")),
        );
}

#[test]
fn missing_and_read_only_tokens_are_refused() {
    let server = SecureServer::start();
    server
        .jobctl()
        .args(["submit", "hello", "Ann"])
        .assert()
        .code(3)
        .stderr(one_line().and(predicate::str::contains("bearer token is required")));
    server
        .jobctl()
        .env("JOBD_TOKEN", "not-the-right-token-at-all")
        .args(["functions"])
        .assert()
        .code(3)
        .stderr(one_line().and(predicate::str::contains("not valid")));
    server
        .jobctl()
        .env("JOBD_TOKEN", READER)
        .args(["submit", "hello", "Ann"])
        .assert()
        .code(3)
        .stderr(one_line().and(predicate::str::contains("read-only")));
    // Nothing was created by the refused submissions.
    server
        .jobctl()
        .env("JOBD_TOKEN", READER)
        .args(["-o", "json", "list"])
        .assert()
        .success()
        .stdout("");
}

#[test]
fn bad_tls_settings_fail_with_one_line() {
    let server = SecureServer::start();
    // Without --ca-cert the system's roots do not know the test CA.
    let mut untrusting = Command::cargo_bin("jobctl").unwrap();
    untrusting
        .env_remove("JOBD_CA_CERT")
        .env("JOBD_TOKEN", WRITER)
        .args(["--addr", &server.addr, "functions"])
        .timeout(Duration::from_secs(60))
        .assert()
        .code(3)
        .stderr(one_line().and(predicate::str::contains("cannot reach jobd")));
    // Unreadable files are usage errors, found before connecting.
    server
        .jobctl()
        .args(["--token-file", "/nonexistent/token", "functions"])
        .assert()
        .code(2)
        .stderr(one_line().and(predicate::str::contains("--token-file /nonexistent/token")));
    let empty = server.token_file("empty", "# no token here\n");
    server
        .jobctl()
        .arg("--token-file")
        .arg(&empty)
        .arg("functions")
        .assert()
        .code(2)
        .stderr(one_line().and(predicate::str::contains("holds no token")));
    // A client certificate needs its key.
    server
        .jobctl()
        .args(["--client-cert", "/some/cert.pem", "functions"])
        .assert()
        .code(2)
        .stderr(one_line().and(predicate::str::contains("--client-key")));
}

/// `jobctl bench` opens its own connections: they use TLS and send the token
/// too.
#[test]
fn bench_over_tls_with_a_token() {
    let server = SecureServer::start();
    let output = server
        .jobctl()
        .env("JOBD_TOKEN", WRITER)
        .args([
            "-o", "json", "bench", "--mode", "submit", "--jobs", "200", "--warmup", "0",
        ])
        .args(["--connections", "2"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["floor_errors"], 0, "{report}");
    assert!(report["jobs"].as_u64().unwrap() >= 200, "{report}");

    // With a read-only token every submit is refused: nothing to measure.
    server
        .jobctl()
        .env("JOBD_TOKEN", READER)
        .args(["bench", "--mode", "submit", "--jobs", "20", "--warmup", "0"])
        .assert()
        .code(3)
        .stderr(one_line().and(predicate::str::contains("read-only")));
}
