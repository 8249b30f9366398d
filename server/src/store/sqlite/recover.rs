//! Recovery at start: every job that was unfinished when the previous run
//! ended gets a fate, so none stays RUNNING forever.
//!
//! - PENDING jobs run again, in their original priority/submission order.
//! - RUNNING jobs under a lease that outlives the process (a remote
//!   worker's) stay running under that lease, which lapses unless its
//!   holder re-attaches and renews it.
//! - Other RUNNING jobs lost their attempt with the process (a claim is only
//!   ever written by a run that is now gone): re-queued for the next attempt, or
//!   FAILED when the job is not safe to retry, or FAILED as a poison pill
//!   once the process has died [`POISON_LIMIT`] times in a row while running
//!   it (see [`lost_attempt`]).

use std::time::{Duration, SystemTime};

use jobd_proto::JobState;
use rusqlite::{Connection, params};

use super::codec::{
    RECORD_COLUMNS, history_entry, id_bytes, micros, record_from_row, state_code, stored_state,
};
#[cfg(doc)]
use crate::store::live::table::POISON_LIMIT;
use crate::{
    job::JobRecord,
    store::{
        FencingToken, LeaseHolder,
        live::table::{LostTo, lost_attempt},
    },
};

/// What the previous run left behind.
pub(crate) struct Recovered {
    /// This run's boot number (1 for a new database).
    pub(crate) boot: i64,
    /// Jobs to queue again, in queue order, each with the attempts it lost
    /// in a row so far.
    pub(crate) pending: Vec<(JobRecord, u32)>,
    /// Jobs still running under a lease that outlives the process (a
    /// remote worker's), which its holder may renew by re-attaching.
    pub(crate) running: Vec<RunningLease>,
    /// How many interrupted jobs were re-queued, failed as not safe to
    /// retry, and failed as poison pills.
    pub(crate) requeued: usize,
    pub(crate) failed_unsafe: usize,
    pub(crate) poisoned: usize,
}

/// A job left running under a lease that outlives the process.
pub(crate) struct RunningLease {
    pub(crate) record: JobRecord,
    pub(crate) lost: u32,
    pub(crate) token: FencingToken,
    pub(crate) holder: LeaseHolder,
    pub(crate) ttl: Duration,
}

pub(crate) fn recover(conn: &mut Connection, now: SystemTime) -> rusqlite::Result<Recovered> {
    let tx = conn.transaction()?;
    tx.execute("UPDATE meta SET value = value + 1 WHERE key = 'boot'", [])?;
    let boot: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'boot'", [], |r| {
        r.get(0)
    })?;

    type Row = (JobRecord, u32, Option<i64>, Option<String>, Option<i64>);
    let mut rows: Vec<Row> = tx
        .prepare(&format!(
            "SELECT {RECORD_COLUMNS}, crashes, lease, holder, lease_ttl_ms FROM jobs \
             WHERE state IN ({}, {}) ORDER BY priority DESC, id",
            stored_state::PENDING,
            stored_state::RUNNING
        ))?
        .query_map([], |row| {
            Ok((
                record_from_row(row)?,
                row.get::<_, u32>(20)?,
                row.get(21)?,
                row.get(22)?,
                row.get(23)?,
            ))
        })?
        .collect::<Result<_, _>>()?;

    let mut recovered = Recovered {
        boot,
        pending: Vec::with_capacity(rows.len()),
        running: Vec::new(),
        requeued: 0,
        failed_unsafe: 0,
        poisoned: 0,
    };
    for (mut record, mut crashes, lease, holder, ttl) in rows.drain(..) {
        if record.state == JobState::Running
            && let (Some(token), Some(holder), Some(ttl)) = (lease, holder, ttl)
        {
            // Held by a process that did not die with this one: it may
            // re-attach and renew its lease before the lease lapses.
            recovered.running.push(RunningLease {
                record,
                lost: crashes,
                token: FencingToken(u64::try_from(token).unwrap_or(0)),
                holder: holder.into(),
                ttl: Duration::from_millis(u64::try_from(ttl).unwrap_or(0)),
            });
            continue;
        }
        if record.state == JobState::Running {
            crashes += 1;
            let key = id_bytes(record.id);
            if let Some(message) = lost_attempt(crashes, record.retry_safe, LostTo::Restart) {
                if record.retry_safe {
                    recovered.poisoned += 1;
                } else {
                    recovered.failed_unsafe += 1;
                }
                tx.execute(
                    &format!(
                        "UPDATE jobs SET state = ?1, finished_at = ?2, error_kind = 4, error = ?3, \
                         crashes = ?4, history = history || ?5 WHERE id = ?6 AND state = {}",
                        stored_state::RUNNING
                    ),
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
                &format!(
                    "UPDATE jobs SET state = {}, crashes = ?1, history = history || ?2 \
                     WHERE id = ?3 AND state = {}",
                    stored_state::PENDING,
                    stored_state::RUNNING
                ),
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
        recovered.pending.push((record, crashes));
    }
    tx.commit()?;
    Ok(recovered)
}
