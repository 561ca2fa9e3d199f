//! The values the ledger stores and answers with.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;

/// Where a device stands, in the order a device moves through them.
///
/// `planned -> key_ready -> issued -> registered -> delivered -> verified`,
/// or `failed` (with a reason) from any of them. A job that does not
/// register goes from `issued` to `delivered` directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// The device is in the ledger, nothing done yet.
    Planned,
    /// Its key exists: made by the station, or its CSR checked.
    KeyReady,
    /// A certificate is signed and recorded (live).
    Issued,
    /// The certificate is registered with the cloud.
    Registered,
    /// The credentials reached the device (or its bundle is written).
    Delivered,
    /// The device proved it holds the key and the certificate.
    Verified,
    /// The device stopped with an error; see its `error`.
    Failed,
}

impl DeviceState {
    /// Every state, in order.
    pub const ALL: [DeviceState; 7] = [
        DeviceState::Planned,
        DeviceState::KeyReady,
        DeviceState::Issued,
        DeviceState::Registered,
        DeviceState::Delivered,
        DeviceState::Verified,
        DeviceState::Failed,
    ];

    /// The name stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Planned => "planned",
            DeviceState::KeyReady => "key_ready",
            DeviceState::Issued => "issued",
            DeviceState::Registered => "registered",
            DeviceState::Delivered => "delivered",
            DeviceState::Verified => "verified",
            DeviceState::Failed => "failed",
        }
    }

    /// Whether the device holds a live certificate in this state.
    pub fn has_certificate(self) -> bool {
        matches!(
            self,
            DeviceState::Issued
                | DeviceState::Registered
                | DeviceState::Delivered
                | DeviceState::Verified
        )
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown device state {s:?}"))
    }
}

/// Where a certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    /// Recorded before signing; the signature may or may not exist.
    Intent,
    /// Signed and recorded: the device's current certificate.
    Live,
    /// No longer the device's certificate; see the reason.
    Superseded,
}

impl CertState {
    /// The name stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Intent => "intent",
            CertState::Live => "live",
            CertState::Superseded => "superseded",
        }
    }
}

impl fmt::Display for CertState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CertState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [CertState::Intent, CertState::Live, CertState::Superseded]
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown certificate state {s:?}"))
    }
}

/// Why a certificate was superseded: a re-issue was asked for.
pub const REASON_REISSUE: &str = "reissue";
/// Why a certificate was superseded: an intent found on opening, whose
/// signature may exist but was never recorded nor delivered.
pub const REASON_CRASH: &str = "never delivered (crash)";

/// The CA a device's certificates come from: lower-case hex SHA-256 of the
/// CA certificate's DER.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct CaId(String);

impl CaId {
    /// The id of the CA whose certificate is `der`.
    pub fn of_certificate(der: &[u8]) -> CaId {
        CaId(sha256_hex(der))
    }

    /// An id given as 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Option<CaId> {
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| CaId(hex.to_ascii_lowercase()))
    }

    /// An id read back from the ledger, written there by this module.
    pub(crate) fn from_stored(hex: String) -> CaId {
        CaId(hex)
    }

    /// The lower-case hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The job a device was planned by: the job file and a label. Two jobs are
/// the same when both are equal; a label such as the SHA-256 of the job's
/// contents keeps a moved or edited file apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct JobId {
    /// The job file, as given to the station.
    pub file: String,
    /// A label chosen by the operator or the station.
    pub label: String,
}

impl JobId {
    /// A job id from its file and label.
    pub fn new(file: impl Into<PathBuf>, label: impl Into<String>) -> JobId {
        JobId {
            file: file.into().to_string_lossy().into_owned(),
            label: label.into(),
        }
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.label.is_empty() {
            f.write_str(&self.file)
        } else {
            write!(f, "{} ({})", self.file, self.label)
        }
    }
}

/// A device as a job plans it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDevice {
    /// The device serial.
    pub serial: String,
    /// The thing name (certificate CN).
    pub thing_name: String,
    /// Line in the job file.
    pub line: u64,
}

/// What [`Ledger::plan`](super::Ledger::plan) found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanOutcome {
    /// The device was not in the ledger; it is now, `planned`.
    New,
    /// The device was already planned by this job: here is where it stands.
    /// Nothing was changed.
    Resume(DeviceStatus),
    /// The device had failed in this job; it goes back to `issued` if it
    /// holds a live certificate, else to `planned`.
    Retry {
        /// The state it is back to.
        state: DeviceState,
        /// The error it had failed with.
        previous_error: String,
    },
    /// The device belonged to another job and a re-issue was asked for: it
    /// now belongs to this job, `planned`, and its live certificate, if
    /// any, is superseded (reason `reissue`).
    Reissue {
        /// The job it belonged to.
        previous_job: JobId,
        /// The serial of the certificate superseded, if it had one.
        superseded: Option<String>,
    },
}

/// A device's record, for resuming a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceStatus {
    /// The device serial.
    pub serial: String,
    /// The thing name.
    pub thing_name: String,
    /// The job that planned it.
    pub job: JobId,
    /// Its line in that job.
    pub line: u64,
    /// Where it stands.
    pub state: DeviceState,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Serial of its live certificate, if any.
    pub live_cert_serial: Option<String>,
    /// Id of its live certificate, if any.
    pub live_certificate_id: Option<String>,
    /// Serial of an intent not yet signed or recorded, if any.
    pub pending_intent: Option<String>,
    /// When it was planned (UTC, RFC 3339).
    pub created: String,
    /// When it last changed.
    pub updated: String,
}

impl DeviceStatus {
    /// Whether the device reached `last` without failing: a re-run of its
    /// job has nothing left to do for it.
    pub fn is_finished(&self, last: DeviceState) -> bool {
        self.state != DeviceState::Failed && self.state >= last
    }
}

/// A certificate as exported: one row per certificate ever signed (or
/// about to be) through the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateRow {
    /// The CA (SHA-256 hex of its certificate).
    pub ca: CaId,
    /// The device serial.
    pub device_serial: String,
    /// The thing name.
    pub thing_name: String,
    /// The certificate serial, lower-case hex.
    pub cert_serial: String,
    /// SHA-256 hex of the DER, once signed.
    pub certificate_id: Option<String>,
    /// SHA-256 hex of the certified public key.
    pub public_key: String,
    /// Where it stands.
    pub state: CertState,
    /// Why it was superseded.
    pub reason: Option<String>,
    /// Its notAfter (RFC 3339), once signed.
    pub not_after: Option<String>,
    /// When the intent was recorded.
    pub created: String,
    /// When it last changed.
    pub updated: String,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Its position in the log.
    pub id: i64,
    /// When (UTC, RFC 3339).
    pub time: String,
    /// The CA.
    pub ca: CaId,
    /// The device serial.
    pub device_serial: String,
    /// What happened (`planned`, `intent`, `issued`, `superseded`, ...).
    pub event: String,
    /// Details: certificate serial, reason, ...
    pub detail: String,
}

/// An intent found on opening with no certificate recorded: the signature
/// may exist, was never delivered, and is now superseded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AbandonedIntent {
    /// The CA.
    pub ca: CaId,
    /// The device serial.
    pub device_serial: String,
    /// The certificate serial that may have been signed.
    pub cert_serial: String,
    /// When the intent was recorded.
    pub since: String,
}

/// Lower-case hex SHA-256: a certificate's id (of its DER), a public key's
/// fingerprint.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::ca::serial::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A certificate serial as stored: lower-case hex, no separators.
pub(crate) fn normalise_serial(hex: &str) -> Option<String> {
    let hex = hex.trim();
    (!hex.is_empty() && hex.len() <= 42 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// The serial number a certificate's DER carries, as lower-case hex
/// without leading zeros; `None` if `der` is not shaped as an X.509
/// certificate. Only the outer structure is read, up to the serial
/// (`SEQUENCE { SEQUENCE { [0] version OPTIONAL, INTEGER serial, ...`):
/// the certificate comes from this station's signer, and a full parse
/// here cost a tenth of the instructions of the signature itself.
pub(crate) fn der_serial(der: &[u8]) -> Option<String> {
    use x509_parser::asn1_rs::{Any, Class, FromDer, Tag};
    let (rest, cert) = Any::from_der(der).ok()?;
    if !rest.is_empty() || cert.tag() != Tag::Sequence {
        return None;
    }
    let (_, tbs) = Any::from_der(cert.data).ok()?;
    if tbs.tag() != Tag::Sequence {
        return None;
    }
    let (fields, first) = Any::from_der(tbs.data).ok()?;
    let serial = if first.class() == Class::ContextSpecific && first.tag() == Tag(0) {
        Any::from_der(fields).ok()?.1
    } else {
        first
    };
    (serial.class() == Class::Universal && serial.tag() == Tag::Integer)
        .then(|| significant_hex(&crate::ca::serial::hex(serial.data)))
}

/// A hex number without its leading zeros ("0" for zero).
pub(crate) fn significant_hex(hex: &str) -> String {
    match hex.trim_start_matches('0') {
        "" => "0".to_string(),
        digits => digits.to_string(),
    }
}
