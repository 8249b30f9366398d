//! Job logs over the wire (`JobService.Logs`): read back in order, resumed
//! from an offset, followed while the job runs, capped, bytes kept as
//! written, and clear errors for jobs that do not exist.

use jobd_proto::pb::{self, job_service_client::JobServiceClient};
use serde_json::json;
use tonic::{Code, transport::Channel};

use crate::harness::{TestServer, config, registry};

async fn rpc(server: &TestServer) -> JobServiceClient<Channel> {
    JobServiceClient::connect(server.url()).await.unwrap()
}

/// Every entry of the stream's pages, with the stream's last `next_offset`
/// and the bytes skipped.
async fn read_all(
    rpc: &mut JobServiceClient<Channel>,
    id: &str,
    offset: u64,
    follow: bool,
) -> (Vec<pb::LogEntry>, u64, u64) {
    let mut stream = rpc
        .logs(pb::LogsRequest {
            job_id: id.to_owned(),
            offset,
            follow,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut entries, mut next, mut skipped) = (Vec::new(), offset, 0);
    while let Some(page) = stream.message().await.unwrap() {
        skipped += page.skipped;
        next = page.next_offset;
        entries.extend(page.entries);
    }
    (entries, next, skipped)
}

fn texts(entries: &[pb::LogEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .collect()
}

#[tokio::test]
async fn a_finished_jobs_log_reads_back_in_order_and_resumes_from_any_offset() {
    let (registry, _fx) = registry();
    let server = TestServer::start(registry, config(8, 2, 100)).await;
    let client = server.client().await;
    let job = client.submit("log_lines", json!(5)).await.unwrap();
    assert_eq!(job.result().await.unwrap(), json!(5));
    let id = job.id().to_string();
    let mut rpc = rpc(&server).await;

    let (entries, next, skipped) = read_all(&mut rpc, &id, 0, false).await;
    assert_eq!(
        texts(&entries),
        ["line 0\n", "line 1\n", "line 2\n", "line 3\n", "line 4\n"]
    );
    assert!(
        entries
            .iter()
            .all(|e| e.attempt == 1 && e.stream() == pb::LogStream::Log && e.at.is_some())
    );
    assert_eq!((next, skipped), (35, 0));
    // Resuming where a reader stopped gives the rest, nothing twice.
    let (rest, _, _) = read_all(&mut rpc, &id, entries[3].offset, false).await;
    assert_eq!(texts(&rest), ["line 3\n", "line 4\n"]);
    // At the end: nothing more, and the stream ends.
    let (none, next_again, _) = read_all(&mut rpc, &id, next, false).await;
    assert!(none.is_empty());
    assert_eq!(next_again, next);
    server.shutdown().await;
}

#[tokio::test]
async fn a_follower_gets_lines_as_they_come_and_the_stream_ends_with_the_job() {
    follow(&jobd::StoreConfig::Memory).await;
}

#[tokio::test]
async fn a_follower_of_a_durable_log_gets_lines_once_committed() {
    let dir = tempfile::tempdir().unwrap();
    follow(&jobd::StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    })
    .await;
}

async fn follow(store: &jobd::StoreConfig) {
    let (registry, mut fx) = registry();
    let server = TestServer::start_on(
        registry,
        config(8, 2, 100),
        std::time::Duration::from_secs(5),
        store,
    )
    .await;
    let client = server.client().await;
    let job = client.submit("log_gated", json!(null)).await.unwrap();
    fx.next_started().await;
    let mut rpc = rpc(&server).await;
    let mut stream = rpc
        .logs(pb::LogsRequest {
            job_id: job.id().to_string(),
            offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first page");
    assert_eq!(texts(&first.entries), ["first\n"]);
    // The job is blocked on the gate: the stream waits with it.
    fx.gate.add_permits(1);
    let mut rest = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        rest.extend(page.entries);
    }
    // Bytes that are not UTF-8 arrive as they were written.
    assert_eq!(rest[0].data, b"\xff\xfe\n");
    assert_eq!(rest[0].stream(), pb::LogStream::Stdout);
    assert_eq!(texts(&rest[1..]), ["second\n"]);
    assert_eq!(job.result().await.unwrap(), json!("logged"));
    server.shutdown().await;
}

#[tokio::test]
async fn the_cap_keeps_the_newest_lines_and_says_how_much_was_dropped() {
    let (registry, _fx) = registry();
    let config = jobd::EngineConfig {
        max_log_bytes: 100,
        ..config(8, 2, 100)
    };
    let server = TestServer::start(registry, config).await;
    let client = server.client().await;
    let job = client.submit("log_lines", json!(100)).await.unwrap();
    job.result().await.unwrap();
    let mut rpc = rpc(&server).await;
    let (entries, next, skipped) = read_all(&mut rpc, &job.id().to_string(), 0, false).await;
    let kept: u64 = entries.iter().map(|e| e.data.len() as u64).sum();
    assert!(kept <= 100, "kept {kept} bytes");
    assert_eq!(skipped + kept, next, "every byte is kept or counted");
    assert_eq!(texts(&entries).last().unwrap(), "line 99\n");
    server.shutdown().await;
}

#[tokio::test]
async fn logs_of_jobs_that_do_not_exist_are_refused_clearly() {
    let (registry, _fx) = registry();
    let server = TestServer::start(registry, config(8, 2, 100)).await;
    let mut rpc = rpc(&server).await;
    for (id, code) in [
        ("not-an-id", Code::InvalidArgument),
        ("0190b6e0-0000-7000-8000-000000000000", Code::NotFound),
    ] {
        let status = rpc
            .logs(pb::LogsRequest {
                job_id: id.to_owned(),
                offset: 0,
                follow: true,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{id}: {status}");
    }
    // A deleted job's log goes with it.
    let client = server.client().await;
    let job = client.submit("log_lines", json!(2)).await.unwrap();
    job.result().await.unwrap();
    job.delete().await.unwrap();
    let status = rpc
        .logs(pb::LogsRequest {
            job_id: job.id().to_string(),
            offset: 0,
            follow: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status}");
    server.shutdown().await;
}
