//! Arbitrary bytes as the body of a JobService call: whatever decodes as
//! protobuf goes through the real handler (request validation, argument
//! schemas, the engine) of an in-memory server with paused pools. A panic
//! anywhere is a finding; so is an INVALID_ARGUMENT without field-level
//! details, or a status code no documented rule gives.
#![no_main]

use std::{sync::OnceLock, time::Duration};

use jobd::{Engine, EngineConfig, JobService};
use jobd_proto::pb::{self, job_service_server::JobService as _};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

struct Server {
    runtime: tokio::runtime::Runtime,
    service: JobService,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let engine = runtime.block_on(async {
            Engine::start(
                jobd::builtins::registry(),
                EngineConfig {
                    paused: true,
                    max_queued: std::num::NonZeroUsize::new(1000).expect("nonzero"),
                    ..EngineConfig::default()
                },
            )
        });
        let service = JobService::new(engine).with_wait_limits(Duration::from_millis(100), 16);
        Server { runtime, service }
    })
}

fn check(answer: Result<(), Status>) {
    let Err(status) = answer else { return };
    match status.code() {
        Code::InvalidArgument => {
            let details = status.get_details_bad_request();
            assert!(
                details.is_some_and(|d| !d.field_violations.is_empty()),
                "INVALID_ARGUMENT without field violations: {status:?}"
            );
        }
        Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::ResourceExhausted
        | Code::DeadlineExceeded => {}
        other => panic!("undocumented code {other:?}: {status:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    let Server { runtime, service } = server();
    runtime.block_on(async {
        let answer = match method % 8 {
            0 => match pb::SubmitRequest::decode(body) {
                Ok(r) => service.submit(Request::new(r)).await.map(drop),
                Err(_) => return,
            },
            1 => match pb::SubmitBatchRequest::decode(body) {
                Ok(r) => service.submit_batch(Request::new(r)).await.map(drop),
                Err(_) => return,
            },
            2 => match pb::DoneRequest::decode(body) {
                Ok(r) => service.done(Request::new(r)).await.map(drop),
                Err(_) => return,
            },
            3 => match pb::CancelRequest::decode(body) {
                Ok(r) => service.cancel(Request::new(r)).await.map(drop),
                Err(_) => return,
            },
            4 => match pb::GetJobRequest::decode(body) {
                Ok(r) => service.get_job(Request::new(r)).await.map(drop),
                Err(_) => return,
            },
            5 => match pb::ListJobsRequest::decode(body) {
                Ok(r) => service.list_jobs(Request::new(r)).await.map(drop),
                Err(_) => return,
            },
            6 => match pb::DeleteJobRequest::decode(body) {
                Ok(r) => service.delete_job(Request::new(r)).await.map(drop),
                Err(_) => return,
            },
            _ => match pb::WaitRequest::decode(body) {
                // Bounded by the 100 ms wait cap above.
                Ok(r) => service.wait(Request::new(r)).await.map(drop),
                Err(_) => return,
            },
        };
        check(answer);
    });
});
