//! A job's life as a client sees it: submit, done, result, status, and the
//! concurrent.futures seed example over the network.

use std::time::{Duration, SystemTime};

use jobd_client::{ErrorKind, JobState, Submission};
use serde_json::json;

use crate::harness::{TestServer, config, on_tokio_clock, registry};

#[tokio::test]
async fn hello_round_trip() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;

    let job = client.submit("hello", json!(null)).await.unwrap();
    assert_eq!(job.result().await.unwrap(), json!("Hello, world!"));
    assert!(job.done().await.unwrap());

    let ann = client.submit("hello", json!("Ann")).await.unwrap();
    // A handle is awaitable for its result.
    assert_eq!(ann.await.unwrap(), json!("Hello, Ann!"));

    let typed: String = client
        .submit_json(
            "hello",
            &serde_json::Map::from_iter([("name".to_owned(), json!("Bo"))]),
        )
        .await
        .unwrap()
        .result_as()
        .await
        .unwrap();
    assert_eq!(typed, "Hello, Bo!");
    server.shutdown().await;
}

#[tokio::test]
async fn get_job_reports_the_whole_record() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let before = SystemTime::now();
    let job = client
        .submit_with(
            Submission::new("echo", json!({"k": [1, 2.5, "x"]}))
                .label("team", "infra")
                .request_id("req-1")
                .pool("async"),
        )
        .await
        .unwrap();
    job.result().await.unwrap();
    let info = job.status().await.unwrap();
    assert_eq!(info.id, job.id());
    assert_eq!(info.function, "echo");
    assert_eq!(info.pool, "async");
    assert_eq!(info.state, JobState::Succeeded);
    assert_eq!(info.args, json!({"k": [1, 2.5, "x"]}));
    assert_eq!(info.labels.get("team").map(String::as_str), Some("infra"));
    assert_eq!(info.request_id.as_deref(), Some("req-1"));
    assert_eq!(info.attempt, 1);
    let submitted = info.submitted_at.unwrap();
    let started = info.started_at.unwrap();
    let finished = info.finished_at.unwrap();
    assert!(before <= submitted && submitted <= started && started <= finished);
    assert_eq!(
        info.outcome.unwrap().result,
        Ok(json!({"k": [1, 2.5, "x"]}))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn pending_job_has_no_start_time_and_attempt_zero() {
    let (registry, mut fx) = registry();
    let server = TestServer::start(registry, config(8, 1, 100)).await;
    let client = server.client().await;
    let blocker = client.submit("blocking_started", json!(300)).await.unwrap();
    fx.started.recv().await.unwrap();
    let queued = client
        .submit("return_future", json!(["later", 0]))
        .await
        .unwrap();
    let info = queued.status().await.unwrap();
    assert_eq!(info.state, JobState::Pending);
    assert_eq!(info.attempt, 0);
    assert!(info.started_at.is_none() && info.finished_at.is_none() && info.outcome.is_none());
    assert!(!queued.done().await.unwrap());
    assert_eq!(queued.result().await.unwrap(), json!("later"));
    blocker.result().await.unwrap();
    server.shutdown().await;
}

/// The seed example: `ThreadPoolExecutor(max_workers=2)` running two 3-second
/// `return_future` calls, across the network. On tokio's paused clock,
/// frozen so that it moves only when the test moves it (the blocking pool's
/// threads work outside the runtime, which would otherwise jump ahead while
/// they do): the example's timeline, exactly, in no real time. The real
/// binary's test (`server/tests/binary.rs`) keeps real time.
#[tokio::test(start_paused = true)]
async fn seed_example_two_blocking_jobs_run_side_by_side() {
    let _frozen = jobd_test_support::time::freeze_clock();
    let (registry, _fx) = registry();
    let server = TestServer::start(registry, on_tokio_clock(config(1024, 2, 100))).await;
    let client = server.client().await;
    let start = tokio::time::Instant::now();
    let hello = client
        .submit("return_future", json!("hello"))
        .await
        .unwrap();
    let world = client
        .submit("return_future", json!("world"))
        .await
        .unwrap();
    // Both threads take one each at once (time stands still meanwhile).
    for job in [&hello, &world] {
        let mut polls = 0;
        while job.status().await.unwrap().state != JobState::Running {
            polls += 1;
            assert!(polls < 10_000, "a job never started");
            tokio::task::yield_now().await;
        }
    }

    // The example's own timeline: look once after a second...
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!hello.done().await.unwrap(), "hello done after 1 s");
    assert!(!world.done().await.unwrap(), "world done after 1 s");

    // ...then both finish together, 3 s after the start, not 6.
    tokio::time::advance(Duration::from_secs(2)).await;
    let (a, b) = tokio::join!(hello.result(), world.result());
    assert_eq!(a.unwrap(), json!("hello"));
    assert_eq!(b.unwrap(), json!("world"));
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    for job in [&hello, &world] {
        let info = job.status().await.unwrap();
        let ran = info
            .finished_at
            .unwrap()
            .duration_since(info.started_at.unwrap())
            .unwrap();
        assert_eq!(ran, Duration::from_secs(3), "on the server's clock too");
    }
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn two_async_sleeps_finish_together() {
    let (registry, _fx) = registry();
    let server = TestServer::start(registry, on_tokio_clock(config(1024, 4, 1000))).await;
    let client = server.client().await;
    let start = tokio::time::Instant::now();
    let a = client.submit("sleep", json!(5)).await.unwrap();
    let b = client.submit("sleep", json!(5)).await.unwrap();
    let (ra, rb) = tokio::join!(a.result(), b.result());
    let elapsed = start.elapsed();
    assert_eq!(ra.unwrap(), json!(5));
    assert_eq!(rb.unwrap(), json!(5));
    assert!(elapsed >= Duration::from_millis(4900), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(8000),
        "not concurrent: {elapsed:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn thousands_of_waiters_on_one_job_are_all_woken() {
    let (server, mut fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let job = client.submit("blocking_started", json!(200)).await.unwrap();
    fx.started.recv().await.unwrap();
    let waiters: Vec<_> = (0..2000)
        .map(|_| {
            let job = job.clone();
            tokio::spawn(async move { job.result().await })
        })
        .collect();
    for w in waiters {
        assert_eq!(w.await.unwrap().unwrap(), json!("finished anyway"));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn list_functions_shows_builtins_with_pools() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let functions = server.client().await.functions().await.unwrap();
    let pool_of = |name: &str| {
        functions
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.pool.clone())
            .unwrap_or_else(|| panic!("{name} not listed"))
    };
    assert_eq!(pool_of("hello"), "async");
    assert_eq!(pool_of("noop"), "async");
    assert_eq!(pool_of("sleep"), "async");
    assert_eq!(pool_of("return_future"), "blocking");
    assert_eq!(pool_of("sha256"), "blocking");
    assert!(functions.iter().all(|f| !f.description.is_empty()));
    let names: Vec<_> = functions.iter().map(|f| f.name.clone()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    server.shutdown().await;
}

#[tokio::test]
async fn health_check_reports_serving() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", jobd_proto::SERVICE_NAME] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn cpu_bound_sha256_runs_on_the_blocking_pool() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let one = client.submit("sha256", json!("abc")).await.unwrap();
    assert_eq!(
        one.result().await.unwrap(),
        json!("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    );
    let many = client
        .submit("sha256", json!({"text": "abc", "rounds": 2}))
        .await
        .unwrap();
    // sha256(sha256("abc")), computed independently.
    assert_eq!(
        many.result().await.unwrap(),
        json!("4f8b42c22dd3729b519ba6f68d2da7cc5b2d606d05daed5ad5128cc03e6c6358")
    );
    let info = many.status().await.unwrap();
    assert_eq!(info.pool, "blocking");
    server.shutdown().await;
}

#[tokio::test]
async fn failed_and_panicked_jobs_are_data_not_rpc_errors() {
    let (registry, _fx) = registry();
    // One blocking worker: it must survive the panic to run the next job.
    let server = TestServer::start(registry, config(8, 1, 100)).await;
    let client = server.client().await;
    for (function, kind, needle) in [
        ("fail", ErrorKind::Failed, "failed on purpose"),
        ("panic_async", ErrorKind::Panicked, "async boom"),
        ("panic_blocking", ErrorKind::Panicked, "blocking boom"),
    ] {
        let job = client.submit(function, json!(1)).await.unwrap();
        let outcome = job.outcome(None).await.unwrap();
        assert_eq!(outcome.state, JobState::Failed, "{function}");
        let (got_kind, message) = outcome.result.unwrap_err();
        assert_eq!(got_kind, kind, "{function}");
        assert!(message.contains(needle), "{function}: {message}");
        match job.result().await {
            Err(jobd_client::Error::JobFailed { message, .. }) => assert!(message.contains(needle)),
            other => panic!("{function}: expected JobFailed, got {other:?}"),
        }
    }
    // Arguments that break the function's declared schema are a bad
    // request, refused before any job exists, naming the field.
    match client.submit("hello", json!({"name": 42})).await {
        Err(jobd_client::Error::InvalidArgument(message)) => {
            assert!(message.contains("args.name"), "{message}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // The lone blocking worker survived its panic.
    let after = client
        .submit("return_future", json!(["still here", 0]))
        .await
        .unwrap();
    assert_eq!(after.result().await.unwrap(), json!("still here"));
    server.shutdown().await;
}

/// grpcurl 1.8 asks for reflection v1alpha (tested in server/tests); newer
/// tools ask for v1, checked here with a real v1 client.
#[tokio::test]
async fn reflection_v1_lists_and_resolves_the_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let (server, _fx) = TestServer::with_fixtures().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("jobd.v1.JobService".into()),
        MessageRequest::FileContainingSymbol("google.protobuf.Duration".into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "jobd.v1.JobService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    for _ in 0..2 {
        let answer = answers.message().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::FileDescriptorResponse(files)) = answer else {
            panic!("expected descriptors, got {answer:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    server.shutdown().await;
}
