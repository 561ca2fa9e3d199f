//! The newline-delimited JSON that AWS IoT's StartThingRegistrationTask
//! reads: one device a line, its template parameters and its CSR.
//!
//! ```text
//! {"ThingName":"sensor_SN-1","SerialNumber":"SN-1","CSR":"-----BEGIN CERTIFICATE REQUEST-----\n..."}
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use super::OutputError;
use crate::keygen::DeviceKey;

/// One line of the bulk-registration file.
#[derive(Debug, Clone, Serialize)]
pub struct BulkLine<'a> {
    /// Template parameter ThingName.
    #[serde(rename = "ThingName")]
    pub thing_name: &'a str,
    /// Template parameter SerialNumber.
    #[serde(rename = "SerialNumber")]
    pub serial: &'a str,
    /// The device's CSR, PEM.
    #[serde(rename = "CSR")]
    pub csr: &'a str,
    /// Any further template parameters (the job's attribute columns).
    #[serde(flatten)]
    pub attributes: &'a BTreeMap<String, String>,
}

/// Appends lines to the bulk-registration file from any worker.
#[derive(Debug)]
pub struct BulkWriter {
    path: PathBuf,
    out: Mutex<BufWriter<File>>,
}

impl BulkWriter {
    /// Creates (or truncates) the file.
    pub fn create(path: &Path) -> Result<Self, OutputError> {
        let file = File::create(path).map_err(|source| OutputError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(BulkWriter {
            path: path.to_path_buf(),
            out: Mutex::new(BufWriter::new(file)),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one device's line.
    pub fn push(&self, line: &BulkLine<'_>) -> Result<(), OutputError> {
        let mut text =
            serde_json::to_string(line).map_err(|e| self.err(std::io::Error::other(e)))?;
        text.push('\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(text.as_bytes()).map_err(|e| self.err(e))
    }

    /// Flushes and syncs the file.
    pub fn finish(self) -> Result<PathBuf, OutputError> {
        let out = self.out.into_inner().unwrap_or_else(|p| p.into_inner());
        let file = out.into_inner().map_err(|e| OutputError::Io {
            path: self.path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(|source| OutputError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.path)
    }

    fn err(&self, source: std::io::Error) -> OutputError {
        OutputError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// A CSR for a key the station made, so bulk registration can take it.
pub fn csr_for(key: &DeviceKey, thing_name: &str) -> Result<String, String> {
    csr_for_pem(&key.pkcs8_pem(), thing_name)
}

/// [`csr_for`] for a PKCS#8 PEM key (a device folder's `private.key`).
pub fn csr_for_pem(key_pem: &str, thing_name: &str) -> Result<String, String> {
    let pair = rcgen::KeyPair::from_pem(key_pem).map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, thing_name);
    params
        .serialize_request(&pair)
        .and_then(|csr| csr.pem())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygen::{self, KeyType};

    #[test]
    fn lines_are_json_with_a_csr_that_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulk.jsonl");
        let writer = BulkWriter::create(&path).unwrap();
        let key = keygen::generate(KeyType::P256, &ring::rand::SystemRandom::new()).unwrap();
        let csr = csr_for(&key, "sensor_1").unwrap();
        let attributes = BTreeMap::from([("location".to_string(), "hall-3".to_string())]);
        writer
            .push(&BulkLine {
                thing_name: "sensor_1",
                serial: "SN-1",
                csr: &csr,
                attributes: &attributes,
            })
            .unwrap();
        writer.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(line["ThingName"], "sensor_1");
        assert_eq!(line["location"], "hall-3");
        let checked = crate::csr::check(line["CSR"].as_str().unwrap().as_bytes()).unwrap();
        assert_eq!(&checked.public_key, key.public_key());
    }
}
