//! Read connections for jobs that are no longer in the live table (finished
//! and evicted, or from before a restart), and for listings, which need
//! every job. SQLite in WAL mode lets readers
//! run beside the writer; each query runs on the blocking thread pool behind
//! a semaphore, never on the async workers.

use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use jobd_proto::JobId;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, types::Value};
use tokio::sync::Semaphore;

use super::codec::{
    RECORD_COLUMNS, gone_from_reason, id_bytes, log_entry_from_row, log_offset, micros,
    record_from_row, state_code,
};
use crate::{
    clock::micros_ceil,
    job::{JobRecord, LogEntry},
    store::{Gone, ListFilter, MAX_LOG_ENTRY, StoreError},
};

/// What the database knows about an id.
pub(crate) enum Lookup {
    Job(Box<JobRecord>),
    Gone(Gone),
    Unknown,
}

pub(crate) struct Reader {
    conns: Vec<Arc<Mutex<Connection>>>,
    permits: Semaphore,
}

impl Reader {
    pub(crate) fn open(path: &Path, count: usize) -> rusqlite::Result<Self> {
        let conns = (0..count)
            .map(|_| {
                let conn = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                Ok(Arc::new(Mutex::new(conn)))
            })
            .collect::<rusqlite::Result<_>>()?;
        Ok(Self {
            conns,
            permits: Semaphore::new(count),
        })
    }

    pub(crate) async fn lookup(&self, id: JobId) -> Result<Lookup, StoreError> {
        self.run(move |conn| lookup(conn, id)).await
    }

    /// The entries of `id`'s log that end after `from`, up to about
    /// `max_bytes` (at least one, when there is one).
    pub(crate) async fn log(
        &self,
        id: JobId,
        from: u64,
        max_bytes: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        self.run(move |conn| log(conn, id, from, max_bytes)).await
    }

    /// Where `id`'s log ends on disk.
    pub(crate) async fn log_end(&self, id: JobId) -> Result<u64, StoreError> {
        self.run(move |conn| {
            conn.prepare_cached(
                "SELECT MAX(offset + length(data)) FROM job_logs WHERE job_id = ?1",
            )?
            .query_row([id_bytes(id)], |row| row.get::<_, Option<i64>>(0))
            .map(|end| end.map_or(0, |end| u64::try_from(end).unwrap_or(0)))
        })
        .await
    }

    /// The newest `limit` jobs on disk that match `filter` (as stored: a
    /// claim may not be written yet) with ids below `before`, newest first.
    pub(crate) async fn list(
        &self,
        filter: ListFilter,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        self.run(move |conn| list(conn, &filter, before, limit))
            .await
    }

    /// Runs `query` on a free read connection, on the blocking thread pool.
    async fn run<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        // With a permit held, some connection is free; take the first one
        // whose lock is not held.
        let conn = self
            .conns
            .iter()
            .find_map(|c| c.try_lock().ok().map(|_| Arc::clone(c)))
            .unwrap_or_else(|| Arc::clone(&self.conns[0]));
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            query(&conn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("store reader failed: {e}")))?
        .map_err(|e| StoreError::from_sqlite(&e))
    }
}

/// Builds the listing query from the filter: only the conditions given, all
/// as bound parameters. Ordered by the primary key, so without filters it is
/// a range scan that stops after `limit` rows; the function and state
/// filters have indexes of their own (migration 2).
fn list(
    conn: &Connection,
    filter: &ListFilter,
    before: Option<JobId>,
    limit: usize,
) -> rusqlite::Result<Vec<JobRecord>> {
    let mut sql = format!("SELECT {RECORD_COLUMNS} FROM jobs WHERE 1 = 1");
    let mut params: Vec<Value> = Vec::new();
    if let Some(before) = before {
        sql.push_str(" AND id < ?");
        params.push(Value::Blob(id_bytes(before).to_vec()));
    }
    if !filter.states.is_empty() {
        let marks = vec!["?"; filter.states.len()].join(", ");
        sql.push_str(&format!(" AND state IN ({marks})"));
        params.extend(filter.states.iter().map(|&s| Value::Integer(state_code(s))));
    }
    if let Some(function) = &filter.function {
        sql.push_str(" AND function = ?");
        params.push(Value::Text(function.clone()));
    }
    for (key, value) in &filter.labels {
        // Label keys are [A-Za-z0-9_.-/] (checked at decode), so quoting the
        // key in the JSON path is enough.
        sql.push_str(" AND json_extract(labels, ?) = ?");
        params.push(Value::Text(format!("$.\"{key}\"")));
        params.push(Value::Text(value.clone()));
    }
    // Stored times are whole microseconds, filter times may have
    // nanoseconds: `s > t` is `s > floor(t)`, and `s < t` is `s < ceil(t)`,
    // so the database matches exactly what `ListFilter::matches` does.
    if let Some(after) = filter.submitted_after {
        sql.push_str(" AND submitted_at > ?");
        params.push(Value::Integer(micros(after)));
    }
    if let Some(before) = filter.submitted_before {
        sql.push_str(" AND submitted_at < ?");
        params.push(Value::Integer(micros_ceil(before)));
    }
    sql.push_str(" ORDER BY id DESC LIMIT ?");
    params.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
    conn.prepare_cached(&sql)?
        .query_map(rusqlite::params_from_iter(params), record_from_row)?
        .collect()
}

fn log(
    conn: &Connection,
    id: JobId,
    from: u64,
    max_bytes: usize,
) -> rusqlite::Result<Vec<LogEntry>> {
    // An entry holds at most MAX_LOG_ENTRY bytes: one that ends after `from`
    // starts after this.
    let earliest = from.saturating_sub(MAX_LOG_ENTRY as u64);
    let mut statement = conn.prepare_cached(
        "SELECT offset, attempt, stream, at, data FROM job_logs \
         WHERE job_id = ?1 AND offset >= ?2 ORDER BY offset",
    )?;
    let mut rows = statement.query(rusqlite::params![id_bytes(id), log_offset(earliest)])?;
    let mut entries = Vec::new();
    let mut bytes = 0;
    while let Some(row) = rows.next()? {
        let entry = log_entry_from_row(row)?;
        if entry.end() <= from {
            continue;
        }
        if !entries.is_empty() && bytes + entry.data.len() > max_bytes {
            break;
        }
        bytes += entry.data.len();
        entries.push(entry);
    }
    Ok(entries)
}

fn lookup(conn: &Connection, id: JobId) -> rusqlite::Result<Lookup> {
    let key = id_bytes(id);
    let record = conn
        .prepare_cached(&format!("SELECT {RECORD_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([key], record_from_row)
        .optional()?;
    if let Some(record) = record {
        return Ok(Lookup::Job(Box::new(record)));
    }
    let reason: Option<i64> = conn
        .prepare_cached("SELECT reason FROM tombstones WHERE id = ?1")?
        .query_row([key], |row| row.get(0))
        .optional()?;
    Ok(reason.map_or(Lookup::Unknown, |reason| {
        Lookup::Gone(gone_from_reason(reason))
    }))
}
