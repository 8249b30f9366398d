//! The durable embedded store: SQLite (bundled), WAL mode,
//! `synchronous=FULL`, in a data directory locked by one jobd at a time.
//!
//! Writes go through the group-committing [`writer`]; reads of jobs that are
//! not in the live table go through the [`reader`] connections; [`recover`]
//! runs once at start and decides the fate of every unfinished job.

mod codec;
mod reader;
mod recover;
mod schema;
mod writer;

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use rusqlite::Connection;

pub use self::recover::POISON_LIMIT;
pub(crate) use self::{
    reader::{Lookup, Reader},
    recover::Recovered,
    writer::{Deleted, Inserted, NewJob, Publish, Writer},
};
use super::{StoreError, TestKnobs};
use crate::function::Registry;

/// The database file inside the data directory.
pub const DB_FILE: &str = "jobd.sqlite3";
/// The lock file that keeps a second jobd out of the data directory.
pub const LOCK_FILE: &str = "jobd.lock";
/// Read connections for jobs not held in memory.
const READERS: usize = 2;

pub(crate) struct SqliteStore {
    pub(crate) writer: Writer,
    pub(crate) reader: Reader,
    pub(crate) path: PathBuf,
    /// Held for the life of the process: the advisory lock on the data dir.
    _lock: File,
}

/// Opens (creating if needed) the store in `dir`, migrates it, and recovers
/// unfinished jobs from the previous run.
pub(crate) fn open(
    dir: &Path,
    registry: &Registry,
    testing: TestKnobs,
    table: std::sync::Arc<super::table::JobTable>,
) -> Result<(SqliteStore, Recovered), StoreError> {
    let data_dir_error = |action: &str, err: std::io::Error| StoreError::DataDir {
        path: dir.to_owned(),
        message: format!("{action}: {err}"),
    };
    std::fs::create_dir_all(dir).map_err(|e| data_dir_error("cannot create it", e))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| data_dir_error("cannot create its lock file", e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(StoreError::Locked(dir.to_owned()));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(data_dir_error("cannot lock it", e)),
    }

    let path = dir.join(DB_FILE);
    let open_error = |err: &dyn std::fmt::Display| StoreError::Open {
        path: path.clone(),
        message: err.to_string(),
    };
    let mut conn = Connection::open(&path).map_err(|e| open_error(&e))?;
    configure(&conn).map_err(|e| open_error(&e))?;
    schema::migrate(&mut conn).map_err(|e| open_error(&e))?;
    let recovered = recover::recover(&mut conn, registry).map_err(|e| open_error(&e))?;
    if let Some(pages) = testing.max_db_pages {
        conn.pragma_update(
            None,
            "max_page_count",
            i64::try_from(pages).unwrap_or(i64::MAX),
        )
        .map_err(|e| open_error(&e))?;
    }
    let reader = Reader::open(&path, READERS).map_err(|e| open_error(&e))?;
    let writer =
        Writer::spawn(conn, recovered.boot, testing.ack_before_commit, table).map_err(|e| {
            StoreError::Open {
                path: path.clone(),
                message: format!("cannot start the writer thread: {e}"),
            }
        })?;
    Ok((
        SqliteStore {
            writer,
            reader,
            path,
            _lock: lock,
        },
        recovered,
    ))
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // Reading the journal mode back also proves the file is a database: a
    // corrupt or foreign file fails here, before anything is written.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, expected wal"
        )));
    }
    // FULL: every commit is fsynced, so an acknowledged job survives a power
    // cut, not just a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Checkpointing every ~40 MiB of WAL instead of every 4 MiB copies a
    // page that many commits touched once instead of many times.
    //
    // The page cache is 8 MiB, not more: the writer touches only the right
    // edges of its B-trees, and a bigger cache costs every commit time. A
    // page split that reorders pages swaps their numbers through a spare one
    // past the 1 GiB lock-byte page; while the file is smaller than that,
    // the end of the transaction then walks the cache's whole hash table to
    // drop pages "past the end of the file". With 64 MiB that walk was ~10%
    // of the writer's time in `jobctl bench --mode submit`.
    conn.pragma_update(None, "cache_size", -8 * 1024)?;
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    // No integrity check here: `quick_check` reads every page, which would
    // make start-up grow with history. Corruption surfaces as an error on the
    // first read or write that meets it, and then fails stop.
    Ok(())
}
