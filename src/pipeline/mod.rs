//! A batch job: rows in, credentials out, on every core, with every step
//! in the ledger so a killed run finishes on the next.
//!
//! ```text
//! reader thread: CSV rows -> ledger plan (256 a chunk)
//!     │ bounded
//!     ▼
//! 2N workers: key or CSR -> intent (committed) -> sign -> issued (committed) -> bundle -> delivered
//!     │ bounded
//!     ▼
//! collector (tokio): manifest, progress, Ctrl-C
//! ```
//!
//! Each worker handles a chunk of devices at a time, queueing the chunk's
//! ledger operations together so they share commits. The crypto and the
//! file writes run on the workers (two per core, N = `--threads`); tokio
//! orchestrates the collector and signals. Memory does not grow with the
//! job: rows stream through bounded queues and uniqueness is checked by the
//! ledger.

pub mod device;
mod register;
mod resume;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ring::rand::SystemRandom;

use crate::ca::{DeviceProfile, LocalCa};
use crate::clock::Clock;
use crate::cloud::cli::BatchCloud;
use crate::job::{DeviceRequest, JobConfig, JobError, JobReader, KeySource, RowError};
use crate::keygen::DeviceKey;
use crate::ledger::{self, CaId, DeviceState, JobId, Ledger, LedgerError, LedgerOptions, Pending};
use crate::output::bulk::{self, BulkLine, BulkWriter};
use crate::output::{BundleWriter, ManifestRow, ManifestWriter, OutputError};
use crate::progress::Outcome;
use device::{failed_row, issued_row, obtain_key, row_error};
use resume::Action;

pub use device::KeyMaterial;

/// Devices a worker takes at once; their ledger operations share commits.
/// The larger the commit, the fewer times a ledger page is written: a
/// device's public key lands on a random page of its index, and a commit
/// writes each page it touched once (a 20,000-device batch: 32% fewer
/// `pwrite` calls with chunks of 256 than of 64, 8% more devices/s).
const CHUNK: usize = 256;

/// Devices a registering worker takes at once: it holds them while AWS's
/// pace lets them through, so smaller chunks reach `delivered` sooner.
const REGISTERING_CHUNK: usize = 64;

/// What a batch needs besides the CA.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// The job CSV.
    pub job: PathBuf,
    /// The output folder.
    pub out: PathBuf,
    /// Cores for the crypto and the files (two workers run on each, so
    /// that one works while the other waits for the ledger).
    pub threads: usize,
    /// How rows become devices.
    pub job_config: JobConfig,
    /// The certificate profile.
    pub profile: DeviceProfile,
    /// The ledger file.
    pub ledger: PathBuf,
    /// What a ledger commit survives.
    pub durability: ledger::Durability,
    /// Re-issue devices the ledger holds from another job.
    pub reissue: bool,
    /// Also write bulk-registration JSONL here.
    pub bulk_jsonl: Option<PathBuf>,
}

/// What a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BatchSummary {
    /// Devices issued and written in this run.
    pub issued: u64,
    /// Devices an earlier run had finished, left as they were.
    pub skipped: u64,
    /// Devices that failed (each in the manifest with its reason).
    pub failed: u64,
    /// Whether Ctrl-C stopped the run before the end of the job.
    pub interrupted: bool,
    /// Wall time.
    pub seconds: f64,
}

impl BatchSummary {
    /// Devices handled per second.
    pub fn rate(&self) -> f64 {
        (self.issued + self.failed + self.skipped) as f64 / self.seconds.max(1e-9)
    }
}

/// A batch that could not start, or had to stop.
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
    /// The ledger cannot be opened or written.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Orchestration failed to start.
    #[error("starting the pipeline: {0}")]
    Runtime(String),
}

/// The default output folder for a job.
pub fn default_out(job: &Path) -> PathBuf {
    let stem = job
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    PathBuf::from(format!("provline-out/{stem}"))
}

/// The default ledger of an output folder: `OUT.ledger.sqlite` beside it.
pub fn default_ledger(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{name}.ledger.sqlite"))
}

/// What workers share.
pub(crate) struct Shared<'a> {
    ca: &'a LocalCa,
    profile: &'a DeviceProfile,
    writer: &'a BundleWriter,
    ledger: &'a Ledger,
    bulk: Option<&'a BulkWriter>,
    clock: &'a dyn Clock,
    stop: &'a AtomicBool,
    fatal: Mutex<Option<BatchError>>,
    /// Per-device cloud registration, between `issued` and `delivered`.
    cloud: Option<&'a BatchCloud>,
}

impl Shared<'_> {
    /// Stops the run for an error no device can get past (full disk, ledger gone).
    /// The bulk-registration line of a device delivered before this point
    /// of the run (skipped, adopted, re-delivered): its CSR comes from the
    /// job's CSR file or is made from the key in its folder. The file must
    /// list every device of the job, so a device that cannot have its line
    /// stops the run.
    pub(crate) fn bulk_done(&self, req: &DeviceRequest) {
        let Some(bulk) = self.bulk else { return };
        let csr = match &req.key {
            KeySource::Csr(path) => std::fs::read(path)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .map_err(|e| format!("{}: {e}", path.display())),
            KeySource::Station(_) => {
                let key = self
                    .writer
                    .device_dir(&req.thing_name)
                    .join(crate::output::KEY_FILE);
                std::fs::read_to_string(&key)
                    .map_err(|e| format!("{}: {e}", key.display()))
                    .and_then(|pem| bulk::csr_for_pem(&pem, &req.thing_name))
            }
        };
        let line = csr.and_then(|csr| {
            bulk.push(&BulkLine {
                thing_name: &req.thing_name,
                serial: &req.serial,
                csr: &csr,
                attributes: &req.attributes,
            })
            .map_err(|e| e.to_string())
        });
        if let Err(problem) = line {
            self.abort(bulk_error(bulk, &req.serial, problem));
        }
    }

    pub(crate) fn abort(&self, err: BatchError) {
        self.stop.store(true, Ordering::SeqCst);
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        fatal.get_or_insert(err);
    }
}

/// Whether a ledger error stops the whole run rather than one device.
pub(crate) fn is_fatal(e: &LedgerError) -> bool {
    e.is_disk_full()
        || matches!(e, LedgerError::WriterStopped { .. })
        || matches!(e, LedgerError::Sqlite { .. })
}

fn is_disk_full(e: &OutputError) -> bool {
    matches!(e, OutputError::Io { source, .. } if source.raw_os_error() == Some(28))
}

/// Runs a whole batch. `observe` sees every manifest row as it is written.
/// `stop` ends the run early (Ctrl-C sets it too): devices in flight finish.
pub fn run(
    ca: &LocalCa,
    config: &BatchConfig,
    clock: &dyn Clock,
    stop: &AtomicBool,
    observe: &mut dyn FnMut(&ManifestRow, Outcome),
) -> Result<BatchSummary, BatchError> {
    run_registering(ca, config, None, clock, stop, observe)
}

/// [`run`], registering every device with AWS IoT through `cloud` between
/// `issued` and `delivered` (`None`: no per-device registration).
pub fn run_registering(
    ca: &LocalCa,
    config: &BatchConfig,
    cloud: Option<&BatchCloud>,
    clock: &dyn Clock,
    stop: &AtomicBool,
    observe: &mut dyn FnMut(&ManifestRow, Outcome),
) -> Result<BatchSummary, BatchError> {
    let started = Instant::now();
    config.profile.fixed_subject()?;
    let job_config = JobConfig {
        track_duplicates: false,
        ..config.job_config.clone()
    };
    let mut rows = JobReader::open(&config.job, job_config)?.peekable();
    if rows.peek().is_none() {
        return Err(BatchError::EmptyJob(config.job.clone()));
    }
    let writer = BundleWriter::create(&config.out)?;
    let ledger = Ledger::open(
        &config.ledger,
        CaId::of_certificate(ca.cert_der()),
        LedgerOptions {
            durability: config.durability,
            ..LedgerOptions::default()
        },
    )?;
    let job_file = std::fs::canonicalize(&config.job).unwrap_or_else(|_| config.job.clone());
    let job_id = JobId::new(job_file, "");
    let mut manifest = ManifestWriter::create(&config.out)?;
    let bulk = config
        .bulk_jsonl
        .as_deref()
        .map(BulkWriter::create)
        .transpose()?;
    let shared = Shared {
        ca,
        profile: &config.profile,
        writer: &writer,
        ledger: &ledger,
        bulk: bulk.as_ref(),
        clock,
        stop,
        fatal: Mutex::new(None),
        cloud,
    };
    let threads = config.threads.max(1)
        * match cloud {
            // A registering worker spends most of a chunk waiting on AWS's
            // pace: more workers than cores keep every API's limiter fed
            // while some of them sign and write their next chunk.
            Some(_) => REGISTERING_WORKERS_PER_THREAD,
            None => WORKERS_PER_THREAD,
        };
    let (work_tx, work_rx) =
        crossbeam_channel::bounded::<Vec<(DeviceRequest, Action)>>(threads * 2);
    let chunk = match cloud {
        Some(_) => REGISTERING_CHUNK,
        None => CHUNK,
    };
    let (done_tx, mut done_rx) =
        tokio::sync::mpsc::channel::<(ManifestRow, Outcome)>(threads * chunk * 2);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BatchError::Runtime(e.to_string()))?;
    let mut summary = BatchSummary::default();
    let mut write_error = None;
    std::thread::scope(|scope| {
        let shared = &shared;
        let reader_done = done_tx.clone();
        let job_id = &job_id;
        let reissue = config.reissue;
        scope.spawn(move || {
            resume::read_and_plan(shared, rows, job_id, reissue, chunk, &work_tx, &reader_done)
        });
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            scope.spawn(move || {
                let rng = SystemRandom::new();
                for chunk in work_rx {
                    work_chunk(shared, chunk, &rng, &done_tx);
                }
            });
        }
        drop(done_tx);
        runtime.block_on(async {
            let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
            let mut listening = true;
            loop {
                tokio::select! {
                    row = done_rx.recv() => {
                        let Some((row, outcome)) = row else { break };
                        match outcome {
                            Outcome::Done => summary.issued += 1,
                            Outcome::Skipped => summary.skipped += 1,
                            Outcome::Failed => summary.failed += 1,
                        }
                        observe(&row, outcome);
                        if write_error.is_none() {
                            write_error = manifest.push(&row).err();
                        }
                    }
                    _ = &mut ctrl_c, if listening => {
                        listening = false;
                        stop.store(true, Ordering::SeqCst);
                        // A second Ctrl-C ends the process at once; the
                        // ledger makes that safe, and the next run resumes.
                        tokio::spawn(async {
                            if tokio::signal::ctrl_c().await.is_ok() {
                                std::process::exit(130);
                            }
                        });
                    }
                }
            }
        });
    });
    summary.interrupted = stop.load(Ordering::SeqCst);
    if let Some(err) = shared.fatal.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(err);
    }
    if let Some(e) = write_error {
        return Err(e.into());
    }
    manifest.finish()?;
    if let Some(bulk) = bulk {
        bulk.finish()?;
    }
    ledger.close()?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Workers per thread. A worker waits for the ledger three times a chunk
/// (intents, certificates, deliveries committed); with one worker per
/// core, a core idles through each wait. Two per core keep the cores busy
/// (a 20,000-device batch on two cores: 175% of a core used against 155%,
/// 15% more devices per second; more workers gain nothing more).
const WORKERS_PER_THREAD: usize = 2;

/// Workers per thread when the batch registers devices (`--register`).
const REGISTERING_WORKERS_PER_THREAD: usize = 4;

pub(crate) type Done = tokio::sync::mpsc::Sender<(ManifestRow, Outcome)>;

pub(crate) fn send(done: &Done, row: ManifestRow, outcome: Outcome) {
    // The collector only goes away when the run is over.
    let _ = done.blocking_send((row, outcome));
}

/// A device between its stages.
pub(crate) struct Staged {
    pub(crate) req: DeviceRequest,
    pub(crate) key: KeyMaterial,
    cert_serial: [u8; crate::ca::serial::SERIAL_LEN],
}

/// One chunk of devices through every stage, ledger operations queued
/// together at each step so they share commits.
fn work_chunk(
    shared: &Shared<'_>,
    chunk: Vec<(DeviceRequest, Action)>,
    rng: &SystemRandom,
    done: &Done,
) {
    let fail = |req: &DeviceRequest, problem: String| {
        if let Ok(pending) = shared.ledger.submit_fail(&req.serial, &problem) {
            let _ = pending.wait();
        }
        send(done, failed_row(&row_error(req, problem)), Outcome::Failed);
    };
    let ledger_failed = |req: &DeviceRequest, e: LedgerError| {
        let problem = e.to_string();
        if is_fatal(&e) {
            shared.abort(BatchError::Ledger(e));
        }
        send(done, failed_row(&row_error(req, problem)), Outcome::Failed);
    };
    // Devices of an earlier run still to register: registered together first.
    let chunk = match shared.cloud {
        Some(cloud) => register::register_resumed(shared, cloud, chunk, done),
        None => chunk,
    };
    // Stage 1: keys, and intents queued.
    let mut intents: Vec<(Staged, Pending<()>)> = Vec::with_capacity(chunk.len());
    for (req, action) in chunk {
        match resume::prepare(shared, &req, action) {
            Ok(None) => {}
            Ok(Some((row, outcome))) => {
                send(done, row, outcome);
                continue;
            }
            Err(problem) => {
                fail(&req, problem);
                continue;
            }
        }
        let key = match obtain_key(&req.key, rng) {
            Ok(key) => key,
            Err(problem) => {
                fail(&req, problem);
                continue;
            }
        };
        let cert_serial = match shared.ca.new_serial() {
            Ok(s) => s,
            Err(e) => {
                fail(&req, e.to_string());
                continue;
            }
        };
        let hex = crate::ca::serial::hex(&cert_serial);
        match shared
            .ledger
            .submit_intent(&req.serial, &hex, key.public.raw())
        {
            Ok(pending) => intents.push((
                Staged {
                    req,
                    key,
                    cert_serial,
                },
                pending,
            )),
            Err(e) => ledger_failed(&req, e),
        }
    }
    // Stage 2: sign what the ledger holds the intent of, queue the records.
    let mut issued = Vec::with_capacity(intents.len());
    for (staged, pending) in intents {
        if let Err(e) = pending.wait() {
            ledger_failed(&staged.req, e);
            continue;
        }
        let cert = match device::sign(
            shared.ca,
            shared.profile,
            &staged.req,
            &staged.key.public,
            &staged.cert_serial,
            shared.clock.now(),
        ) {
            Ok(cert) => cert,
            Err(problem) => {
                fail(&staged.req, problem);
                continue;
            }
        };
        let certificate_id = cert.certificate_id();
        match shared.ledger.submit_issued(
            &cert.serial_hex(),
            &cert.der,
            &certificate_id,
            cert.not_after,
        ) {
            Ok(pending) => issued.push((staged, cert, certificate_id, pending)),
            Err(e) => ledger_failed(&staged.req, e),
        }
    }
    // Stage 3: write the bundles of what the ledger holds as issued.
    let mut written = Vec::with_capacity(issued.len());
    for (staged, cert, certificate_id, pending) in issued {
        if let Err(e) = pending.wait() {
            ledger_failed(&staged.req, e);
            continue;
        }
        let cert_pem = cert.pem();
        let key_pem = staged.key.private.as_ref().map(DeviceKey::pkcs8_pem);
        if let Err(e) = shared.writer.write(&device::bundle(
            &staged.req,
            &cert_pem,
            shared.ca.cert_pem(),
            key_pem.as_deref(),
        )) {
            if is_disk_full(&e) {
                shared.abort(BatchError::Output(OutputError::Io {
                    path: shared.writer.out().to_path_buf(),
                    source: std::io::Error::from_raw_os_error(28),
                }));
            }
            fail(&staged.req, e.to_string());
            continue;
        }
        if let Some(bulk) = shared.bulk {
            // The device has its credentials whatever happens to this file.
            if let Err(problem) = bulk_line(bulk, &staged) {
                shared.abort(bulk_error(bulk, &staged.req.serial, problem));
            }
        }
        written.push((staged, cert, certificate_id));
    }
    // Stage 4 (with --register): register the chunk with AWS IoT, paced.
    if let Some(cloud) = shared.cloud {
        written = register::register_chunk(shared, cloud, written, done);
    }
    // Stage 5: delivered.
    let mut delivered = Vec::with_capacity(written.len());
    for (staged, cert, certificate_id) in written {
        match shared.ledger.submit_advance(
            &staged.req.serial,
            DeviceState::Delivered,
            &certificate_id,
        ) {
            Ok(pending) => delivered.push((staged.req, cert, certificate_id, pending)),
            Err(e) => ledger_failed(&staged.req, e),
        }
    }
    for (req, cert, certificate_id, pending) in delivered {
        match pending.wait() {
            Ok(()) => send(
                done,
                issued_row(&req, &cert.serial_hex(), &certificate_id, cert.not_after),
                Outcome::Done,
            ),
            Err(e) => ledger_failed(&req, e),
        }
    }
}

fn bulk_line(bulk: &BulkWriter, staged: &Staged) -> Result<(), String> {
    let csr = match (&staged.key.csr, &staged.key.private) {
        (Some(csr), _) => String::from_utf8_lossy(csr).into_owned(),
        (None, Some(key)) => bulk::csr_for(key, &staged.req.thing_name)?,
        (None, None) => return Err("no CSR for the bulk-registration file".into()),
    };
    bulk.push(&BulkLine {
        thing_name: &staged.req.thing_name,
        serial: &staged.req.serial,
        csr: &csr,
        attributes: &staged.req.attributes,
    })
    .map_err(|e| e.to_string())
}

fn bulk_error(bulk: &BulkWriter, serial: &str, problem: String) -> BatchError {
    BatchError::Output(OutputError::Io {
        path: bulk.path().to_path_buf(),
        source: std::io::Error::other(format!(
            "bulk-registration line of device {serial}: {problem}"
        )),
    })
}

/// The key source of a request, for deciding how to resume it.
pub(crate) fn from_csr(req: &DeviceRequest) -> bool {
    matches!(req.key, KeySource::Csr(_))
}

/// Row errors the reader found before planning.
pub(crate) fn reject(done: &Done, err: &RowError) {
    send(done, failed_row(err), Outcome::Failed);
}
