//! A device simulator that speaks the link protocol over pseudo-terminals,
//! so that a line can be tried and tested without hardware.
//!
//! ```text
//!  station ──opens──> /dev/pts/N (slave)  <══ pty ══>  master ── Link ── Device
//!                                                       (pacing, faults)  (states, storage, key)
//! ```
//!
//! - [`device`]: the protocol state machine of `docs/device-protocol.md`
//!   section 7, without I/O;
//! - [`link`]: the pseudo-terminal loop: framing, pacing to the baud rate,
//!   fault injection;
//! - [`faults`]: which faults, and the seeded generator behind them;
//! - [`key`]: the device key, its CSR and the proof signature;
//! - [`cli`]: `provline device-sim`.
//!
//! [`SimDevice::spawn`] opens a pseudo-terminal pair and runs one device on
//! its own thread; the station opens [`SimDevice::port_path`];
//! [`SimDevice::stored`] tells what the device holds.

pub mod cli;
pub mod device;
pub mod faults;
pub mod key;
pub mod link;

#[cfg(test)]
mod tests_device;
#[cfg(test)]
mod tests_faults;
#[cfg(test)]
mod tests_pty;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use serialport::{SerialPort, TTYPort};

use crate::device::message::{MAX_FIRMWARE_LEN, MAX_SERIAL_LEN};
use crate::device::{Item, MIN_MAX_FRAME};

pub use faults::{FaultCounts, Faults};

/// The default baud rate a simulated device paces itself to.
pub const DEFAULT_BAUD: u32 = 115_200;
/// The default receive limit of a simulated device.
pub const DEFAULT_MAX_FRAME: u16 = 256;

/// Where the device's key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SimKeyMode {
    /// The device generates its key and a CSR (`CAN_GENERATE_KEY`).
    Device,
    /// The station writes the private key (`ACCEPTS_PRIVATE_KEY`).
    Station,
}

/// One simulated device.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Serial number (at most 64 bytes).
    pub serial: String,
    /// Firmware version (at most 32 bytes).
    pub firmware: String,
    /// Where the device key comes from.
    pub key_mode: SimKeyMode,
    /// Baud rate the device paces itself to (each byte costs 10 bits each
    /// way); 0 for no pacing.
    pub baud: u32,
    /// The device's receive limit, at least 64.
    pub max_frame: u16,
    /// Staged items and partial transfers survive a reset.
    pub resumable: bool,
    /// Announces `BUNDLE`: takes several items in one `Bundle` write and
    /// answers `ReadDigestSet` (on by default).
    pub bundle: bool,
    /// How long generating a key takes (state GENERATING: every request
    /// meanwhile is answered `Nak{Busy}`); zero by default.
    pub keygen_time: Duration,
    /// Faults to inject.
    pub faults: Faults,
    /// Also keep committed items as files in `DIR/<serial>/<item>`.
    pub store_dir: Option<PathBuf>,
}

impl SimConfig {
    /// A device with this serial and key mode, at 115200 baud, 256-byte
    /// frames, not resumable, taking bundles, without faults.
    pub fn new(serial: impl Into<String>, key_mode: SimKeyMode) -> SimConfig {
        SimConfig {
            serial: serial.into(),
            firmware: format!("sim-{}", env!("CARGO_PKG_VERSION")),
            key_mode,
            baud: DEFAULT_BAUD,
            max_frame: DEFAULT_MAX_FRAME,
            resumable: false,
            bundle: true,
            keygen_time: Duration::ZERO,
            faults: Faults::default(),
            store_dir: None,
        }
    }

    /// Checks the values the protocol bounds.
    pub fn check(&self) -> Result<(), SimError> {
        let bad = |reason: String| {
            Err(SimError::Config {
                serial: self.serial.clone(),
                reason,
            })
        };
        if self.serial.is_empty() || self.serial.len() > MAX_SERIAL_LEN {
            return bad(format!(
                "the serial must be 1 to {MAX_SERIAL_LEN} bytes, it is {}",
                self.serial.len()
            ));
        }
        if self.serial.contains(['/', '\\']) || self.serial.starts_with('.') {
            return bad(
                "the serial names a folder of the store: no '/', '\\' or leading '.'".into(),
            );
        }
        if self.firmware.len() > MAX_FIRMWARE_LEN {
            return bad(format!(
                "the firmware version must be at most {MAX_FIRMWARE_LEN} bytes"
            ));
        }
        if self.max_frame < MIN_MAX_FRAME {
            return bad(format!(
                "max_frame {} is below the protocol's smallest, {MIN_MAX_FRAME}",
                self.max_frame
            ));
        }
        self.faults.check().or_else(bad)
    }

    fn profile(&self) -> device::Profile {
        device::Profile {
            serial: self.serial.clone(),
            firmware: self.firmware.clone(),
            key_mode: self.key_mode,
            max_frame: self.max_frame,
            resumable: self.resumable,
            lie_digest: self.faults.lie_digest,
            bundle: self.bundle,
        }
    }
}

/// A snapshot of what a simulated device holds and what happened on its link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// Committed items.
    pub items: HashMap<Item, Vec<u8>>,
    /// The public key (SubjectPublicKeyInfo, DER) of the key the device
    /// generated, if it made one (device-key mode).
    pub device_key_spki: Option<Vec<u8>>,
    /// Resets (power cycles) the device went through.
    pub resets: u64,
    /// Bytes received from the station.
    pub bytes_in: u64,
    /// Bytes sent to the station.
    pub bytes_out: u64,
    /// Good request frames received (after drops).
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Frames that did not decode (noise, damage).
    pub bad_frames: u64,
    /// Faults injected.
    pub faults: FaultCounts,
    /// Why the device's loop ended early, if it did.
    pub link_error: Option<String>,
}

impl Stored {
    /// A committed item.
    pub fn item(&self, item: Item) -> Option<&[u8]> {
        self.items.get(&item).map(Vec::as_slice)
    }
}

/// The file name of an item in the store folder.
pub fn item_file_name(item: Item) -> String {
    match item {
        Item::Certificate => "certificate.der".into(),
        Item::Chain => "chain.pem".into(),
        Item::PrivateKey => "private-key.der".into(),
        Item::ThingName => "thing-name.txt".into(),
        Item::Endpoint => "endpoint.txt".into(),
        Item::RootCa => "root-ca.der".into(),
        Item::Csr => "csr.der".into(),
        Item::Bundle => "bundle.bin".into(),
        Item::Unknown(id) => format!("item-{id}.bin"),
    }
}

/// What can go wrong running a simulated device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The configuration is out of the protocol's bounds.
    #[error("simulated device {serial}: {reason}")]
    Config {
        /// The device's serial.
        serial: String,
        /// What is wrong.
        reason: String,
    },
    /// The pseudo-terminal pair could not be opened or set up.
    #[error("simulated device {serial}: opening a pseudo-terminal pair: {source}")]
    OpenPty {
        /// The device's serial.
        serial: String,
        /// The error from the serial port library.
        #[source]
        source: serialport::Error,
    },
    /// The pseudo-terminal's slave side has no path.
    #[error("simulated device {serial}: the pseudo-terminal has no path")]
    NoPath {
        /// The device's serial.
        serial: String,
    },
    /// Reading or writing the pseudo-terminal failed.
    #[error("simulated device {serial} on {}: {op}: {source}", port.display())]
    Io {
        /// The device's serial.
        serial: String,
        /// The port path the station opens.
        port: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing an item to the store folder failed.
    #[error("simulated device {serial} on {}: writing {}: {source}", port.display(), path.display())]
    Store {
        /// The device's serial.
        serial: String,
        /// The port path the station opens.
        port: PathBuf,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for Ctrl-C failed.
    #[error("device-sim: waiting for Ctrl-C: {source}")]
    Signal {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The device's thread could not be started.
    #[error("simulated device {serial}: starting its thread: {source}")]
    Thread {
        /// The device's serial.
        serial: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A simulated device running on its own thread behind a pseudo-terminal.
/// Dropping it stops the device and closes the pseudo-terminal.
#[derive(Debug)]
pub struct SimDevice {
    serial: String,
    port: PathBuf,
    shared: Arc<link::Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SimDevice {
    /// Opens a pseudo-terminal pair and starts the device on it.
    pub fn spawn(config: SimConfig) -> Result<SimDevice, SimError> {
        config.check()?;
        let serial = config.serial.clone();
        let (mut master, slave) = TTYPort::pair().map_err(|source| SimError::OpenPty {
            serial: serial.clone(),
            source,
        })?;
        let port = slave
            .name()
            .map(PathBuf::from)
            .ok_or_else(|| SimError::NoPath {
                serial: serial.clone(),
            })?;
        master
            .set_timeout(link::POLL)
            .map_err(|source| SimError::OpenPty {
                serial: serial.clone(),
                source,
            })?;
        let shared = Arc::new(link::Shared {
            stored: Mutex::new(Stored::default()),
            stop: AtomicBool::new(false),
        });
        let link = link::Link::new(master, port.clone(), &config, Arc::clone(&shared));
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("sim-{serial}"))
            .spawn(move || {
                // The slave side stays open while the device runs, so the
                // master reads no hang-up between two stations' sessions.
                let _slave = slave;
                if let Err(e) = link.run() {
                    tracing::warn!(error = %e, "simulated device stopped");
                    thread_shared
                        .stored
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .link_error = Some(e.to_string());
                }
            })
            .map_err(|source| SimError::Thread {
                serial: serial.clone(),
                source,
            })?;
        Ok(SimDevice {
            serial,
            port,
            shared,
            thread: Some(thread),
        })
    }

    /// The path the station opens (the pseudo-terminal's slave side).
    pub fn port_path(&self) -> &Path {
        &self.port
    }

    /// The device's serial number.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// A snapshot of what the device holds and what its link saw.
    pub fn stored(&self) -> Stored {
        self.shared
            .stored
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops the device and closes its pseudo-terminal.
    pub fn stop(self) {
        drop(self);
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.halt();
    }
}
