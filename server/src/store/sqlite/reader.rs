//! Read connections for jobs that are no longer in the live table (finished
//! and evicted, or from before a restart). SQLite in WAL mode lets readers
//! run beside the writer; each query runs on the blocking thread pool behind
//! a semaphore, never on the async workers.

use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use jobd_proto::JobId;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _};
use tokio::sync::Semaphore;

use super::codec::{RECORD_COLUMNS, id_bytes, record_from_row};
use crate::{
    job::JobRecord,
    store::{Gone, StoreError},
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
            lookup(&conn, id)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("store reader failed: {e}")))?
        .map_err(|e| StoreError::from_sqlite(&e))
    }
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
    Ok(match reason {
        Some(2) => Lookup::Gone(Gone::Deleted),
        Some(_) => Lookup::Gone(Gone::Expired),
        None => Lookup::Unknown,
    })
}
