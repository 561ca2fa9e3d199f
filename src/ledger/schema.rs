//! The ledger's tables, their versions, and how a connection is opened.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::error::LedgerError;
use super::Durability;

/// `PRAGMA application_id` of a ledger file ("PVLN").
pub const APPLICATION_ID: i32 = 0x5056_4c4e;

/// Schema migrations: entry `i` takes the file from version `i` to `i + 1`.
/// Append only; never edit a released entry.
pub(super) const MIGRATIONS: &[&str] = &[
    // 0 -> 1: devices, certificates, the append-only event log.
    r#"
CREATE TABLE devices (
    ca          TEXT NOT NULL,
    serial      TEXT NOT NULL,
    thing_name  TEXT NOT NULL,
    job_file    TEXT NOT NULL,
    job_label   TEXT NOT NULL,
    line        INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN
                  ('planned','key_ready','issued','registered','delivered','verified','failed')),
    error       TEXT,
    created     TEXT NOT NULL,
    updated     TEXT NOT NULL,
    PRIMARY KEY (ca, serial)
) WITHOUT ROWID;
CREATE INDEX devices_by_job ON devices (job_file, job_label, ca);
CREATE UNIQUE INDEX devices_one_thing_name ON devices (ca, thing_name);

CREATE TABLE certificates (
    id              INTEGER PRIMARY KEY,
    ca              TEXT NOT NULL,
    device_serial   TEXT NOT NULL,
    thing_name      TEXT NOT NULL,
    cert_serial     TEXT NOT NULL UNIQUE,
    certificate_id  TEXT UNIQUE,
    public_key      TEXT NOT NULL,
    der             BLOB,
    not_after       TEXT,
    state           TEXT NOT NULL CHECK (state IN ('intent','live','superseded')),
    reason          TEXT,
    created         TEXT NOT NULL,
    updated         TEXT NOT NULL,
    CHECK (state <> 'live' OR (der IS NOT NULL AND certificate_id IS NOT NULL)),
    FOREIGN KEY (ca, device_serial) REFERENCES devices (ca, serial)
);
CREATE UNIQUE INDEX certificates_one_live ON certificates (ca, device_serial) WHERE state = 'live';
CREATE UNIQUE INDEX certificates_one_intent ON certificates (ca, device_serial) WHERE state = 'intent';
CREATE INDEX certificates_by_device ON certificates (ca, device_serial);
CREATE INDEX certificates_by_key ON certificates (public_key);

CREATE TABLE events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    time            TEXT NOT NULL,
    ca              TEXT NOT NULL,
    device_serial   TEXT NOT NULL,
    event           TEXT NOT NULL,
    detail          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_by_device ON events (ca, device_serial);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
"#,
    // 1 -> 2: the same tables, cheaper to write (the writer's cost per
    // device is what caps a batch):
    // - state checks as OR chains: SQLite builds a temporary table for an
    //   `IN (...)` list of a CHECK on every INSERT and UPDATE;
    // - keys lead with the device serial, not the 64-digit CA id every row
    //   shares, so comparisons end at the first differing byte;
    // - no `certificates_by_device`: the live and intent indexes serve every
    //   query by device, and devices are never deleted;
    // - events without AUTOINCREMENT: the log is append-only, so rowids are
    //   never reused anyway, and `sqlite_sequence` is one write less.
    r#"
CREATE TABLE devices_v2 (
    ca          TEXT NOT NULL,
    serial      TEXT NOT NULL,
    thing_name  TEXT NOT NULL,
    job_file    TEXT NOT NULL,
    job_label   TEXT NOT NULL,
    line        INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state = 'planned' OR state = 'key_ready' OR state = 'issued'
                  OR state = 'registered' OR state = 'delivered' OR state = 'verified'
                  OR state = 'failed'),
    error       TEXT,
    created     TEXT NOT NULL,
    updated     TEXT NOT NULL,
    PRIMARY KEY (serial, ca)
) WITHOUT ROWID;
INSERT INTO devices_v2 (ca, serial, thing_name, job_file, job_label, line, state, error, created, updated)
    SELECT ca, serial, thing_name, job_file, job_label, line, state, error, created, updated FROM devices;

CREATE TABLE certificates_v2 (
    id              INTEGER PRIMARY KEY,
    ca              TEXT NOT NULL,
    device_serial   TEXT NOT NULL,
    thing_name      TEXT NOT NULL,
    cert_serial     TEXT NOT NULL UNIQUE,
    certificate_id  TEXT UNIQUE,
    public_key      TEXT NOT NULL,
    der             BLOB,
    not_after       TEXT,
    state           TEXT NOT NULL CHECK (state = 'intent' OR state = 'live' OR state = 'superseded'),
    reason          TEXT,
    created         TEXT NOT NULL,
    updated         TEXT NOT NULL,
    CHECK (state <> 'live' OR (der IS NOT NULL AND certificate_id IS NOT NULL)),
    FOREIGN KEY (ca, device_serial) REFERENCES devices (ca, serial)
);
INSERT INTO certificates_v2 (id, ca, device_serial, thing_name, cert_serial, certificate_id, public_key,
                             der, not_after, state, reason, created, updated)
    SELECT id, ca, device_serial, thing_name, cert_serial, certificate_id, public_key,
           der, not_after, state, reason, created, updated FROM certificates;

CREATE TABLE events_v2 (
    id              INTEGER PRIMARY KEY,
    time            TEXT NOT NULL,
    ca              TEXT NOT NULL,
    device_serial   TEXT NOT NULL,
    event           TEXT NOT NULL,
    detail          TEXT NOT NULL DEFAULT ''
);
INSERT INTO events_v2 (id, time, ca, device_serial, event, detail)
    SELECT id, time, ca, device_serial, event, detail FROM events;

DROP TABLE events;
DROP TABLE certificates;
DROP TABLE devices;
DELETE FROM sqlite_sequence WHERE name = 'events';
ALTER TABLE devices_v2 RENAME TO devices;
ALTER TABLE certificates_v2 RENAME TO certificates;
ALTER TABLE events_v2 RENAME TO events;

CREATE INDEX devices_by_job ON devices (job_label, job_file, ca);
CREATE UNIQUE INDEX devices_one_thing_name ON devices (thing_name, ca);
CREATE UNIQUE INDEX certificates_one_live ON certificates (device_serial, ca) WHERE state = 'live';
CREATE UNIQUE INDEX certificates_one_intent ON certificates (device_serial, ca) WHERE state = 'intent';
CREATE INDEX certificates_by_key ON certificates (public_key);
CREATE INDEX events_by_device ON events (device_serial);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
"#,
    // 2 -> 3: cloud registration steps, one row per device, certificate and step.
    r#"
CREATE TABLE registration_steps (
    ca              TEXT NOT NULL,
    device_serial   TEXT NOT NULL,
    cert_serial     TEXT NOT NULL,
    step            TEXT NOT NULL,
    mode            TEXT NOT NULL,
    thing_name      TEXT NOT NULL,
    certificate_id  TEXT NOT NULL,
    resource        TEXT NOT NULL,
    detail          TEXT NOT NULL,
    done            TEXT NOT NULL,
    UNIQUE (ca, device_serial, cert_serial, step),
    FOREIGN KEY (ca, device_serial) REFERENCES devices (ca, serial)
);
"#,
    // 3 -> 4: certificates without a unique index on certificate_id. The
    // id is the SHA-256 of the DER, so every insert into that index landed
    // on a random page, one more page written to the WAL per certificate
    // and commit. A DER holds its serial: the unique cert_serial, with the
    // check that the DER recorded carries the serial of its intent, keeps
    // every DER recorded once.
    r#"
CREATE TABLE certificates_v4 (
    id              INTEGER PRIMARY KEY,
    ca              TEXT NOT NULL,
    device_serial   TEXT NOT NULL,
    thing_name      TEXT NOT NULL,
    cert_serial     TEXT NOT NULL UNIQUE,
    certificate_id  TEXT,
    public_key      TEXT NOT NULL,
    der             BLOB,
    not_after       TEXT,
    state           TEXT NOT NULL CHECK (state = 'intent' OR state = 'live' OR state = 'superseded'),
    reason          TEXT,
    created         TEXT NOT NULL,
    updated         TEXT NOT NULL,
    CHECK (state <> 'live' OR (der IS NOT NULL AND certificate_id IS NOT NULL)),
    FOREIGN KEY (ca, device_serial) REFERENCES devices (ca, serial)
);
INSERT INTO certificates_v4 (id, ca, device_serial, thing_name, cert_serial, certificate_id, public_key,
                             der, not_after, state, reason, created, updated)
    SELECT id, ca, device_serial, thing_name, cert_serial, certificate_id, public_key,
           der, not_after, state, reason, created, updated FROM certificates;
DROP TABLE certificates;
ALTER TABLE certificates_v4 RENAME TO certificates;
CREATE UNIQUE INDEX certificates_one_live ON certificates (device_serial, ca) WHERE state = 'live';
CREATE UNIQUE INDEX certificates_one_intent ON certificates (device_serial, ca) WHERE state = 'intent';
CREATE INDEX certificates_by_key ON certificates (public_key);
"#,
    // 4 -> 5: the public-key index holds the first 12 hex digits (48 bits)
    // of the key's SHA-256, not all 64. Keys are random, so every new
    // certificate lands on a random page of this index: once the index
    // outgrows SQLite's page cache, each one costs a page read, a WAL frame
    // and a checkpoint write. A fifth of the size keeps it cached longer and
    // touches fewer pages per commit (100,000 devices: 5% more devices/s).
    // A lookup compares the whole key after the prefix.
    r#"
DROP INDEX certificates_by_key;
CREATE INDEX certificates_by_key_prefix ON certificates (substr(public_key, 1, 12));
"#,
    // 5 -> 6: CAs by number. Every device, certificate, event and
    // registration step carried its CA's 64-digit id, and so did most index
    // entries: a quarter of a ledger's bytes, written to the WAL and again
    // by each checkpoint. The ids now live once in `cas`, and rows hold the
    // CA's number (100,000 devices: 10% more devices/s).
    r#"
CREATE TABLE cas (
    id  INTEGER PRIMARY KEY,
    ca  TEXT NOT NULL UNIQUE
);
INSERT INTO cas (ca)
    SELECT ca FROM devices UNION SELECT ca FROM certificates
    UNION SELECT ca FROM events UNION SELECT ca FROM registration_steps;

CREATE TABLE devices_v6 (
    ca          INTEGER NOT NULL REFERENCES cas (id),
    serial      TEXT NOT NULL,
    thing_name  TEXT NOT NULL,
    job_file    TEXT NOT NULL,
    job_label   TEXT NOT NULL,
    line        INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state = 'planned' OR state = 'key_ready' OR state = 'issued'
                  OR state = 'registered' OR state = 'delivered' OR state = 'verified'
                  OR state = 'failed'),
    error       TEXT,
    created     TEXT NOT NULL,
    updated     TEXT NOT NULL,
    PRIMARY KEY (serial, ca)
) WITHOUT ROWID;
INSERT INTO devices_v6 (ca, serial, thing_name, job_file, job_label, line, state, error, created, updated)
    SELECT cas.id, serial, thing_name, job_file, job_label, line, state, error, created, updated
    FROM devices JOIN cas ON cas.ca = devices.ca;

CREATE TABLE certificates_v6 (
    id              INTEGER PRIMARY KEY,
    ca              INTEGER NOT NULL,
    device_serial   TEXT NOT NULL,
    thing_name      TEXT NOT NULL,
    cert_serial     TEXT NOT NULL UNIQUE,
    certificate_id  TEXT,
    public_key      TEXT NOT NULL,
    der             BLOB,
    not_after       TEXT,
    state           TEXT NOT NULL CHECK (state = 'intent' OR state = 'live' OR state = 'superseded'),
    reason          TEXT,
    created         TEXT NOT NULL,
    updated         TEXT NOT NULL,
    CHECK (state <> 'live' OR (der IS NOT NULL AND certificate_id IS NOT NULL)),
    FOREIGN KEY (ca, device_serial) REFERENCES devices (ca, serial)
);
INSERT INTO certificates_v6 (id, ca, device_serial, thing_name, cert_serial, certificate_id, public_key,
                             der, not_after, state, reason, created, updated)
    SELECT c.id, cas.id, device_serial, thing_name, cert_serial, certificate_id, public_key,
           der, not_after, state, reason, created, updated
    FROM certificates c JOIN cas ON cas.ca = c.ca;

CREATE TABLE events_v6 (
    id              INTEGER PRIMARY KEY,
    time            TEXT NOT NULL,
    ca              INTEGER NOT NULL REFERENCES cas (id),
    device_serial   TEXT NOT NULL,
    event           TEXT NOT NULL,
    detail          TEXT NOT NULL DEFAULT ''
);
INSERT INTO events_v6 (id, time, ca, device_serial, event, detail)
    SELECT e.id, time, cas.id, device_serial, event, detail FROM events e JOIN cas ON cas.ca = e.ca;

CREATE TABLE registration_steps_v6 (
    ca              INTEGER NOT NULL,
    device_serial   TEXT NOT NULL,
    cert_serial     TEXT NOT NULL,
    step            TEXT NOT NULL,
    mode            TEXT NOT NULL,
    thing_name      TEXT NOT NULL,
    certificate_id  TEXT NOT NULL,
    resource        TEXT NOT NULL,
    detail          TEXT NOT NULL,
    done            TEXT NOT NULL,
    UNIQUE (ca, device_serial, cert_serial, step),
    FOREIGN KEY (ca, device_serial) REFERENCES devices (ca, serial)
);
INSERT INTO registration_steps_v6 (ca, device_serial, cert_serial, step, mode, thing_name, certificate_id,
                                   resource, detail, done)
    SELECT cas.id, device_serial, cert_serial, step, mode, thing_name, certificate_id, resource, detail, done
    FROM registration_steps r JOIN cas ON cas.ca = r.ca ORDER BY r.rowid;

DROP TABLE registration_steps;
DROP TABLE events;
DROP TABLE certificates;
DROP TABLE devices;
ALTER TABLE devices_v6 RENAME TO devices;
ALTER TABLE certificates_v6 RENAME TO certificates;
ALTER TABLE events_v6 RENAME TO events;
ALTER TABLE registration_steps_v6 RENAME TO registration_steps;
CREATE INDEX devices_by_job ON devices (job_label, job_file, ca);
CREATE UNIQUE INDEX devices_one_thing_name ON devices (thing_name, ca);
CREATE UNIQUE INDEX certificates_one_live ON certificates (device_serial, ca) WHERE state = 'live';
CREATE UNIQUE INDEX certificates_one_intent ON certificates (device_serial, ca) WHERE state = 'intent';
CREATE INDEX certificates_by_key_prefix ON certificates (substr(public_key, 1, 12));
CREATE INDEX events_by_device ON events (device_serial);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
"#,
];

/// The schema version this station writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

fn sqlite_err<'a>(path: &'a Path, op: &str) -> impl FnOnce(rusqlite::Error) -> LedgerError + 'a {
    let op = op.to_string();
    move |source| LedgerError::Sqlite {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Opens the writing connection: WAL, the durability asked for, foreign
/// keys on, and the schema migrated to [`SCHEMA_VERSION`].
pub(crate) fn open_writer(path: &Path, durability: Durability) -> Result<Connection, LedgerError> {
    // One thread owns this connection: SQLite's own locking is not needed.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).map_err(sqlite_err(path, "opening"))?;
    // Every statement of the writer stays prepared (the default cache holds 16).
    conn.set_prepared_statement_cache_capacity(64);
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(sqlite_err(path, "setting the busy timeout"))?;
    // Refuse another program's database before changing anything in it.
    let (app, version) = identity(&conn, path)?;
    check_identity(path, app, version, &conn)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(sqlite_err(path, "switching to WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LedgerError::NotALedger {
            path: path.to_path_buf(),
            reason: format!("the file system refused WAL mode (journal mode stays {mode})"),
        });
    }
    conn.pragma_update(None, "synchronous", durability.pragma())
        .map_err(sqlite_err(path, "setting synchronous"))?;
    // Checkpoints stay with the writer (SQLite's automatic checkpoint at
    // 1000 pages): a checkpoint run from another connection while the
    // writer commits without pause never finds the WAL fully copied, so the
    // WAL is never restarted and grows without bound (seen: 4.9 GB for
    // 200,000 devices).
    // Savepoint journals (one per operation of a batch) stay in memory.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(sqlite_err(path, "setting temp_store"))?;
    // Migrations rebuild tables: `migrate` checks foreign keys itself, and
    // they are enforced from here on.
    migrate(&conn, path)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(sqlite_err(path, "enabling foreign keys"))?;
    Ok(conn)
}

/// Opens a connection that only reads, after checking the schema version.
pub(crate) fn open_reader(path: &Path) -> Result<Connection, LedgerError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(sqlite_err(path, "opening for reading"))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(sqlite_err(path, "setting the busy timeout"))?;
    conn.pragma_update(None, "query_only", true)
        .map_err(sqlite_err(path, "opening for reading"))?;
    let (app, version) = identity(&conn, path)?;
    check_identity(path, app, version, &conn)?;
    if version < SCHEMA_VERSION {
        return Err(LedgerError::NotALedger {
            path: path.to_path_buf(),
            reason: format!("schema version {version} is older than {SCHEMA_VERSION}; open it for writing once to migrate"),
        });
    }
    Ok(conn)
}

fn identity(conn: &Connection, path: &Path) -> Result<(i32, i64), LedgerError> {
    let app: i32 = conn
        .query_row("PRAGMA application_id", [], |row| row.get(0))
        .map_err(sqlite_err(path, "reading the application id"))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(sqlite_err(path, "reading the schema version"))?;
    Ok((app, version))
}

fn check_identity(
    path: &Path,
    app: i32,
    version: i64,
    conn: &Connection,
) -> Result<(), LedgerError> {
    if app != APPLICATION_ID && app != 0 {
        return Err(LedgerError::NotALedger {
            path: path.to_path_buf(),
            reason: format!("application id {app:#x}"),
        });
    }
    if version > SCHEMA_VERSION {
        return Err(LedgerError::NewerSchema {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version == 0 {
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
                [],
                |row| row.get(0),
            )
            .map_err(sqlite_err(path, "reading the schema"))?;
        if tables > 0 {
            return Err(LedgerError::NotALedger {
                path: path.to_path_buf(),
                reason: format!("{tables} foreign tables and no schema version"),
            });
        }
    }
    Ok(())
}

/// Brings the schema to [`SCHEMA_VERSION`], one version per transaction;
/// refuses a file newer than this station. A migration may rebuild a table
/// others refer to, so foreign keys are off while it runs and its result
/// is checked with `PRAGMA foreign_key_check` before it commits.
pub fn migrate(conn: &Connection, path: &Path) -> Result<(), LedgerError> {
    let (app, version) = identity(conn, path)?;
    check_identity(path, app, version, conn)?;
    if version < SCHEMA_VERSION {
        conn.pragma_update(None, "foreign_keys", false)
            .map_err(sqlite_err(path, "disabling foreign keys to migrate"))?;
    }
    for (from, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let to = from + 1;
        let op = format!("migrating the schema to version {to}");
        let script = format!(
            "BEGIN IMMEDIATE;\n{sql}\nPRAGMA application_id = {APPLICATION_ID};\nPRAGMA user_version = {to};"
        );
        let applied = conn
            .execute_batch(&script)
            .and_then(|()| foreign_key_violations(conn))
            .and_then(|violations| match violations {
                0 => conn.execute_batch("COMMIT"),
                n => Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY),
                    Some(format!("{n} rows break a foreign key after the migration")),
                )),
            });
        if let Err(source) = applied {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            return Err(LedgerError::Sqlite {
                path: path.to_path_buf(),
                op,
                source,
            });
        }
    }
    Ok(())
}

fn foreign_key_violations(conn: &Connection) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare("PRAGMA foreign_key_check")?;
    let mut rows = stmt.query([])?;
    let mut n = 0;
    while rows.next()?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// The lock that keeps a second station process from writing the same
/// ledger: an exclusive transaction on a side file, held while the ledger
/// is open and released by the OS if the process dies.
#[derive(Debug)]
pub(crate) struct StationLock {
    _conn: Connection,
}

impl StationLock {
    /// The side file of `ledger`.
    pub(crate) fn path_for(ledger: &Path) -> PathBuf {
        let mut name = ledger.as_os_str().to_owned();
        name.push("-lock");
        PathBuf::from(name)
    }

    /// Takes the lock, or says who holds it.
    pub(crate) fn acquire(ledger: &Path) -> Result<StationLock, LedgerError> {
        let lock = Self::path_for(ledger);
        let conn = Connection::open(&lock).map_err(sqlite_err(ledger, "opening the lock file"))?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(sqlite_err(ledger, "taking the lock"))?;
        match conn.execute_batch("BEGIN EXCLUSIVE") {
            Ok(()) => Ok(StationLock { _conn: conn }),
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {
                Err(LedgerError::InUse {
                    path: ledger.to_path_buf(),
                    lock,
                })
            }
            Err(source) => Err(LedgerError::Sqlite {
                path: ledger.to_path_buf(),
                op: "taking the lock".into(),
                source,
            }),
        }
    }
}
