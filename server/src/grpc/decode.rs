//! Validation of incoming requests: wire messages become domain values here,
//! or the request is refused with `INVALID_ARGUMENT` naming the field. Every
//! rule about what a well-formed id, name, label or duration is lives in this
//! module.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, SystemTime},
};

use jobd_proto::{JobId, JobState, pb, value};
use sha2::{Digest as _, Sha256};

use crate::{
    Error,
    engine::{DeclaredFunction, HeldLease, WorkerAttach},
    engine::{ReturnWhen, SubmitSpec, WatchFilter, WatchSpec},
    function::{MAX_FUNCTION_NAME_LEN, is_valid_function_name},
    job::{JobError, Outcome, PoolName},
    store::ListFilter,
};

/// At most this many labels per job.
pub(crate) const MAX_LABELS: usize = 64;
/// Label keys: 1 to 63 bytes of `[A-Za-z0-9_.-/]`.
pub(crate) const MAX_LABEL_KEY_LEN: usize = 63;
/// Label values: at most 255 bytes, no control characters.
pub(crate) const MAX_LABEL_VALUE_LEN: usize = 255;
/// Request ids: 1 to 128 printable ASCII characters.
pub(crate) const MAX_REQUEST_ID_LEN: usize = 128;

/// Job priorities: bounded so that no client can pick a priority no other
/// can outrank, and so that aging's bound is finite: a job of priority p is
/// overtaken only by jobs arriving within (1000 - p) aging intervals.
pub(crate) const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

/// How far ahead a job may be scheduled (`delay` / `not_before`): far
/// enough for "tonight" or "next week", near enough that a forgotten job
/// does not hold a queue slot for ever.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

/// The most attempts a job may ask for: retries beyond that are a loop.
pub(crate) const MAX_ATTEMPTS: u32 = 100;

/// The most submissions one SubmitBatch may carry.
pub(crate) const MAX_BATCH: usize = 10_000;

pub(crate) fn batch_len(len: usize) -> Result<(), Error> {
    if (1..=MAX_BATCH).contains(&len) {
        Ok(())
    } else {
        Err(Error::invalid(
            "requests",
            format!("a batch holds 1 to {MAX_BATCH} submissions (got {len})"),
        ))
    }
}

pub(crate) fn job_id(raw: &str) -> Result<JobId, Error> {
    raw.parse()
        .map_err(|e: jobd_proto::ParseJobIdError| Error::invalid("job_id", e.to_string()))
}

/// An optional wire duration: absent stays `None`; negative or out of range
/// is refused.
pub(crate) fn timeout(
    field: &'static str,
    raw: Option<prost_types::Duration>,
) -> Result<Option<Duration>, Error> {
    raw.map(|d| {
        // Refused before converting: prost's conversion negates negative
        // values, which overflows (and panics in debug builds) at i64::MIN.
        if d.seconds < 0 || d.nanos < 0 {
            return Err(Error::invalid(
                field,
                format!("{}s {}ns is negative", d.seconds, d.nanos),
            ));
        }
        Duration::try_from(d).map_err(|_| {
            Error::invalid(
                field,
                format!("{}s {}ns is negative or out of range", d.seconds, d.nanos),
            )
        })
    })
    .transpose()
}

/// The time before which a submitted job must not start, from its `delay`
/// or `not_before` (at most one), bounded by [`MAX_DELAY`] from now.
fn not_before(
    delay: Option<prost_types::Duration>,
    at: Option<prost_types::Timestamp>,
    now: SystemTime,
) -> Result<Option<SystemTime>, Error> {
    let (field, not_before) = match (timeout("delay", delay)?, at) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid(
                "not_before",
                "set at most one of delay and not_before",
            ));
        }
        (None, None) => return Ok(None),
        // Capped before adding: a huge delay must be refused below as too
        // far ahead, not overflow the clock here.
        (Some(delay), None) => ("delay", now + delay.min(MAX_DELAY + Duration::from_secs(1))),
        (None, Some(at)) => (
            "not_before",
            SystemTime::try_from(at)
                .map_err(|e| Error::invalid("not_before", format!("is not a usable time: {e}")))?,
        ),
    };
    if not_before.duration_since(now).unwrap_or_default() > MAX_DELAY {
        return Err(Error::invalid(
            field,
            format!(
                "must be at most {} days ahead",
                MAX_DELAY.as_secs() / 86_400
            ),
        ));
    }
    Ok(Some(not_before))
}

/// A request as the server received it, at `.1` on the server's clock
/// (what a relative time in it, such as a `delay`, counts from).
pub(crate) struct Received<T>(pub(crate) T, pub(crate) SystemTime);

impl TryFrom<Received<pb::SubmitRequest>> for SubmitSpec {
    type Error = Error;

    fn try_from(Received(req, now): Received<pb::SubmitRequest>) -> Result<Self, Error> {
        if !is_valid_function_name(&req.function) {
            return Err(Error::invalid(
                "function",
                if req.function.is_empty() {
                    "is required (see ListFunctions)".to_owned()
                } else {
                    format!(
                        "must be 1-{MAX_FUNCTION_NAME_LEN} characters of [A-Za-z0-9_.:-] \
                         (got {} bytes)",
                        req.function.len()
                    )
                },
            ));
        }
        // A pool name follows the function-name rules; whether this server
        // has such a pool, and whether the function runs on it, is the
        // engine's to say.
        let pool = match req.pool.as_str() {
            "" => None,
            name if is_valid_function_name(name) => Some(PoolName::from(name)),
            _ => {
                return Err(Error::invalid(
                    "pool",
                    format!(
                        "must be empty or a pool name of 1-{MAX_FUNCTION_NAME_LEN} characters of [A-Za-z0-9_.:-] (see ListFunctions)"
                    ),
                ));
            }
        };
        let request_id = match req.request_id.as_str() {
            "" => None,
            id if id.len() <= MAX_REQUEST_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()) => {
                Some(req.request_id)
            }
            _ => {
                return Err(Error::invalid(
                    "request_id",
                    format!("must be 1-{MAX_REQUEST_ID_LEN} printable ASCII characters"),
                ));
            }
        };
        if !PRIORITY_RANGE.contains(&req.priority) {
            return Err(Error::invalid(
                "priority",
                format!(
                    "must be {} to {} (got {})",
                    PRIORITY_RANGE.start(),
                    PRIORITY_RANGE.end(),
                    req.priority
                ),
            ));
        }
        let not_before = not_before(req.delay, req.not_before, now)?;
        let run_timeout = match timeout("timeout", req.timeout)? {
            Some(limit) if limit.is_zero() || limit > MAX_DELAY => {
                return Err(Error::invalid(
                    "timeout",
                    format!(
                        "must be more than 0 and at most {} days",
                        MAX_DELAY.as_secs() / 86_400
                    ),
                ));
            }
            limit => limit,
        };
        Ok(Self {
            function: req.function,
            args: value::option_to_json(req.args),
            pool,
            request_id,
            labels: labels(req.labels, "labels")?,
            worker_labels: labels(req.worker_labels, "worker_labels")?,
            priority: req.priority,
            not_before,
            timeout: run_timeout,
            max_attempts: match req.max_attempts {
                0..=MAX_ATTEMPTS => req.max_attempts,
                n => {
                    return Err(Error::invalid(
                        "max_attempts",
                        format!("must be 0 to {MAX_ATTEMPTS} (got {n})"),
                    ));
                }
            },
        })
    }
}

/// Map's `max_in_flight` when the request leaves it at 0.
pub(crate) const DEFAULT_MAP_IN_FLIGHT: usize = 64;
/// Map's `max_in_flight` values above this are coerced down to it: each
/// in-flight argument may be a running job and a buffered result.
pub(crate) const MAX_MAP_IN_FLIGHT: usize = 1024;

/// A validated Map stream's first request: what each job is submitted as,
/// and how results come back.
#[derive(Debug)]
pub(crate) struct MapPlan {
    /// Every job's submission, with `args` left null.
    pub(crate) template: SubmitSpec,
    pub(crate) ordered: bool,
    pub(crate) max_in_flight: usize,
}

impl TryFrom<Received<Option<pb::MapStart>>> for MapPlan {
    type Error = Error;

    fn try_from(Received(start, now): Received<Option<pb::MapStart>>) -> Result<Self, Error> {
        let start = start.ok_or_else(|| {
            Error::invalid(
                "start",
                "the first MapRequest must set start (the function and options)",
            )
        })?;
        // The options mean what they mean in Submit, so they are checked by
        // Submit's own rules.
        let template = SubmitSpec::try_from(Received(
            pb::SubmitRequest {
                function: start.function,
                pool: start.pool,
                labels: start.labels,
                priority: start.priority,
                timeout: start.timeout,
                max_attempts: start.max_attempts,
                ..pb::SubmitRequest::default()
            },
            now,
        ))?;
        let max_in_flight = match usize::try_from(start.max_in_flight) {
            Ok(0) => DEFAULT_MAP_IN_FLIGHT,
            Ok(n) => n.min(MAX_MAP_IN_FLIGHT),
            Err(_) => MAX_MAP_IN_FLIGHT,
        };
        Ok(Self {
            template,
            ordered: start.ordered,
            max_in_flight,
        })
    }
}

/// A Map request after the first: it must not set `start` again.
pub(crate) fn map_args(req: pb::MapRequest) -> Result<Vec<prost_types::Value>, Error> {
    if req.start.is_some() {
        return Err(Error::invalid(
            "start",
            "only the first MapRequest may set start",
        ));
    }
    Ok(req.args)
}

/// The most jobs one Wait may name.
pub(crate) const MAX_WAIT_IDS: usize = 1000;
/// ListJobs page size when the request leaves it at 0.
pub(crate) const DEFAULT_PAGE_SIZE: usize = 100;
/// ListJobs page sizes above this are coerced down to it (AIP-158).
pub(crate) const MAX_PAGE_SIZE: usize = 1000;

/// A validated Wait request.
#[derive(Debug)]
pub(crate) struct WaitQuery {
    /// The jobs, in request order, each once.
    pub(crate) ids: Vec<JobId>,
    pub(crate) return_when: ReturnWhen,
    pub(crate) timeout: Option<Duration>,
}

impl TryFrom<pb::WaitRequest> for WaitQuery {
    type Error = Error;

    fn try_from(req: pb::WaitRequest) -> Result<Self, Error> {
        let ids = distinct_job_ids(&req.job_ids, MAX_WAIT_IDS)?
            .filter(|ids| !ids.is_empty())
            .ok_or_else(|| {
                Error::invalid(
                    "job_ids",
                    format!("a Wait names 1 to {MAX_WAIT_IDS} distinct jobs"),
                )
            })?;
        let return_when = match pb::ReturnWhen::try_from(req.return_when) {
            Ok(pb::ReturnWhen::FirstCompleted) => ReturnWhen::FirstCompleted,
            Ok(pb::ReturnWhen::FirstException) => ReturnWhen::FirstException,
            // Python's default.
            Ok(pb::ReturnWhen::AllCompleted | pb::ReturnWhen::Unspecified) => {
                ReturnWhen::AllCompleted
            }
            Err(_) => {
                return Err(Error::invalid(
                    "return_when",
                    format!("{} is not a ReturnWhen value", req.return_when),
                ));
            }
        };
        Ok(Self {
            ids,
            return_when,
            timeout: timeout("timeout", req.timeout)?,
        })
    }
}

/// A validated ListJobs request.
#[derive(Debug)]
pub(crate) struct ListQuery {
    pub(crate) filter: ListFilter,
    /// The page holds ids below this one (from the page token).
    pub(crate) before: Option<JobId>,
    pub(crate) page_size: usize,
}

impl TryFrom<pb::ListJobsRequest> for ListQuery {
    type Error = Error;

    fn try_from(req: pb::ListJobsRequest) -> Result<Self, Error> {
        let page_size = match usize::try_from(req.page_size) {
            Err(_) => {
                return Err(Error::invalid(
                    "page_size",
                    format!("must not be negative (got {})", req.page_size),
                ));
            }
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) => n.min(MAX_PAGE_SIZE),
        };
        let states = states(&req.states)?;
        let function = function_filter(req.function)?;
        let time = |field: &'static str, raw: Option<prost_types::Timestamp>| {
            raw.map(|t| {
                SystemTime::try_from(t)
                    .map_err(|e| Error::invalid(field, format!("is not a usable time: {e}")))
            })
            .transpose()
        };
        let filter = ListFilter {
            states,
            function,
            labels: labels(req.labels, "labels")?,
            submitted_after: time("submitted_after", req.submitted_after)?,
            submitted_before: time("submitted_before", req.submitted_before)?,
        };
        let before = match req.page_token.as_str() {
            "" => None,
            token => Some(parse_page_token(token, &filter)?),
        };
        Ok(Self {
            filter,
            before,
            page_size,
        })
    }
}

/// A state filter: known states only, in a canonical order (so that one set
/// of states written twice or in another order is the same filter, and the
/// same page-token fingerprint).
fn states(raw: &[i32]) -> Result<Vec<JobState>, Error> {
    let mut states = raw
        .iter()
        .map(|&raw| {
            pb::JobState::try_from(raw)
                .ok()
                .and_then(|s| JobState::try_from(s).ok())
                .ok_or_else(|| Error::invalid("states", format!("{raw} is not a job state")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    states.sort_by_key(|&s| state_byte(s));
    states.dedup();
    Ok(states)
}

/// A function-name filter; empty means any function.
fn function_filter(raw: String) -> Result<Option<String>, Error> {
    match raw.as_str() {
        "" => Ok(None),
        name if is_valid_function_name(name) => Ok(Some(raw)),
        _ => Err(Error::invalid(
            "function",
            format!("must be 1-{MAX_FUNCTION_NAME_LEN} characters of [A-Za-z0-9_.:-]"),
        )),
    }
}

/// Parses `raw` as job ids, dropping repeats (first occurrence wins, so the
/// order is the caller's). `Ok(None)` when more than `max` distinct ids are
/// named; a malformed id is refused naming the field.
fn distinct_job_ids(raw: &[String], max: usize) -> Result<Option<Vec<JobId>>, Error> {
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    for raw in raw {
        let id = raw
            .parse()
            .map_err(|e: jobd_proto::ParseJobIdError| Error::invalid("job_ids", e.to_string()))?;
        if seen.insert(id) {
            ids.push(id);
            if ids.len() > max {
                return Ok(None);
            }
        }
    }
    Ok(Some(ids))
}

/// The most jobs one Watch may name.
pub(crate) const MAX_WATCH_IDS: usize = 1000;

impl TryFrom<pb::WatchRequest> for WatchSpec {
    type Error = Error;

    fn try_from(req: pb::WatchRequest) -> Result<Self, Error> {
        let ids = distinct_job_ids(&req.job_ids, MAX_WATCH_IDS)?.ok_or_else(|| {
            Error::invalid(
                "job_ids",
                format!("a Watch names at most {MAX_WATCH_IDS} distinct jobs"),
            )
        })?;
        let filter = WatchFilter {
            function: function_filter(req.function)?,
            states: states(&req.states)?,
            labels: labels(req.labels, "labels")?,
        };
        if !ids.is_empty() && filter != WatchFilter::default() {
            return Err(Error::invalid(
                "job_ids",
                "watch either job ids or a filter (function, states, labels), not both",
            ));
        }
        let resume = match (req.stream_epoch.as_str(), req.after_seq) {
            ("", 0) => None,
            ("", _) => {
                return Err(Error::invalid(
                    "stream_epoch",
                    "required with after_seq: the stream_epoch of the events received",
                ));
            }
            (epoch, after) if epoch.len() <= 64 => Some((req.stream_epoch.clone(), after)),
            _ => return Err(Error::invalid("stream_epoch", "at most 64 characters")),
        };
        Ok(Self {
            ids,
            filter,
            resume,
        })
    }
}

/// The page token that continues a listing below `last` with `filter`:
/// the id and a fingerprint of the filter, in hex. Opaque to clients; the
/// fingerprint lets a token used with other filters be refused instead of
/// silently listing something else.
pub(crate) fn page_token(last: JobId, filter: &ListFilter) -> String {
    let mut bytes = Vec::with_capacity(PAGE_TOKEN_BYTES);
    bytes.extend_from_slice(last.as_uuid().as_bytes());
    bytes.extend_from_slice(&filter_fingerprint(filter));
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 16 bytes of job id, 8 of filter fingerprint.
const PAGE_TOKEN_BYTES: usize = 24;

fn parse_page_token(token: &str, filter: &ListFilter) -> Result<JobId, Error> {
    let malformed = || {
        Error::invalid(
            "page_token",
            "is not a token this server made; pass back next_page_token exactly",
        )
    };
    if token.len() != 2 * PAGE_TOKEN_BYTES || !token.is_ascii() {
        return Err(malformed());
    }
    let bytes = (0..PAGE_TOKEN_BYTES)
        .map(|i| u8::from_str_radix(&token[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| malformed())?;
    let (id, fingerprint) = bytes.split_at(16);
    if fingerprint != filter_fingerprint(filter) {
        return Err(Error::invalid(
            "page_token",
            "was made for other filters; send the same filters as for the first page",
        ));
    }
    let id = uuid::Uuid::from_slice(id).map_err(|_| malformed())?;
    Ok(JobId::from(id))
}

/// A short hash of everything that decides which jobs a listing returns.
fn filter_fingerprint(filter: &ListFilter) -> [u8; 8] {
    let mut hasher = Sha256::new();
    for state in &filter.states {
        hasher.update([state_byte(*state)]);
    }
    hasher.update([0xff]);
    hasher.update(filter.function.as_deref().unwrap_or("").as_bytes());
    hasher.update([0]);
    for (key, value) in &filter.labels {
        hasher.update(key.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
        hasher.update([0]);
    }
    for time in [filter.submitted_after, filter.submitted_before] {
        match time {
            // At full precision: filters a nanosecond apart list different
            // jobs, so their pages must not be mixed.
            Some(t) => hasher.update(
                t.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
                    .to_le_bytes(),
            ),
            None => hasher.update([0xff; 17]),
        }
    }
    let digest = hasher.finalize();
    let mut out = [0; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// The wire's number of a state (1 to 5), for page-token fingerprints.
fn state_byte(state: JobState) -> u8 {
    u8::try_from(i32::from(pb::JobState::from(state))).unwrap_or(u8::MAX)
}

/// Job labels (`field`: `labels` or `worker_labels`): a bounded number of
/// them, keys of [A-Za-z0-9_.-/], values without control characters.
pub(crate) fn labels(
    raw: std::collections::HashMap<String, String>,
    field: &'static str,
) -> Result<BTreeMap<String, String>, Error> {
    if raw.len() > MAX_LABELS {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_LABELS} labels per job (got {})", raw.len()),
        ));
    }
    for (key, value) in &raw {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
        if !key_ok {
            return Err(Error::invalid(
                field,
                format!("key must be 1-{MAX_LABEL_KEY_LEN} characters of [A-Za-z0-9_.-/]"),
            ));
        }
        if value.len() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
            return Err(Error::invalid(
                field,
                format!(
                    "value of {key:?} must be at most {MAX_LABEL_VALUE_LEN} bytes with no control characters"
                ),
            ));
        }
    }
    Ok(raw.into_iter().collect())
}

/// The most functions one worker may declare.
pub(crate) const MAX_WORKER_FUNCTIONS: usize = 1000;
/// The most slots one worker may announce.
pub(crate) const MAX_WORKER_SLOTS: u32 = 10_000;
/// The longest worker instance, version or function description.
const MAX_WORKER_TEXT: usize = 1024;

/// A worker's attach: its name, instance, functions (with their schemas as
/// JSON; the engine compiles them), slots, labels, version, and the leases
/// it still holds after a reconnect.
pub(crate) fn worker_attach(
    attach: pb::Attach,
    peer: Option<std::net::SocketAddr>,
) -> Result<WorkerAttach, Error> {
    if !is_valid_function_name(&attach.name) {
        return Err(Error::invalid(
            "attach.name",
            format!("must be 1-{MAX_FUNCTION_NAME_LEN} characters of [A-Za-z0-9_.:-]"),
        ));
    }
    let printable = |text: &str| text.bytes().all(|b| b.is_ascii_graphic());
    if attach.instance.is_empty()
        || attach.instance.len() > MAX_WORKER_TEXT
        || !printable(&attach.instance)
    {
        return Err(Error::invalid(
            "attach.instance",
            format!("must be 1-{MAX_WORKER_TEXT} printable ASCII characters (e.g. a UUID)"),
        ));
    }
    if attach.version.len() > MAX_WORKER_TEXT || attach.version.chars().any(char::is_control) {
        return Err(Error::invalid(
            "attach.version",
            format!("must be at most {MAX_WORKER_TEXT} bytes with no control characters"),
        ));
    }
    if !(1..=MAX_WORKER_SLOTS).contains(&attach.slots) {
        return Err(Error::invalid(
            "attach.slots",
            format!("must be 1 to {MAX_WORKER_SLOTS} (got {})", attach.slots),
        ));
    }
    if attach.functions.is_empty() || attach.functions.len() > MAX_WORKER_FUNCTIONS {
        return Err(Error::invalid(
            "attach.functions",
            format!(
                "must declare 1 to {MAX_WORKER_FUNCTIONS} functions (got {})",
                attach.functions.len()
            ),
        ));
    }
    let mut names = HashSet::new();
    let mut functions = Vec::with_capacity(attach.functions.len());
    for declared in attach.functions {
        if !is_valid_function_name(&declared.name) {
            return Err(Error::invalid(
                "attach.functions.name",
                format!(
                    "{:?} is not 1-{MAX_FUNCTION_NAME_LEN} characters of [A-Za-z0-9_.:-]",
                    declared.name
                ),
            ));
        }
        if !names.insert(declared.name.clone()) {
            return Err(Error::invalid(
                "attach.functions.name",
                format!("{:?} is declared twice", declared.name),
            ));
        }
        for (field, text) in [
            ("attach.functions.description", &declared.description),
            ("attach.functions.returns", &declared.returns),
        ] {
            if text.len() > MAX_WORKER_TEXT {
                return Err(Error::invalid(
                    field,
                    format!("must be at most {MAX_WORKER_TEXT} bytes"),
                ));
            }
        }
        functions.push(DeclaredFunction {
            name: declared.name,
            description: declared.description,
            args_schema: declared.args_schema.map(value::to_json),
            returns: Some(declared.returns).filter(|r| !r.is_empty()),
            retry_safe: !declared.not_safe_to_retry,
        });
    }
    if attach.running.len() > usize::try_from(attach.slots).unwrap_or(usize::MAX) {
        return Err(Error::invalid(
            "attach.running",
            "holds more jobs than the worker has slots",
        ));
    }
    let running = attach
        .running
        .iter()
        .map(|held| {
            Ok(HeldLease {
                job: job_id(&held.job_id)?,
                attempt: held.attempt,
                token: held.fencing_token,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(WorkerAttach {
        name: attach.name,
        instance: attach.instance,
        functions,
        slots: attach.slots,
        labels: labels(attach.labels, "attach.labels")?,
        version: attach.version,
        running,
        peer,
    })
}

/// How a worker says a job ended.
pub(crate) fn worker_outcome(outcome: Option<pb::report::Outcome>) -> Result<Outcome, Error> {
    use pb::worker_failure::Kind;
    match outcome {
        Some(pb::report::Outcome::Value(value)) => Ok(Ok(value::to_json(value))),
        Some(pb::report::Outcome::Failure(failure)) => {
            let message = failure.message;
            Ok(Err(match Kind::try_from(failure.kind) {
                Ok(Kind::Retryable) => JobError::Retryable(message),
                Ok(Kind::Cancelled) => JobError::Cancelled,
                Ok(Kind::Panicked) => JobError::Panicked(message),
                Ok(Kind::TimedOut) => JobError::TimedOut(message),
                Ok(Kind::Failed | Kind::Unspecified) | Err(_) => JobError::Failed(message),
            }))
        }
        None => Err(Error::invalid(
            "report.outcome",
            "a report needs a value or a failure",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(f: impl FnOnce(&mut pb::SubmitRequest)) -> Result<SubmitSpec, Error> {
        let mut req = pb::SubmitRequest {
            function: "hello".into(),
            ..Default::default()
        };
        f(&mut req);
        SubmitSpec::try_from(Received(req, now()))
    }

    fn now() -> SystemTime {
        crate::Clock::system().now()
    }

    fn field_of(result: Result<SubmitSpec, Error>) -> &'static str {
        match result {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_map_start_is_checked_as_submit_and_its_bound_coerced() {
        let plan = |f: fn(&mut pb::MapStart)| {
            let mut start = pb::MapStart {
                function: "hello".into(),
                ..Default::default()
            };
            f(&mut start);
            MapPlan::try_from(Received(Some(start), now()))
        };
        let default = plan(|_| {}).unwrap();
        assert_eq!(default.max_in_flight, DEFAULT_MAP_IN_FLIGHT);
        assert!(!default.ordered);
        let coerced = plan(|s| s.max_in_flight = u32::MAX).unwrap();
        assert_eq!(coerced.max_in_flight, MAX_MAP_IN_FLIGHT);
        assert_eq!(plan(|s| s.max_in_flight = 7).unwrap().max_in_flight, 7);
        let template = plan(|s| {
            s.priority = -3;
            s.max_attempts = 2;
            s.labels.insert("k".into(), "v".into());
        })
        .unwrap()
        .template;
        assert_eq!((template.priority, template.max_attempts), (-3, 2));
        assert_eq!(template.labels.get("k").map(String::as_str), Some("v"));
        assert!(matches!(
            plan(|s| s.priority = 1001),
            Err(Error::InvalidArgument {
                field: "priority",
                ..
            })
        ));
        assert!(matches!(
            MapPlan::try_from(Received(None, now())),
            Err(Error::InvalidArgument { field: "start", .. })
        ));
        let again = pb::MapRequest {
            start: Some(pb::MapStart::default()),
            args: Vec::new(),
        };
        assert!(map_args(again).is_err());
    }

    #[test]
    fn accepts_a_minimal_submit() {
        let spec = submit(|_| {}).unwrap();
        assert_eq!(spec.function, "hello");
        assert_eq!(spec.args, serde_json::Value::Null);
        assert_eq!(spec.pool, None);
    }

    #[test]
    fn refuses_bad_fields_naming_them() {
        assert_eq!(field_of(submit(|r| r.function.clear())), "function");
        assert_eq!(field_of(submit(|r| r.function = "a b".into())), "function");
        assert_eq!(field_of(submit(|r| r.pool = "no pool".into())), "pool");
        assert_eq!(
            submit(|r| r.pool = "gpu".into()).unwrap().pool,
            Some(PoolName::from("gpu")),
            "a well-formed name is the engine's to judge"
        );
        assert_eq!(field_of(submit(|r| r.priority = 1001)), "priority");
        assert_eq!(field_of(submit(|r| r.priority = -1001)), "priority");
        assert_eq!(submit(|r| r.priority = -1000).unwrap().priority, -1000);
        let secs = |seconds| prost_types::Duration { seconds, nanos: 0 };
        assert_eq!(field_of(submit(|r| r.delay = Some(secs(-1)))), "delay");
        assert_eq!(
            field_of(submit(|r| r.delay = Some(secs(31 * 86_400)))),
            "delay"
        );
        assert_eq!(
            field_of(submit(|r| {
                r.delay = Some(secs(1));
                r.not_before = Some(now().into());
            })),
            "not_before"
        );
        assert!(
            submit(|r| r.delay = Some(secs(60)))
                .unwrap()
                .not_before
                .is_some()
        );
        assert_eq!(
            field_of(submit(|r| r.delay = Some(secs(i64::MAX)))),
            "delay"
        );
        assert_eq!(field_of(submit(|r| r.max_attempts = 101)), "max_attempts");
        assert_eq!(
            field_of(submit(|r| r.request_id = "x".repeat(129))),
            "request_id"
        );
        assert_eq!(
            field_of(submit(|r| r.request_id = "tab\there".into())),
            "request_id"
        );
        assert_eq!(
            field_of(submit(|r| {
                r.labels.insert(String::new(), "v".into());
            })),
            "labels"
        );
        assert_eq!(
            field_of(submit(|r| {
                r.labels.insert("k".into(), "line\nbreak".into());
            })),
            "labels"
        );
    }

    #[test]
    fn durations_reject_negative() {
        let neg = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert!(timeout("timeout", Some(neg)).is_err());
        for (seconds, nanos) in [(i64::MIN, 0), (0, i32::MIN), (i64::MIN, i32::MIN)] {
            let d = prost_types::Duration { seconds, nanos };
            assert!(timeout("timeout", Some(d)).is_err());
        }
        let half = prost_types::Duration {
            seconds: 0,
            nanos: 500_000_000,
        };
        assert_eq!(
            timeout("timeout", Some(half)).unwrap(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(timeout("timeout", None).unwrap(), None);
    }

    #[test]
    fn page_tokens_round_trip_and_bind_their_filters() {
        let filter = ListFilter {
            function: Some("hello".into()),
            ..ListFilter::default()
        };
        let last = JobId::new();
        let token = page_token(last, &filter);
        assert_eq!(parse_page_token(&token, &filter).unwrap(), last);
        assert!(parse_page_token(&token, &ListFilter::default()).is_err());
        for junk in [
            "",
            "x",
            &token[1..],
            &token.replace(|c: char| c.is_ascii_digit(), "g"),
        ] {
            assert!(parse_page_token(junk, &filter).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn page_sizes_default_coerce_and_refuse_negative() {
        let size = |page_size| {
            ListQuery::try_from(pb::ListJobsRequest {
                page_size,
                ..Default::default()
            })
            .map(|q| q.page_size)
        };
        assert_eq!(size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(size(7).unwrap(), 7);
        assert_eq!(size(5000).unwrap(), MAX_PAGE_SIZE);
        assert!(size(-1).is_err());
    }

    #[test]
    fn waits_deduplicate_and_are_bounded() {
        let id = JobId::new().to_string();
        let query = WaitQuery::try_from(pb::WaitRequest {
            job_ids: vec![id.clone(), id.clone()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(query.ids.len(), 1);
        assert_eq!(query.return_when, ReturnWhen::AllCompleted);
        let too_many = (0..=MAX_WAIT_IDS)
            .map(|_| JobId::new().to_string())
            .collect();
        for job_ids in [vec![], too_many] {
            let refused = WaitQuery::try_from(pb::WaitRequest {
                job_ids,
                ..Default::default()
            });
            assert!(refused.is_err());
        }
    }

    #[test]
    fn watches_take_ids_or_a_filter_and_resume_with_an_epoch() {
        let id = JobId::new().to_string();
        let spec = WatchSpec::try_from(pb::WatchRequest {
            job_ids: vec![id.clone(), id.clone()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(spec.ids.len(), 1);
        assert!(spec.resume.is_none());
        let field = |req: pb::WatchRequest| match WatchSpec::try_from(req) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        };
        let both = pb::WatchRequest {
            job_ids: vec![id],
            function: "noop".into(),
            ..Default::default()
        };
        assert_eq!(field(both), "job_ids");
        let no_epoch = pb::WatchRequest {
            after_seq: 5,
            ..Default::default()
        };
        assert_eq!(field(no_epoch), "stream_epoch");
        let bad_state = pb::WatchRequest {
            states: vec![99],
            ..Default::default()
        };
        assert_eq!(field(bad_state), "states");
        let too_many = pb::WatchRequest {
            job_ids: (0..=MAX_WATCH_IDS)
                .map(|_| JobId::new().to_string())
                .collect(),
            ..Default::default()
        };
        assert_eq!(field(too_many), "job_ids");
        let resume = WatchSpec::try_from(pb::WatchRequest {
            stream_epoch: "e".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(resume.resume, Some(("e".to_owned(), 0)));
    }

    #[test]
    fn ids_are_checked() {
        assert!(job_id("0190b5a4-7b1e-7000-8000-000000000000").is_ok());
        assert!(matches!(
            job_id(""),
            Err(Error::InvalidArgument {
                field: "job_id",
                ..
            })
        ));
    }
}

/// Property tests: request decoding never panics, whatever the wire holds,
/// and every refusal is `InvalidArgument` naming a field of the request;
/// what it accepts satisfies the rules. Cases: `PROPTEST_CASES` (default
/// 256).
#[cfg(test)]
mod properties {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// Strings that are often almost valid: near the length limits, with
    /// the allowed characters and a few hostile ones.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[A-Za-z0-9_.:/-]{0,130}",
            "[a-z\\x00\\t\\n é😀-]{0,20}",
            "[0-9a-f]{46,50}",
        ]
    }

    fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
        prop::option::of(
            prop_oneof![
                (any::<i64>(), any::<i32>()),
                (-5i64..100_000_000, -5i32..2_000_000_000),
            ]
            .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
        )
    }

    fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
        prop::option::of(
            prop_oneof![
                (any::<i64>(), any::<i32>()),
                (1_600_000_000i64..1_900_000_000, 0i32..1_000_000_000),
            ]
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
        )
    }

    /// A few arbitrary labels, or (cheaper to generate) about as many as
    /// the limit allows.
    fn labels() -> impl Strategy<Value = HashMap<String, String>> {
        prop_oneof![
            8 => prop::collection::hash_map(text(), text(), 0..4),
            1 => prop::collection::hash_map("[a-z]{1,8}", "[a-z]{0,8}", 60..70),
        ]
    }

    prop_compose! {
        fn submit_request()(
            function in text(),
            pool in prop_oneof![Just(String::new()), Just("async".to_owned()), text()],
            request_id in prop_oneof![Just(String::new()), text()],
            labels in labels(),
            worker_labels in labels(),
            priority in prop_oneof![any::<i32>(), -1001i32..=1001],
            delay in duration(),
            not_before in timestamp(),
            timeout in duration(),
            max_attempts in prop_oneof![any::<u32>(), 0u32..=101],
        ) -> pb::SubmitRequest {
            pb::SubmitRequest {
                function,
                args: None,
                pool,
                request_id,
                labels,
                worker_labels,
                priority,
                delay,
                not_before,
                timeout,
                max_attempts,
            }
        }
    }

    const SUBMIT_FIELDS: &[&str] = &[
        "function",
        "pool",
        "request_id",
        "labels",
        "worker_labels",
        "priority",
        "delay",
        "not_before",
        "timeout",
        "max_attempts",
    ];

    fn refused_field<T: std::fmt::Debug>(result: Result<T, Error>) -> Option<&'static str> {
        match result {
            Ok(_) => None,
            Err(Error::InvalidArgument { field, reason }) => {
                assert!(!reason.is_empty(), "{field}: empty reason");
                Some(field)
            }
            Err(other) => panic!("refused with {other:?}, not InvalidArgument"),
        }
    }

    proptest! {
        #[test]
        fn submit_decoding_never_panics_and_names_the_field(req in submit_request()) {
            let result = SubmitSpec::try_from(Received(req.clone(), crate::Clock::system().now()));
            if let Some(field) = refused_field(result.as_ref().map(drop).map_err(Clone::clone)) {
                prop_assert!(SUBMIT_FIELDS.contains(&field), "unknown field {}", field);
            }
            if let Ok(spec) = result {
                prop_assert!(is_valid_function_name(&spec.function));
                prop_assert!(PRIORITY_RANGE.contains(&spec.priority));
                prop_assert!(spec.max_attempts <= MAX_ATTEMPTS);
                prop_assert!(spec.labels.len() <= MAX_LABELS);
                prop_assert!(spec.timeout.is_none_or(|t| !t.is_zero() && t <= MAX_DELAY));
                prop_assert!(!(req.delay.is_some() && req.not_before.is_some()));
            }
        }

        #[test]
        fn wait_decoding_never_panics_and_names_the_field(
            job_ids in prop::collection::vec(
                prop_oneof![text(), Just(JobId::new().to_string())], 0..5),
            return_when in prop_oneof![any::<i32>(), 0i32..4],
            timeout in duration(),
        ) {
            let result = WaitQuery::try_from(pb::WaitRequest { job_ids, return_when, timeout });
            if let Some(field) = refused_field(result) {
                prop_assert!(["job_ids", "return_when", "timeout"].contains(&field));
            }
        }

        #[test]
        fn list_decoding_never_panics_and_names_the_field(
            page_size in any::<i32>(),
            page_token in prop_oneof![Just(String::new()), text()],
            states in prop::collection::vec(prop_oneof![any::<i32>(), 0i32..7], 0..4),
            function in prop_oneof![Just(String::new()), text()],
            labels in labels(),
            submitted_after in timestamp(),
            submitted_before in timestamp(),
        ) {
            let result = ListQuery::try_from(pb::ListJobsRequest {
                page_size,
                page_token,
                states,
                function,
                labels,
                submitted_after,
                submitted_before,
            });
            if let Some(field) = refused_field(result.as_ref().map(drop).map_err(Clone::clone)) {
                prop_assert!([
                    "page_size", "page_token", "states", "function", "labels",
                    "submitted_after", "submitted_before",
                ].contains(&field));
            }
            if let Ok(query) = result {
                prop_assert!((1..=MAX_PAGE_SIZE).contains(&query.page_size));
            }
        }

        #[test]
        fn job_ids_decode_without_panicking(raw in text()) {
            if let Some(field) = refused_field(job_id(&raw)) {
                prop_assert_eq!(field, "job_id");
            }
        }
    }
}
