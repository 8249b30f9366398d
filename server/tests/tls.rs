//! TLS against the real `jobd` binary, with certificates made at test time:
//! the client library over TLS with a token; plaintext to a TLS port, a
//! client without the CA, and (mutual TLS) a missing or untrusted client
//! certificate are all refused without creating a job; a client that stalls
//! mid-handshake is cut off by the handshake timeout; unusable certificate
//! files stop jobd at start.

#![allow(
    clippy::disallowed_methods,
    reason = "tests of the real jobd binary keep real time: its clock is the system's"
)]

use std::{
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use jobd_client::{ConnectOptions, Error, JobClient};
use jobd_test_support::{
    JobdProcess, jobd_binary, pki::Pki, refused_start, refused_start_output, tools::require_grpcurl,
};
use serde_json::json;

const TOKEN: &str = "tls-test-token-0123456789abcdef";

fn tls_args(pki: &Pki) -> Vec<String> {
    let server = pki.pair("server");
    vec![
        "--store".into(),
        "memory".into(),
        "--tls-cert".into(),
        server.cert.display().to_string(),
        "--tls-key".into(),
        server.key.display().to_string(),
    ]
}

fn start(args: &[String]) -> JobdProcess {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    JobdProcess::start(jobd_binary!(), &args)
}

/// A refusal by the transport (the TLS handshake or the connection broke),
/// not an answer from jobd: tonic reports it either at connect or as a
/// status it made up itself, which carries the transport error as its
/// source.
fn refused_by_transport(error: &Error) -> bool {
    match error {
        Error::Transport(_) => true,
        Error::Rpc(status) => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

fn trusted(pki: &Pki) -> ConnectOptions {
    ConnectOptions::new().ca_certificate_pem(pki.read(&pki.ca()))
}

/// How many jobs exist, asked over a connection that is allowed to.
async fn job_count(client: &JobClient) -> usize {
    client
        .list_jobs(&jobd_client::ListFilter::default(), 1000, None)
        .await
        .unwrap()
        .jobs
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_token_through_the_client_library() {
    let pki = Pki::new();
    let tokens = pki.dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN} name=tests\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut args = tls_args(&pki);
    args.extend(["--auth-token-file".into(), tokens.display().to_string()]);
    let server = start(&args);

    let client = JobClient::connect_with(server.https_url(), trusted(&pki).bearer_token(TOKEN))
        .await
        .unwrap();
    let job = client.submit("hello", json!("Ann")).await.unwrap();
    assert_eq!(job.result().await.unwrap(), json!("Hello, Ann!"));

    // TLS alone is not enough: the token is still required.
    let tokenless = JobClient::connect_with(server.https_url(), trusted(&pki))
        .await
        .unwrap();
    let refused = tokenless.submit("hello", json!("Bob")).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(tonic::Code::Unauthenticated),
        "{refused}"
    );

    // Connecting by IP address works too: the certificate names 127.0.0.1.
    let by_ip = JobClient::connect_with(
        format!("https://127.0.0.1:{}", server.addr.port()),
        trusted(&pki).bearer_token(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(job_count(&by_ip).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_untrusting_clients_are_refused() {
    let pki = Pki::new();
    let server = start(&tls_args(&pki));

    // Plaintext HTTP/2 to the TLS port: the handshake fails, no call lands.
    let plaintext = JobClient::connect(server.url()).await;
    let error = match plaintext {
        Err(error) => error,
        Ok(client) => client.submit("noop", json!(1)).await.unwrap_err(),
    };
    assert!(refused_by_transport(&error), "{error:?}");

    // A client that does not trust the server's CA refuses the server.
    let rogue_ca =
        ConnectOptions::new().ca_certificate_pem(pki.read(&pki.dir.path().join("rogue-ca.pem")));
    let error = JobClient::connect_with(server.https_url(), rogue_ca)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Transport(_)), "{error:?}");

    let client = JobClient::connect_with(server.https_url(), trusted(&pki))
        .await
        .unwrap();
    assert_eq!(job_count(&client).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_missing_and_untrusted_client_certificates() {
    let pki = Pki::new();
    let mut args = tls_args(&pki);
    args.extend(["--tls-client-ca".into(), pki.ca().display().to_string()]);
    let server = start(&args);

    let with_identity = |name: &str| {
        let pair = pki.pair(name);
        trusted(&pki).client_identity_pem(pki.read(&pair.cert), pki.read(&pair.key))
    };
    // The handshake error may surface at connect or at the first call
    // (TLS 1.3 lets the client finish before the server checks its
    // certificate).
    let refused = |result: Result<JobClient, Error>| async move {
        let error = match result {
            Err(error) => error,
            Ok(client) => client.submit("noop", json!(1)).await.unwrap_err(),
        };
        assert!(refused_by_transport(&error), "{error:?}");
    };
    refused(JobClient::connect_with(server.https_url(), trusted(&pki)).await).await;
    refused(JobClient::connect_with(server.https_url(), with_identity("rogue")).await).await;

    let client = JobClient::connect_with(server.https_url(), with_identity("client"))
        .await
        .unwrap();
    assert_eq!(job_count(&client).await, 0);
    let job = client.submit("hello", json!("Cy")).await.unwrap();
    assert_eq!(job.result().await.unwrap(), json!("Hello, Cy!"));
}

/// A client that opens a TCP connection and never speaks is disconnected
/// when the handshake timeout runs out.
#[test]
fn a_stalled_handshake_is_cut_off() {
    let pki = Pki::new();
    let mut args = tls_args(&pki);
    args.extend(["--tls-handshake-timeout".into(), "300ms".into()]);
    let server = start(&args);

    let mut stalled = std::net::TcpStream::connect(server.addr).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    // EOF or a reset: either way the server hung up, well before our own
    // 10 s read timeout.
    let closed = match stalled.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!("the server sent {n} bytes to a silent client"),
        Err(error) => {
            error.kind() != std::io::ErrorKind::WouldBlock
                && error.kind() != std::io::ErrorKind::TimedOut
        }
    };
    let waited = started.elapsed();
    assert!(closed, "the stalled connection was not closed");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
}

#[test]
fn unusable_certificates_stop_jobd_at_start() {
    let pki = Pki::new();
    let path = |p: &Path| p.display().to_string();
    let server = pki.pair("server");
    let client = pki.pair("client");
    // A key that is not the certificate's.
    let stderr = refused_start(
        jobd_binary!(),
        &[
            "--tls-cert",
            &path(&server.cert),
            "--tls-key",
            &path(&client.key),
        ],
    );
    assert!(stderr.contains("not usable"), "{stderr}");
    // A certificate file that is not PEM.
    let stderr = refused_start(
        jobd_binary!(),
        &[
            "--tls-cert",
            &path(&server.key),
            "--tls-key",
            &path(&server.key),
        ],
    );
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    let stderr = refused_start(
        jobd_binary!(),
        &[
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            &path(&server.key),
        ],
    );
    assert!(
        stderr.contains("cannot read certificate /nonexistent.pem"),
        "{stderr}"
    );
    let stderr = refused_start(
        jobd_binary!(),
        &[
            "--tls-cert",
            &path(&server.cert),
            "--tls-key",
            &path(&server.key),
            "--tls-client-ca",
            &path(&server.key),
        ],
    );
    assert!(stderr.contains("client CA"), "{stderr}");
    // --tls-cert without --tls-key is a usage error.
    let stderr = refused_start_output(jobd_binary!(), &["--tls-cert", &path(&server.cert)]);
    assert!(stderr.contains("--tls-key"), "{stderr}");
    // The private key never shows up in an error.
    assert!(!stderr.contains("PRIVATE KEY"));
}

/// README's grpcurl example: `-cacert` and an `authorization` header.
#[test]
fn grpcurl_with_a_ca_certificate_and_a_bearer_token() {
    require_grpcurl();
    let pki = Pki::new();
    let tokens = pki.dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut args = tls_args(&pki);
    args.extend(["--auth-token-file".into(), tokens.display().to_string()]);
    let server = start(&args);
    let target = format!("localhost:{}", server.addr.port());
    let grpcurl = |extra: &[&str]| {
        Command::new("grpcurl")
            .args(["-max-time", "20", "-cacert"])
            .arg(pki.ca())
            .args(extra)
            .args(["-d", r#"{"function": "hello", "args": "Ann"}"#])
            .args([target.as_str(), "jobd.v1.JobService/Submit"])
            .output()
            .expect("run grpcurl")
    };

    let bearer = format!("authorization: Bearer {TOKEN}");
    let out = grpcurl(&["-H", &bearer]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(answer["jobId"].is_string(), "{answer}");

    let out = grpcurl(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
}
