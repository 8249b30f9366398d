//! The bad-input matrix (issue 6): malformed, hostile and out-of-range
//! requests sent over the wire to the real `jobd` binary, one line per case
//! with the status code the server must answer. Afterwards the server is
//! still healthy, still takes work, and not one rejected call created a job.
//!
//! Requests a well-behaved client cannot even build (invalid UTF-8 in a
//! string field, undecodable protobuf, unknown methods) go out as raw bytes
//! through tonic's generic client with a pass-through codec.

use std::time::Duration;

use http::uri::PathAndQuery;
use jobd_proto::{
    JobId,
    pb::{self, job_service_client::JobServiceClient},
};
use jobd_test_support::{JobdProcess, job_count, jobd_binary};
use prost::bytes::{Buf as _, BufMut as _};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::MetadataValue,
    transport::Channel,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt as _;

/// The server's caps in this test, small so that crossing them is cheap.
const MAX_ARGS_BYTES: usize = 64 * 1024;
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// A codec that sends and receives message bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// One request of the matrix.
enum Call {
    Submit(pb::SubmitRequest),
    /// A SubmitBatch; the code checked is the call's when it fails, else
    /// the first item's.
    Batch(Vec<pb::SubmitRequest>),
    Done(String),
    Result(pb::ResultRequest),
    Cancel(String),
    GetJob(String),
    DeleteJob(String),
    Wait(pb::WaitRequest),
    List(pb::ListJobsRequest),
    /// Raw message bytes to a method path.
    Raw(&'static str, Vec<u8>),
    /// A Done call for an existing job carrying this `grpc-timeout` header.
    DoneWithTimeoutHeader(&'static str),
    /// A Result call for a pending job carrying this `grpc-timeout` header.
    ResultWithTimeoutHeader(&'static str),
}

fn submit(function: &str) -> pb::SubmitRequest {
    pb::SubmitRequest {
        function: function.to_owned(),
        ..Default::default()
    }
}

fn with(function: &str, edit: impl FnOnce(&mut pb::SubmitRequest)) -> pb::SubmitRequest {
    let mut request = submit(function);
    edit(&mut request);
    request
}

fn args(function: &str, json: serde_json::Value) -> pb::SubmitRequest {
    with(function, |r| {
        r.args = Some(jobd_proto::value::from_json(json));
    })
}

fn labeled(key: &str, value: &str) -> pb::SubmitRequest {
    with("echo", |r| {
        r.labels.insert(key.to_owned(), value.to_owned());
    })
}

fn secs(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

fn result(job_id: &str, timeout: Option<prost_types::Duration>) -> pb::ResultRequest {
    pb::ResultRequest {
        job_id: job_id.to_owned(),
        timeout,
    }
}

fn wait(job_ids: Vec<String>, edit: impl FnOnce(&mut pb::WaitRequest)) -> pb::WaitRequest {
    let mut request = pb::WaitRequest {
        job_ids,
        ..Default::default()
    };
    edit(&mut request);
    request
}

fn list(edit: impl FnOnce(&mut pb::ListJobsRequest)) -> pb::ListJobsRequest {
    let mut request = pb::ListJobsRequest::default();
    edit(&mut request);
    request
}

/// A protobuf length-delimited field (`tag`, raw bytes): how invalid UTF-8
/// gets into a string field.
fn raw_field(field: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

const SUBMIT: &str = "/jobd.v1.JobService/Submit";
const DONE: &str = "/jobd.v1.JobService/Done";

/// The matrix: (case, expected code, call). `pending` is a job that never
/// runs (the pools are paused), `unknown` a well-formed id of no job.
#[rustfmt::skip] // One line per case, like a table.
fn cases(pending: &str, unknown: &str) -> Vec<(&'static str, Code, Call)> {
    use Call::*;
    use Code::*;
    let big = |n: usize| "a".repeat(n);
    let ids = |n: usize| (0..n).map(|_| JobId::new().to_string()).collect::<Vec<_>>();
    let many_labels = with("echo", |r| {
        for i in 0..65 {
            r.labels.insert(format!("k{i}"), "v".into());
        }
    });
    let foreign_token = "00".repeat(24);
    vec![
        // Function names.
        ("unknown function", NotFound, Submit(submit("nope"))),
        ("empty function", InvalidArgument, Submit(submit(""))),
        ("10 KiB function name", InvalidArgument, Submit(submit(&big(10 * 1024)))),
        ("129-char function name", InvalidArgument, Submit(submit(&big(129)))),
        ("128-char unknown function", NotFound, Submit(submit(&big(128)))),
        ("NUL in function name", InvalidArgument, Submit(submit("hel\0lo"))),
        ("emoji function name", InvalidArgument, Submit(submit("hello😀"))),
        ("space in function name", InvalidArgument, Submit(submit("he llo"))),
        ("invalid UTF-8 function (raw)", Internal, Raw(SUBMIT, raw_field(1, &[0x68, 0xff, 0xfe]))),
        ("unknown pool", InvalidArgument, Submit(with("hello", |r| r.pool = "gpu".into()))),
        ("pool not the function's", InvalidArgument, Submit(with("hello", |r| r.pool = "blocking".into()))),
        // Job ids.
        ("empty job id", InvalidArgument, Done(String::new())),
        ("malformed job id", InvalidArgument, Done("garbage".into())),
        ("10 KiB job id", InvalidArgument, Done(big(10 * 1024))),
        ("job id with NUL", InvalidArgument, Done(format!("{}\0", &unknown[..35]))),
        ("emoji job id", InvalidArgument, Done("😀".repeat(9))),
        ("invalid UTF-8 job id (raw)", Internal, Raw(DONE, raw_field(1, &[0xc3, 0x28]))),
        ("unknown job id", NotFound, Done(unknown.into())),
        ("Result: malformed id", InvalidArgument, Result(result("x", None))),
        ("Cancel: malformed id", InvalidArgument, Cancel("x".into())),
        ("Cancel: unknown id", NotFound, Cancel(unknown.into())),
        ("GetJob: malformed id", InvalidArgument, GetJob("zz".into())),
        ("GetJob: unknown id", NotFound, GetJob(unknown.into())),
        ("DeleteJob: malformed id", InvalidArgument, DeleteJob("zz".into())),
        ("DeleteJob: unknown id", NotFound, DeleteJob(unknown.into())),
        ("DeleteJob: pending job", FailedPrecondition, DeleteJob(pending.into())),
        // Timeouts and durations.
        ("Result timeout -1s", InvalidArgument, Result(result(pending, secs(-1, 0)))),
        ("Result timeout -1ns", InvalidArgument, Result(result(pending, secs(0, -1)))),
        ("Result timeout i64::MIN", InvalidArgument, Result(result(pending, secs(i64::MIN, 0)))),
        ("Result timeout 0", DeadlineExceeded, Result(result(pending, secs(0, 0)))),
        ("Result timeout i64::MAX, cut at --max-wait", DeadlineExceeded, Result(result(pending, secs(i64::MAX, 0)))),
        ("Result no timeout, cut at --max-wait", DeadlineExceeded, Result(result(pending, None))),
        ("Result timeout nanos 2e9 (normalised)", DeadlineExceeded, Result(result(pending, secs(0, 2_000_000_000)))),
        ("Submit delay -1s", InvalidArgument, Submit(with("echo", |r| r.delay = secs(-1, 0)))),
        ("Submit delay i64::MIN", InvalidArgument, Submit(with("echo", |r| r.delay = secs(i64::MIN, 0)))),
        ("Submit delay 31 days", InvalidArgument, Submit(with("echo", |r| r.delay = secs(31 * 86_400, 0)))),
        ("Submit delay i64::MAX s", InvalidArgument, Submit(with("echo", |r| r.delay = secs(i64::MAX, 999_999_999)))),
        ("Submit not_before year 10000", InvalidArgument, Submit(with("echo", |r| r.not_before = Some(prost_types::Timestamp { seconds: 253_402_300_800, nanos: 0 })))),
        ("Submit not_before i64::MIN", InvalidArgument, Submit(with("echo", |r| r.not_before = Some(prost_types::Timestamp { seconds: i64::MIN, nanos: 0 })))),
        ("Submit delay and not_before", InvalidArgument, Submit(with("echo", |r| { r.delay = secs(1, 0); r.not_before = Some(prost_types::Timestamp::default()); }))),
        ("Submit run timeout 0", InvalidArgument, Submit(with("echo", |r| r.timeout = secs(0, 0)))),
        ("Submit run timeout -1s", InvalidArgument, Submit(with("echo", |r| r.timeout = secs(-1, 0)))),
        ("Submit run timeout i64::MAX", InvalidArgument, Submit(with("echo", |r| r.timeout = secs(i64::MAX, 0)))),
        ("Wait timeout -1s", InvalidArgument, Wait(wait(vec![pending.into()], |w| w.timeout = secs(-1, 0)))),
        ("Wait timeout i64::MAX, cut at --max-wait", Ok, Wait(wait(vec![pending.into()], |w| w.timeout = secs(i64::MAX, 0)))),
        // Labels.
        ("label: empty key", InvalidArgument, Submit(labeled("", "v"))),
        ("label: space in key", InvalidArgument, Submit(labeled("a b", "v"))),
        ("label: 64-char key", InvalidArgument, Submit(labeled(&big(64), "v"))),
        ("label: emoji key", InvalidArgument, Submit(labeled("😀", "v"))),
        ("label: 256-byte value", InvalidArgument, Submit(labeled("k", &big(256)))),
        ("label: newline in value", InvalidArgument, Submit(labeled("k", "a\nb"))),
        ("label: 65 labels", InvalidArgument, Submit(many_labels)),
        // Priorities, attempts, request ids.
        ("priority 1001", InvalidArgument, Submit(with("echo", |r| r.priority = 1001))),
        ("priority i32::MIN", InvalidArgument, Submit(with("echo", |r| r.priority = i32::MIN))),
        ("max_attempts 101", InvalidArgument, Submit(with("echo", |r| r.max_attempts = 101))),
        ("max_attempts u32::MAX", InvalidArgument, Submit(with("echo", |r| r.max_attempts = u32::MAX))),
        ("request_id 129 chars", InvalidArgument, Submit(with("echo", |r| r.request_id = big(129)))),
        ("request_id with a tab", InvalidArgument, Submit(with("echo", |r| r.request_id = "a\tb".into()))),
        // Listing.
        ("page_size -1", InvalidArgument, List(list(|l| l.page_size = -1))),
        ("page_size i32::MIN", InvalidArgument, List(list(|l| l.page_size = i32::MIN))),
        ("page_token garbage", InvalidArgument, List(list(|l| l.page_token = "garbage".into()))),
        ("page_token for other filters", InvalidArgument, List(list(|l| l.page_token = foreign_token))),
        ("page_token 48 non-hex chars", InvalidArgument, List(list(|l| l.page_token = "zz".repeat(24)))),
        ("page_token 10 KiB", InvalidArgument, List(list(|l| l.page_token = big(10 * 1024)))),
        ("list: unknown state 99", InvalidArgument, List(list(|l| l.states = vec![99]))),
        ("list: bad function filter", InvalidArgument, List(list(|l| l.function = "a b".into()))),
        ("list: bad label filter", InvalidArgument, List(list(|l| { l.labels.insert("a b".into(), "v".into()); }))),
        ("list: submitted_after i64::MIN", InvalidArgument, List(list(|l| l.submitted_after = Some(prost_types::Timestamp { seconds: i64::MIN, nanos: 0 })))),
        // Wait.
        ("Wait for no jobs", InvalidArgument, Wait(wait(vec![], |_| {}))),
        ("Wait for 1,001 jobs", InvalidArgument, Wait(wait(ids(1001), |_| {}))),
        ("Wait with a malformed id", InvalidArgument, Wait(wait(vec!["junk".into()], |_| {}))),
        ("Wait return_when 7", InvalidArgument, Wait(wait(vec![pending.into()], |w| w.return_when = 7))),
        ("Wait for an unknown job", NotFound, Wait(wait(vec![unknown.into()], |_| {}))),
        // Arguments against their function's schema.
        ("hello {name: 5}", InvalidArgument, Submit(args("hello", serde_json::json!({"name": 5})))),
        ("hello two names", InvalidArgument, Submit(args("hello", serde_json::json!(["a", "b"])))),
        ("hello unknown member", InvalidArgument, Submit(args("hello", serde_json::json!({"nmae": "Ann"})))),
        ("sleep \"x\"", InvalidArgument, Submit(args("sleep", serde_json::json!("x")))),
        ("sleep -1", InvalidArgument, Submit(args("sleep", serde_json::json!(-1)))),
        ("sha256 rounds 1e9", InvalidArgument, Submit(args("sha256", serde_json::json!({"rounds": 1_000_000_000})))),
        ("return_future without message", InvalidArgument, Submit(args("return_future", serde_json::json!({"delay": 1})))),
        // Sizes.
        ("args over --max-args-bytes", InvalidArgument, Submit(args("echo", serde_json::json!(big(MAX_ARGS_BYTES + 1))))),
        ("message over --max-message-bytes", OutOfRange, Submit(args("echo", serde_json::json!(big(MAX_MESSAGE_BYTES + 1))))),
        ("raw 2 MiB garbage", OutOfRange, Raw(SUBMIT, vec![0xff; 2 * MAX_MESSAGE_BYTES])),
        // SubmitBatch: the call, or its first item.
        ("empty batch", InvalidArgument, Batch(vec![])),
        ("batch of 10,001", InvalidArgument, Batch(vec![submit("noop"); 10_001])),
        ("batch item: unknown function", NotFound, Batch(vec![submit("nope")])),
        ("batch item: schema violation", InvalidArgument, Batch(vec![args("hello", serde_json::json!(7))])),
        ("batch item: args over the cap", InvalidArgument, Batch(vec![args("echo", serde_json::json!(big(MAX_ARGS_BYTES + 1)))])),
        ("batch item: bad label", InvalidArgument, Batch(vec![labeled("", "v")])),
        // Undecodable protobuf, unknown methods.
        ("undecodable bytes", Internal, Raw(SUBMIT, vec![0xff, 0xff, 0xff, 0xff])),
        ("truncated length-delimited field", Internal, Raw(SUBMIT, vec![0x0a, 0x05, b'h'])),
        ("wrong wire type for a string", Internal, Raw(SUBMIT, vec![0x08, 0x01])),
        ("empty message (no function)", InvalidArgument, Raw(SUBMIT, vec![])),
        ("only an unknown field", InvalidArgument, Raw(SUBMIT, vec![0xf8, 0x07, 0x01])),
        ("unknown method", Unimplemented, Raw("/jobd.v1.JobService/Nope", vec![])),
        ("unknown service", Unimplemented, Raw("/jobd.v2.JobService/Submit", vec![])),
        // grpc-timeout headers: malformed ones are ignored (tonic's
        // behaviour), a valid one bounds a wait.
        ("grpc-timeout \"abc\"", Ok, DoneWithTimeoutHeader("abc")),
        ("grpc-timeout \"-5S\"", Ok, DoneWithTimeoutHeader("-5S")),
        ("grpc-timeout with 9 digits", Ok, DoneWithTimeoutHeader("123456789S")),
        ("grpc-timeout \"5x\"", Ok, DoneWithTimeoutHeader("5x")),
        ("grpc-timeout 300m on a pending job", DeadlineExceeded, ResultWithTimeoutHeader("300m")),
    ]
}

/// Sends one call; its status code (for batches, the first item's).
async fn run(channel: &Channel, pending: &str, call: Call) -> (Code, Option<Status>) {
    let mut jobs = JobServiceClient::new(channel.clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let code = |result: Result<(), Status>| match result {
        Ok(()) => (Code::Ok, None),
        Err(status) => (status.code(), Some(status)),
    };
    match call {
        Call::Submit(r) => code(jobs.submit(r).await.map(drop)),
        Call::Batch(requests) => {
            match jobs.submit_batch(pb::SubmitBatchRequest { requests }).await {
                Err(status) => (status.code(), Some(status)),
                Ok(answer) => {
                    let first = answer.into_inner().results.remove(0);
                    match first.error {
                        None => (Code::Ok, None),
                        Some(error) => {
                            let code = Code::from_i32(error.code);
                            if code == Code::InvalidArgument {
                                assert!(
                                    !error.field_violations.is_empty(),
                                    "a refused batch item names its fields: {error:?}"
                                );
                            }
                            (code, None)
                        }
                    }
                }
            }
        }
        Call::Done(job_id) => code(jobs.done(pb::DoneRequest { job_id }).await.map(drop)),
        Call::Result(r) => code(jobs.result(r).await.map(drop)),
        Call::Cancel(job_id) => code(jobs.cancel(pb::CancelRequest { job_id }).await.map(drop)),
        Call::GetJob(job_id) => code(jobs.get_job(pb::GetJobRequest { job_id }).await.map(drop)),
        Call::DeleteJob(job_id) => code(
            jobs.delete_job(pb::DeleteJobRequest { job_id })
                .await
                .map(drop),
        ),
        Call::Wait(r) => code(jobs.wait(r).await.map(drop)),
        Call::List(r) => code(jobs.list_jobs(r).await.map(drop)),
        Call::Raw(path, bytes) => {
            let mut grpc = tonic::client::Grpc::new(channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            grpc.ready().await.expect("channel ready");
            let answer = grpc
                .unary(
                    tonic::Request::new(bytes),
                    PathAndQuery::from_static(path),
                    RawCodec,
                )
                .await;
            code(answer.map(drop))
        }
        Call::DoneWithTimeoutHeader(header) => {
            let mut request = tonic::Request::new(pb::DoneRequest {
                job_id: pending.to_owned(),
            });
            request
                .metadata_mut()
                .insert("grpc-timeout", MetadataValue::from_static(header));
            code(jobs.done(request).await.map(drop))
        }
        Call::ResultWithTimeoutHeader(header) => {
            let mut request = tonic::Request::new(result(pending, None));
            request
                .metadata_mut()
                .insert("grpc-timeout", MetadataValue::from_static(header));
            code(jobs.result(request).await.map(drop))
        }
    }
}

#[tokio::test]
async fn every_bad_input_gets_its_status_code_and_creates_no_job() {
    let max_args = MAX_ARGS_BYTES.to_string();
    let max_message = MAX_MESSAGE_BYTES.to_string();
    let server = JobdProcess::start(
        jobd_binary!(),
        &[
            "--store",
            "memory",
            "--paused",
            "--max-wait",
            "1s",
            "--max-args-bytes",
            &max_args,
            "--max-message-bytes",
            &max_message,
        ],
    );
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut jobs = JobServiceClient::new(channel.clone());
    // A job that never runs (the pools are paused), for waits that must time out.
    let pending = jobs
        .submit(submit("echo"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let unknown = JobId::new().to_string();
    let before = job_count(&mut jobs).await;
    assert_eq!(before, 1);

    let cases = cases(&pending, &unknown);
    let total = cases.len();
    assert!(total >= 60, "the matrix has {total} cases");
    let mut failures = Vec::new();
    for (name, expected, call) in cases {
        let (got, status) =
            tokio::time::timeout(Duration::from_secs(10), run(&channel, &pending, call))
                .await
                .unwrap_or_else(|_| panic!("{name}: no answer within 10 s"));
        if got != expected {
            failures.push(format!(
                "{name}: expected {expected:?}, got {got:?} {status:?}"
            ));
            continue;
        }
        if let Some(status) = status {
            // Field-level details on every INVALID_ARGUMENT from jobd's own
            // validation (tonic's own refusals never are INVALID_ARGUMENT).
            if got == Code::InvalidArgument {
                let violations = status
                    .get_details_bad_request()
                    .map(|b| b.field_violations)
                    .unwrap_or_default();
                if violations.is_empty() || violations.iter().any(|v| v.field.is_empty()) {
                    failures.push(format!(
                        "{name}: no BadRequest field violations: {status:?}"
                    ));
                }
            }
            // Whatever the code, a message never leaks internals.
            let message = status.message();
            if message.contains("panicked") || message.contains(".rs:") {
                failures.push(format!("{name}: leaky message {message:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Still up, still serving, and no rejected call created a job.
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health check after the matrix")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    assert_eq!(job_count(&mut jobs).await, before);
    let accepted = jobs.submit(submit("hello")).await;
    assert!(accepted.is_ok(), "{accepted:?}");
    assert_eq!(job_count(&mut jobs).await, before + 1);
    println!("bad-input matrix: {total} cases passed");
}
