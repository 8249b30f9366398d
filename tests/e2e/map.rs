//! The `Map` stream and `JobClient::map`: Executor.map across the network.

use std::{
    future::IntoFuture as _,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use jobd::JobError;
use jobd_client::{Error, JobState, ListFilter, MapItem, MapOptions, ReturnWhen};
use jobd_proto::pb;
use serde_json::json;
use tonic::Code;

use crate::harness::{TestServer, config, on_both_stores, registry};

async fn collect(results: jobd_client::MapResults) -> Vec<MapItem> {
    results
        .try_collect()
        .await
        .expect("the map stream ends cleanly")
}

#[tokio::test]
async fn a_map_of_a_thousand_returns_a_thousand_results_in_order() {
    on_both_stores(config(1024, 2, 10_000), |server, _fx| async move {
        let client = server.client().await;
        let started = Instant::now();
        let results = client
            .map("noop", (0..1000).map(|n| json!(n)))
            .await
            .unwrap();
        let items = collect(results).await;
        eprintln!(
            "map of 1,000 no-ops (durable: {}): {:?}",
            server.engine.is_durable(),
            started.elapsed()
        );
        assert_eq!(items.len(), 1000);
        for (n, item) in items.iter().enumerate() {
            assert_eq!(item.index, n as u64);
            assert_eq!(item.result.as_ref().unwrap(), &json!(n));
        }
        // Real jobs, visible to GetJob.
        let last = client.job(items[999].job.unwrap()).status().await.unwrap();
        assert_eq!(last.function, "noop");
        assert_eq!(last.state, JobState::Succeeded);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn unordered_answers_each_job_as_it_finishes() {
    on_both_stores(config(1024, 2, 1000), |server, _fx| async move {
        let client = server.client().await;
        // The first argument sleeps; the others do not.
        let args = std::iter::once(json!(0.5)).chain((0..20).map(|_| json!(0)));
        let items = collect(
            client
                .map_with(
                    MapOptions::new("sleep").unordered(),
                    futures::stream::iter(args),
                )
                .await
                .unwrap(),
        )
        .await;
        let mut indices: Vec<u64> = items.iter().map(|i| i.index).collect();
        assert_eq!(indices.last(), Some(&0), "the slow job is answered last");
        indices.sort_unstable();
        assert_eq!(indices, (0..21).collect::<Vec<_>>());
        assert_eq!(items.last().unwrap().result.as_ref().unwrap(), &json!(0.5));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn failed_jobs_are_answers_not_the_end_of_the_stream() {
    let (mut registry, _fx) = registry();
    registry.register_async(
        "fail_odd",
        "fails on odd numbers",
        |_ctx, args| async move {
            match args.as_u64() {
                Some(n) if n % 2 == 1 => Err(JobError::failed(format!("{n} is odd"))),
                _ => Ok(args),
            }
        },
    );
    let server = TestServer::start(registry, config(64, 1, 100)).await;
    let client = server.client().await;
    let items = collect(
        client
            .map("fail_odd", (0..10).map(|n| json!(n)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(items.len(), 10);
    for (n, item) in items.iter().enumerate() {
        assert_eq!(item.index, n as u64);
        match &item.result {
            Ok(value) => assert_eq!((n % 2, value), (0, &json!(n))),
            Err(Error::JobFailed { id, message, .. }) => {
                assert_eq!(n % 2, 1);
                assert_eq!(Some(*id), item.job);
                assert!(message.contains("is odd"), "{message}");
            }
            Err(other) => panic!("item {n}: unexpected {other}"),
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_refused_argument_is_answered_in_place_and_the_map_goes_on() {
    // Paused, with room for two queued jobs: the third to fifth arguments
    // find the queue full.
    let (registry, _fx) = registry();
    let server = TestServer::start(
        registry,
        jobd::EngineConfig {
            paused: true,
            ..config(64, 1, 2)
        },
    )
    .await;
    let client = server.client().await;
    let mut results = client
        .map_with(
            MapOptions::new("echo").unordered(),
            futures::stream::iter((0..5).map(|n| json!(n))),
        )
        .await
        .unwrap();
    let mut refused = Vec::new();
    for _ in 0..3 {
        let item = results.next().await.unwrap().unwrap();
        assert_eq!(item.job, None);
        assert_eq!(
            item.result.unwrap_err().code(),
            Some(Code::ResourceExhausted)
        );
        refused.push(item.index);
    }
    refused.sort_unstable();
    assert_eq!(refused, [2, 3, 4]);
    server.engine.set_paused(false);
    let rest = collect(results).await;
    let mut accepted: Vec<_> = rest.iter().map(|i| i.index).collect();
    accepted.sort_unstable();
    assert_eq!(accepted, [0, 1]);
    assert!(rest.iter().all(|i| i.result.is_ok()));
    server.shutdown().await;
}

#[tokio::test]
async fn no_more_than_max_in_flight_jobs_run_at_once() {
    on_both_stores(config(1024, 2, 1000), |server, fx| async move {
        let client = server.client().await;
        let options = MapOptions::new("probe_async").max_in_flight(4);
        let items = collect(
            client
                .map_with(options, futures::stream::iter((0..40).map(|_| json!(10))))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(items.len(), 40);
        assert!(items.iter().all(|i| i.result.is_ok()));
        assert_eq!(fx.probe.started(), 40);
        let max = fx.probe.max_running();
        assert!(max <= 4, "{max} jobs ran at once, more than max_in_flight");
        assert!(max >= 2, "the map never ran jobs side by side (max {max})");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn dropping_the_results_cancels_the_unfinished_jobs() {
    on_both_stores(config(1024, 2, 1000), |server, mut fx| async move {
        let client = server.client().await;
        let options = MapOptions::new("async_started").max_in_flight(3);
        let results = client
            .map_with(options, futures::stream::iter((0..10).map(|n| json!(n))))
            .await
            .unwrap();
        for _ in 0..3 {
            fx.started.recv().await.unwrap();
        }
        drop(results);
        let jobs: Vec<_> = client
            .list_all(ListFilter::default().function("async_started"))
            .try_collect()
            .await
            .unwrap();
        // Only the three in flight were ever submitted.
        assert_eq!(jobs.len(), 3, "{jobs:?}");
        let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
        let waited = client
            .wait(
                ids.clone(),
                ReturnWhen::AllCompleted,
                Some(Duration::from_secs(10)),
            )
            .await
            .unwrap();
        assert!(
            waited.not_done.is_empty(),
            "the map's jobs were not cancelled"
        );
        for id in ids {
            assert_eq!(
                client.job(id).status().await.unwrap().state,
                JobState::Cancelled
            );
        }
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_bad_start_fails_the_call() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let unknown = client
        .map("no_such_function", [json!(1)])
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some(Code::NotFound), "{unknown}");
    let bad_priority = client
        .map_with(
            MapOptions::new("echo").priority(5000),
            futures::stream::iter([json!(1)]),
        )
        .await
        .unwrap_err();
    assert_eq!(
        bad_priority.code(),
        Some(Code::InvalidArgument),
        "{bad_priority}"
    );

    // Raw stream: no start at all, then a second start.
    let mut rpc = client.rpc();
    let args_only = pb::MapRequest {
        start: None,
        args: vec![jobd_proto::value::from_json(json!(1))],
    };
    let status = rpc
        .map(futures::stream::iter([args_only]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    let start = pb::MapRequest {
        start: Some(pb::MapStart {
            function: "echo".into(),
            ..Default::default()
        }),
        args: Vec::new(),
    };
    let mut stream = rpc
        .map(futures::stream::iter([start.clone(), start]))
        .await
        .unwrap()
        .into_inner();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(status.message().contains("only the first"), "{status}");
    server.shutdown().await;
}

/// Opens a raw Map of `echo` whose requests are `first` (with the start),
/// then `later`, and returns what the stream answered: the indices and
/// values of its results, and how it ended.
async fn raw_echo_map(
    client: &jobd_client::JobClient,
    first: Vec<serde_json::Value>,
    later: Vec<pb::MapRequest>,
) -> (Vec<(u64, serde_json::Value)>, Result<(), tonic::Status>) {
    let start = pb::MapRequest {
        start: Some(pb::MapStart {
            function: "echo".into(),
            ordered: true,
            ..Default::default()
        }),
        args: first
            .into_iter()
            .map(jobd_proto::value::from_json)
            .collect(),
    };
    let requests = std::iter::once(start).chain(later);
    let mut stream = client
        .rpc()
        .map(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answered = Vec::new();
    let end = loop {
        match stream.message().await {
            Ok(Some(response)) => answered.push((
                response.index,
                jobd_proto::value::to_json(response.value.expect("echo answers a value")),
            )),
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    (answered, end)
}

fn args_request(args: Vec<serde_json::Value>) -> pb::MapRequest {
    pb::MapRequest {
        start: None,
        args: args.into_iter().map(jobd_proto::value::from_json).collect(),
    }
}

#[tokio::test]
async fn a_later_request_that_cannot_be_taken_ends_the_stream_with_its_error() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;

    // The third request is over the server's 4 MiB message cap: the two
    // arguments before it are answered, then the stream ends OUT_OF_RANGE,
    // never OK (the fourth argument was not taken, and the client must know).
    let huge = json!("x".repeat(5 * 1024 * 1024));
    let (answered, end) = raw_echo_map(
        &client,
        vec![json!("one")],
        vec![
            args_request(vec![json!("two")]),
            args_request(vec![huge]),
            args_request(vec![json!("four")]),
        ],
    )
    .await;
    assert_eq!(answered, [(0, json!("one")), (1, json!("two"))]);
    let status = end.expect_err("the stream must not end OK");
    assert_eq!(status.code(), Code::OutOfRange, "{status}");

    // The same for a request that breaks the rules (a second start).
    let (answered, end) = raw_echo_map(
        &client,
        vec![json!("one")],
        vec![
            pb::MapRequest {
                start: Some(pb::MapStart::default()),
                args: vec![jobd_proto::value::from_json(json!("two"))],
            },
            args_request(vec![json!("three")]),
        ],
    )
    .await;
    assert_eq!(answered, [(0, json!("one"))]);
    let status = end.expect_err("the stream must not end OK");
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    server.shutdown().await;
}

#[tokio::test]
async fn an_empty_map_ends_at_once() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let items = collect(client.map("echo", Vec::new()).await.unwrap()).await;
    assert!(items.is_empty());
    assert_eq!(server.engine.job_count(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn an_open_map_holds_an_in_flight_slot_until_it_ends() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (registry, _fx) = registry();
    let engine = jobd::Engine::start(registry, config(64, 1, 100));
    let stop = tokio_util::sync::CancellationToken::new();
    let limits = jobd::ServerLimits {
        max_in_flight: 1,
        ..jobd::ServerLimits::default()
    };
    let serving = tokio::spawn(
        jobd::serve(listener, engine)
            .limits(limits)
            .with_graceful_shutdown(stop.clone().cancelled_owned(), Duration::from_secs(1))
            .into_future(),
    );
    let client = jobd_client::JobClient::connect(&url).await.unwrap();
    // A map whose arguments never come: its handler has long returned.
    let open = client
        .map_with(MapOptions::new("echo"), futures::stream::pending())
        .await
        .unwrap();
    let refused = client.submit("echo", json!(1)).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");

    drop(open);
    // The slot comes back once the server has seen the map go; poll for
    // that exact condition, bounded.
    let mut accepted = None;
    for _ in 0..200 {
        match client.submit("echo", json!(2)).await {
            Ok(job) => {
                accepted = Some(job);
                break;
            }
            Err(err) if err.code() == Some(Code::ResourceExhausted) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => panic!("{err}"),
        }
    }
    let job = accepted.expect("the map's slot was never given back");
    assert_eq!(job.result().await.unwrap(), json!(2));
    stop.cancel();
    serving.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_server_shutdown_ends_the_stream_with_unavailable() {
    let (registry, _fx) = registry();
    let server =
        TestServer::start_with_grace(registry, config(64, 1, 100), Duration::from_millis(100))
            .await;
    let client = server.client().await;
    // Two hang (interrupted at the end of the grace), the rest never start.
    let options = MapOptions::new("sleep").max_in_flight(2);
    let mut results = client
        .map_with(options, futures::stream::iter((0..10).map(|_| json!(60))))
        .await
        .unwrap();
    server.until_waiters(2).await;
    server.begin_shutdown();
    let mut answered = Vec::new();
    let end = loop {
        match results.next().await {
            Some(Ok(item)) => answered.push(item),
            Some(Err(err)) => break err,
            None => panic!("the stream ended cleanly after {} answers", answered.len()),
        }
    };
    assert_eq!(end.code(), Some(Code::Unavailable), "{end}");
    // What was answered is the truth: jobs interrupted by the shutdown.
    for item in &answered {
        let failure = item.result.as_ref().unwrap_err();
        assert!(failure.to_string().contains("shut down"), "{failure}");
    }
    server.join().await;
}
