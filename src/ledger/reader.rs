//! Reading the ledger: resume queries, the audit trail, the export.
//!
//! A reader has its own connection; in WAL mode it reads the last committed
//! state while the writer goes on, and it never writes.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use super::error::LedgerError;
use super::registration::{self, RegisteredDevice, StepRecord};
use super::schema;
use super::store;
use super::types::{CaId, CertificateRow, DeviceStatus, Event, JobId};

/// Read access to a ledger file, without taking the station lock: safe
/// while a station writes it.
#[derive(Debug)]
pub struct LedgerReader {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl LedgerReader {
    /// Opens `path` for reading; refuses a file that is not a ledger of
    /// this station's schema version.
    pub fn open(path: &Path) -> Result<LedgerReader, LedgerError> {
        if !path.exists() {
            return Err(LedgerError::NotALedger {
                path: path.to_path_buf(),
                reason: "no such file".into(),
            });
        }
        Ok(LedgerReader {
            path: path.to_path_buf(),
            conn: Mutex::new(schema::open_reader(path)?),
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, op: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> LedgerError + '_ {
        let op = op.into();
        move |source| LedgerError::Sqlite {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// Where device `serial` stands under `ca`, if it is in the ledger.
    pub fn device(&self, ca: &CaId, serial: &str) -> Result<Option<DeviceStatus>, LedgerError> {
        let conn = self.conn();
        let read = || match store::find_ca(&conn, ca)? {
            Some(ca) => store::device_status(&conn, ca, serial),
            None => Ok(None),
        };
        read().map_err(self.err(format!("reading device {serial}")))
    }

    /// Every device `job` planned under `ca`, in job order.
    pub fn devices_for_job(
        &self,
        ca: &CaId,
        job: &JobId,
    ) -> Result<Vec<DeviceStatus>, LedgerError> {
        let conn = self.conn();
        let read = || match store::find_ca(&conn, ca)? {
            Some(ca) => store::job_devices(&conn, ca, job),
            None => Ok(Vec::new()),
        };
        read().map_err(self.err(format!("reading the devices of job {job}")))
    }

    /// The DER of certificate `cert_serial` (lower-case hex), once signed.
    pub fn certificate_der(&self, cert_serial: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        self.conn()
            .query_row(
                "SELECT der FROM certificates WHERE cert_serial = ?1 AND der IS NOT NULL",
                [cert_serial.to_ascii_lowercase()],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err(format!("reading certificate {cert_serial}")))
    }

    /// The audit trail of device `serial` under `ca`, oldest first.
    pub fn events(&self, ca: &CaId, serial: &str) -> Result<Vec<Event>, LedgerError> {
        let conn = self.conn();
        let read = || -> rusqlite::Result<Vec<Event>> {
            let Some(key) = store::find_ca(&conn, ca)? else {
                return Ok(Vec::new());
            };
            let mut stmt = conn.prepare_cached(
                "SELECT id, time, device_serial, event, detail FROM events \
                 WHERE ca = ?1 AND device_serial = ?2 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![key, serial], |r| {
                Ok(Event {
                    id: r.get(0)?,
                    time: r.get(1)?,
                    ca: ca.clone(),
                    device_serial: r.get(2)?,
                    event: r.get(3)?,
                    detail: r.get(4)?,
                })
            })?;
            rows.collect()
        };
        read().map_err(self.err(format!("reading the events of device {serial}")))
    }

    /// Calls `f` with every certificate in the ledger, all CAs, in the
    /// order they were recorded; stops at the first error `f` returns.
    pub fn for_each_certificate<E, F>(&self, mut f: F) -> Result<(), E>
    where
        E: From<LedgerError>,
        F: FnMut(CertificateRow) -> Result<(), E>,
    {
        let conn = self.conn();
        let op = "exporting the certificates";
        let mut stmt = conn
            .prepare(
                "SELECT cas.ca, device_serial, thing_name, cert_serial, certificate_id, public_key, state, reason, \
                 not_after, created, updated FROM certificates c JOIN cas ON cas.id = c.ca ORDER BY c.id",
            )
            .map_err(self.err(op))?;
        let mut rows = stmt.query([]).map_err(self.err(op))?;
        while let Some(r) = rows.next().map_err(self.err(op))? {
            let read = || -> rusqlite::Result<CertificateRow> {
                let state: String = r.get(6)?;
                Ok(CertificateRow {
                    ca: CaId::from_stored(r.get(0)?),
                    device_serial: r.get(1)?,
                    thing_name: r.get(2)?,
                    cert_serial: r.get(3)?,
                    certificate_id: r.get(4)?,
                    public_key: r.get(5)?,
                    state: state.parse().map_err(|e: String| {
                        rusqlite::Error::FromSqlConversionFailure(
                            6,
                            rusqlite::types::Type::Text,
                            e.into(),
                        )
                    })?,
                    reason: r.get(7)?,
                    not_after: r.get(8)?,
                    created: r.get(9)?,
                    updated: r.get(10)?,
                })
            };
            f(read().map_err(self.err(op))?)?;
        }
        Ok(())
    }

    /// The registration steps of certificate `cert_serial` of device
    /// `serial` under `ca`, oldest first.
    pub fn registration_steps(
        &self,
        ca: &CaId,
        serial: &str,
        cert_serial: &str,
    ) -> Result<Vec<StepRecord>, LedgerError> {
        let conn = self.conn();
        let read = || match store::find_ca(&conn, ca)? {
            Some(ca) => registration::steps(&conn, ca, serial, &cert_serial.to_ascii_lowercase()),
            None => Ok(Vec::new()),
        };
        read().map_err(self.err(format!("reading the registration steps of device {serial}")))
    }

    /// Every device of `ca` the ledger holds as registered (or past it)
    /// with registration steps for its live certificate.
    pub fn registered_devices(&self, ca: &CaId) -> Result<Vec<RegisteredDevice>, LedgerError> {
        let conn = self.conn();
        let read = || match store::find_ca(&conn, ca)? {
            Some(ca) => registration::registered(&conn, ca),
            None => Ok(Vec::new()),
        };
        read().map_err(self.err("reading the registered devices"))
    }

    /// SQLite's `PRAGMA integrity_check`: `["ok"]` for a sound file.
    pub fn integrity_check(&self) -> Result<Vec<String>, LedgerError> {
        let conn = self.conn();
        let check = || -> rusqlite::Result<Vec<String>> {
            let mut stmt = conn.prepare("PRAGMA integrity_check")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        };
        check().map_err(self.err("checking integrity"))
    }
}
