//! `jobctl bench`: loads a live jobd with jobs and measures jobs/s and
//! latency, next to the gRPC floor (health checks) measured in the same run,
//! so that figures taken on different or noisy machines can be compared by
//! their ratio.
//!
//! This module decides the plan (connections, the two phases, the server's
//! memory before and after); `load` drives the requests and keeps the
//! tallies, `report` turns them into text or JSON, `progress` shows a live
//! line on a terminal, `worker` starts and stops the remote worker of
//! `--worker-slots`.

mod load;
mod progress;
mod report;
mod worker;

use std::{io::Write as _, num::NonZeroU64, time::Duration};

use jobd_client::{ConnectOptions, Error as ClientError, JobClient};
use jobd_proto::pb;
use tonic::transport::Channel;

pub(crate) use self::report::{Report, render};
pub(crate) use self::worker::Flags as WorkerFlags;
use self::{
    load::{Phase, Stop, Workload},
    report::{Measured, RemoteWorker},
    worker::WorkerChild,
};
use crate::{
    cli::{Bench, BenchMode},
    commands::CONNECT_TIMEOUT,
    failure::{Failure, root_cause},
};

/// How long `--duration` is when neither it nor `--jobs` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(5);

/// With `--jobs` alone, the run stops after this long even if the jobs are
/// not done, so that a stalled server cannot hold the bench forever.
const SAFETY_CAP: Duration = Duration::from_secs(600);

/// Runs the benchmark `args` describes against the server `client` is
/// connected to (at `addr`), and returns what it measured. With
/// `--worker-slots`, a remote worker started with `worker_flags` (this
/// jobctl's connection flags) serves the jobs for the length of the run.
pub(crate) async fn run(
    client: &JobClient,
    addr: &str,
    options: &ConnectOptions,
    worker_flags: &WorkerFlags,
    args: &Bench,
) -> Result<Report, Failure> {
    let slots = match args.worker_slots {
        Some(slots) if args.mode != BenchMode::Floor => slots,
        _ => return measure(client, addr, options, args, None).await,
    };
    let function = args.function();
    let mut worker = WorkerChild::start(worker_flags, function, slots)?;
    let remote = RemoteWorker {
        slots,
        pid: worker.pid(),
    };
    let report = match worker.wait_served(client, function).await {
        Ok(()) => measure(client, addr, options, args, Some(remote)).await,
        Err(failure) => Err(failure),
    };
    // Stopped whichever way the run went: no worker outlives its bench.
    if let Some(trouble) = worker.stop().await {
        // Not eprintln!, which panics if stderr is closed.
        let _ = writeln!(
            std::io::stderr(),
            "jobctl: warning: the bench's worker (pid {}): {trouble}",
            remote.pid
        );
    }
    report
}

/// The measurement itself, with `worker` serving the jobs if there is one.
async fn measure(
    client: &JobClient,
    addr: &str,
    options: &ConnectOptions,
    args: &Bench,
    worker: Option<RemoteWorker>,
) -> Result<Report, Failure> {
    // An unknown function would make every submit fail; say so now rather
    // than after the floor phase.
    if args.mode != BenchMode::Floor {
        check_function(client, args.function()).await?;
    }
    // A wrong --server-pid is found before the load, not after it.
    if let Some(pid) = args.server_pid {
        resident_bytes(pid)?;
    }
    let channels = connect_all(addr, options, args.connections.get()).await?;
    let credentials = options.credentials()?;
    let workload = Workload::new(args);

    let floor_stop = Stop {
        warmup: args.warmup,
        // The floor has no jobs to finish: with --jobs alone it runs for the
        // default duration at most.
        duration: args.duration.unwrap_or(DEFAULT_DURATION),
        budget: args.jobs.map(NonZeroU64::get),
    };
    let mode_stop = Stop {
        warmup: args.warmup,
        duration: match (args.duration, args.jobs) {
            (Some(duration), _) => duration,
            (None, Some(_)) => SAFETY_CAP,
            (None, None) => DEFAULT_DURATION,
        },
        budget: args.jobs.map(NonZeroU64::get),
    };
    let rss = || args.server_pid.map(resident_bytes).transpose();
    // The memory "before" is read just before the phase that is reported:
    // after the first floor round, so that the difference is the jobs' (the
    // connections are already open).
    let mut rss_before = if args.mode == BenchMode::Floor {
        rss()?
    } else {
        None
    };
    let mut floor: Option<Phase> = None;
    let mut measured: Option<Phase> = None;
    for round in 0..args.rounds {
        if let Some(stop) = floor_stop.round(round, args.rounds) {
            let phase = load::run(
                &channels,
                &credentials,
                args.concurrency.get(),
                &Workload::Floor,
                &stop,
                addr,
                args.server_pid,
            )
            .await;
            if round == 0 {
                // A server that answers no health check will not answer
                // jobs either: say so before loading it with them.
                ensure_some_succeeded(&phase, "health checks")?;
            }
            Phase::merge_into(&mut floor, phase);
        }
        if args.mode == BenchMode::Floor {
            continue;
        }
        let Some(stop) = mode_stop.round(round, args.rounds) else {
            continue;
        };
        if round == 0 {
            rss_before = rss()?;
        }
        let phase = load::run(
            &channels,
            &credentials,
            args.concurrency.get(),
            &workload,
            &stop,
            addr,
            args.server_pid,
        )
        .await;
        Phase::merge_into(&mut measured, phase);
    }
    let floor = floor.expect("the first round always has a floor share");
    if let Some(phase) = &measured {
        ensure_some_succeeded(phase, attempts(args.mode))?;
    }
    // After the run the server may have exited; the report says so with a
    // null rather than losing the figures already measured.
    let rss_after = args.server_pid.and_then(|pid| match resident_bytes(pid) {
        Ok(bytes) => Some(bytes),
        Err(failure) => {
            // Not eprintln!, which panics if stderr is closed.
            let _ = writeln!(std::io::stderr(), "jobctl: warning: {}", failure.describe());
            None
        }
    });

    Ok(Report {
        mode: args.mode,
        function: args.function().to_owned(),
        pool: args.pool.clone(),
        payload_bytes: args.payload_bytes,
        connections: args.connections.get(),
        concurrency: args.concurrency.get(),
        warmup: args.warmup,
        rounds: args.rounds,
        batch_size: (args.mode == BenchMode::Batch).then_some(args.batch_size),
        floor: Measured::from(floor),
        run: measured.map(Measured::from),
        server_pid: args.server_pid,
        rss_before,
        rss_after,
        worker,
    })
}

/// What a mode's requests are called in the "none succeeded" message.
fn attempts(mode: BenchMode) -> &'static str {
    match mode {
        BenchMode::Submit => "submits",
        BenchMode::Roundtrip => "round trips",
        BenchMode::Batch => "batch items",
        BenchMode::Floor => "health checks",
    }
}

fn ensure_some_succeeded(phase: &Phase, what: &'static str) -> Result<(), Failure> {
    if phase.ok > 0 {
        return Ok(());
    }
    Err(Failure::NothingSucceeded {
        what,
        errors: phase.errors,
        first: phase
            .first_error
            .clone()
            .unwrap_or_else(|| "none finished before the deadline".to_owned()),
    })
}

async fn check_function(client: &JobClient, function: &str) -> Result<(), Failure> {
    let functions = client.functions().await?;
    if functions.iter().any(|f| f.name == function) {
        Ok(())
    } else {
        Err(ClientError::NotFound(format!(
            "jobd has no function named {function:?} (see `jobctl functions`)"
        ))
        .into())
    }
}

/// Opens `count` separate HTTP/2 connections. Clones of one channel would
/// share a connection, and measure one connection's limits instead of the
/// server's.
async fn connect_all(
    addr: &str,
    options: &ConnectOptions,
    count: u32,
) -> Result<Vec<Channel>, Failure> {
    let endpoint = options.endpoint(addr)?;
    let unreachable = |reason| Failure::Unreachable {
        addr: addr.to_owned(),
        reason,
    };
    let mut channels = Vec::new();
    for _ in 0..count {
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
            .await
            .map_err(|_| unreachable(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|error| unreachable(root_cause(&error)))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// The resident memory of process `pid` (`VmRSS` in `/proc/PID/status`), in
/// bytes.
fn resident_bytes(pid: u32) -> Result<u64, Failure> {
    let failure = |reason: String| Failure::ServerMemory { pid, reason };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|error| {
        failure(match error.kind() {
            std::io::ErrorKind::NotFound => "no such process".to_owned(),
            _ => root_cause(&error),
        })
    })?;
    parse_vm_rss(&status).ok_or_else(|| failure("no VmRSS line in /proc/PID/status".to_owned()))
}

/// The CPU time (user + system, all threads, living or exited) process
/// `pid` has used so far, from `/proc/PID/stat`; `None` if it is unreadable
/// (the server exited: the report then leaves the figure out).
fn cpu_time(pid: u32) -> Option<Duration> {
    parse_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
        .map(|ticks| Duration::from_millis(ticks.saturating_mul(1000 / USER_HZ)))
}

/// The unit of `/proc` CPU times: the kernel's USER_HZ, 100 on every
/// architecture Linux runs jobd on (it is part of the user-space ABI, unlike
/// the kernel's internal HZ).
const USER_HZ: u64 = 100;

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in ticks.
/// The command name (field 2) may hold spaces and parentheses, so fields
/// are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// `VmRSS:    12345 kB` in bytes. The kernel always writes kB (KiB).
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// The argument every submitted job gets: absent (JSON null) for 0 bytes,
/// else a string of that many bytes, so the size of the payload is what is
/// measured and not the cost of building it.
fn payload(bytes: usize) -> Option<prost_types::Value> {
    (bytes > 0).then(|| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("x".repeat(bytes))),
    })
}

impl Workload {
    fn new(args: &Bench) -> Self {
        // No request id: the bench measures the plain path, and ids would
        // add the idempotency index to every submit.
        let submit = pb::SubmitRequest {
            function: args.function().to_owned(),
            args: payload(args.payload_bytes),
            pool: args.pool.clone().unwrap_or_default(),
            ..pb::SubmitRequest::default()
        };
        match args.mode {
            BenchMode::Submit => Self::Submit(submit),
            BenchMode::Roundtrip => Self::Roundtrip(submit),
            BenchMode::Batch => Self::Batch(pb::SubmitBatchRequest {
                requests: vec![submit; args.batch_size as usize],
            }),
            BenchMode::Floor => Self::Floor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_utime_plus_stime_even_with_odd_names() {
        let stat = "4242 (jobd (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    1234 56 0 0 20 0 6 0 100 200000 300 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(1290));
        assert_eq!(parse_cpu_ticks("4242 (jobd) S 1"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn our_own_cpu_time_is_read_and_grows() {
        let before = cpu_time(std::process::id()).unwrap();
        let mut x = 0u64;
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_time(std::process::id()).unwrap() > before);
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tjobd\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tjobd\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn the_payload_is_null_or_a_string_of_that_size() {
        assert_eq!(payload(0), None);
        let Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(text)),
        }) = payload(100)
        else {
            panic!("a string payload");
        };
        assert_eq!(text.len(), 100);
    }

    #[test]
    fn our_own_pid_has_a_resident_size() {
        assert!(resident_bytes(std::process::id()).unwrap() > 0);
        assert!(matches!(
            resident_bytes(u32::MAX),
            Err(Failure::ServerMemory { .. })
        ));
    }
}
