//! The worker SDK against the real jobd, served in-process on 127.0.0.1:0:
//! what `worker_protocol.rs` pins down message by message against a fake,
//! seen here from a client's side, through jobd's own WorkerService. A
//! worker's functions are listed and their schemas enforced by jobd, its
//! jobs' results, progress and cancels reach clients, and a worker that
//! stops leaves jobd's list of workers.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use jobd::EngineConfig;
use jobd_client::{Ctx, Error, JobClient, PoolKind, Watch, Worker};
use jobd_test_support::TestServer;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Bounds every wait, so that a hang fails the test.
const LIMIT: Duration = Duration::from_secs(30);

/// Tells the test when it is dropped: a job's future was dropped.
struct DropSignal(mpsc::UnboundedSender<&'static str>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send("dropped");
    }
}

/// Waits until jobd lists `function` as served by a worker. Polls: jobd
/// has no event for a worker attaching; bounded by [`LIMIT`].
async fn served(client: &JobClient, function: &str) {
    tokio::time::timeout(LIMIT, async {
        loop {
            let functions = client.functions().await.expect("ListFunctions");
            if functions
                .iter()
                .any(|f| f.name == function && f.workers > 0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the worker attached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_jobd_clients() {
    let (registry, _fixtures) = jobd_test_support::registry();
    let server = TestServer::start(registry, EngineConfig::default()).await;
    let client = server.client().await;

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let worker_gate = Arc::clone(&gate);
    let worker = Worker::new(server.url())
        .name("sdk-test")
        .slots(3)
        .label("zone", "eu")
        .register_async("sdk.greet", "Greets NAME", |_ctx, args| async move {
            Ok(json!(format!(
                "hi {}",
                args["name"].as_str().unwrap_or("?")
            )))
        })
        .with_args_schema(json!({
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"]
        }))
        .returns("a greeting")
        .register_blocking("sdk.square", "Squares a number", |_ctx, args| {
            let n: f64 = serde_json::from_value(args)?;
            Ok(json!(n * n))
        })
        .register_async(
            "sdk.halfway",
            "Half done, then waits",
            move |ctx: Ctx, _args| {
                let gate = Arc::clone(&worker_gate);
                async move {
                    ctx.set_progress(0.5, "halfway");
                    gate.acquire().await.expect("open").forget();
                    Ok(json!("whole"))
                }
            },
        )
        .register_async("sdk.stuck", "Never returns", move |_ctx, _args| {
            let events = events_tx.clone();
            async move {
                let _guard = DropSignal(events.clone());
                let _ = events.send("started");
                std::future::pending::<()>().await;
                Ok(Value::Null)
            }
        });
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    served(&client, "sdk.stuck").await;

    // jobd lists the functions as the worker declared them, and checks
    // arguments against the declared schema before accepting a job.
    let functions = client.functions().await.expect("functions");
    let greet = functions
        .iter()
        .find(|f| f.name == "sdk.greet")
        .expect("listed");
    assert_eq!(greet.pool_kind, PoolKind::Worker);
    assert_eq!(greet.workers, 1);
    assert_eq!(greet.returns.as_deref(), Some("a greeting"));
    assert!(greet.args_schema.is_some());
    let refused = client.submit("sdk.greet", json!({"nom": "Ann"})).await;
    assert!(
        matches!(refused, Err(Error::InvalidArgument(_))),
        "{refused:?}"
    );

    // Results, from async and blocking functions; worker labels route.
    let greeting = client
        .submit_with(
            jobd_client::Submission::new("sdk.greet", json!({"name": "Ann"}))
                .worker_label("zone", "eu"),
        )
        .await
        .expect("submit");
    assert_eq!(greeting.result().await.expect("a value"), json!("hi Ann"));
    let square = client.submit("sdk.square", json!(7)).await.expect("submit");
    // Numbers cross the wire as doubles; an integral one reads as an integer.
    assert_eq!(square.result().await.expect("a value"), json!(49));

    // Progress reaches watchers while the job runs.
    let halfway = client
        .submit("sdk.halfway", Value::Null)
        .await
        .expect("submit");
    let mut watch = client
        .watch(Watch::ids([halfway.id()]))
        .await
        .expect("watch");
    let progress = tokio::time::timeout(LIMIT, async {
        while let Some(event) = watch.next().await {
            if let Some(progress) = event.expect("an event").progress {
                return progress;
            }
        }
        panic!("the watch ended without progress");
    })
    .await
    .expect("progress in time");
    assert_eq!(
        (progress.fraction, progress.message.as_str()),
        (0.5, "halfway")
    );
    gate.add_permits(1);
    assert_eq!(halfway.result().await.expect("a value"), json!("whole"));

    // A cancel reaches the running job: its future is dropped, and the job
    // ends cancelled.
    let stuck = client
        .submit("sdk.stuck", Value::Null)
        .await
        .expect("submit");
    assert_eq!(
        tokio::time::timeout(LIMIT, events.recv())
            .await
            .expect("started"),
        Some("started")
    );
    stuck.cancel().await.expect("cancel");
    assert_eq!(
        tokio::time::timeout(LIMIT, events.recv())
            .await
            .expect("dropped"),
        Some("dropped")
    );
    assert!(matches!(stuck.result().await, Err(Error::Cancelled { .. })));

    // jobctl workers' view of it.
    let workers = client.workers().await.expect("workers");
    assert_eq!(workers.len(), 1, "{workers:?}");
    let me = &workers[0];
    assert_eq!((me.name.as_str(), me.slots), ("sdk-test", 3));
    assert_eq!(
        me.functions,
        ["sdk.greet", "sdk.halfway", "sdk.square", "sdk.stuck"]
    );
    assert_eq!(me.labels.get("zone").map(String::as_str), Some("eu"));
    assert!(!me.draining);

    // A stopped worker drains, returns, and leaves jobd's list.
    stop.send(()).expect("the worker runs");
    tokio::time::timeout(LIMIT, run)
        .await
        .expect("the worker stopped in time")
        .expect("no panic")
        .expect("a clean stop");
    assert!(client.workers().await.expect("workers").is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_worker_function_logs_is_the_jobs_log() {
    let (registry, _fixtures) = jobd_test_support::registry();
    let server = TestServer::start(registry, EngineConfig::default()).await;
    let client = server.client().await;
    let worker = Worker::new(server.url())
        .name("sdk-logs")
        .register_blocking("sdk.chatty", "Logs three lines", |ctx: Ctx, _args| {
            for n in 1..=3 {
                ctx.log(format!("line {n}"));
            }
            ctx.log_output(jobd_client::LogStream::Stderr, b"\xff\n");
            Ok(json!("said it"))
        });
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    served(&client, "sdk.chatty").await;
    let job = client.submit("sdk.chatty", Value::Null).await.unwrap();
    assert_eq!(
        tokio::time::timeout(LIMIT, job.result())
            .await
            .unwrap()
            .unwrap(),
        json!("said it")
    );
    // The lines were stored before the report: the log is whole now.
    let mut pages = client.logs(job.id(), 0, false).await.unwrap();
    let mut entries = Vec::new();
    while let Some(page) = pages.next().await {
        entries.extend(page.unwrap().entries);
    }
    let data: Vec<&[u8]> = entries.iter().map(|e| e.data.as_slice()).collect();
    assert_eq!(
        data,
        [&b"line 1\n"[..], b"line 2\n", b"line 3\n", b"\xff\n"]
    );
    assert_eq!(entries[3].stream, jobd_client::LogStream::Stderr);
    stop.send(()).expect("the worker runs");
    tokio::time::timeout(LIMIT, run)
        .await
        .expect("the worker stopped in time")
        .expect("the worker task")
        .expect("a clean stop");
    server.shutdown().await;
}
