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
    // 4: a job's transitions move into its own row, as `history` text
    // (`state,attempt,at;` per change, oldest first; see `codec`). Every
    // state change already rewrites the row, so appending there costs no
    // B-tree write of its own, where the `transitions` table cost one insert
    // per change and one delete per change when the job was removed: a
    // third of the writer's work for a short job.
    "
    ALTER TABLE jobs ADD COLUMN history TEXT NOT NULL DEFAULT '';
    UPDATE jobs SET history = (
        SELECT group_concat(t.state || ',' || t.attempt || ',' || t.at || ';', '' ORDER BY t.at, t.state)
        FROM transitions t WHERE t.job_id = jobs.id
    ) WHERE EXISTS (SELECT 1 FROM transitions t WHERE t.job_id = jobs.id);
    DROP TABLE transitions;
    ",
    // 5: retention walks the primary key (ids are UUIDv7, so in submission
    // order) instead of an index on `finished_at`: a job cannot finish
    // before it was submitted, so every job finished before the cutoff has
    // an id below the cutoff's. The index cost every finish a B-tree insert
    // (~10% of the writer's SQLite time for a short job) to serve only the
    // purge, which runs every `--retention` / 4 (at most a minute).
    "
    DROP INDEX jobs_by_finish;
    ",
    // 6: the store boundary. `retry_safe` (1 or 0) is decided when the job
    // is submitted, from its function's registration, so recovery and lease
    // expiry need no function registry (jobs stored before this migration
    // count as safe to retry, the default). `lease` is the fencing token of
    // the claim that last started the job. State codes stay as they are:
    // they are now the store's own (`codec::stored_state`), no longer read
    // from the wire's numbering, and equal to it for every existing row.
    "
    ALTER TABLE jobs ADD COLUMN retry_safe INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN lease INTEGER;
    ",
    // 7: remote workers. `worker_labels` (JSON object, NULL when empty): the
    // labels a worker must carry to run the job. `holder` and `lease_ttl_ms`
    // (NULL for a lease held for the life of the process): who holds the
    // running attempt's lease and for how long between renewals, so that
    // after a restart a lease a remote worker holds survives until it lapses
    // (the worker re-attaches) instead of being taken back at once.
    "
    ALTER TABLE jobs ADD COLUMN worker_labels TEXT;
    ALTER TABLE jobs ADD COLUMN holder TEXT;
    ALTER TABLE jobs ADD COLUMN lease_ttl_ms INTEGER;
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
    migrate_to(conn, MIGRATIONS.len())
}

/// Applies the migrations up to version `target`.
fn migrate_to(conn: &mut Connection, target: usize) -> Result<(), SchemaError> {
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(SchemaError::TooNew { found, known });
    }
    for (version, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target)
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use jobd_proto::JobState;

    use super::*;
    use crate::store::sqlite::codec::{RECORD_COLUMNS, parse_history, record_from_row};

    #[test]
    fn migration_4_moves_every_transition_into_its_job_row_in_order() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 3).unwrap();
        let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        for id in [a, b, c] {
            conn.execute(
                "INSERT INTO jobs (id, function, pool, state, args, submitted_at) \
                 VALUES (?1, 'noop', 1, 3, 'null', 10)",
                [id],
            )
            .unwrap();
        }
        // Inserted out of order; job c has none (its history stays empty).
        for (id, at, state, attempt) in [
            (a, 30, 3, 1),
            (a, 10, 1, 0),
            (b, 15, 1, 0),
            (a, 20, 2, 1),
            (a, 20, 1, 1),
        ] {
            conn.execute(
                "INSERT INTO transitions (job_id, at, state, attempt) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![id, at, state, attempt],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();

        let history = |id: [u8; 16]| {
            let text: String = conn
                .query_row("SELECT history FROM jobs WHERE id = ?1", [id], |r| r.get(0))
                .unwrap();
            parse_history(&text).unwrap()
        };
        let at = |us| UNIX_EPOCH + Duration::from_micros(us);
        assert_eq!(
            history(a),
            vec![
                (JobState::Pending, 0, at(10)),
                (JobState::Pending, 1, at(20)),
                (JobState::Running, 1, at(20)),
                (JobState::Succeeded, 1, at(30)),
            ]
        );
        assert_eq!(history(b), vec![(JobState::Pending, 0, at(15))]);
        assert!(history(c).is_empty());
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'transitions'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0);
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 7);
    }

    #[test]
    fn a_version_5_job_reads_back_after_migration_6_as_safe_to_retry() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 5).unwrap();
        conn.execute(
            "INSERT INTO jobs (id, function, pool, state, args, submitted_at, history) \
             VALUES (?1, 'noop', 2, 1, '[1]', 10, '1,0,10;')",
            [[7u8; 16]],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let record = conn
            .query_row(
                &format!("SELECT {RECORD_COLUMNS} FROM jobs"),
                [],
                record_from_row,
            )
            .unwrap();
        assert_eq!(record.state, JobState::Pending);
        assert_eq!(record.pool.as_str(), "blocking");
        assert!(record.retry_safe);
        assert_eq!(record.args, serde_json::json!([1]));
    }

    #[test]
    fn a_newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(SchemaError::TooNew {
                found: 99,
                known: 7
            })
        ));
    }
}
