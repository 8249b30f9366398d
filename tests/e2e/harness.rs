//! The end-to-end tests' use of the workspace harness (`jobd-test-support`):
//! the shared [`TestServer`] and fixtures, plus two helpers of their own.

use std::time::Duration;

use jobd::EngineConfig;
use jobd_client::{JobClient, JobHandle, Submission};
pub(crate) use jobd_test_support::{Fixtures, TestServer, config, registry};
use serde_json::json;

/// `config` on tokio's clock, for a test on a paused runtime: the server's
/// timers and stored times then move only as the test's virtual time does.
pub(crate) fn on_tokio_clock(config: EngineConfig) -> EngineConfig {
    EngineConfig {
        clock: jobd::Clock::tokio(),
        ..config
    }
}

/// Submits `n` `noop` jobs in one SubmitBatch, job `k` with argument `k`
/// (so its result is `k`); every one must be accepted.
pub(crate) async fn submit_noops(client: &JobClient, n: usize) -> Vec<JobHandle> {
    let batch = (0..n).map(|k| Submission::new("noop", json!(k))).collect();
    client
        .submit_batch(batch)
        .await
        .expect("SubmitBatch")
        .into_iter()
        .map(|job| job.expect("every noop accepted"))
        .collect()
}

/// Runs `test` against a fixture server on the in-memory store and then on a
/// SQLite one in a fresh directory, both with `config`.
pub(crate) async fn on_both_stores<F, Fut>(config: EngineConfig, test: F)
where
    F: Fn(TestServer, Fixtures) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    for store in [
        jobd::StoreConfig::Memory,
        jobd::StoreConfig::Sqlite {
            dir: dir.path().to_owned(),
        },
    ] {
        let (registry, fixtures) = registry();
        let server =
            TestServer::start_on(registry, config.clone(), Duration::from_secs(5), &store).await;
        assert_eq!(
            server.engine.is_durable(),
            store != jobd::StoreConfig::Memory
        );
        test(server, fixtures).await;
    }
}
