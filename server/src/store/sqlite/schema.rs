//! The database schema and its migrations, applied in order on start.
//! `PRAGMA user_version` records how far a database has been migrated.

use rusqlite::Connection;

/// Each entry migrates from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: jobs, their transitions, tombstones of removed jobs, server metadata.
    "
    CREATE TABLE jobs (
        id           BLOB PRIMARY KEY,    -- UUIDv7, 16 bytes: inserts append
        function     TEXT NOT NULL,
        pool         INTEGER NOT NULL,    -- 1 async, 2 blocking
        state        INTEGER NOT NULL,    -- 1 pending .. 5 cancelled
        priority     INTEGER NOT NULL DEFAULT 0,
        args         TEXT NOT NULL,       -- JSON
        labels       TEXT,                -- JSON object, NULL when empty
        request_id   TEXT,
        fingerprint  BLOB,                -- of function + args, for idempotency
        submitted_at INTEGER NOT NULL,    -- microseconds since the epoch
        started_at   INTEGER,
        finished_at  INTEGER,
        attempt      INTEGER NOT NULL DEFAULT 0,
        crashes      INTEGER NOT NULL DEFAULT 0, -- boots that died while it ran
        boot         INTEGER,             -- the boot that last started it
        value        TEXT,                -- JSON result when succeeded
        error_kind   INTEGER,             -- 1 failed, 2 panicked, 3 cancelled, 4 interrupted
        error        TEXT
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX jobs_by_request_id ON jobs (request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX jobs_active ON jobs (state, priority DESC, id) WHERE state IN (1, 2);
    CREATE INDEX jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    -- Keyed by job, so one insert touches one B-tree and a job's history
    -- reads in order; ids are time-ordered, so inserts append.
    CREATE TABLE transitions (
        job_id  BLOB NOT NULL,
        at      INTEGER NOT NULL,
        state   INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        PRIMARY KEY (job_id, at, state)
    ) WITHOUT ROWID;
    CREATE TABLE tombstones (
        id     BLOB PRIMARY KEY,
        reason INTEGER NOT NULL,          -- 1 expired, 2 deleted
        at     INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX tombstones_by_time ON tombstones (at);
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('boot', 0);
    ",
    // 2: ListJobs. Newest-first pages filtered by function walk this in id
    // order instead of scanning every job; unfiltered pages use the primary
    // key, pending/running filters the `jobs_active` index. There is no
    // index on state alone: every transition would pay to move the job in
    // it, and the terminal states are most of the table anyway.
    "
    CREATE INDEX jobs_by_function ON jobs (function, id);
    ",
    // 3: job options. `not_before` (microseconds since the epoch, NULL for
    // "at once") so that recovery schedules a delayed job again instead of
    // starting it early; `timeout_us` (NULL for none) so that a recovered job
    // keeps its running-time limit; `max_attempts` (NULL for 1) so that it
    // keeps its retries.
    "
    ALTER TABLE jobs ADD COLUMN not_before INTEGER;
    ALTER TABLE jobs ADD COLUMN timeout_us INTEGER;
    ALTER TABLE jobs ADD COLUMN max_attempts INTEGER;
    ",
];

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SchemaError {
    #[error(
        "the database is at schema version {found}, newer than this jobd knows ({known}); upgrade jobd"
    )]
    TooNew { found: i64, known: i64 },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// Applies the missing migrations in one transaction each.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), SchemaError> {
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(SchemaError::TooNew { found, known });
    }
    for (version, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(version + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
        tracing::info!(version = version + 1, "migrated the job database");
    }
    Ok(())
}
