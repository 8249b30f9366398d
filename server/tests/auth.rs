//! Bearer tokens against the real `jobd` binary: every way of getting the
//! token wrong is refused with UNAUTHENTICATED, a read-only token that tries
//! to change something with PERMISSION_DENIED, an unknown method needs write
//! access, and none of the refused calls creates a job. Also: bad token files
//! and unprotected non-loopback addresses stop jobd at start.

#![allow(
    clippy::disallowed_methods,
    reason = "tests of the real jobd binary keep real time: its clock is the system's"
)]

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use jobd_client::{ConnectOptions, JobClient};
use jobd_proto::pb::{self, job_service_client::JobServiceClient};
use jobd_test_support::{JobdProcess, jobd_binary, refused_start};
use serde_json::json;
use tonic::{
    Code,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

const WRITER: &str = "w-3f9c1e0b7a2d4c58e6f1a9b0c3d2e4f5";
const READER: &str = "r-9a8b7c6d5e4f30211f2e3d4c5b6a7988";

/// Writes a private token file (mode 600) with a read-write and a read-only
/// token.
fn token_file(dir: &Path) -> PathBuf {
    write_private(
        &dir.join("tokens"),
        &format!("# jobd tokens\n{WRITER} name=ci\n{READER} name=dashboard readonly\n"),
    )
}

fn write_private(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_owned()
}

fn start_with_tokens(extra: &[&str]) -> (JobdProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let mut args = vec![
        "--store",
        "memory",
        "--auth-token-file",
        tokens.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    (JobdProcess::start(jobd_binary!(), &args), dir)
}

async fn channel(server: &JobdProcess) -> Channel {
    Endpoint::from_shared(server.url())
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

/// Sends one chosen header (or none) with every call.
#[derive(Clone)]
struct Header(Option<(&'static str, String)>);

impl tonic::service::Interceptor for Header {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some((name, value)) = &self.0 {
            let value = MetadataValue::try_from(value.as_str()).unwrap();
            request.metadata_mut().insert(*name, value);
        }
        Ok(request)
    }
}

type Stub = JobServiceClient<tonic::service::interceptor::InterceptedService<Channel, Header>>;

/// A raw stub that sends `header: value` (or nothing) with every call.
fn stub_with(channel: Channel, header: Option<(&'static str, String)>) -> Stub {
    JobServiceClient::with_interceptor(channel, Header(header))
}

fn submit_request() -> pb::SubmitRequest {
    pb::SubmitRequest {
        function: "noop".into(),
        args: Some(jobd_proto::value::from_json(json!(1))),
        ..Default::default()
    }
}

/// How many jobs exist, asked with the read-write token.
async fn job_count(channel: Channel) -> usize {
    let mut rpc = stub_with(channel, Some(("authorization", format!("Bearer {WRITER}"))));
    rpc.list_jobs(pb::ListJobsRequest {
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .jobs
    .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_unauthenticated_and_create_nothing() {
    let (server, _dir) = start_with_tokens(&[]);
    let channel = channel(&server).await;
    let same_length_wrong = format!("w-{}", "0".repeat(WRITER.len() - 2));
    let cases: Vec<(&str, Option<(&'static str, String)>)> = vec![
        ("no header", None),
        (
            "wrong token",
            Some(("authorization", format!("Bearer {same_length_wrong}"))),
        ),
        (
            "shorter token",
            Some(("authorization", format!("Bearer {}", &WRITER[..20]))),
        ),
        (
            "longer token",
            Some(("authorization", format!("Bearer {WRITER}{WRITER}"))),
        ),
        (
            "empty bearer",
            Some(("authorization", "Bearer ".to_owned())),
        ),
        ("wrong header", Some(("x-token", WRITER.to_owned()))),
        (
            "wrong header with scheme",
            Some(("x-authorization", format!("Bearer {WRITER}"))),
        ),
        (
            "basic scheme",
            Some(("authorization", format!("Basic {WRITER}"))),
        ),
        ("no scheme", Some(("authorization", WRITER.to_owned()))),
    ];
    for (case, header) in cases {
        let mut rpc = stub_with(channel.clone(), header);
        let status = rpc.submit(submit_request()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        let status = rpc
            .submit_batch(pb::SubmitBatchRequest {
                requests: vec![submit_request()],
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        // Reading needs a token too.
        let status = rpc
            .list_functions(pb::ListFunctionsRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
    }
    assert_eq!(job_count(channel).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_reads_but_cannot_write() {
    let (server, _dir) = start_with_tokens(&[]);
    let writer = JobClient::connect_with(server.url(), ConnectOptions::new().bearer_token(WRITER))
        .await
        .unwrap();
    let reader = JobClient::connect_with(server.url(), ConnectOptions::new().bearer_token(READER))
        .await
        .unwrap();

    let job = writer.submit("hello", json!("Ann")).await.unwrap();
    assert_eq!(job.result().await.unwrap(), json!("Hello, Ann!"));
    // Every read works with the read-only token.
    let seen = reader.job(job.id());
    assert_eq!(seen.result().await.unwrap(), json!("Hello, Ann!"));
    assert!(seen.state().await.unwrap().is_terminal());
    assert!(!reader.functions().await.unwrap().is_empty());
    let page = reader
        .list_jobs(&jobd_client::ListFilter::default(), 10, None)
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 1);

    // Every write is refused, and nothing changes.
    let refused = reader.submit("hello", json!("Bob")).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::PermissionDenied), "{refused}");
    let mut rpc = reader.rpc();
    let id = job.id().to_string();
    let batch = rpc
        .submit_batch(pb::SubmitBatchRequest {
            requests: vec![submit_request()],
        })
        .await
        .unwrap_err();
    let cancel = rpc
        .cancel(pb::CancelRequest { job_id: id.clone() })
        .await
        .unwrap_err();
    let delete = rpc
        .delete_job(pb::DeleteJobRequest { job_id: id.clone() })
        .await
        .unwrap_err();
    for status in [batch, cancel, delete] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("dashboard"), "{status:?}");
    }
    assert_eq!(job_count(channel(&server).await).await, 1);
    // The job was not deleted by the refused DeleteJob.
    assert_eq!(seen.result().await.unwrap(), json!("Hello, Ann!"));
}

/// A method jobd does not know is classified as a write: a read-only token
/// is refused before the router says UNIMPLEMENTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_need_write_access() {
    let (server, _dir) = start_with_tokens(&[]);
    let channel = channel(&server).await;
    let call = |token: Option<&str>| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        let token = token.map(str::to_owned);
        async move {
            grpc.ready().await.unwrap();
            let mut request = tonic::Request::new(pb::ListFunctionsRequest {});
            if let Some(token) = token {
                request.metadata_mut().insert(
                    "authorization",
                    MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
                );
            }
            let path = http::uri::PathAndQuery::from_static("/jobd.v1.JobService/Bogus");
            let codec = tonic_prost::ProstCodec::<
                pb::ListFunctionsRequest,
                pb::ListFunctionsResponse,
            >::default();
            grpc.unary(request, path, codec).await.unwrap_err().code()
        }
    };
    assert_eq!(call(None).await, Code::Unauthenticated);
    assert_eq!(call(Some(READER)).await, Code::PermissionDenied);
    assert_eq!(call(Some(WRITER)).await, Code::Unimplemented);
}

async fn reflection_list(channel: Channel, token: Option<&str>) -> Result<usize, Code> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut request = tonic::Request::new(tokio_stream::once(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }));
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
        );
    }
    let mut answers = client
        .server_reflection_info(request)
        .await
        .map_err(|s| s.code())?
        .into_inner();
    let answer = answers.message().await.map_err(|s| s.code())?.unwrap();
    match answer.message_response {
        Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.len())
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn health_check(channel: Channel) -> i32 {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "jobd.v1.JobService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_open_and_reflection_only_closes_on_request() {
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

    let (open, _dir) = start_with_tokens(&[]);
    let channel_open = channel(&open).await;
    assert_eq!(health_check(channel_open.clone()).await, serving);
    assert!(reflection_list(channel_open, None).await.unwrap() >= 2);

    let (closed, _dir) = start_with_tokens(&["--auth-reflection"]);
    let channel_closed = channel(&closed).await;
    assert_eq!(health_check(channel_closed.clone()).await, serving);
    assert_eq!(
        reflection_list(channel_closed.clone(), None).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        reflection_list(channel_closed.clone(), Some("not-a-valid-token-at-all")).await,
        Err(Code::Unauthenticated)
    );
    // Any valid token will do, a read-only one too.
    assert!(reflection_list(channel_closed, Some(READER)).await.unwrap() >= 2);
}

#[test]
fn bad_token_files_stop_jobd_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let listen = ["--listen", "127.0.0.1:0", "--auth-token-file"];
    let check = |name: &str, text: &str, mode: u32, expected: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut args = listen.to_vec();
        args.push(path.to_str().unwrap());
        let stderr = refused_start(jobd_binary!(), &args);
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(stderr.contains("--auth-token-file"), "{name}: {stderr}");
    };
    check(
        "short",
        "too-short\n",
        0o600,
        "line 1: the token is 9 bytes",
    );
    check("empty", "# nothing\n", 0o600, "holds no token");
    check(
        "attribute",
        &format!("{WRITER} admin\n"),
        0o600,
        "unknown attribute",
    );
    check(
        "world-readable",
        &format!("{WRITER}\n"),
        0o644,
        "readable by every user",
    );
    let mut args = listen.to_vec();
    args.push("/nonexistent/tokens");
    assert!(refused_start(jobd_binary!(), &args).contains("cannot read /nonexistent/tokens"));
    // A token never shows up in an error.
    let stderr = refused_start(
        jobd_binary!(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth-token-file",
            write_private(&dir.path().join("dup"), &format!("{WRITER}\n{WRITER}\n"))
                .to_str()
                .unwrap(),
        ],
    );
    assert!(
        stderr.contains("line 2: the same token appears twice"),
        "{stderr}"
    );
    assert!(!stderr.contains(WRITER), "{stderr}");
}

#[test]
fn non_loopback_addresses_need_tls_and_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let stderr = refused_start(jobd_binary!(), &["--listen", listen, "--store", "memory"]);
        assert!(
            stderr.contains("refusing to listen") && stderr.contains("--insecure-listen"),
            "{stderr}"
        );
    }
    // Tokens alone would travel in clear.
    let stderr = refused_start(
        jobd_binary!(),
        &[
            "--listen",
            "0.0.0.0:0",
            "--store",
            "memory",
            "--auth-token-file",
            tokens.to_str().unwrap(),
        ],
    );
    assert!(stderr.contains("without TLS"), "{stderr}");
}

/// `--insecure-listen` lets it bind everywhere; the server is killed as soon
/// as it says where it listens.
#[test]
fn insecure_listen_accepts_the_risk() {
    let data = tempfile::tempdir().unwrap();
    let server = JobdProcess::start_in(
        jobd_binary!(),
        data.path(),
        "0.0.0.0:0",
        &["--store", "memory", "--insecure-listen"],
    );
    assert!(server.addr.ip().is_unspecified(), "{}", server.addr);
    drop(server);
}

/// SIGHUP reloads the token file: the new token works and the old one is
/// refused, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_token_file() {
    let (server, dir) = start_with_tokens(&[]);
    let channel = channel(&server).await;
    let list = |token: &str| {
        let mut rpc = stub_with(
            channel.clone(),
            Some(("authorization", format!("Bearer {token}"))),
        );
        async move {
            rpc.list_functions(pb::ListFunctionsRequest {})
                .await
                .map(drop)
                .map_err(|s| s.code())
        }
    };
    const ROTATED: &str = "rotated-token-00112233445566778899";
    assert_eq!(list(WRITER).await, Ok(()));
    assert_eq!(list(ROTATED).await, Err(Code::Unauthenticated));

    // Replace the file in one step (rename), as an operator's tooling would.
    let staged = write_private(
        &dir.path().join("tokens.new"),
        &format!("{ROTATED} name=rotated\n"),
    );
    std::fs::rename(staged, dir.path().join("tokens")).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The reload happens on jobd's own schedule and announces itself only in
    // its log, so poll for it, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while list(ROTATED).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new token was never accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(list(WRITER).await, Err(Code::Unauthenticated));
    assert_eq!(list(READER).await, Err(Code::Unauthenticated));
}
