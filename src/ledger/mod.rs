//! The ledger: the durable record of every device and every issuance.
//!
//! A SQLite file in WAL mode, written by one station process at a time
//! (a side file `<ledger>-lock` holds the lock; the OS drops it if the
//! process dies) and readable by any number of [`LedgerReader`]s meanwhile.
//!
//! ```text
//! workers ──(bounded channel)──> writer thread: BEGIN; op; op; ...; COMMIT ──> answers
//!                                     │
//! readers (resume, export) ──────> ledger.sqlite (WAL) <── events: append only
//! ```
//!
//! - [`types`]: device and certificate states, the rows the ledger answers with;
//! - `store`: planning a device, resume queries, recovery on opening;
//! - `lifecycle`: the writes after planning (steps, failure, intent, issuance, superseding);
//!   each checks the lifecycle and appends one event per change;
//! - `writer`: group commit, one thread, one transaction for many operations;
//! - [`reader`]: resume queries, the audit trail, the export;
//! - [`registration`]: cloud registration steps, one row per device and step;
//! - `schema`: tables, `user_version` migrations, opening a connection.
//!
//! # The lifecycle
//! A device is its serial under one CA (the SHA-256 of the CA certificate,
//! [`CaId`]; rows name the CA by its number in the `cas` table). It goes `planned -> key_ready -> issued -> registered ->
//! delivered -> verified`, or `failed` with a reason, each step recorded
//! before the next starts. It holds at most one live certificate and one
//! pending intent (unique indexes say so, not only this code).
//!
//! # Intent before signing
//! [`Ledger::record_intent`] returns once the certificate serial, the
//! device and the public key's hash are committed; only then may the CA
//! sign. [`Ledger::record_issued`] then stores the DER and makes the
//! certificate live. An intent still there when the ledger is opened is a
//! signature that may exist and was never delivered: [`Ledger::open`]
//! marks it superseded (`never delivered (crash)`), lists it in
//! [`Ledger::recovered`], and the device is issued anew. A certificate
//! serial is never used twice, the DER recorded for an intent must carry
//! its serial (so no DER is recorded twice), and a public key certified
//! for one device is refused for another.
//!
//! # Durability
//! Every operation is answered only after its transaction committed. What
//! "committed" survives depends on [`Durability`]:
//!
//! | setting | process killed (SIGKILL, panic, abort) | power cut, kernel crash |
//! |---|---|---|
//! | [`Durability::Normal`] (default) | nothing answered is lost | the file stays sound, but transactions committed since the last WAL checkpoint (up to ~4 MB of WAL, thousands of operations) may roll back |
//! | [`Durability::Full`] | nothing answered is lost | nothing answered is lost, if the disk honours flushes |
//!
//! With `Normal`, SQLite writes each commit to the WAL without `fsync`; the
//! OS keeps it even when the process dies, but not when the power goes.
//! After a power cut under `Normal`, a lost intent means a certificate may
//! have been signed without a trace, and a lost `delivered` means a device
//! is issued again on the re-run. `Full` syncs the WAL at every commit; group
//! commit makes that one `fsync` per batch rather than per device.
//!
//! # Group commit
//! Operations from every thread queue on a bounded channel; the writer
//! takes what is queued (up to [`LedgerOptions::max_batch`], waiting
//! [`LedgerOptions::linger`] for more) into one transaction, each operation
//! in a savepoint of its own, and answers after the commit. A refused
//! operation rolls back alone; a batch that cannot commit (a full disk) is
//! retried operation by operation, so every caller gets its own answer and
//! nothing panics.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use time::OffsetDateTime;

use crate::clock::{Clock, SystemClock};

mod error;
mod lifecycle;
pub mod reader;
pub mod registration;
mod schema;
mod store;
pub mod types;
mod writer;

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_kill;
#[cfg(test)]
mod tests_load;

pub use error::LedgerError;
pub use reader::LedgerReader;
pub use schema::{migrate, APPLICATION_ID, SCHEMA_VERSION};
pub use types::{
    AbandonedIntent, CaId, CertState, CertificateRow, DeviceState, DeviceStatus, Event, JobId,
    PlanOutcome, PlannedDevice, REASON_CRASH, REASON_REISSUE,
};

use lifecycle::WriteOp;
use schema::StationLock;
use store::PlanOp;
use writer::{Batching, Request, Writer};

/// How durable a committed operation is; see the module docs for what
/// each setting can lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `PRAGMA synchronous = NORMAL`: survives the process being killed; a
    /// power cut may roll back the last transactions.
    #[default]
    Normal,
    /// `PRAGMA synchronous = FULL`: survives power cuts too; one `fsync`
    /// per commit.
    Full,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        }
    }
}

/// How a ledger is opened.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// What a commit survives.
    pub durability: Durability,
    /// Most operations in one transaction; 1 is a transaction per operation.
    pub max_batch: usize,
    /// How long the writer waits for more operations before committing a
    /// batch; zero commits whatever is queued at once (operations queue up
    /// while the previous commit runs, so batches still form under load).
    pub linger: Duration,
    /// Operations that may wait for the writer before callers block.
    pub queue: usize,
    /// Where the times recorded come from.
    pub clock: Arc<dyn Clock>,
    /// Test hook: `PRAGMA max_page_count`, to make the disk "full".
    #[cfg(test)]
    pub(crate) max_pages: Option<u32>,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            durability: Durability::Normal,
            max_batch: 1024,
            linger: Duration::ZERO,
            queue: 4096,
            clock: Arc::new(SystemClock),
            #[cfg(test)]
            max_pages: None,
        }
    }
}

/// A ledger open for writing by this station, for one CA.
///
/// `Ledger` is `Sync`: share it by reference between worker threads. Every
/// write blocks its caller until its transaction committed.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    ca: CaId,
    sender: Option<Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    reader: LedgerReader,
    recovered: Vec<AbandonedIntent>,
    _lock: Mutex<StationLock>,
}

impl Ledger {
    /// Opens (or creates) the ledger at `path` for certificates of `ca`:
    /// takes the station lock, migrates the schema, supersedes the intents
    /// a crash left (see [`Ledger::recovered`]) and starts the writer.
    pub fn open(path: &Path, ca: CaId, options: LedgerOptions) -> Result<Ledger, LedgerError> {
        let lock = StationLock::acquire(path)?;
        let conn = schema::open_writer(path, options.durability)?;
        #[cfg(test)]
        if let Some(pages) = options.max_pages {
            conn.pragma_update(None, "max_page_count", pages)
                .map_err(|source| LedgerError::Sqlite {
                    path: path.to_path_buf(),
                    op: "limiting the page count".into(),
                    source,
                })?;
        }
        let recovered = recover(&conn, path, &timestamp(options.clock.now()))?;
        let ca_key = store::register_ca(&conn, &ca).map_err(|source| LedgerError::Sqlite {
            path: path.to_path_buf(),
            op: format!("recording CA {ca}"),
            source,
        })?;
        let reader = LedgerReader::open(path)?;
        let (sender, rx) = crossbeam_channel::bounded(options.queue.max(1));
        let writer = Writer {
            conn,
            path: path.to_path_buf(),
            ca: ca_key,
            clock: options.clock,
            batching: Batching {
                max_batch: options.max_batch,
                linger: options.linger,
            },
        };
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LedgerError::Invalid {
                path: path.to_path_buf(),
                op: "starting the writer".into(),
                problem: e.to_string(),
            })?;
        Ok(Ledger {
            path: path.to_path_buf(),
            ca,
            sender: Some(sender),
            writer: Some(handle),
            reader,
            recovered,
            _lock: Mutex::new(lock),
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The CA this ledger records for.
    pub fn ca(&self) -> &CaId {
        &self.ca
    }

    /// Intents found on opening without a certificate, now superseded
    /// (`never delivered (crash)`): their devices need a new certificate.
    pub fn recovered(&self) -> &[AbandonedIntent] {
        &self.recovered
    }

    /// Read access (the same queries as a [`LedgerReader`]).
    pub fn reader(&self) -> &LedgerReader {
        &self.reader
    }

    /// Puts a device of `job` in the ledger, or says where it stands. A
    /// device of another job is refused ([`LedgerError::OtherJob`]) unless
    /// `reissue`: then it moves to this job and its live certificate is
    /// superseded (`reissue`). A device of this same job is resumed, never
    /// re-issued.
    pub fn plan(
        &self,
        job: &JobId,
        device: &PlannedDevice,
        reissue: bool,
    ) -> Result<PlanOutcome, LedgerError> {
        self.submit_plan(job, device, reissue)?.wait()
    }

    /// [`Ledger::plan`] without waiting: queue it now, [`Pending::wait`]
    /// for the answer later, so that many operations share one commit.
    pub fn submit_plan(
        &self,
        job: &JobId,
        device: &PlannedDevice,
        reissue: bool,
    ) -> Result<Pending<PlanOutcome>, LedgerError> {
        let op = PlanOp {
            job: job.clone(),
            device: device.clone(),
            reissue,
        };
        self.queue(op.describe(), |reply| Request::Plan {
            op,
            reply,
            result: None,
        })
    }

    /// Moves device `serial` forward to `to` (`key_ready`, `registered`,
    /// `delivered`, `verified`); a no-op if it is there already. `issued`
    /// comes from [`Ledger::record_issued`], `failed` from [`Ledger::fail`].
    pub fn advance(&self, serial: &str, to: DeviceState, detail: &str) -> Result<(), LedgerError> {
        self.submit_advance(serial, to, detail)?.wait()
    }

    /// [`Ledger::advance`] without waiting.
    pub fn submit_advance(
        &self,
        serial: &str,
        to: DeviceState,
        detail: &str,
    ) -> Result<Pending<()>, LedgerError> {
        self.submit(WriteOp::Advance {
            serial: serial.to_string(),
            to,
            detail: detail.to_string(),
        })
    }

    /// Records that device `serial` failed, and why; a pending intent of
    /// it is superseded.
    pub fn fail(&self, serial: &str, reason: &str) -> Result<(), LedgerError> {
        self.submit_fail(serial, reason)?.wait()
    }

    /// [`Ledger::fail`] without waiting.
    pub fn submit_fail(&self, serial: &str, reason: &str) -> Result<Pending<()>, LedgerError> {
        self.submit(WriteOp::Fail {
            serial: serial.to_string(),
            reason: reason.to_string(),
        })
    }

    /// Records, durably, that the CA is about to sign certificate
    /// `cert_serial` (hex) for device `serial` over `public_key` (the bytes
    /// the certificate carries, e.g. `PublicKey::raw`; the ledger keeps
    /// their SHA-256). Sign only after this returned `Ok`.
    pub fn record_intent(
        &self,
        serial: &str,
        cert_serial: &str,
        public_key: &[u8],
    ) -> Result<(), LedgerError> {
        self.submit_intent(serial, cert_serial, public_key)?.wait()
    }

    /// [`Ledger::record_intent`] without waiting: sign only after
    /// [`Pending::wait`] returned `Ok`.
    pub fn submit_intent(
        &self,
        serial: &str,
        cert_serial: &str,
        public_key: &[u8],
    ) -> Result<Pending<()>, LedgerError> {
        let cert_serial = self.cert_serial(cert_serial, || {
            format!("recording intent for device {serial}")
        })?;
        self.submit(WriteOp::Intent {
            serial: serial.to_string(),
            cert_serial,
            public_key: types::sha256_hex(public_key),
        })
    }

    /// Records the signed certificate `der` of intent `cert_serial`: it
    /// becomes the device's live certificate and the device `issued`.
    /// Returns its certificate id (SHA-256 hex of the DER).
    pub fn record_issued(
        &self,
        cert_serial: &str,
        der: &[u8],
        not_after: OffsetDateTime,
    ) -> Result<String, LedgerError> {
        let certificate_id = types::sha256_hex(der);
        self.submit_issued(cert_serial, der, &certificate_id, not_after)?
            .wait()?;
        Ok(certificate_id)
    }

    /// [`Ledger::record_issued`] without waiting, for a certificate whose
    /// id (SHA-256 hex of `der`) the caller computed already. `der` must be
    /// a certificate carrying `cert_serial`
    /// ([`LedgerError::CertificateMismatch`]): with certificate serials
    /// unique, no DER is then ever recorded twice.
    pub fn submit_issued(
        &self,
        cert_serial: &str,
        der: &[u8],
        certificate_id: &str,
        not_after: OffsetDateTime,
    ) -> Result<Pending<()>, LedgerError> {
        let cert_serial = self.cert_serial(cert_serial, || {
            format!("recording certificate {cert_serial}")
        })?;
        let found = types::der_serial(der);
        if found.as_deref() != Some(types::significant_hex(&cert_serial).as_str()) {
            return Err(LedgerError::CertificateMismatch {
                path: self.path.clone(),
                cert_serial,
                found,
            });
        }
        self.submit(WriteOp::Issued {
            cert_serial,
            der: der.to_vec(),
            certificate_id: certificate_id.to_string(),
            not_after: timestamp_seconds(not_after),
        })
    }

    /// Supersedes the live certificate (and any pending intent) of device
    /// `serial` for `reason`; the device goes back to `planned`. Nothing to
    /// supersede is not an error.
    pub fn supersede(&self, serial: &str, reason: &str) -> Result<(), LedgerError> {
        self.submit(WriteOp::Supersede {
            serial: serial.to_string(),
            reason: reason.to_string(),
        })?
        .wait()
    }

    /// Records a cloud registration step of device `serial`'s live
    /// certificate `cert_serial` (a step recorded twice keeps its first
    /// record).
    pub fn record_step(
        &self,
        serial: &str,
        cert_serial: &str,
        record: &registration::StepRecord,
    ) -> Result<(), LedgerError> {
        self.submit(WriteOp::RegistrationStep {
            serial: serial.to_string(),
            cert_serial: cert_serial.to_ascii_lowercase(),
            record: record.clone(),
        })?
        .wait()
    }

    /// The registration steps recorded for certificate `cert_serial` of
    /// device `serial`, oldest first.
    pub fn registration_steps(
        &self,
        serial: &str,
        cert_serial: &str,
    ) -> Result<Vec<registration::StepRecord>, LedgerError> {
        self.reader
            .registration_steps(&self.ca, serial, cert_serial)
    }

    /// Where device `serial` stands, if it is in the ledger.
    pub fn device(&self, serial: &str) -> Result<Option<DeviceStatus>, LedgerError> {
        self.reader.device(&self.ca, serial)
    }

    /// Every device `job` planned, in job order.
    pub fn devices_for_job(&self, job: &JobId) -> Result<Vec<DeviceStatus>, LedgerError> {
        self.reader.devices_for_job(&self.ca, job)
    }

    /// The audit trail of device `serial`, oldest first.
    pub fn events(&self, serial: &str) -> Result<Vec<Event>, LedgerError> {
        self.reader.events(&self.ca, serial)
    }

    /// Calls `f` with every certificate of the ledger (all CAs).
    pub fn for_each_certificate<E, F>(&self, f: F) -> Result<(), E>
    where
        E: From<LedgerError>,
        F: FnMut(CertificateRow) -> Result<(), E>,
    {
        self.reader.for_each_certificate(f)
    }

    /// Stops the writer after the queued operations and releases the lock.
    pub fn close(mut self) -> Result<(), LedgerError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), LedgerError> {
        self.sender.take();
        match self.writer.take().map(JoinHandle::join) {
            Some(Err(_)) => Err(self.stopped("closing")),
            _ => Ok(()),
        }
    }

    fn cert_serial(&self, hex: &str, op: impl FnOnce() -> String) -> Result<String, LedgerError> {
        types::normalise_serial(hex).ok_or_else(|| LedgerError::Invalid {
            path: self.path.clone(),
            op: op(),
            problem: format!("certificate serial {hex:?} is not 1 to 42 hex digits"),
        })
    }

    fn stopped(&self, op: &str) -> LedgerError {
        LedgerError::WriterStopped {
            path: self.path.clone(),
            op: op.to_string(),
        }
    }

    fn send(&self, req: Request, describe: &str) -> Result<(), LedgerError> {
        match &self.sender {
            Some(sender) => sender.send(req).map_err(|_| self.stopped(describe)),
            None => Err(self.stopped(describe)),
        }
    }

    fn submit(&self, op: WriteOp) -> Result<Pending<()>, LedgerError> {
        self.queue(op.describe(), |reply| Request::Write {
            op,
            reply,
            result: None,
        })
    }

    /// Queues the request `make` builds around its reply channel.
    fn queue<T>(
        &self,
        describe: String,
        make: impl FnOnce(Sender<Result<T, LedgerError>>) -> Request,
    ) -> Result<Pending<T>, LedgerError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(make(reply), &describe)?;
        Ok(Pending {
            answer,
            path: self.path.clone(),
            describe,
        })
    }
}

/// An operation queued for the writer; its answer comes after its commit.
#[derive(Debug)]
#[must_use = "an operation is durable only once its answer came"]
pub struct Pending<T> {
    answer: Receiver<Result<T, LedgerError>>,
    path: PathBuf,
    describe: String,
}

impl<T> Pending<T> {
    /// Waits for the commit (or the refusal) of the operation.
    pub fn wait(self) -> Result<T, LedgerError> {
        self.answer.recv().map_err(|_| LedgerError::WriterStopped {
            path: self.path,
            op: self.describe,
        })?
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn recover(
    conn: &rusqlite::Connection,
    path: &Path,
    now: &str,
) -> Result<Vec<AbandonedIntent>, LedgerError> {
    let sql = |source| LedgerError::Sqlite {
        path: path.to_path_buf(),
        op: "superseding intents left by a crash".into(),
        source,
    };
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
    let found = store::recover(conn, path, now);
    match found.and_then(|found| conn.execute_batch("COMMIT").map(|()| found).map_err(sql)) {
        Ok(found) => Ok(found),
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            Err(e)
        }
    }
}

/// A time as the ledger stores it: UTC, RFC 3339, milliseconds.
pub(crate) fn timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    ))
    .unwrap_or_default()
}

fn timestamp_seconds(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
    ))
    .unwrap_or_default()
}
