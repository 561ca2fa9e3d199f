//! `provline flash`: one session per port, every port at once, until every
//! device passed or failed (or, with `--watch`, until Ctrl-C).
//!
//! ```text
//! ports (given, or found by --watch) ──> one thread per port: open -> Station::provision
//!                                                │ claims: a serial on one port at a time
//!                                                ▼
//!                              outcomes ──> live view, summary, ledger states
//! ```

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::link::LinkTiming;
use super::session::{Claims, KeyMode, Observer, Passed, Quiet, SessionConfig, Station, Step};
use super::transport::SerialTransport;
use super::view::{self, LiveView};
use crate::ca::{CaError, DeviceProfile, LocalCa};
use crate::clock::{Clock, SystemClock};
use crate::job::DEFAULT_PATTERN;
use crate::keygen::KeyType;
use crate::ledger::{CaId, DeviceStatus, JobId, Ledger, LedgerError, LedgerOptions};

/// How often `--watch` looks for new ports.
const WATCH_EVERY: Duration = Duration::from_millis(300);

/// The arguments of `provline flash`.
#[derive(clap::Args, Debug, Clone)]
pub struct FlashArgs {
    /// Folder of the CA.
    #[arg(long)]
    pub ca: PathBuf,
    /// A port with a device on it (repeat for more; all run at once).
    #[arg(long = "port", value_name = "PATH")]
    pub ports: Vec<String>,
    /// Who makes the device key: the device (CSR) or the station.
    #[arg(long, value_enum, default_value = "device")]
    pub key_mode: KeyMode,
    /// Key type.
    #[arg(long, default_value = "p256")]
    pub key_type: KeyType,
    /// The ledger (SQLite).
    #[arg(long, default_value = "line.ledger.sqlite")]
    pub ledger: PathBuf,
    /// The ledger job label the line records under.
    #[arg(long, default_value = "flash")]
    pub job: String,
    /// Thing name of a device; {serial} is replaced by its serial.
    #[arg(long, default_value = DEFAULT_PATTERN)]
    pub thing_name_pattern: String,
    /// AWS IoT data endpoint written to each device.
    #[arg(long, default_value = "")]
    pub endpoint: String,
    /// Amazon Root CA 1 (PEM or DER) to write to each device as well.
    #[arg(long)]
    pub root_ca: Option<PathBuf>,
    /// Keep going: start a session on every port that appears, until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: only USB ports of this vendor id (hex).
    #[arg(long, value_parser = parse_hex16)]
    pub vid: Option<u16>,
    /// With --watch: only USB ports of this product id (hex).
    #[arg(long, value_parser = parse_hex16)]
    pub pid: Option<u16>,
    /// Baud rate of the line; 0 for USB CDC-ACM (rate ignored, 500 ms base timeout).
    #[arg(long, default_value_t = 115_200)]
    pub baud: u32,
    /// Fixed part of a request's timeout in ms [default: 250, 500 over USB].
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Retries of an unanswered request (same seq).
    #[arg(long, default_value_t = 9)]
    pub retries: u32,
    /// Restarts from the hello after device resets before the device fails.
    #[arg(long, default_value_t = 5)]
    pub max_restarts: u32,
    /// Station-key mode: also keep each private key in this folder (mode 0600).
    #[arg(long)]
    pub keep_keys: Option<PathBuf>,
    /// Device certificate validity in days (never past the CA's own).
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
}

fn parse_hex16(s: &str) -> Result<u16, String> {
    let t = s.trim_start_matches("0x").trim_start_matches("0X");
    u16::from_str_radix(t, 16).map_err(|e| format!("{s:?}: not a 16-bit hex number: {e}"))
}

/// Why a line could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlashError {
    /// The arguments do not make a run.
    #[error("{0}")]
    Usage(String),
    /// The CA cannot be used.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The ledger cannot be opened or read.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A device (or port) that failed, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct Failed {
    /// The port.
    pub port: String,
    /// The device serial, if it said it.
    pub serial: Option<String>,
    /// The step that failed.
    pub step: String,
    /// Why.
    pub reason: String,
    /// Session time in seconds.
    pub seconds: f64,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlashReport {
    /// Devices that passed.
    pub passed: Vec<Passed>,
    /// Devices and ports that failed.
    pub failed: Vec<Failed>,
    /// Every device of the job in the ledger, with its state.
    pub devices: Vec<DeviceStatus>,
    /// Wall time of the run.
    pub seconds: f64,
    /// Whether Ctrl-C ended the run.
    pub interrupted: bool,
}

/// Runs `provline flash` and prints its report; returns the exit code
/// (0 every device passed, 1 some failed or, without `--watch`, Ctrl-C
/// stopped the run).
pub fn command(args: &FlashArgs, json: bool, quiet: bool) -> Result<u8, FlashError> {
    let stop = Arc::new(AtomicBool::new(false));
    watch_ctrl_c(Arc::clone(&stop));
    let live = view::wanted(json, quiet).then(LiveView::new);
    let observer: &dyn ObserveEnd = match &live {
        Some(v) => v,
        None => &Quiet,
    };
    let report = run(args, &SystemClock, observer, &stop)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else if !quiet {
        print!("{}", summary_text(&report));
    }
    // Ctrl-C is how a watching line ends; without --watch it cut the run short.
    Ok(
        if report.failed.is_empty() && (args.watch || !report.interrupted) {
            0
        } else {
            1
        },
    )
}

/// An observer that is also told how each session ended.
pub trait ObserveEnd: Observer {
    /// The session on `port` ended.
    fn end(&self, port: &str, serial: Option<&str>, outcome: Result<(), &str>);
}

impl ObserveEnd for Quiet {
    fn end(&self, _: &str, _: Option<&str>, _: Result<(), &str>) {}
}

impl ObserveEnd for LiveView {
    fn end(&self, port: &str, serial: Option<&str>, outcome: Result<(), &str>) {
        self.finish(port, serial, outcome);
    }
}

/// The text summary: passed, failed with reason, per-device time, ledger states.
pub fn summary_text(report: &FlashReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} passed, {} failed in {:.2} s{}",
        report.passed.len(),
        report.failed.len(),
        report.seconds,
        if report.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );
    for p in &report.passed {
        let _ = writeln!(
            s,
            "PASS {:<20} {:<16} {:>7.2} s  cert {}{}{}",
            p.port,
            p.serial,
            p.seconds,
            p.cert_serial,
            if p.reused { " (reused)" } else { "" },
            if p.restarts > 0 {
                format!(" after {} restart(s)", p.restarts)
            } else {
                String::new()
            }
        );
    }
    for f in &report.failed {
        let _ = writeln!(
            s,
            "FAIL {:<20} {:<16} {:>7.2} s  at {}: {}",
            f.port,
            f.serial.as_deref().unwrap_or("-"),
            f.seconds,
            f.step,
            f.reason
        );
    }
    if !report.devices.is_empty() {
        let _ = writeln!(s, "ledger:");
        for d in &report.devices {
            let _ = writeln!(
                s,
                "  {:<16} {:<10} {}",
                d.serial,
                d.state,
                d.error.as_deref().unwrap_or("")
            );
        }
    }
    s
}

/// Sets `stop` on Ctrl-C (a second one exits at once).
fn watch_ctrl_c(stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    stop.store(true, Ordering::SeqCst);
                }
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            });
        });
    if let Err(e) = spawned {
        tracing::warn!("Ctrl-C will not stop the line gracefully: {e}");
    }
}

/// Runs the line: every port of `args` at once (and, with `--watch`, every
/// port that appears until `stop`). Devices that fail are in the report;
/// only a run that cannot start is an error.
pub fn run(
    args: &FlashArgs,
    clock: &dyn Clock,
    observer: &dyn ObserveEnd,
    stop: &AtomicBool,
) -> Result<FlashReport, FlashError> {
    if args.ports.is_empty() && !args.watch {
        return Err(FlashError::Usage(
            "no --port given (or --watch to find ports)".into(),
        ));
    }
    if args.keep_keys.is_some() && args.key_mode != KeyMode::Station {
        return Err(FlashError::Usage(
            "--keep-keys needs --key-mode station (a device key never leaves the device)".into(),
        ));
    }
    let started = Instant::now();
    let ca = LocalCa::load(&args.ca, clock.now())?;
    let profile = DeviceProfile {
        validity: time::Duration::days(i64::from(args.days)),
        ..DeviceProfile::default()
    };
    let root_ca = match &args.root_ca {
        Some(path) => Some(read_cert(path)?),
        None => None,
    };
    let ledger = Ledger::open(
        &args.ledger,
        CaId::of_certificate(ca.cert_der()),
        LedgerOptions::default(),
    )?;
    let base =
        Duration::from_millis(
            args.timeout_ms
                .unwrap_or(if args.baud == 0 { 500 } else { 250 }),
        );
    let config = SessionConfig {
        key_mode: args.key_mode,
        key_type: args.key_type,
        thing_name_pattern: args.thing_name_pattern.clone(),
        endpoint: args.endpoint.clone(),
        root_ca,
        job: JobId::new("line", args.job.clone()),
        timing: LinkTiming {
            baud: args.baud,
            base,
            tries: args.retries.saturating_add(1),
        },
        keep_keys: args.keep_keys.clone(),
        max_restarts: args.max_restarts,
    };
    let claims = Claims::new();
    let station = Station {
        ca: &ca,
        profile: &profile,
        ledger: &ledger,
        clock,
        claims: &claims,
        config: &config,
    };
    let outcomes: Mutex<FlashReport> = Mutex::new(FlashReport::default());
    let stopped = || stop.load(Ordering::SeqCst);
    std::thread::scope(|scope| {
        let mut running: HashMap<String, std::thread::ScopedJoinHandle<'_, ()>> = HashMap::new();
        let mut finished: HashSet<String> = HashSet::new();
        let start = |port: String, running: &mut HashMap<_, _>| {
            let outcomes = &outcomes;
            let name = port.clone();
            let handle = scope.spawn(move || {
                let outcome = flash_one(&station, &port, args.baud, observer, &stopped);
                let mut report = outcomes.lock().unwrap_or_else(|p| p.into_inner());
                match outcome {
                    Ok(p) => report.passed.push(p),
                    Err(f) => report.failed.push(f),
                }
            });
            running.insert(name, handle);
        };
        for port in &args.ports {
            if !running.contains_key(port) {
                start(port.clone(), &mut running);
            }
        }
        if args.watch {
            while !stopped() {
                std::thread::sleep(WATCH_EVERY);
                let present = present_ports(args);
                let done: Vec<String> = running
                    .iter()
                    .filter(|(_, h)| h.is_finished())
                    .map(|(p, _)| p.clone())
                    .collect();
                for port in done {
                    if let Some(h) = running.remove(&port) {
                        let _ = h.join();
                    }
                    finished.insert(port);
                }
                // A port that went away and came back is a new device.
                finished.retain(|p| present.contains(p));
                for port in present {
                    if !running.contains_key(&port) && !finished.contains(&port) {
                        start(port, &mut running);
                    }
                }
            }
        }
        for (_, h) in running {
            let _ = h.join();
        }
    });
    let mut report = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
    report.passed.sort_by(|a, b| a.port.cmp(&b.port));
    report.failed.sort_by(|a, b| a.port.cmp(&b.port));
    report.devices = ledger.devices_for_job(&config.job)?;
    report.seconds = started.elapsed().as_secs_f64();
    report.interrupted = stopped();
    ledger.close()?;
    Ok(report)
}

/// Opens `port` and provisions the device on it; the port is closed
/// (freed for the next device) when this returns.
fn flash_one(
    station: &Station<'_>,
    port: &str,
    baud: u32,
    observer: &dyn ObserveEnd,
    stop: &dyn Fn() -> bool,
) -> Result<Passed, Failed> {
    let started = Instant::now();
    let mut transport = match SerialTransport::open(port, baud) {
        Ok(t) => t,
        Err(e) => {
            let reason = format!("port {port}: cannot open: {e}");
            observer.end(port, None, Err(&reason));
            return Err(Failed {
                port: port.to_string(),
                serial: None,
                step: "open".into(),
                reason,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    };
    let result = station.provision(&mut transport, observer, stop);
    drop(transport);
    match result {
        Ok(passed) => {
            observer.step(port, Some(&passed.serial), Step::Done);
            observer.end(port, Some(&passed.serial), Ok(()));
            Ok(passed)
        }
        Err(failure) => {
            let reason = failure.error.to_string();
            observer.end(port, failure.serial.as_deref(), Err(&reason));
            Err(Failed {
                port: failure.port,
                serial: failure.serial,
                step: failure.step.to_string(),
                reason,
                seconds: failure.seconds,
            })
        }
    }
}

/// The ports `--watch` serves now: the `--port` paths that exist, and the
/// USB ports serialport finds that match `--vid`/`--pid`.
fn present_ports(args: &FlashArgs) -> Vec<String> {
    let mut ports: Vec<String> = args
        .ports
        .iter()
        .filter(|p| std::path::Path::new(p).exists())
        .cloned()
        .collect();
    if let Ok(found) = serialport::available_ports() {
        for info in found {
            if let serialport::SerialPortType::UsbPort(usb) = &info.port_type {
                let vid_ok = args.vid.is_none_or(|v| v == usb.vid);
                let pid_ok = args.pid.is_none_or(|p| p == usb.pid);
                if vid_ok && pid_ok && !ports.contains(&info.port_name) {
                    ports.push(info.port_name);
                }
            }
        }
    }
    ports
}

/// A certificate file, PEM or DER, as DER.
fn read_cert(path: &std::path::Path) -> Result<Vec<u8>, FlashError> {
    let bytes = std::fs::read(path).map_err(|source| FlashError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.first() == Some(&0x30) {
        return Ok(bytes);
    }
    pem::parse(&bytes)
        .map(pem::Pem::into_contents)
        .map_err(|e| FlashError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })
}
