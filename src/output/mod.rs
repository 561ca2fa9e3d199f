//! What a batch leaves behind: one folder per device and the manifest.
//!
//! ```text
//! OUT/manifest.csv              serial,thing_name,certificate_id,cert_serial,not_after,status,error
//! OUT/<thing_name>/cert.pem     the device certificate
//! OUT/<thing_name>/chain.pem    device certificate, then the CA certificate
//! OUT/<thing_name>/private.key  PKCS#8 PEM, mode 0600; only when the station made the key
//! OUT/<thing_name>/AmazonRootCA1.pem
//! ```
//!
//! Every file is written to a temporary name and renamed, so no half-written
//! file ever stands under its final name.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub mod bulk;

use serde::Serialize;

use crate::fsx::{self, Durability};

/// Amazon Root CA 1, which devices need to trust the AWS IoT endpoint.
pub const AMAZON_ROOT_CA1: &str = include_str!("../../fixtures/AmazonRootCA1.pem");
/// File names inside a device folder.
pub const CERT_FILE: &str = "cert.pem";
/// The chain file.
pub const CHAIN_FILE: &str = "chain.pem";
/// The private key file.
pub const KEY_FILE: &str = "private.key";
/// The root CA file.
pub const ROOT_FILE: &str = "AmazonRootCA1.pem";
/// The manifest.
pub const MANIFEST_FILE: &str = "manifest.csv";

/// Output could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// A file or folder could not be written.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The device already has credentials in this output folder.
    #[error("{path} already holds a certificate; refusing to overwrite it")]
    AlreadyIssued {
        /// The existing certificate.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The credentials of one device.
#[derive(Debug)]
pub struct Bundle<'a> {
    /// Folder name.
    pub thing_name: &'a str,
    /// cert.pem.
    pub cert_pem: &'a str,
    /// The CA certificate, appended in chain.pem.
    pub ca_pem: &'a str,
    /// private.key, when the station made the key.
    pub private_key_pem: Option<&'a str>,
}

/// Writes device folders under an output folder.
#[derive(Debug, Clone)]
pub struct BundleWriter {
    out: PathBuf,
    /// One copy of Amazon Root CA 1 that every device folder links to.
    root: PathBuf,
    /// Whether the output folder held device folders when this writer
    /// was made (not counting hidden ones: partial or set-aside bundles).
    had_devices: bool,
}

impl BundleWriter {
    /// Creates the output folder if needed and checks it is writable.
    pub fn create(out: &Path) -> Result<Self, OutputError> {
        fs::create_dir_all(out).map_err(io_err(out))?;
        let had_devices = fs::read_dir(out)
            .map_err(io_err(out))?
            .filter_map(Result::ok)
            .any(|e| {
                !e.file_name().to_string_lossy().starts_with('.')
                    && e.file_type().is_ok_and(|t| t.is_dir())
            });
        let probe = out.join(format!(".provline-probe-{}", std::process::id()));
        fs::write(&probe, b"").map_err(io_err(out))?;
        fs::remove_file(&probe).map_err(io_err(&probe))?;
        let root = out.join(format!(".{ROOT_FILE}"));
        fsx::write_atomic(
            &root,
            AMAZON_ROOT_CA1.as_bytes(),
            fsx::PUBLIC,
            Durability::Rename,
        )
        .map_err(io_err(&root))?;
        Ok(BundleWriter {
            out: out.to_path_buf(),
            root,
            had_devices,
        })
    }

    /// Whether a device folder may stand here from before this writer:
    /// false when the output folder held none, so a run into a new folder
    /// need not look for one device by device. ([`BundleWriter::write`]
    /// never overwrites a certificate either way.)
    pub fn may_hold_earlier_devices(&self) -> bool {
        self.had_devices
    }

    /// The output folder.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// The folder of one device.
    pub fn device_dir(&self, thing_name: &str) -> PathBuf {
        self.out.join(thing_name)
    }

    /// Writes a device's folder. Refuses if it already holds a certificate.
    ///
    /// The files are written into a temporary folder beside it
    /// (`.<thing_name>.partial`), which is then renamed into place: the
    /// device's folder appears complete or not at all, with one rename for
    /// the bundle rather than one per file.
    pub fn write(&self, bundle: &Bundle<'_>) -> Result<PathBuf, OutputError> {
        let dir = self.device_dir(bundle.thing_name);
        let partial = self.out.join(format!(".{}.partial", bundle.thing_name));
        match fs::create_dir(&partial) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Left by a run that was killed: nothing in it was delivered.
                fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
                fs::create_dir(&partial).map_err(io_err(&partial))?;
            }
            Err(e) => return Err(io_err(&partial)(e)),
        }
        let write = |name: &str, text: &str, mode| {
            let path = partial.join(name);
            fsx::write_new_file(&path, text.as_bytes(), mode).map_err(io_err(&path))
        };
        if let Some(key) = bundle.private_key_pem {
            write(KEY_FILE, key, fsx::SECRET)?;
        }
        let mut chain = String::with_capacity(bundle.cert_pem.len() + bundle.ca_pem.len());
        chain.push_str(bundle.cert_pem);
        chain.push_str(bundle.ca_pem);
        write(CHAIN_FILE, &chain, fsx::PUBLIC)?;
        write(CERT_FILE, bundle.cert_pem, fsx::PUBLIC)?;
        // The root is the same public file for every device: a hard link
        // costs one system call where a copy costs three.
        if fs::hard_link(&self.root, partial.join(ROOT_FILE)).is_err() {
            write(ROOT_FILE, AMAZON_ROOT_CA1, fsx::PUBLIC)?;
        }
        // An empty folder of that name is replaced by the rename; one with
        // files in it is not (rename refuses it), so a certificate standing
        // there is never overwritten, and asking first would cost every
        // device a lookup.
        match fs::rename(&partial, &dir) {
            Ok(()) => Ok(dir),
            Err(e) => {
                let _ = fs::remove_dir_all(&partial);
                let cert_path = dir.join(CERT_FILE);
                if cert_path.exists() {
                    return Err(OutputError::AlreadyIssued { path: cert_path });
                }
                Err(io_err(&dir)(e))
            }
        }
    }
}

/// Outcome of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Credentials written.
    Issued,
    /// Nothing issued; see the error.
    Failed,
}

/// One line of manifest.csv.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestRow {
    /// Device serial.
    pub serial: String,
    /// Thing name.
    pub thing_name: String,
    /// AWS certificate id.
    pub certificate_id: String,
    /// Certificate serial, hex.
    pub cert_serial: String,
    /// notAfter, RFC 3339.
    pub not_after: String,
    /// issued or failed.
    pub status: Status,
    /// Why it failed, naming the job line.
    pub error: String,
}

/// Writes manifest.csv: rows go to a temporary file, renamed when finished.
pub struct ManifestWriter {
    path: PathBuf,
    tmp: PathBuf,
    writer: csv::Writer<io::BufWriter<fs::File>>,
}

impl std::fmt::Debug for ManifestWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestWriter")
            .field("path", &self.path)
            .finish()
    }
}

impl ManifestWriter {
    /// Starts `OUT/manifest.csv`.
    pub fn create(out: &Path) -> Result<Self, OutputError> {
        let path = out.join(MANIFEST_FILE);
        let prefix = format!(".{MANIFEST_FILE}.tmp-");
        // Manifests of runs that were killed: the ledger holds what they did.
        for entry in fs::read_dir(out).map_err(io_err(out))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(entry.path());
            }
        }
        let tmp = out.join(format!("{prefix}{}", std::process::id()));
        let file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(ManifestWriter {
            writer: csv::Writer::from_writer(io::BufWriter::new(file)),
            path,
            tmp,
        })
    }

    /// Appends a row.
    pub fn push(&mut self, row: &ManifestRow) -> Result<(), OutputError> {
        self.writer.serialize(row).map_err(|e| OutputError::Io {
            path: self.tmp.clone(),
            source: io::Error::other(e),
        })
    }

    /// Flushes, syncs and moves the manifest to its final name.
    pub fn finish(self) -> Result<PathBuf, OutputError> {
        let file = self
            .writer
            .into_inner()
            .map_err(|e| io_err(&self.tmp)(e.into_error()))?
            .into_inner()
            .map_err(|e| io_err(&self.tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err(&self.tmp))?;
        fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        Ok(self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_amazon_root_has_the_published_fingerprint() {
        let der = pem::parse(AMAZON_ROOT_CA1).unwrap().into_contents();
        let digest = ring::digest::digest(&ring::digest::SHA256, &der);
        let hex = crate::ca::serial::hex(digest.as_ref()).to_uppercase();
        assert_eq!(
            hex,
            "8ECDE6884F3D87B1125BA31AC3FCB13D7016DE7F57CC904FE1CB97C6AE98196E"
        );
    }

    #[test]
    fn refuses_to_overwrite_a_device_folder_with_a_cert() {
        let dir = tempfile::tempdir().unwrap();
        let writer = BundleWriter::create(dir.path()).unwrap();
        let bundle = Bundle {
            thing_name: "t1",
            cert_pem: "C",
            ca_pem: "A",
            private_key_pem: Some("K"),
        };
        writer.write(&bundle).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("t1/chain.pem")).unwrap(),
            "CA"
        );
        let second = Bundle {
            cert_pem: "D",
            private_key_pem: Some("L"),
            ..bundle
        };
        assert!(matches!(
            writer.write(&second),
            Err(OutputError::AlreadyIssued { .. })
        ));
        // The first bundle stands, and the refused one left nothing behind.
        assert_eq!(
            fs::read_to_string(dir.path().join("t1/cert.pem")).unwrap(),
            "C"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("t1/private.key")).unwrap(),
            "K"
        );
        assert!(!dir.path().join(".t1.partial").exists());
    }
}
