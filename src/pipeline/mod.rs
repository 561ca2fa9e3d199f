//! A batch job: rows in, credentials out, on every core.
//!
//! ```text
//! reader thread ──(bounded)──> N workers: key or CSR -> sign -> bundle ──(bounded)──> manifest
//! ```
//!
//! Each stage is a function of its own ([`obtain_key`], [`provision`]) so
//! the same steps serve the batch, the benchmark and the line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use ring::rand::SystemRandom;
use time::format_description::well_known::Rfc3339;

use crate::ca::{DeviceProfile, LocalCa};
use crate::clock::Clock;
use crate::csr;
use crate::job::{DeviceRequest, JobConfig, JobError, JobReader, KeySource, RowError};
use crate::keygen::{self, DeviceKey, PublicKey};
use crate::output::{
    Bundle, BundleWriter, ManifestRow, ManifestWriter, OutputError, Status, CERT_FILE,
};

/// What a batch needs besides the CA.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// The job CSV.
    pub job: PathBuf,
    /// The output folder.
    pub out: PathBuf,
    /// Worker threads for the crypto.
    pub threads: usize,
    /// How rows become devices.
    pub job_config: JobConfig,
    /// The certificate profile.
    pub profile: DeviceProfile,
}

/// What a batch did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSummary {
    /// Devices with credentials written.
    pub issued: u64,
    /// Devices that failed (each in the manifest with its reason).
    pub failed: u64,
    /// Wall time.
    pub seconds: f64,
}

impl BatchSummary {
    /// Devices per second, failed ones included.
    pub fn rate(&self) -> f64 {
        (self.issued + self.failed) as f64 / self.seconds.max(1e-9)
    }
}

/// A batch that could not start or could not finish its output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The job cannot be read.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The output cannot be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The job has no rows.
    #[error("{0}: the job has no device rows")]
    EmptyJob(PathBuf),
    /// The profile's fixed subject fields are invalid.
    #[error("certificate profile: {0}")]
    Profile(#[from] crate::ca::dn::DnError),
}

/// A device's public key, and its private key when the station made it.
#[derive(Debug)]
pub struct KeyMaterial {
    /// The key to certify.
    pub public: PublicKey,
    /// The private key, station mode only.
    pub private: Option<DeviceKey>,
}

/// Stage 1: a fresh key from the station, or the checked key of the device's CSR.
pub fn obtain_key(source: &KeySource, rng: &SystemRandom) -> Result<KeyMaterial, String> {
    match source {
        KeySource::Station(key) => {
            let key = keygen::generate(*key, rng).map_err(|e| e.to_string())?;
            Ok(KeyMaterial {
                public: key.public_key().clone(),
                private: Some(key),
            })
        }
        KeySource::Csr(path) => {
            let bytes = std::fs::read(path).map_err(|e| format!("CSR {}: {e}", path.display()))?;
            let checked = csr::check(&bytes).map_err(|e| format!("CSR {}: {e}", path.display()))?;
            Ok(KeyMaterial {
                public: checked.public_key,
                private: None,
            })
        }
    }
}

/// Public keys already certified in this run, so no key is certified twice.
#[derive(Debug, Default)]
pub struct SeenKeys(Mutex<HashMap<[u8; 32], u64>>);

impl SeenKeys {
    /// Records `key` for `line`; the line that had it first if it was seen.
    pub fn first_use(&self, key: &PublicKey, line: u64) -> Option<u64> {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.raw());
        let mut id = [0u8; 32];
        id.copy_from_slice(digest.as_ref());
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get(&id) {
            Some(first) => Some(*first),
            None => {
                seen.insert(id, line);
                None
            }
        }
    }
}

/// Everything a worker shares.
#[derive(Debug)]
pub struct Provisioner<'a> {
    /// The CA.
    pub ca: &'a LocalCa,
    /// The profile.
    pub profile: &'a DeviceProfile,
    /// The output.
    pub writer: &'a BundleWriter,
    /// The clock.
    pub clock: &'a dyn Clock,
    /// Keys certified so far.
    pub seen: &'a SeenKeys,
}

/// Stages 1-3 for one device: key, certificate, bundle.
pub fn provision(p: &Provisioner<'_>, req: &DeviceRequest, rng: &SystemRandom) -> ManifestRow {
    match provision_inner(p, req, rng) {
        Ok(row) => row,
        Err(problem) => failed_row(&RowError {
            line: req.line,
            serial: req.serial.clone(),
            thing_name: req.thing_name.clone(),
            problem,
        }),
    }
}

fn provision_inner(
    p: &Provisioner<'_>,
    req: &DeviceRequest,
    rng: &SystemRandom,
) -> Result<ManifestRow, String> {
    let existing = p.writer.device_dir(&req.thing_name).join(CERT_FILE);
    if existing.exists() {
        return Err(format!(
            "{} already holds a certificate for this device",
            existing.display()
        ));
    }
    let key = obtain_key(&req.key, rng)?;
    if key.private.is_none() {
        if let Some(first) = p.seen.first_use(&key.public, req.line) {
            return Err(format!(
                "the CSR's public key was already certified for line {first}"
            ));
        }
    }
    let cert =
        p.ca.issue_device(
            p.profile,
            &req.thing_name,
            &req.serial,
            &key.public,
            p.clock.now(),
        )
        .map_err(|e| e.to_string())?;
    let cert_pem = cert.pem();
    let key_pem = key.private.as_ref().map(DeviceKey::pkcs8_pem);
    p.writer
        .write(&Bundle {
            thing_name: &req.thing_name,
            cert_pem: &cert_pem,
            ca_pem: p.ca.cert_pem(),
            private_key_pem: key_pem.as_deref(),
        })
        .map_err(|e| e.to_string())?;
    Ok(ManifestRow {
        serial: req.serial.clone(),
        thing_name: req.thing_name.clone(),
        certificate_id: cert.certificate_id(),
        cert_serial: cert.serial_hex(),
        not_after: cert.not_after.format(&Rfc3339).unwrap_or_default(),
        status: Status::Issued,
        error: String::new(),
    })
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

/// Runs a whole batch. `observe` sees every manifest row as it is written.
pub fn run(
    ca: &LocalCa,
    config: &BatchConfig,
    clock: &dyn Clock,
    observe: &mut dyn FnMut(&ManifestRow),
) -> Result<BatchSummary, BatchError> {
    let started = Instant::now();
    config.profile.fixed_subject()?;
    let mut rows = JobReader::open(&config.job, config.job_config.clone())?.peekable();
    if rows.peek().is_none() {
        return Err(BatchError::EmptyJob(config.job.clone()));
    }
    let writer = BundleWriter::create(&config.out)?;
    let mut manifest = ManifestWriter::create(&config.out)?;
    let seen = SeenKeys::default();
    let provisioner = Provisioner {
        ca,
        profile: &config.profile,
        writer: &writer,
        clock,
        seen: &seen,
    };
    let threads = config.threads.max(1);
    let (work_tx, work_rx) =
        crossbeam_channel::bounded::<Result<DeviceRequest, RowError>>(threads * 64);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<ManifestRow>(threads * 64);
    let mut summary = BatchSummary {
        issued: 0,
        failed: 0,
        seconds: 0.0,
    };
    let mut write_error = None;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for row in rows {
                if work_tx.send(row).is_err() {
                    break;
                }
            }
        });
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let provisioner = &provisioner;
            scope.spawn(move || {
                let rng = SystemRandom::new();
                for item in work_rx {
                    let row = match item {
                        Ok(req) => provision(provisioner, &req, &rng),
                        Err(err) => failed_row(&err),
                    };
                    if done_tx.send(row).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        for row in done_rx {
            match row.status {
                Status::Issued => summary.issued += 1,
                Status::Failed => summary.failed += 1,
            }
            observe(&row);
            if write_error.is_none() {
                write_error = manifest.push(&row).err();
            }
        }
    });
    if let Some(e) = write_error {
        return Err(e.into());
    }
    manifest.finish()?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The default output folder for a job.
pub fn default_out(job: &Path) -> PathBuf {
    let stem = job
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    PathBuf::from(format!("provline-out/{stem}"))
}
