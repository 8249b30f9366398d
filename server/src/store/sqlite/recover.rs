//! Recovery at start: every job that was unfinished when the previous run
//! ended gets a fate, so none stays RUNNING forever.
//!
//! - PENDING jobs run again, in their original priority/submission order.
//! - RUNNING jobs were interrupted by the crash (a claim is only ever written
//!   by a run that is now gone): re-queued with the next attempt, or FAILED
//!   "interrupted by restart" for functions registered as not safe to retry,
//!   or FAILED as a poison pill once the process has died
//!   [`POISON_LIMIT`] times in a row while running the job.

use std::time::SystemTime;

use jobd_proto::JobState;
use rusqlite::{Connection, params};

use super::codec::{RECORD_COLUMNS, history_entry, id_bytes, micros, record_from_row, state_code};
use crate::{function::Registry, job::JobRecord};

/// Crashes while running one job before it is failed as a poison pill.
pub const POISON_LIMIT: u32 = 3;

/// What the previous run left behind.
pub(crate) struct Recovered {
    /// This run's boot number (1 for a new database).
    pub(crate) boot: i64,
    /// Jobs to queue again, in queue order.
    pub(crate) pending: Vec<JobRecord>,
    /// How many interrupted jobs were re-queued, failed as not safe to
    /// retry, and failed as poison pills.
    pub(crate) requeued: usize,
    pub(crate) failed_unsafe: usize,
    pub(crate) poisoned: usize,
}

pub(crate) fn recover(conn: &mut Connection, registry: &Registry) -> rusqlite::Result<Recovered> {
    let tx = conn.transaction()?;
    tx.execute("UPDATE meta SET value = value + 1 WHERE key = 'boot'", [])?;
    let boot: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'boot'", [], |r| {
        r.get(0)
    })?;

    let mut rows: Vec<(JobRecord, u32)> = tx
        .prepare(&format!(
            "SELECT {RECORD_COLUMNS}, crashes FROM jobs WHERE state IN (1, 2) \
             ORDER BY priority DESC, id"
        ))?
        .query_map([], |row| {
            Ok((record_from_row(row)?, row.get::<_, u32>(18)?))
        })?
        .collect::<Result<_, _>>()?;

    let now = SystemTime::now();
    let mut recovered = Recovered {
        boot,
        pending: Vec::with_capacity(rows.len()),
        requeued: 0,
        failed_unsafe: 0,
        poisoned: 0,
    };
    for (mut record, crashes) in rows.drain(..) {
        if record.state == JobState::Running {
            let crashes = crashes + 1;
            let verdict = if crashes >= POISON_LIMIT {
                recovered.poisoned += 1;
                Some(format!(
                    "poison pill: the server died {crashes} times in a row while running this job"
                ))
            } else if registry
                .get(&record.function)
                .is_some_and(|f| !f.retry_safe())
            {
                recovered.failed_unsafe += 1;
                Some(
                    "interrupted by restart; the function is registered as not safe to retry"
                        .to_owned(),
                )
            } else {
                None
            };
            let key = id_bytes(record.id);
            if let Some(message) = verdict {
                tx.execute(
                    "UPDATE jobs SET state = ?1, finished_at = ?2, error_kind = 4, error = ?3, \
                     crashes = ?4, history = history || ?5 WHERE id = ?6",
                    params![
                        state_code(JobState::Failed),
                        micros(now),
                        message,
                        crashes,
                        history_entry(JobState::Failed, record.attempt, now),
                        key
                    ],
                )?;
                continue;
            }
            tx.execute(
                "UPDATE jobs SET state = 1, crashes = ?1, history = history || ?2 WHERE id = ?3",
                params![
                    crashes,
                    history_entry(JobState::Pending, record.attempt, now),
                    key
                ],
            )?;
            recovered.requeued += 1;
            record.state = JobState::Pending;
            record.started_at = None;
        }
        recovered.pending.push(record);
    }
    tx.commit()?;
    Ok(recovered)
}
