//! How job records map to SQLite columns: states, pools and error kinds as
//! small integers with names of their own (the disk format, fixed apart from
//! the wire's numbering), times as microseconds since the Unix epoch, values
//! as JSON text. One place, so the writer, the reader and recovery agree.

use std::time::{Duration, SystemTime};

use jobd_proto::{JobId, JobState};
use rusqlite::{Row, types::ValueRef};

pub(crate) use crate::clock::{from_micros, micros};
use crate::{
    job::{JobError, JobRecord, Outcome, PoolName},
    store::Gone,
};

/// A job's state as stored. These numbers are the disk format: they match
/// the wire's numbering of the day they were fixed, and never follow it.
pub(crate) mod stored_state {
    pub(crate) const PENDING: i64 = 1;
    pub(crate) const RUNNING: i64 = 2;
    pub(crate) const SUCCEEDED: i64 = 3;
    pub(crate) const FAILED: i64 = 4;
    pub(crate) const CANCELLED: i64 = 5;
}

/// The columns `record_from_row` reads, in order.
pub(crate) const RECORD_COLUMNS: &str = "id, function, pool, state, args, labels, request_id, \
     submitted_at, started_at, finished_at, attempt, value, error_kind, error, priority, not_before, timeout_us, \
     max_attempts, retry_safe, worker_labels";

/// The tombstone reason of a job removed by retention.
pub(crate) const TOMBSTONE_EXPIRED: i64 = 1;
/// The tombstone reason of a job deleted by a client.
pub(crate) const TOMBSTONE_DELETED: i64 = 2;

/// Why a job is gone, from its tombstone's reason code.
pub(crate) fn gone_from_reason(reason: i64) -> Gone {
    match reason {
        TOMBSTONE_DELETED => Gone::Deleted,
        // Expired, and any code a newer jobd may add: the job is gone either
        // way, and "expired" is the historical meaning.
        _ => Gone::Expired,
    }
}

pub(crate) fn state_code(state: JobState) -> i64 {
    match state {
        JobState::Pending => stored_state::PENDING,
        JobState::Running => stored_state::RUNNING,
        JobState::Succeeded => stored_state::SUCCEEDED,
        JobState::Failed => stored_state::FAILED,
        JobState::Cancelled => stored_state::CANCELLED,
    }
}

pub(crate) fn state_from_code(code: i64) -> rusqlite::Result<JobState> {
    Ok(match code {
        stored_state::PENDING => JobState::Pending,
        stored_state::RUNNING => JobState::Running,
        stored_state::SUCCEEDED => JobState::Succeeded,
        stored_state::FAILED => JobState::Failed,
        stored_state::CANCELLED => JobState::Cancelled,
        other => return Err(bad_value(format!("unknown job state code {other}"))),
    })
}

/// The two original pools are stored as small integers (1 async, 2
/// blocking); any other pool by its name.
pub(crate) fn pool_value(pool: &PoolName) -> rusqlite::types::Value {
    use rusqlite::types::Value;
    match pool.as_str() {
        "async" => Value::Integer(1),
        "blocking" => Value::Integer(2),
        name => Value::Text(name.to_owned()),
    }
}

fn pool_from_value(value: ValueRef<'_>) -> rusqlite::Result<PoolName> {
    match value {
        ValueRef::Integer(1) => Ok(PoolName::from("async")),
        ValueRef::Integer(2) => Ok(PoolName::from("blocking")),
        ValueRef::Text(name) => std::str::from_utf8(name)
            .map(PoolName::from)
            .map_err(|e| bad_value(format!("bad pool name: {e}"))),
        other => Err(bad_value(format!("unknown pool {other:?}"))),
    }
}

/// `(value, error_kind, error_message)` columns for an outcome.
pub(crate) fn outcome_columns(outcome: &Outcome) -> (Option<String>, Option<i64>, Option<String>) {
    match outcome {
        Ok(value) => (Some(json_text(value)), None, None),
        Err(err) => {
            let (kind, message) = match err {
                JobError::Failed(m) => (1, m.as_str()),
                JobError::Panicked(m) => (2, m.as_str()),
                JobError::Cancelled => (3, ""),
                JobError::Interrupted(m) => (4, m.as_str()),
                JobError::TimedOut(m) => (5, m.as_str()),
                JobError::Retryable(m) => (6, m.as_str()),
                JobError::ResultTooLarge(m) => (7, m.as_str()),
                JobError::WorkerLost(m) => (8, m.as_str()),
            };
            (None, Some(kind), Some(message.to_owned()))
        }
    }
}

fn outcome_from_columns(
    value: Option<String>,
    kind: Option<i64>,
    message: Option<String>,
) -> rusqlite::Result<Option<Outcome>> {
    Ok(match (value, kind) {
        (Some(json), _) => Some(Ok(parse_json(&json)?)),
        (None, Some(kind)) => {
            let message = message.unwrap_or_default();
            Some(Err(match kind {
                1 => JobError::Failed(message),
                2 => JobError::Panicked(message),
                3 => JobError::Cancelled,
                4 => JobError::Interrupted(message),
                5 => JobError::TimedOut(message),
                6 => JobError::Retryable(message),
                7 => JobError::ResultTooLarge(message),
                8 => JobError::WorkerLost(message),
                other => return Err(bad_value(format!("unknown error kind {other}"))),
            }))
        }
        (None, None) => None,
    })
}

/// One state change as the `history` column keeps it: `state,attempt,at;`
/// (state code, attempt, microseconds since the epoch). A job's history is
/// its entries in order, appended by the same statement that changes its
/// state, so it costs no B-tree write of its own.
pub(crate) fn history_entry(state: JobState, attempt: u32, at: SystemTime) -> String {
    let mut entry = String::with_capacity(24);
    push_history_entry(&mut entry, state, attempt, at);
    entry
}

/// Appends one [`history_entry`] to `out`. `itoa`, not `format!`: the
/// writer makes two or three of these per job.
pub(crate) fn push_history_entry(out: &mut String, state: JobState, attempt: u32, at: SystemTime) {
    let mut digits = itoa::Buffer::new();
    out.push_str(digits.format(state_code(state)));
    out.push(',');
    out.push_str(digits.format(attempt));
    out.push(',');
    out.push_str(digits.format(micros(at)));
    out.push(';');
}

/// A JSON value as the text the database keeps. Straight to a string, not
/// through `Display` and its formatter.
pub(crate) fn json_text(value: &serde_json::Value) -> String {
    // A `Value` always serialises: its map keys are strings.
    serde_json::to_string(value).unwrap_or_default()
}

/// A job's state changes, oldest first, from its `history` column.
#[cfg(test)]
pub(crate) fn parse_history(text: &str) -> rusqlite::Result<Vec<(JobState, u32, SystemTime)>> {
    text.split_terminator(';')
        .map(|entry| {
            let mut fields = entry.split(',').map(str::parse::<i64>);
            match (fields.next(), fields.next(), fields.next(), fields.next()) {
                (Some(Ok(state)), Some(Ok(attempt)), Some(Ok(at)), None) => Ok((
                    state_from_code(state)?,
                    u32::try_from(attempt).map_err(|e| bad_value(e.to_string()))?,
                    from_micros(at),
                )),
                _ => Err(bad_value(format!("bad history entry {entry:?}"))),
            }
        })
        .collect()
}

pub(crate) fn id_bytes(id: JobId) -> [u8; 16] {
    *id.as_uuid().as_bytes()
}

/// The smallest id minted in the millisecond after `t`'s: every UUIDv7
/// minted at or before `t` sorts below it, as bytes.
pub(crate) fn first_id_after(t: SystemTime) -> [u8; 16] {
    let ms = u64::try_from(micros(t) / 1000)
        .unwrap_or(0)
        .saturating_add(1)
        .min((1 << 48) - 1);
    let mut id = [0; 16];
    id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    id
}

pub(crate) fn id_from_bytes(bytes: &[u8]) -> rusqlite::Result<JobId> {
    uuid::Uuid::from_slice(bytes)
        .map(JobId::from)
        .map_err(|e| bad_value(format!("bad job id in the database: {e}")))
}

pub(crate) fn labels_json(labels: &std::collections::BTreeMap<String, String>) -> Option<String> {
    (!labels.is_empty()).then(|| serde_json::to_string(labels).unwrap_or_default())
}

/// Reads a row selected with [`RECORD_COLUMNS`].
pub(crate) fn record_from_row(row: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let id: Vec<u8> = row.get(0)?;
    let function: String = row.get(1)?;
    let labels: Option<String> = row.get(5)?;
    Ok(JobRecord {
        id: id_from_bytes(&id)?,
        function: function.into(),
        pool: pool_from_value(row.get_ref(2)?)?,
        state: state_from_code(row.get(3)?)?,
        args: parse_json(&row.get::<_, String>(4)?)?,
        labels: match labels {
            Some(json) => serde_json::from_str(&json).map_err(|e| bad_value(e.to_string()))?,
            None => std::collections::BTreeMap::new(),
        },
        request_id: row.get(6)?,
        submitted_at: from_micros(row.get(7)?),
        started_at: row.get::<_, Option<i64>>(8)?.map(from_micros),
        finished_at: row.get::<_, Option<i64>>(9)?.map(from_micros),
        attempt: row.get(10)?,
        outcome: outcome_from_columns(row.get(11)?, row.get(12)?, row.get(13)?)?,
        priority: row.get(14)?,
        not_before: row.get::<_, Option<i64>>(15)?.map(from_micros),
        timeout: row
            .get::<_, Option<i64>>(16)?
            .map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(0))),
        max_attempts: row.get::<_, Option<u32>>(17)?.unwrap_or(1).max(1),
        retry_safe: row.get(18)?,
        worker_labels: match row.get::<_, Option<String>>(19)? {
            Some(json) => serde_json::from_str(&json).map_err(|e| bad_value(e.to_string()))?,
            None => std::collections::BTreeMap::new(),
        },
        // Progress is never written to disk.
        progress: None,
    })
}

fn parse_json(text: &str) -> rusqlite::Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| bad_value(format!("bad JSON in the database: {e}")))
}

fn bad_value(message: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for s in [
            JobState::Pending,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(state_from_code(state_code(s)).unwrap(), s);
        }
        for outcome in [
            Ok(serde_json::json!({"a": 1})),
            Err(JobError::Failed("f".into())),
            Err(JobError::Panicked("p".into())),
            Err(JobError::Cancelled),
            Err(JobError::Interrupted("i".into())),
            Err(JobError::TimedOut("t".into())),
            Err(JobError::Retryable("r".into())),
            Err(JobError::ResultTooLarge("big".into())),
            Err(JobError::WorkerLost("gone".into())),
        ] {
            let (v, k, m) = outcome_columns(&outcome);
            assert_eq!(outcome_from_columns(v, k, m).unwrap(), Some(outcome));
        }
        let t = std::time::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(from_micros(micros(t)), t);
        for pool in ["async", "blocking", "gpu"] {
            let value = pool_value(&PoolName::from(pool));
            let back = pool_from_value(ValueRef::from(&value)).unwrap();
            assert_eq!(back.as_str(), pool);
        }
    }

    #[test]
    fn history_entries_round_trip_in_order() {
        let t = std::time::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let text = [
            history_entry(JobState::Pending, 0, t),
            history_entry(JobState::Running, 1, t + Duration::from_micros(7)),
            history_entry(JobState::Succeeded, 1, t + Duration::from_secs(2)),
        ]
        .concat();
        assert_eq!(
            parse_history(&text).unwrap(),
            vec![
                (JobState::Pending, 0, t),
                (JobState::Running, 1, t + Duration::from_micros(7)),
                (JobState::Succeeded, 1, t + Duration::from_secs(2)),
            ]
        );
        assert!(parse_history("").unwrap().is_empty());
        assert!(parse_history("3,1;").is_err());
        assert!(parse_history("9,1,5;").is_err());
    }
}
