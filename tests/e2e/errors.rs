//! Bad requests get the documented status codes, and nothing is created.

use std::time::{Duration, Instant};

use jobd_client::JobId;
use jobd_proto::pb;
use serde_json::json;
use tonic::Code;

use crate::harness::{TestServer, config, registry};

fn raw_submit(function: &str) -> pb::SubmitRequest {
    pb::SubmitRequest {
        function: function.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn unknown_function_is_not_found_and_creates_nothing() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let err = client
        .submit("no_such_function", json!(null))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert!(err.to_string().contains("no_such_function"), "{err}");
    assert_eq!(server.engine.job_count(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let mut rpc = server.client().await.rpc();
    let cases = [
        raw_submit(""),
        raw_submit("bad name"),
        raw_submit(&"x".repeat(10 * 1024)),
        raw_submit("nul\0"),
        raw_submit("emoji😀"),
        pb::SubmitRequest {
            pool: "gpu".into(),
            ..raw_submit("hello")
        },
        // hello runs on the async pool.
        pb::SubmitRequest {
            pool: "blocking".into(),
            ..raw_submit("hello")
        },
        pb::SubmitRequest {
            request_id: "x".repeat(200),
            ..raw_submit("hello")
        },
        pb::SubmitRequest {
            labels: [("bad key!".to_owned(), "v".to_owned())].into(),
            ..raw_submit("hello")
        },
    ];
    for (i, req) in cases.into_iter().enumerate() {
        let status = rpc.submit(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "case {i}: {status:?}");
        assert!(
            status.message().starts_with("invalid "),
            "case {i}: {}",
            status.message()
        );
    }
    assert_eq!(server.engine.job_count(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_ids_are_invalid_argument_and_unknown_ids_not_found() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let mut rpc = server.client().await.rpc();
    for bad in ["", "nope", "0190b5a4-7b1e-7000-8000", &"9".repeat(5000)] {
        let status = rpc
            .done(pb::DoneRequest { job_id: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:.40}");
        let status = rpc
            .result(pb::ResultRequest {
                job_id: bad.into(),
                timeout: None,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = rpc
            .cancel(pb::CancelRequest { job_id: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = rpc
            .get_job(pb::GetJobRequest { job_id: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let unknown = JobId::new().to_string();
    let status = rpc
        .done(pb::DoneRequest {
            job_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains(&unknown));
    let status = rpc
        .result(pb::ResultRequest {
            job_id: unknown.clone(),
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = rpc
        .cancel(pb::CancelRequest {
            job_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = rpc
        .get_job(pb::GetJobRequest { job_id: unknown })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    server.shutdown().await;
}

#[tokio::test]
async fn result_timeout_is_deadline_exceeded_and_the_job_keeps_running() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let job = client.submit("sleep", json!(1)).await.unwrap();
    let start = Instant::now();
    let err = job
        .result_timeout(Duration::from_millis(200))
        .await
        .unwrap_err();
    let waited = start.elapsed();
    assert!(matches!(err, jobd_client::Error::Timeout), "{err:?}");
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_millis(900),
        "{waited:?}"
    );
    // Zero timeout: an immediate answer.
    let err = job.result_timeout(Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, jobd_client::Error::Timeout), "{err:?}");
    assert_eq!(job.result().await.unwrap(), json!(1));
    assert_eq!(job.result_timeout(Duration::ZERO).await.unwrap(), json!(1));
    server.shutdown().await;
}

#[tokio::test]
async fn negative_timeout_is_invalid_argument() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let job = client.submit("hello", json!(null)).await.unwrap();
    let status = client
        .rpc()
        .result(pb::ResultRequest {
            job_id: job.id().to_string(),
            timeout: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("timeout"), "{}", status.message());
    server.shutdown().await;
}

#[tokio::test]
async fn grpc_deadline_is_honoured_with_deadline_exceeded() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let job = client.submit("sleep", json!(30)).await.unwrap();
    let mut request = tonic::Request::new(pb::ResultRequest {
        job_id: job.id().to_string(),
        timeout: None,
    });
    request.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let status = client.rpc().result(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
    job.cancel().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn full_queue_is_resource_exhausted_and_loses_nothing() {
    let (registry, mut fx) = registry();
    let server = TestServer::start(registry, config(8, 1, 2)).await;
    let client = server.client().await;
    let running = client.submit("blocking_started", json!(200)).await.unwrap();
    fx.started.recv().await.unwrap();
    let a = client
        .submit("return_future", json!(["a", 0]))
        .await
        .unwrap();
    let b = client
        .submit("return_future", json!(["b", 0]))
        .await
        .unwrap();
    let err = client
        .submit("return_future", json!(["c", 0]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("queue is full"), "{err}");
    // The async pool has its own queue and is unaffected.
    assert_eq!(
        client
            .submit("hello", json!(null))
            .await
            .unwrap()
            .await
            .unwrap(),
        json!("Hello, world!")
    );
    // Everything accepted still completes.
    assert_eq!(a.result().await.unwrap(), json!("a"));
    assert_eq!(b.result().await.unwrap(), json!("b"));
    running.result().await.unwrap();
    // Room again once the queue drained.
    let c = client
        .submit("return_future", json!(["c", 0]))
        .await
        .unwrap();
    assert_eq!(c.result().await.unwrap(), json!("c"));
    server.shutdown().await;
}
