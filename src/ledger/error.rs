//! What can go wrong with the ledger, each error naming the file and the operation.

use std::path::PathBuf;

use super::types::{CertState, DeviceState, JobId};

/// A ledger operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// SQLite failed: I/O, a full disk (see [`LedgerError::is_disk_full`]),
    /// a corrupt file, a lock held too long.
    #[error("{}: {op}: {source}", path.display())]
    Sqlite {
        /// The ledger file.
        path: PathBuf,
        /// What the ledger was doing, e.g. `recording intent for device SN-1`.
        op: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer station.
    #[error("{}: ledger schema version {found} is newer than this station's {supported}; use a newer provline", path.display())]
    NewerSchema {
        /// The ledger file.
        path: PathBuf,
        /// The file's schema version.
        found: i64,
        /// The newest version this station knows.
        supported: i64,
    },
    /// The file is not a ledger this station can read.
    #[error("{}: not a provline ledger ({reason})", path.display())]
    NotALedger {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another station process has the ledger open for writing.
    #[error("{}: in use by another station process (lock {})", path.display(), lock.display())]
    InUse {
        /// The ledger file.
        path: PathBuf,
        /// The lock file held.
        lock: PathBuf,
    },
    /// The device is not in the ledger (under this CA).
    #[error("{}: {op}: device {serial} is not in the ledger", path.display())]
    UnknownDevice {
        /// The ledger file.
        path: PathBuf,
        /// What the ledger was doing.
        op: String,
        /// The device serial.
        serial: String,
    },
    /// The device belongs to another job and no re-issue was asked for.
    #[error("{}: device {serial} belongs to job {other_job} (line {other_line}); ask for a re-issue to certify it again", path.display())]
    OtherJob {
        /// The ledger file.
        path: PathBuf,
        /// The device serial.
        serial: String,
        /// The job it belongs to.
        other_job: JobId,
        /// Its line there.
        other_line: u64,
    },
    /// The certificate serial is already in the ledger.
    #[error("{}: recording intent for device {serial}: certificate serial {cert_serial} was already used (device {used_by})", path.display())]
    DuplicateCertSerial {
        /// The ledger file.
        path: PathBuf,
        /// The device asking.
        serial: String,
        /// The certificate serial.
        cert_serial: String,
        /// The device that has it.
        used_by: String,
    },
    /// The DER recorded for an intent is not a certificate under the
    /// intent's serial.
    #[error("{}: recording certificate {cert_serial}: the DER {}", path.display(), found.as_deref().map_or("is not an X.509 certificate".to_string(), |s| format!("carries serial {s}")))]
    CertificateMismatch {
        /// The ledger file.
        path: PathBuf,
        /// The serial of the intent.
        cert_serial: String,
        /// The serial the DER carries, if it is a certificate.
        found: Option<String>,
    },
    /// The public key was already certified for another device.
    #[error("{}: recording intent for device {serial}: public key {public_key} was already certified for device {used_by} (certificate {used_cert_serial})", path.display())]
    ReusedPublicKey {
        /// The ledger file.
        path: PathBuf,
        /// The device asking.
        serial: String,
        /// SHA-256 hex of the key.
        public_key: String,
        /// The device it was certified for.
        used_by: String,
        /// That certificate's serial.
        used_cert_serial: String,
    },
    /// The device already holds a live certificate, or an intent is pending.
    #[error("{}: recording intent for device {serial}: certificate {cert_serial} is {state}; supersede it first", path.display())]
    CertificateExists {
        /// The ledger file.
        path: PathBuf,
        /// The device serial.
        serial: String,
        /// The certificate it holds.
        cert_serial: String,
        /// `live` or `intent`.
        state: CertState,
    },
    /// No intent waits under this certificate serial.
    #[error("{}: recording certificate {cert_serial}: no intent recorded for it ({})", path.display(), found.map_or("unknown serial".to_string(), |s| format!("it is {s}")))]
    NoIntent {
        /// The ledger file.
        path: PathBuf,
        /// The certificate serial.
        cert_serial: String,
        /// Its state, when the serial is known.
        found: Option<CertState>,
    },
    /// A state change the lifecycle does not allow.
    #[error("{}: device {serial}: cannot go from {from} to {to}{}", path.display(), if note.is_empty() { String::new() } else { format!(" ({note})") })]
    Transition {
        /// The ledger file.
        path: PathBuf,
        /// The device serial.
        serial: String,
        /// Its state.
        from: DeviceState,
        /// The state asked for.
        to: DeviceState,
        /// Why not, when it is not just the order.
        note: String,
    },
    /// An argument the ledger cannot store.
    #[error("{}: {op}: {problem}", path.display())]
    Invalid {
        /// The ledger file.
        path: PathBuf,
        /// What the ledger was doing.
        op: String,
        /// What is wrong.
        problem: String,
    },
    /// The writer thread is gone (it panicked); nothing more can be recorded.
    #[error("{}: {op}: the ledger writer has stopped", path.display())]
    WriterStopped {
        /// The ledger file.
        path: PathBuf,
        /// What the ledger was doing.
        op: String,
    },
}

impl LedgerError {
    /// Whether SQLite reported a full disk (`SQLITE_FULL`).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, LedgerError::Sqlite { source, .. }
            if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
    }

    /// The SQLite error, when the failure is SQLite's.
    pub fn sqlite(&self) -> Option<&rusqlite::Error> {
        match self {
            LedgerError::Sqlite { source, .. } => Some(source),
            _ => None,
        }
    }
}
