//! The stages one device passes through in a batch, each a function:
//! key (station or CSR) -> intent recorded -> signed -> recorded ->
//! bundle written -> delivered.

use std::path::Path;

use ring::rand::SystemRandom;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::ca::serial::hex;
use crate::ca::{IssuedCert, LocalCa};
use crate::csr;
use crate::job::{DeviceRequest, KeySource, RowError};
use crate::keygen::{self, DeviceKey, PublicKey};
use crate::output::{Bundle, ManifestRow, Status, CERT_FILE};

/// A device's public key, and its private key when the station made it.
#[derive(Debug)]
pub struct KeyMaterial {
    /// The key to certify.
    pub public: PublicKey,
    /// The private key, station mode only.
    pub private: Option<DeviceKey>,
    /// The CSR as the device sent it (PEM or DER), CSR mode only.
    pub csr: Option<Vec<u8>>,
}

/// Stage 1: a fresh key from the station, or the checked key of the device's CSR.
pub fn obtain_key(source: &KeySource, rng: &SystemRandom) -> Result<KeyMaterial, String> {
    match source {
        KeySource::Station(key) => {
            let key = keygen::generate(*key, rng).map_err(|e| e.to_string())?;
            Ok(KeyMaterial {
                public: key.public_key().clone(),
                private: Some(key),
                csr: None,
            })
        }
        KeySource::Csr(path) => {
            let bytes = std::fs::read(path).map_err(|e| format!("CSR {}: {e}", path.display()))?;
            let checked = csr::check(&bytes).map_err(|e| format!("CSR {}: {e}", path.display()))?;
            Ok(KeyMaterial {
                public: checked.public_key,
                private: None,
                csr: Some(bytes),
            })
        }
    }
}

/// The manifest row of a device with credentials.
pub fn issued_row(
    req: &DeviceRequest,
    cert_serial: &str,
    certificate_id: &str,
    not_after: OffsetDateTime,
) -> ManifestRow {
    ManifestRow {
        serial: req.serial.clone(),
        thing_name: req.thing_name.clone(),
        certificate_id: certificate_id.to_string(),
        cert_serial: cert_serial.to_string(),
        not_after: not_after.format(&Rfc3339).unwrap_or_default(),
        status: Status::Issued,
        error: String::new(),
    }
}

/// The manifest row of a device that got nothing.
pub fn failed_row(err: &RowError) -> ManifestRow {
    ManifestRow {
        serial: err.serial.clone(),
        thing_name: err.thing_name.clone(),
        certificate_id: String::new(),
        cert_serial: String::new(),
        not_after: String::new(),
        status: Status::Failed,
        error: err.to_string(),
    }
}

/// The row error of a device request.
pub fn row_error(req: &DeviceRequest, problem: impl Into<String>) -> RowError {
    RowError {
        line: req.line,
        serial: req.serial.clone(),
        thing_name: req.thing_name.clone(),
        problem: problem.into(),
    }
}

/// Signs the device's certificate under a serial already recorded as intent.
pub fn sign(
    ca: &LocalCa,
    profile: &crate::ca::DeviceProfile,
    req: &DeviceRequest,
    key: &PublicKey,
    cert_serial: &[u8],
    now: OffsetDateTime,
) -> Result<IssuedCert, String> {
    ca.issue_device_as(profile, &req.thing_name, &req.serial, key, cert_serial, now)
        .map_err(|e| e.to_string())
}

/// The bundle of a signed certificate.
pub fn bundle<'a>(
    req: &'a DeviceRequest,
    cert_pem: &'a str,
    ca_pem: &'a str,
    key_pem: Option<&'a str>,
) -> Bundle<'a> {
    Bundle {
        thing_name: &req.thing_name,
        cert_pem,
        ca_pem,
        private_key_pem: key_pem,
    }
}

/// The serial of the certificate in `dir/cert.pem`, if it holds one that parses.
pub fn delivered_serial(dir: &Path) -> Option<String> {
    let text = std::fs::read(dir.join(CERT_FILE)).ok()?;
    let der = pem::parse(text).ok()?.into_contents();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let raw = cert.raw_serial();
    let raw = match raw {
        [0, rest @ ..] if !rest.is_empty() => rest,
        _ => raw,
    };
    Some(hex(raw))
}

/// The notAfter of a DER certificate.
pub fn not_after_of(der: &[u8]) -> Option<OffsetDateTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.to_datetime())
}
