//! A worker serving three job functions of its own to a local jobd: an async
//! one with an argument schema that reports progress, a blocking one that
//! honours cancels, and one that fails in a retryable way.
//!
//! ```text
//! jobd --listen 127.0.0.1:50051 &             # (with tokens: a `worker` token in JOBD_TOKEN)
//! cargo run --example worker &
//! jobctl functions                             # thumbnail, fib and flaky, pool "worker"
//! jobctl submit --wait thumbnail '{"width": 640, "height": 480}'
//! jobctl submit --wait fib 80
//! jobctl submit --wait --max-attempts 3 flaky
//! jobctl workers                               # this worker, its slots and jobs
//! ```
//!
//! Ctrl-C (or SIGTERM) drains it: it takes no new job, lets the running ones
//! finish within 10 s, gives back the rest, and exits.

use std::time::Duration;

use jobd_client::{ConnectOptions, Ctx, JobFailure, Worker};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("JOBD_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".to_owned());
    let mut options = ConnectOptions::new();
    if let Ok(token) = std::env::var("JOBD_TOKEN") {
        options = options.bearer_token(token);
    }
    let worker = Worker::new(&addr)
        .connect_options(options)
        .name("example-worker")
        .slots(4)
        .label("example", "true")
        .grace(Duration::from_secs(10))
        .register_async(
            "thumbnail",
            "Pretends to make a thumbnail of a WIDTH x HEIGHT image, in STEPS steps",
            thumbnail,
        )
        .with_args_schema(json!({
            "type": "object",
            "properties": {
                "width": {"type": "integer", "minimum": 1},
                "height": {"type": "integer", "minimum": 1},
                "steps": {"type": "integer", "minimum": 1, "maximum": 100}
            },
            "required": ["width", "height"],
            "additionalProperties": false
        }))
        .returns("the thumbnail's size, {\"width\", \"height\"}")
        .register_blocking("fib", "The Nth Fibonacci number, computed slowly", fib)
        .with_args_schema(json!({"type": "integer", "minimum": 0, "maximum": 92}))
        .returns("an integer")
        .register_async(
            "flaky",
            "Fails with a retryable error on every attempt but the last",
            |ctx: Ctx, _args: Value| async move {
                if ctx.attempt() < ctx.max_attempts() {
                    return Err(JobFailure::retryable(format!(
                        "attempt {} of {}: the peer is busy",
                        ctx.attempt(),
                        ctx.max_attempts()
                    )));
                }
                Ok(json!(format!("succeeded on attempt {}", ctx.attempt())))
            },
        );
    println!("serving thumbnail, fib and flaky to {addr}; Ctrl-C drains and exits");
    worker.run(shutdown_signal()).await?;
    println!("drained");
    Ok(())
}

/// Async: cancelled by dropping its future, so it needs no cancel checks.
async fn thumbnail(ctx: Ctx, args: Value) -> Result<Value, JobFailure> {
    #[derive(serde::Deserialize)]
    struct Image {
        width: u64,
        height: u64,
        steps: Option<u32>,
    }
    let image: Image = serde_json::from_value(args)?;
    let steps = image.steps.unwrap_or(10);
    for step in 1..=steps {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ctx.set_progress(
            f64::from(step) / f64::from(steps),
            &format!("step {step} of {steps}"),
        );
    }
    let scale = 128.0 / image.width.max(image.height) as f64;
    Ok(json!({
        "width": (image.width as f64 * scale).round(),
        "height": (image.height as f64 * scale).round(),
    }))
}

/// Blocking: runs on its own thread, and looks at its context to honour a
/// cancel.
fn fib(ctx: Ctx, args: Value) -> Result<Value, JobFailure> {
    let n: u64 = serde_json::from_value(args)?;
    let (mut a, mut b) = (0u64, 1u64);
    for i in 0..n {
        // Slow on purpose, so that there is time to watch or cancel it.
        ctx.sleep_blocking(Duration::from_millis(50))?;
        (a, b) = (b, a + b);
        ctx.set_progress((i + 1) as f64 / n as f64, "");
    }
    Ok(json!(a))
}

/// SIGINT or SIGTERM, whichever comes first.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
