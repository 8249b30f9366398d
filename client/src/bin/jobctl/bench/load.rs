//! The load itself: K tasks per connection, each sending one request after
//! another until the deadline or the job budget runs out, and recording the
//! latency of each counted request in its own histogram. Nothing is shared
//! on the hot path but the budget counter (and the progress line, on a
//! terminal); the tallies are merged once the tasks are done.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use jobd_client::{CallCredentials, Error as ClientError, JobState, RpcClient};
use jobd_proto::pb;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::progress::Progress;
use crate::failure::Failure;

/// How long each roundtrip job's Result call waits for the job.
const RESULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Significant digits kept by the latency histograms: 0.1 % precision.
const SIGNIFICANT_DIGITS: u8 = 3;

/// What one request of a phase is.
#[derive(Debug, Clone)]
pub(crate) enum Workload {
    /// A health check: the gRPC floor.
    Floor,
    /// A Submit of this request.
    Submit(pb::SubmitRequest),
    /// A Submit of this request, then a Result for the new job.
    Roundtrip(pb::SubmitRequest),
    /// A SubmitBatch of (up to) these requests.
    Batch(pb::SubmitBatchRequest),
}

impl Workload {
    /// How many jobs one request carries, so the budget is counted in jobs.
    fn jobs_per_request(&self) -> u64 {
        match self {
            Self::Batch(batch) => batch.requests.len() as u64,
            Self::Floor | Self::Submit(_) | Self::Roundtrip(_) => 1,
        }
    }

    /// What the progress line calls this phase and its unit.
    fn label(&self) -> (&'static str, &'static str) {
        match self {
            Self::Floor => ("floor", "health checks"),
            Self::Submit(_) => ("submit", "jobs"),
            Self::Roundtrip(_) => ("roundtrip", "jobs"),
            Self::Batch(_) => ("batch", "jobs"),
        }
    }
}

/// When a phase stops.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stop {
    /// Load that is sent first and not counted.
    pub(crate) warmup: Duration,
    /// How long the counted load lasts at most (no request starts later).
    pub(crate) duration: Duration,
    /// How many jobs (or, for the floor, requests) to count at most.
    pub(crate) budget: Option<u64>,
}

impl Stop {
    /// Round `round` (from 0) of `rounds`: its share of the duration and of
    /// the budget, and the warmup only in the first. `None` when its share
    /// of the budget is nothing (fewer jobs than rounds: the last rounds go
    /// without, never the first).
    pub(crate) fn round(&self, round: u32, rounds: u32) -> Option<Self> {
        let budget = match self.budget {
            Some(total) => {
                let upto = |k: u32| (total * u64::from(k)).div_ceil(u64::from(rounds));
                let share = upto(round + 1) - upto(round);
                if share == 0 {
                    return None;
                }
                Some(share)
            }
            None => None,
        };
        Some(Self {
            warmup: if round == 0 {
                self.warmup
            } else {
                Duration::ZERO
            },
            duration: self.duration / rounds,
            budget,
        })
    }
}

/// What a phase measured.
#[derive(Debug)]
pub(crate) struct Phase {
    /// Jobs (or floor requests) that succeeded.
    pub(crate) ok: u64,
    /// Jobs (or floor requests) that failed.
    pub(crate) errors: u64,
    /// The first failure seen, on one line.
    pub(crate) first_error: Option<String>,
    /// From the end of the warmup until the last counted request finished.
    pub(crate) elapsed: Duration,
    /// Latency of each successful request, in microseconds.
    pub(crate) latency: Histogram<u64>,
    /// CPU time the server process spent in the measured window (from the
    /// end of the warmup), with `--server-pid`.
    pub(crate) server_cpu: Option<Duration>,
}

/// Runs one phase: `concurrency` tasks on each of `channels`, sending
/// `workload` until `stop`, with `credentials` on every JobService call.
/// `addr` is only for error messages. With `server_pid`, the server's CPU
/// time in the measured window is read too.
pub(crate) async fn run(
    channels: &[Channel],
    credentials: &CallCredentials,
    concurrency: u32,
    workload: &Workload,
    stop: &Stop,
    addr: &str,
    server_pid: Option<u32>,
) -> Phase {
    let (label, unit) = workload.label();
    let progress = Progress::start(label, unit, !stop.warmup.is_zero());
    let workload = Arc::new(workload.clone());
    let addr: Arc<str> = Arc::from(addr);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        measure_from: start + stop.warmup,
        deadline: start + stop.warmup + stop.duration,
        budget: stop.budget.map(AtomicU64::new),
    });
    let warmed_up = {
        let (progress, at) = (progress.clone(), shared.measure_from);
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            progress.measuring();
            server_pid.and_then(super::cpu_time)
        })
    };
    let mut tasks = JoinSet::new();
    for channel in channels {
        for _ in 0..concurrency {
            let worker = Worker {
                jobs: pb::job_service_client::JobServiceClient::with_interceptor(
                    channel.clone(),
                    credentials.clone(),
                ),
                health: HealthClient::new(channel.clone()),
                workload: Arc::clone(&workload),
                shared: Arc::clone(&shared),
                progress: progress.clone(),
                addr: Arc::clone(&addr),
            };
            tasks.spawn(worker.work());
        }
    }
    let mut phase = Phase {
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latency: new_histogram(),
        server_cpu: None,
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(tally) => phase.add(tally),
            // A worker's panic is a bug in jobctl: let it be seen.
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    phase.elapsed = Instant::now().saturating_duration_since(shared.measure_from);
    let cpu_at_end = server_pid.and_then(super::cpu_time);
    // Finished unless the phase ended before its warmup did (a tiny --jobs);
    // then nothing was measured and no CPU figure is given.
    let cpu_at_start = if warmed_up.is_finished() {
        warmed_up.await.ok().flatten()
    } else {
        warmed_up.abort();
        None
    };
    if let (Some(start), Some(end)) = (cpu_at_start, cpu_at_end) {
        phase.server_cpu = Some(end.saturating_sub(start));
    }
    progress.finish();
    phase
}

fn new_histogram() -> Histogram<u64> {
    // Auto-resizing: it grows to the largest latency seen, so a task that
    // only sees sub-millisecond answers holds a few kilobytes, not the
    // hundreds a fixed range up to minutes would take, times hundreds of
    // tasks.
    Histogram::new(SIGNIFICANT_DIGITS).expect("3 significant digits are supported")
}

impl Phase {
    /// Adds `other`, a later round of the same phase, to `total`.
    pub(crate) fn merge_into(total: &mut Option<Self>, other: Self) {
        let Some(sum) = total else {
            *total = Some(other);
            return;
        };
        let Self {
            ok,
            errors,
            first_error,
            elapsed,
            latency,
            server_cpu,
        } = other;
        sum.add(Tally {
            ok,
            errors,
            first_error,
            latency,
        });
        sum.elapsed += elapsed;
        sum.server_cpu = sum.server_cpu.zip(server_cpu).map(|(a, b)| a + b);
    }

    fn add(&mut self, tally: Tally) {
        self.ok += tally.ok;
        self.errors += tally.errors;
        if self.first_error.is_none() {
            self.first_error = tally.first_error;
        }
        self.latency
            .add(&tally.latency)
            .expect("auto-resizing histograms take any value");
    }
}

/// What every task of a phase reads.
struct Shared {
    /// Requests that start before this are warmup and not counted.
    measure_from: Instant,
    /// No request starts after this.
    deadline: Instant,
    /// Jobs still to count, with `--jobs`.
    budget: Option<AtomicU64>,
}

impl Shared {
    /// Takes up to `want` jobs from the budget; 0 means it is spent.
    fn claim(&self, want: u64) -> u64 {
        let Some(budget) = &self.budget else {
            return want;
        };
        budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                (left > 0).then(|| left.saturating_sub(want))
            })
            .map_or(0, |left| left.min(want))
    }
}

/// One task's share of the load: its own stubs (cheap clones of its
/// connection's channel) and its own tally.
struct Worker {
    jobs: RpcClient,
    health: HealthClient<Channel>,
    workload: Arc<Workload>,
    shared: Arc<Shared>,
    progress: Progress,
    addr: Arc<str>,
}

/// One task's counts and latencies.
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

/// How one request went, in jobs (or floor requests).
struct Answer {
    ok: u64,
    failed: u64,
    /// Why some failed; turned into text only if it is the task's first.
    trouble: Option<Trouble>,
}

impl Answer {
    fn ok(count: u64) -> Self {
        Self {
            ok: count,
            failed: 0,
            trouble: None,
        }
    }

    fn failed(count: u64, trouble: Trouble) -> Self {
        Self {
            ok: 0,
            failed: count,
            trouble: Some(trouble),
        }
    }
}

/// A failure as it came, described only when it is reported.
enum Trouble {
    /// The call failed.
    Status(tonic::Status),
    /// The health check answered, but not SERVING.
    NotServing(i32),
    /// A roundtrip job ended without a value.
    Job(pb::ResultResponse),
    /// An item of a batch was rejected (or came back with neither field).
    Item(Option<pb::BatchItemError>),
    /// A batch answer with too few results.
    Missing { asked: u64, answered: u64 },
}

impl Worker {
    async fn work(mut self) -> Tally {
        let mut tally = Tally {
            ok: 0,
            errors: 0,
            first_error: None,
            latency: new_histogram(),
        };
        let jobs_per_request = self.workload.jobs_per_request();
        loop {
            let started = Instant::now();
            if started >= self.shared.deadline {
                break;
            }
            let counted = started >= self.shared.measure_from;
            let jobs = if counted {
                self.shared.claim(jobs_per_request)
            } else {
                jobs_per_request
            };
            if jobs == 0 {
                break;
            }
            let answer = self.once(jobs).await;
            if counted {
                if answer.ok > 0 {
                    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    // `record` grows the histogram; `saturating_record`
                    // would clamp to its current range instead.
                    if tally.latency.record(micros).is_err() {
                        tally.latency.saturating_record(micros);
                    }
                    self.progress.inc(answer.ok);
                }
                tally.ok += answer.ok;
                tally.errors += answer.failed;
                if let (None, Some(trouble)) = (&tally.first_error, answer.trouble) {
                    tally.first_error = Some(trouble.describe(&self.addr));
                }
            }
        }
        tally
    }

    /// Sends one request carrying `jobs` jobs (1 except for the last batch
    /// under a budget).
    async fn once(&mut self, jobs: u64) -> Answer {
        match &*self.workload {
            Workload::Floor => {
                let request = HealthCheckRequest {
                    service: String::new(),
                };
                match self.health.check(request).await {
                    Ok(answer) if answer.get_ref().status == ServingStatus::Serving as i32 => {
                        Answer::ok(1)
                    }
                    Ok(answer) => Answer::failed(1, Trouble::NotServing(answer.get_ref().status)),
                    Err(status) => Answer::failed(1, Trouble::Status(status)),
                }
            }
            Workload::Submit(request) => match self.jobs.submit(request.clone()).await {
                Ok(_) => Answer::ok(1),
                Err(status) => Answer::failed(1, Trouble::Status(status)),
            },
            Workload::Roundtrip(request) => {
                let submitted = match self.jobs.submit(request.clone()).await {
                    Ok(answer) => answer.into_inner(),
                    Err(status) => return Answer::failed(1, Trouble::Status(status)),
                };
                let request = pb::ResultRequest {
                    job_id: submitted.job_id,
                    timeout: Some(RESULT_TIMEOUT.try_into().expect("30 s fits a Duration")),
                };
                match self.jobs.result(request).await {
                    Ok(answer) if answer.get_ref().state == pb::JobState::Succeeded as i32 => {
                        Answer::ok(1)
                    }
                    Ok(answer) => Answer::failed(1, Trouble::Job(answer.into_inner())),
                    Err(status) => Answer::failed(1, Trouble::Status(status)),
                }
            }
            Workload::Batch(batch) => {
                let take = usize::try_from(jobs)
                    .map_or(batch.requests.len(), |n| n.min(batch.requests.len()));
                let request = pb::SubmitBatchRequest {
                    requests: batch.requests[..take].to_vec(),
                };
                match self.jobs.submit_batch(request).await {
                    Ok(answer) => batch_answer(jobs, answer.into_inner()),
                    Err(status) => Answer::failed(jobs, Trouble::Status(status)),
                }
            }
        }
    }
}

/// Counts a batch's accepted and rejected items; missing results count as
/// rejected.
fn batch_answer(asked: u64, answer: pb::SubmitBatchResponse) -> Answer {
    let answered = answer.results.len() as u64;
    let mut tally = Answer::ok(0);
    for result in answer.results {
        if result.job.is_some() {
            tally.ok += 1;
        } else {
            tally.failed += 1;
            tally.trouble.get_or_insert(Trouble::Item(result.error));
        }
    }
    if answered < asked {
        tally.failed += asked - answered;
        tally
            .trouble
            .get_or_insert(Trouble::Missing { asked, answered });
    }
    tally
}

impl Trouble {
    /// The failure on one line, in the words jobctl uses everywhere else.
    fn describe(self, addr: &str) -> String {
        let status = |status: tonic::Status| {
            Failure::from(ClientError::from(status))
                .lost_connection(addr)
                .describe()
        };
        match self {
            Self::Status(error) => status(error),
            Self::NotServing(raw) => format!(
                "the health check answered {}",
                ServingStatus::try_from(raw).map_or("an unknown status", |s| s.as_str_name())
            ),
            Self::Job(answer) => {
                let state =
                    JobState::try_from(answer.state).map_or("in an unknown state", |s| s.as_str());
                let reason = answer.error.map(|e| e.message).unwrap_or_default();
                format!("job {} ended {state}: {reason}", answer.job_id)
            }
            Self::Item(Some(error)) => status(tonic::Status::new(
                tonic::Code::from_i32(error.code),
                error.message,
            )),
            Self::Item(None) => "a batch result with neither a job nor an error".to_owned(),
            Self::Missing { asked, answered } => {
                format!("SubmitBatch answered {answered} results for {asked} requests")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_share_the_budget_and_duration_and_warm_up_once() {
        let stop = Stop {
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(6),
            budget: Some(10),
        };
        let rounds: Vec<Stop> = (0..3).filter_map(|r| stop.round(r, 3)).collect();
        assert_eq!(
            rounds.iter().map(|s| s.budget.unwrap()).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        assert_eq!(
            rounds.iter().map(|s| s.warmup).collect::<Vec<_>>(),
            [Duration::from_secs(1), Duration::ZERO, Duration::ZERO]
        );
        assert!(rounds.iter().all(|s| s.duration == Duration::from_secs(2)));
        // Fewer jobs than rounds: the first rounds get one each.
        let few = Stop {
            budget: Some(2),
            ..stop
        };
        let shares: Vec<Option<u64>> = (0..3)
            .map(|r| few.round(r, 3).map(|s| s.budget.unwrap()))
            .collect();
        assert_eq!(shares, [Some(1), Some(1), None]);
        let timed = Stop {
            budget: None,
            ..stop
        };
        assert_eq!(timed.round(2, 3).unwrap().budget, None);
    }

    #[test]
    fn merged_rounds_add_up() {
        let phase = |ok, errors, secs, cpu_ms: Option<u64>, latency: u64| {
            let mut histogram = new_histogram();
            histogram.record(latency).unwrap();
            Phase {
                ok,
                errors,
                first_error: (errors > 0).then(|| format!("error after {ok}")),
                elapsed: Duration::from_secs(secs),
                latency: histogram,
                server_cpu: cpu_ms.map(Duration::from_millis),
            }
        };
        let mut total = None;
        Phase::merge_into(&mut total, phase(10, 0, 1, Some(5), 100));
        Phase::merge_into(&mut total, phase(20, 1, 2, Some(7), 300));
        let total = total.unwrap();
        assert_eq!((total.ok, total.errors), (30, 1));
        assert_eq!(total.first_error.as_deref(), Some("error after 20"));
        assert_eq!(total.elapsed, Duration::from_secs(3));
        assert_eq!(total.latency.len(), 2);
        assert_eq!(total.server_cpu, Some(Duration::from_millis(12)));
        // A round without a CPU reading makes the sum unknown, not smaller.
        let mut partial = None;
        Phase::merge_into(&mut partial, phase(1, 0, 1, Some(5), 1));
        Phase::merge_into(&mut partial, phase(1, 0, 1, None, 1));
        assert_eq!(partial.unwrap().server_cpu, None);
    }

    fn shared(budget: Option<u64>) -> Shared {
        let now = Instant::now();
        Shared {
            measure_from: now,
            deadline: now,
            budget: budget.map(AtomicU64::new),
        }
    }

    #[test]
    fn histograms_grow_to_any_latency() {
        let mut latency = new_histogram();
        latency.record(3).unwrap();
        latency.record(90_000_000).unwrap();
        assert_eq!(latency.value_at_quantile(0.5), 3);
        assert!(
            latency.max().abs_diff(90_000_000) < 90_000,
            "{}",
            latency.max()
        );
    }

    #[test]
    fn the_budget_is_shared_out_until_spent() {
        let limited = shared(Some(2500));
        assert_eq!(limited.claim(1000), 1000);
        assert_eq!(limited.claim(1000), 1000);
        assert_eq!(limited.claim(1000), 500);
        assert_eq!(limited.claim(1000), 0);
        assert_eq!(limited.claim(1), 0);
        assert_eq!(shared(None).claim(7), 7);
    }

    #[test]
    fn batch_items_are_counted_one_by_one() {
        let accepted = pb::SubmitBatchResult {
            job: Some(pb::SubmitResponse::default()),
            error: None,
        };
        let rejected = pb::SubmitBatchResult {
            job: None,
            error: Some(pb::BatchItemError {
                code: tonic::Code::ResourceExhausted as i32,
                message: "queue full".to_owned(),
                field_violations: Vec::new(),
            }),
        };
        let answer = batch_answer(
            4,
            pb::SubmitBatchResponse {
                results: vec![accepted.clone(), rejected, accepted],
            },
        );
        assert_eq!((answer.ok, answer.failed), (2, 2));
        let described = answer.trouble.expect("a reason").describe("http://x");
        assert!(described.contains("queue full"), "{described}");
    }
}
