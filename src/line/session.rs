//! The station's provisioning session with one device (protocol section 8),
//! as explicit states:
//!
//! ```text
//! Hello -> Key -> Issue -> Write(item)... -> Commit -> ReadBack(item)... -> Prove -> Done
//!   ^        (GenerateKey + CSR,    └─ WriteBundle ─┘        └─ ReadBackSet ─┘        |
//!   |         or a station key)     (a device with BUNDLE: one write, one digest)    |
//!   └──── Nak{BadSequence | NotAllowedInState}: the device was reset ──────────────────┘ (resume)
//! ```
//!
//! Every step is in the ledger before the next one starts: the device is
//! planned at the hello, the intent is committed before the CA signs, the
//! certificate is recorded once signed, the device is `delivered` after the
//! commit and the read-back, `verified` after the proof. A restart keeps
//! what this session already has (the key, the certificate) and asks the
//! device what it holds; a certificate the ledger knows as live and the
//! device holds is reused, and any other is superseded before a new one is
//! issued.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};

use super::link::{Link, LinkError, LinkStats, LinkTiming};
use super::transport::Transport;
use crate::ca::{DeviceProfile, IssueError, LocalCa};
use crate::clock::Clock;
use crate::device::bundle;
use crate::device::message::NONCE_LEN;
use crate::device::{
    chunk_capacity, sha256, Capabilities, Chunker, ErrorCode, Item, ItemSet, KeyType as WireKey,
    Message, Reassembler,
};
use crate::fsx;
use crate::keygen::{self, DeviceKey, KeyAlg, KeyType, PublicKey};
use crate::ledger::{DeviceState, JobId, Ledger, LedgerError, PlannedDevice};

/// The prefix a device signs before the station's nonce (protocol 3.3, Prove).
pub const PROOF_PREFIX: &[u8] = b"provline-proof-v1";
/// Largest CSR the station reads from a device.
const CSR_LIMIT: usize = 16 * 1024;
/// Timeout of `Commit` and `Reset`.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Times a chunked write starts over after `Nak{BadOffset}`.
const WRITE_RESTARTS: u32 = 3;
/// Times a chunked write asks where the device stands after a chunk it
/// gave up on (see `write_item`).
const WRITE_RESYNCS: u32 = 16;

/// Who makes the device's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyMode {
    /// The device generates its key and sends a CSR; the key never leaves it.
    Device,
    /// The station generates the key and writes it to the device.
    Station,
}

/// Where a session stands, for the live view and the reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Opening the session.
    Hello,
    /// Getting the key: the device's CSR, or a station key.
    Key,
    /// Signing the certificate.
    Issue,
    /// Writing an item.
    Write(Item),
    /// Making the written items current.
    Commit,
    /// Comparing an item's stored SHA-256 with what was written.
    ReadBack(Item),
    /// Checking the device's signature over a fresh nonce.
    Prove,
    /// Passed.
    Done,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Hello => f.write_str("hello"),
            Step::Key => f.write_str("key"),
            Step::Issue => f.write_str("issue"),
            Step::Write(item) => write!(f, "write {}", item_name(*item)),
            Step::Commit => f.write_str("commit"),
            Step::ReadBack(item) => write!(f, "read back {}", item_name(*item)),
            Step::Prove => f.write_str("prove"),
            Step::Done => f.write_str("done"),
        }
    }
}

/// The short name of an item.
pub fn item_name(item: Item) -> String {
    match item {
        Item::Certificate => "certificate".into(),
        Item::Chain => "chain".into(),
        Item::PrivateKey => "private key".into(),
        Item::ThingName => "thing name".into(),
        Item::Endpoint => "endpoint".into(),
        Item::RootCa => "root CA".into(),
        Item::Csr => "CSR".into(),
        Item::Bundle => "bundle".into(),
        Item::Unknown(n) => format!("item {n}"),
    }
}

/// What every session of a run shares.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Who makes the key.
    pub key_mode: KeyMode,
    /// Which key.
    pub key_type: KeyType,
    /// Thing name of a device; `{serial}` is replaced by its serial.
    pub thing_name_pattern: String,
    /// The AWS IoT data endpoint written to the device (not written if empty).
    pub endpoint: String,
    /// Amazon Root CA 1 (DER) to write to the device, if given.
    pub root_ca: Option<Vec<u8>>,
    /// The ledger job the line records under.
    pub job: JobId,
    /// Timeouts and tries.
    pub timing: LinkTiming,
    /// Station-key mode: also keep each private key here (mode 0600).
    pub keep_keys: Option<PathBuf>,
    /// Restarts from `Hello` (device resets) before the device fails.
    pub max_restarts: u32,
}

impl SessionConfig {
    /// The thing name of device `serial`.
    pub fn thing_name(&self, serial: &str) -> String {
        self.thing_name_pattern.replace("{serial}", serial)
    }
}

/// The serials being provisioned (or provisioned) in this run, and on which
/// port: a second port presenting one of them is refused.
#[derive(Debug, Default)]
pub struct Claims {
    held: Mutex<HashMap<String, String>>,
}

impl Claims {
    /// No serial claimed.
    pub fn new() -> Claims {
        Claims::default()
    }

    /// Claims `serial` for `port`; the port holding it otherwise.
    pub fn claim(&self, serial: &str, port: &str) -> Result<(), String> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.get(serial) {
            Some(other) if other != port => Err(other.clone()),
            _ => {
                held.insert(serial.to_string(), port.to_string());
                Ok(())
            }
        }
    }

    /// Gives `serial` up (after a failure, so the device may be tried again).
    pub fn release(&self, serial: &str, port: &str) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(serial).is_some_and(|p| p == port) {
            held.remove(serial);
        }
    }
}

/// Sees each session's steps (the live view).
pub trait Observer: Sync {
    /// Session on `port` (device `serial`, once known) reached `step`.
    fn step(&self, port: &str, serial: Option<&str>, step: Step);
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl Observer for Quiet {
    fn step(&self, _: &str, _: Option<&str>, _: Step) {}
}

/// The parts of the station a session uses.
#[derive(Clone, Copy)]
pub struct Station<'a> {
    /// The CA that signs.
    pub ca: &'a LocalCa,
    /// The certificate profile.
    pub profile: &'a DeviceProfile,
    /// The ledger.
    pub ledger: &'a Ledger,
    /// The time certificates start from.
    pub clock: &'a dyn Clock,
    /// Serials in progress on the line.
    pub claims: &'a Claims,
    /// The run's settings.
    pub config: &'a SessionConfig,
}

impl std::fmt::Debug for Station<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Station")
            .field("ledger", &self.ledger.path())
            .field("config", self.config)
            .finish_non_exhaustive()
    }
}

/// A device that passed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Passed {
    /// The port.
    pub port: String,
    /// The device serial.
    pub serial: String,
    /// Its thing name.
    pub thing_name: String,
    /// The certificate serial (hex).
    pub cert_serial: String,
    /// The certificate id (SHA-256 hex of the DER).
    pub certificate_id: String,
    /// Whether the certificate was one the device already held.
    pub reused: bool,
    /// Restarts from `Hello` after device resets.
    pub restarts: u32,
    /// Requests retried after a timeout.
    pub retries: u64,
    /// Bytes written to the port.
    pub bytes_out: u64,
    /// Bytes read from the port.
    pub bytes_in: u64,
    /// Session time in seconds.
    pub seconds: f64,
}

/// A device (or a port) that failed.
#[derive(Debug)]
pub struct Failure {
    /// The port.
    pub port: String,
    /// The device serial, if the device said it.
    pub serial: Option<String>,
    /// The step that failed.
    pub step: Step,
    /// Why.
    pub error: SessionError,
    /// Session time in seconds.
    pub seconds: f64,
}

/// Why a session failed. Every variant names the port and, once known,
/// the device serial.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The link failed (no response, I/O, stopped).
    #[error("{0}")]
    Link(#[from] LinkError),
    /// The device refused a request.
    #[error("port {port}, device {serial}: {request} refused: {code}")]
    Refused {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// The request.
        request: &'static str,
        /// The device's error code.
        code: ErrorCode,
    },
    /// The device answered with the wrong message.
    #[error("port {port}, device {serial}: {request} answered with {got}")]
    Unexpected {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// The request.
        request: &'static str,
        /// What came.
        got: String,
    },
    /// Another port is provisioning the same serial.
    #[error("port {port}: device {serial} is already on port {other}; refused")]
    AlreadyClaimed {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// The port that has it.
        other: String,
    },
    /// Another device answered after a restart.
    #[error("port {port}: device {from} was replaced by device {to} during its session")]
    Replaced {
        /// The port.
        port: String,
        /// The serial the session started with.
        from: String,
        /// The serial that answered.
        to: String,
    },
    /// The device lacks a capability this run needs.
    #[error("port {port}, device {serial}: {reason}")]
    Capability {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// What is missing.
        reason: String,
    },
    /// The device's CSR was refused.
    #[error("port {port}, device {serial}: CSR refused: {reason}")]
    Csr {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// Why.
        reason: String,
    },
    /// The station could not make a key.
    #[error("port {port}, device {serial}: {reason}")]
    Key {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// Why.
        reason: String,
    },
    /// The CA could not sign.
    #[error("port {port}, device {serial}: issuing the certificate: {source}")]
    Issue {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// Why.
        source: IssueError,
    },
    /// The ledger refused or failed.
    #[error("port {port}, device {serial}: {source}")]
    Ledger {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// The ledger's error.
        source: LedgerError,
    },
    /// The device stores something else than what was written.
    #[error("port {port}, device {serial}: read-back of the {item} does not match: device reports {found_len} bytes SHA-256 {found}, written {expected_len} bytes SHA-256 {expected}")]
    DigestMismatch {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// The item.
        item: String,
        /// Length written.
        expected_len: u32,
        /// SHA-256 written, hex.
        expected: String,
        /// Length the device reports.
        found_len: u32,
        /// SHA-256 the device reports, hex.
        found: String,
    },
    /// The device's signature does not verify with the certificate's key.
    #[error("port {port}, device {serial}: proof of possession failed: the signature over the nonce does not verify with the certificate's public key")]
    BadProof {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
    },
    /// The private key could not be kept.
    #[error("port {port}, device {serial}: writing the key to {path}: {source}")]
    KeyFile {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The device kept resetting.
    #[error("port {port}, device {serial}: gave up after {restarts} restarts (last: {last})")]
    TooManyRestarts {
        /// The port.
        port: String,
        /// The device serial.
        serial: String,
        /// Restarts made.
        restarts: u32,
        /// Why the last one happened.
        last: String,
    },
}

/// What the session holds of the device's key.
struct KeyHeld {
    public: PublicKey,
    private: Option<DeviceKey>,
    /// SHA-256 of the device's CSR (device mode), to recognise its key after a reset.
    csr_sha: Option<[u8; 32]>,
}

/// The certificate the session delivers.
struct CertHeld {
    der: Vec<u8>,
    serial_hex: String,
    certificate_id: String,
    reused: bool,
}

/// What the device said in its last `HelloReply`.
struct DeviceInfo {
    serial: String,
    thing_name: String,
    capabilities: Capabilities,
    holds: ItemSet,
}

/// The states of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Hello,
    Key,
    Issue,
    Write(usize),
    WriteBundle,
    Commit,
    ReadBack(usize),
    ReadBackSet,
    Prove,
    Done,
}

/// How a step ended badly.
enum Flow {
    /// The device was reset (or lost the session): start again from `Hello`.
    Restart(String),
    /// The device fails.
    Fail(Box<SessionError>),
}

fn fail(e: SessionError) -> Flow {
    Flow::Fail(Box::new(e))
}

impl From<LinkError> for Flow {
    fn from(e: LinkError) -> Flow {
        fail(SessionError::Link(e))
    }
}

/// One device's session on one port.
struct Session<'s, 'l, T: Transport + ?Sized> {
    station: Station<'s>,
    link: Link<'l, T>,
    observer: &'s dyn Observer,
    rng: SystemRandom,
    device: Option<DeviceInfo>,
    planned: bool,
    key: Option<KeyHeld>,
    cert: Option<CertHeld>,
    items: Vec<(Item, Vec<u8>)>,
    step: Step,
    restarts: u32,
    /// Frame size for writes now (wire bytes): the device's limit on a
    /// clean line, smaller while requests need retries.
    write_limit: u16,
    /// Frame size asked of the device's reads now.
    read_limit: u16,
}

impl Station<'_> {
    /// Provisions the device on `port`, from the hello to the proof.
    /// `stop` is polled between requests (Ctrl-C).
    pub fn provision<T: Transport + ?Sized>(
        &self,
        port: &mut T,
        observer: &dyn Observer,
        stop: &dyn Fn() -> bool,
    ) -> Result<Passed, Box<Failure>> {
        let started = Instant::now();
        let port_name = port.name().to_string();
        let link = Link::new(port, self.config.timing, stop);
        let mut session = Session {
            station: *self,
            link,
            observer,
            rng: SystemRandom::new(),
            device: None,
            planned: false,
            key: None,
            cert: None,
            items: Vec::new(),
            step: Step::Hello,
            restarts: 0,
            write_limit: u16::MAX,
            read_limit: super::link::STATION_MAX_FRAME,
        };
        let result = session.run();
        let seconds = started.elapsed().as_secs_f64();
        let serial = session.device.as_ref().map(|d| d.serial.clone());
        let stats: LinkStats = session.link.stats();
        let (restarts, planned, step) = (session.restarts, session.planned, session.step);
        let error = match (result, session.device, session.cert) {
            (Ok(()), Some(device), Some(cert)) => {
                return Ok(Passed {
                    port: port_name,
                    serial: device.serial,
                    thing_name: device.thing_name,
                    cert_serial: cert.serial_hex,
                    certificate_id: cert.certificate_id,
                    reused: cert.reused,
                    restarts,
                    retries: stats.retries,
                    bytes_out: stats.bytes_out,
                    bytes_in: stats.bytes_in,
                    seconds,
                })
            }
            (Ok(()), _, _) => Box::new(SessionError::Unexpected {
                port: port_name.clone(),
                serial: serial.clone().unwrap_or_default(),
                request: "Prove",
                got: "a session that ended without a certificate".into(),
            }),
            (Err(error), _, _) => error,
        };
        let error = *error;
        if let Some(serial) = &serial {
            if planned {
                // The failure is recorded where it can be; a ledger that
                // cannot take it has already failed the session.
                let _ = self.ledger.fail(serial, &error.to_string());
            }
            if !matches!(error, SessionError::AlreadyClaimed { .. }) {
                self.claims.release(serial, &port_name);
            }
        }
        Err(Box::new(Failure {
            port: port_name,
            serial,
            step,
            error,
            seconds,
        }))
    }
}

impl<T: Transport + ?Sized> Session<'_, '_, T> {
    fn run(&mut self) -> Result<(), Box<SessionError>> {
        let mut state = State::Hello;
        loop {
            self.step = match state {
                State::Hello => Step::Hello,
                State::Key => Step::Key,
                State::Issue => Step::Issue,
                State::Write(i) => Step::Write(self.items[i].0),
                State::WriteBundle => Step::Write(Item::Bundle),
                State::Commit => Step::Commit,
                State::ReadBack(i) => Step::ReadBack(self.items[i].0),
                State::ReadBackSet => Step::ReadBack(Item::Bundle),
                State::Prove => Step::Prove,
                State::Done => Step::Done,
            };
            self.observer.step(
                self.link.port(),
                self.device.as_ref().map(|d| d.serial.as_str()),
                self.step,
            );
            let next = match state {
                State::Hello => self.hello(),
                State::Key => self.key(),
                State::Issue => self.issue(),
                State::Write(i) => self.write(i),
                State::WriteBundle => self.write_bundle(),
                State::Commit => self.commit(),
                State::ReadBack(i) => self.read_back(i),
                State::ReadBackSet => self.read_back_set(),
                State::Prove => self.prove(),
                State::Done => return Ok(()),
            };
            state = match next {
                Ok(next) => next,
                Err(Flow::Fail(e)) => return Err(e),
                Err(Flow::Restart(why)) => {
                    self.restarts += 1;
                    if self.restarts > self.station.config.max_restarts {
                        return Err(Box::new(SessionError::TooManyRestarts {
                            port: self.port(),
                            serial: self.serial(),
                            restarts: self.restarts - 1,
                            last: why,
                        }));
                    }
                    tracing::info!(port = %self.port(), serial = %self.serial(), "restarting the session: {why}");
                    State::Hello
                }
            };
        }
    }

    fn port(&self) -> String {
        self.link.port().to_string()
    }

    fn serial(&self) -> String {
        self.device
            .as_ref()
            .map_or_else(|| "(unknown)".to_string(), |d| d.serial.clone())
    }

    /// The device the hello found (every state after `Hello` has one).
    fn device(&self) -> Result<&DeviceInfo, Flow> {
        self.device.as_ref().ok_or_else(|| {
            fail(SessionError::Unexpected {
                port: self.port(),
                serial: self.serial(),
                request: "Hello",
                got: "no HelloReply before this step".into(),
            })
        })
    }

    /// Moves the device forward to `to` in the ledger, unless it is there
    /// or further already (a device passing again keeps `verified`).
    fn advance(&self, to: DeviceState, detail: &str) -> Result<(), Flow> {
        let serial = self.serial();
        let ledger = self.station.ledger;
        let now = ledger.device(&serial).map_err(|e| self.ledger_err(e))?;
        if now.is_some_and(|d| d.state != DeviceState::Failed && d.state >= to) {
            return Ok(());
        }
        ledger
            .advance(&serial, to, detail)
            .map_err(|e| self.ledger_err(e))
    }

    fn ledger_err(&self, source: LedgerError) -> Flow {
        fail(SessionError::Ledger {
            port: self.port(),
            serial: self.serial(),
            source,
        })
    }

    /// Sends a request; a `Nak` that means the device lost the session
    /// restarts it, any other `Nak` fails the device.
    fn ask(
        &mut self,
        request: Message,
        response_bound: usize,
        timeout: Option<Duration>,
    ) -> Result<Message, Flow> {
        let name = super::link::request_name(&request);
        match self.link.request(request, response_bound, timeout)? {
            Message::Nak {
                code: code @ (ErrorCode::BadSequence | ErrorCode::NotAllowedInState),
            } => Err(Flow::Restart(format!("{name} answered {code}"))),
            Message::Nak { code } => Err(fail(SessionError::Refused {
                port: self.port(),
                serial: self.serial(),
                request: name,
                code,
            })),
            answer => Ok(answer),
        }
    }

    fn unexpected(&self, request: &'static str, got: &Message) -> Flow {
        fail(SessionError::Unexpected {
            port: self.port(),
            serial: self.serial(),
            request,
            got: format!("{got:?}"),
        })
    }

    fn hello(&mut self) -> Result<State, Flow> {
        let mut nonce = [0u8; 16];
        let _ = self.rng.fill(&mut nonce);
        let reply = self.link.hello(nonce)?;
        let Message::HelloReply {
            protocol_version,
            capabilities,
            holds,
            device_serial,
            ..
        } = reply
        else {
            return Err(self.unexpected("Hello", &reply));
        };
        if protocol_version != crate::device::PROTOCOL_VERSION {
            return Err(self.unexpected(
                "Hello",
                &Message::Nak {
                    code: ErrorCode::VersionUnsupported,
                },
            ));
        }
        let port = self.port();
        if let Some(d) = self.device.take_if(|d| d.serial != device_serial) {
            // Another device on the port: the old one's session ends here,
            // and the new one is provisioned from the start.
            let why = SessionError::Replaced {
                port: port.clone(),
                from: d.serial.clone(),
                to: device_serial.clone(),
            };
            if self.planned {
                self.station
                    .ledger
                    .fail(&d.serial, &why.to_string())
                    .map_err(|e| self.ledger_err(e))?;
            }
            self.station.claims.release(&d.serial, &port);
            self.planned = false;
            self.key = None;
            self.cert = None;
            self.items.clear();
            self.restarts = 0;
        }
        match &mut self.device {
            Some(d) => {
                d.capabilities = capabilities;
                d.holds = holds;
            }
            None => {
                let claim = self.station.claims.claim(&device_serial, &port);
                let thing_name = self.station.config.thing_name(&device_serial);
                self.device = Some(DeviceInfo {
                    serial: device_serial.clone(),
                    thing_name: thing_name.clone(),
                    capabilities,
                    holds,
                });
                if let Err(other) = claim {
                    return Err(fail(SessionError::AlreadyClaimed {
                        port,
                        serial: device_serial,
                        other,
                    }));
                }
                let planned = PlannedDevice {
                    serial: device_serial,
                    thing_name,
                    line: 0,
                };
                self.station
                    .ledger
                    .plan(&self.station.config.job, &planned, false)
                    .map_err(|e| self.ledger_err(e))?;
                self.planned = true;
            }
        }
        Ok(State::Key)
    }

    fn key(&mut self) -> Result<State, Flow> {
        let mode = self.station.config.key_mode;
        if self.cert.is_none() && self.key.is_none() {
            if let Some(state) = self.reuse_live()? {
                return Ok(state);
            }
        }
        if mode == KeyMode::Device && self.restarts > 0 {
            self.check_device_key()?;
        }
        if self.key.is_none() {
            let key = match mode {
                KeyMode::Device => self.device_key()?,
                KeyMode::Station => self.station_key()?,
            };
            self.key = Some(key);
            self.advance(DeviceState::KeyReady, mode_detail(mode))?;
        }
        Ok(State::Issue)
    }

    /// A certificate the ledger holds as live for this serial, from an
    /// earlier session: reused if the device holds it (and, station mode,
    /// its key); superseded otherwise, before anything new is issued.
    fn reuse_live(&mut self) -> Result<Option<State>, Flow> {
        let serial = self.serial();
        let ledger = self.station.ledger;
        let status = ledger.device(&serial).map_err(|e| self.ledger_err(e))?;
        let Some(status) = status else {
            return Ok(None);
        };
        let (Some(live), Some(live_id)) = (status.live_cert_serial, status.live_certificate_id)
        else {
            return Ok(None);
        };
        let holds = self.device()?.holds;
        let key_there =
            self.station.config.key_mode == KeyMode::Device || holds.contains(Item::PrivateKey);
        if holds.contains(Item::Certificate) && key_there {
            let digest = self.ask(
                Message::ReadDigest {
                    item: Item::Certificate,
                },
                64,
                None,
            )?;
            if let Message::Digest { sha256, .. } = digest {
                if hex(&sha256) == live_id {
                    let der = ledger
                        .reader()
                        .certificate_der(&live)
                        .map_err(|e| self.ledger_err(e))?;
                    if let Some(public) = der.as_deref().and_then(key_of_certificate) {
                        self.key = Some(KeyHeld {
                            public,
                            private: None,
                            csr_sha: None,
                        });
                        self.cert = der.map(|der| CertHeld {
                            der,
                            serial_hex: live.clone(),
                            certificate_id: live_id.clone(),
                            reused: true,
                        });
                        return Ok(Some(State::Issue));
                    }
                }
            }
        }
        ledger
            .supersede(&serial, "not held by the device; issuing anew")
            .map_err(|e| self.ledger_err(e))?;
        Ok(None)
    }

    /// After a reset in device mode: is the key this session certified still
    /// the device's? If not, its certificate is superseded.
    fn check_device_key(&mut self) -> Result<(), Flow> {
        let Some(csr_sha) = self.key.as_ref().and_then(|k| k.csr_sha) else {
            return Ok(());
        };
        if self.device()?.holds.contains(Item::Certificate) {
            return Ok(());
        }
        let same = match self
            .link
            .request(Message::ReadBegin { item: Item::Csr }, 64, None)?
        {
            Message::ReadInfo { sha256, .. } => sha256 == csr_sha,
            Message::Nak {
                code: code @ (ErrorCode::BadSequence | ErrorCode::NotAllowedInState),
            } => return Err(Flow::Restart(format!("ReadBegin answered {code}"))),
            _ => false,
        };
        if !same {
            self.key = None;
            if self.cert.take().is_some() {
                let serial = self.serial();
                self.station
                    .ledger
                    .supersede(&serial, "the device lost its key in a reset")
                    .map_err(|e| self.ledger_err(e))?;
                self.items.clear();
            }
        }
        Ok(())
    }

    fn device_key(&mut self) -> Result<KeyHeld, Flow> {
        let key_type = self.station.config.key_type;
        let caps = self.device()?.capabilities;
        let wire = wire_key(key_type);
        let able = caps.contains(Capabilities::CAN_GENERATE_KEY)
            && Capabilities::for_key(wire).is_some_and(|c| caps.contains(c));
        if !able {
            return Err(fail(SessionError::Capability {
                port: self.port(),
                serial: self.serial(),
                reason: format!("device-key mode: the device cannot generate a {key_type} key"),
            }));
        }
        let timeout = match key_type {
            KeyType::P256 | KeyType::P384 => Duration::from_secs(30),
            KeyType::Rsa2048 | KeyType::Rsa3072 => Duration::from_secs(120),
        };
        let info = self.ask(Message::GenerateKey { key_type: wire }, 64, Some(timeout))?;
        let Message::ReadInfo {
            item: Item::Csr,
            total_len,
            sha256: csr_sha,
        } = info
        else {
            return Err(self.unexpected("GenerateKey", &info));
        };
        let csr = self.read_item(Item::Csr, total_len, csr_sha)?;
        let checked = crate::csr::check_der(&csr).map_err(|e| {
            fail(SessionError::Csr {
                port: self.port(),
                serial: self.serial(),
                reason: e.to_string(),
            })
        })?;
        if checked.public_key.alg() != key_type.alg() {
            return Err(fail(SessionError::Csr {
                port: self.port(),
                serial: self.serial(),
                reason: format!(
                    "asked for a {} key, the CSR holds a {} key",
                    key_type.alg(),
                    checked.public_key.alg()
                ),
            }));
        }
        Ok(KeyHeld {
            public: checked.public_key,
            private: None,
            csr_sha: Some(csr_sha),
        })
    }

    /// Reads an item the device announced with `ReadInfo`, in chunks as
    /// large as the station's frames allow, and checks its SHA-256.
    fn read_item(&mut self, item: Item, total_len: u32, sha: [u8; 32]) -> Result<Vec<u8>, Flow> {
        let mut asm = Reassembler::new(item, total_len, sha, CSR_LIMIT).map_err(|e| {
            fail(SessionError::Csr {
                port: self.port(),
                serial: self.serial(),
                reason: e.to_string(),
            })
        })?;
        let ceiling = super::link::STATION_MAX_FRAME;
        loop {
            let limit = self.read_limit;
            let max_len = chunk_capacity(limit)
                .and_then(|n| u16::try_from(n).ok())
                .unwrap_or(u16::MAX);
            let Some(read) = asm.next_read(max_len) else {
                break;
            };
            let retries = self.link.stats().retries;
            let answer = self.ask(read, usize::from(limit), None)?;
            self.read_limit = adapt(limit, ceiling, self.link.stats().retries > retries);
            match answer {
                Message::ReadData {
                    item: got,
                    offset,
                    data,
                } if got == item && !data.is_empty() => {
                    if let Err(e) = asm.accept(item, offset, &data) {
                        return Err(fail(SessionError::Csr {
                            port: self.port(),
                            serial: self.serial(),
                            reason: e.to_string(),
                        }));
                    }
                }
                other => return Err(self.unexpected("ReadChunk", &other)),
            }
        }
        asm.finish().map_err(|e| {
            fail(SessionError::Csr {
                port: self.port(),
                serial: self.serial(),
                reason: e.to_string(),
            })
        })
    }

    fn station_key(&mut self) -> Result<KeyHeld, Flow> {
        if !self
            .device()?
            .capabilities
            .contains(Capabilities::ACCEPTS_PRIVATE_KEY)
        {
            return Err(fail(SessionError::Capability {
                port: self.port(),
                serial: self.serial(),
                reason: "station-key mode: the device does not accept a private key".into(),
            }));
        }
        let key = keygen::generate(self.station.config.key_type, &self.rng).map_err(|e| {
            fail(SessionError::Key {
                port: self.port(),
                serial: self.serial(),
                reason: e.to_string(),
            })
        })?;
        if let Some(dir) = &self.station.config.keep_keys {
            let path = dir.join(format!("{}.key.pem", self.device()?.thing_name));
            fsx::write_atomic(
                &path,
                key.pkcs8_pem().as_bytes(),
                fsx::SECRET,
                fsx::Durability::Sync,
            )
            .map_err(|source| {
                fail(SessionError::KeyFile {
                    port: self.port(),
                    serial: self.serial(),
                    path: path.clone(),
                    source,
                })
            })?;
        }
        Ok(KeyHeld {
            public: key.public_key().clone(),
            private: Some(key),
            csr_sha: None,
        })
    }

    fn issue(&mut self) -> Result<State, Flow> {
        if self.cert.is_none() {
            let serial = self.serial();
            let thing_name = self.device()?.thing_name.clone();
            let Some(key) = &self.key else {
                return Ok(State::Key);
            };
            let public = key.public.clone();
            let ca = self.station.ca;
            let issue_err = |e: IssueError, s: &Self| {
                fail(SessionError::Issue {
                    port: s.port(),
                    serial: s.serial(),
                    source: e,
                })
            };
            let cert_serial = ca.new_serial().map_err(|e| issue_err(e, self))?;
            let serial_hex = crate::ca::serial::hex(&cert_serial);
            let ledger = self.station.ledger;
            ledger
                .record_intent(&serial, &serial_hex, public.raw())
                .map_err(|e| self.ledger_err(e))?;
            let issued = ca
                .issue_device_as(
                    self.station.profile,
                    &thing_name,
                    &serial,
                    &public,
                    &cert_serial,
                    self.station.clock.now(),
                )
                .map_err(|e| issue_err(e, self))?;
            let certificate_id = ledger
                .record_issued(&serial_hex, &issued.der, issued.not_after)
                .map_err(|e| self.ledger_err(e))?;
            self.cert = Some(CertHeld {
                der: issued.der,
                serial_hex,
                certificate_id,
                reused: false,
            });
            self.items.clear();
        }
        if self.items.is_empty() {
            self.items = self.build_items()?;
        }
        Ok(if self.bundles()? {
            State::WriteBundle
        } else {
            State::Write(0)
        })
    }

    /// Whether the device takes bundles (`BUNDLE`): then the items go in
    /// one `Bundle` write and are read back with one `ReadDigestSet`.
    fn bundles(&self) -> Result<bool, Flow> {
        Ok(self.device()?.capabilities.contains(Capabilities::BUNDLE))
    }

    /// What goes to the device, in order: the key (station mode, when the
    /// session made it), the certificate, the chain, the thing name, the
    /// endpoint, the root CA.
    fn build_items(&self) -> Result<Vec<(Item, Vec<u8>)>, Flow> {
        let mut items = Vec::with_capacity(6);
        if let Some(private) = self.key.as_ref().and_then(|k| k.private.as_ref()) {
            items.push((Item::PrivateKey, private.pkcs8_der().to_vec()));
        }
        if let Some(cert) = &self.cert {
            let chain = format!(
                "{}{}",
                crate::pem_encode("CERTIFICATE", &cert.der),
                self.station.ca.cert_pem()
            );
            items.push((Item::Certificate, cert.der.clone()));
            items.push((Item::Chain, chain.into_bytes()));
        }
        items.push((
            Item::ThingName,
            self.device()?.thing_name.clone().into_bytes(),
        ));
        let config = self.station.config;
        if !config.endpoint.is_empty() {
            items.push((Item::Endpoint, config.endpoint.clone().into_bytes()));
        }
        if let Some(root) = &config.root_ca {
            items.push((Item::RootCa, root.clone()));
        }
        Ok(items)
    }

    fn next_write(&self, i: usize) -> State {
        if i + 1 < self.items.len() {
            State::Write(i + 1)
        } else {
            State::Commit
        }
    }

    /// Whether the device already holds `item` (committed) with these bytes.
    fn holds_already(&mut self, item: Item, data: &[u8]) -> Result<bool, Flow> {
        if !self.device()?.holds.contains(item) {
            return Ok(false);
        }
        let total_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        Ok(matches!(
            self.ask(Message::ReadDigest { item }, 64, None)?,
            Message::Digest { total_len: len, sha256: found, .. }
                if len == total_len && found == sha256(data)
        ))
    }

    fn write(&mut self, i: usize) -> Result<State, Flow> {
        let (item, data) = self.items[i].clone();
        if !self.holds_already(item, &data)? {
            self.write_item(item, &data)?;
        }
        Ok(self.next_write(i))
    }

    /// Writes every item the device does not already hold, as one Bundle
    /// in ascending item order.
    fn write_bundle(&mut self) -> Result<State, Flow> {
        let mut pending = Vec::with_capacity(self.items.len());
        for (item, data) in self.items.clone() {
            if !self.holds_already(item, &data)? {
                pending.push((item, data));
            }
        }
        if pending.is_empty() {
            return Ok(State::Commit);
        }
        pending.sort_by_key(|(item, _)| u8::from(*item));
        let entries: Vec<(Item, &[u8])> = pending
            .iter()
            .map(|(item, data)| (*item, data.as_slice()))
            .collect();
        let content = bundle::encode(&entries).map_err(|e| {
            fail(SessionError::Capability {
                port: self.port(),
                serial: self.serial(),
                reason: e.to_string(),
            })
        })?;
        self.write_item(Item::Bundle, &content)?;
        Ok(State::Commit)
    }

    /// Writes one item from `WriteBegin` (resuming where the device stands)
    /// to `WriteEnd`.
    fn write_item(&mut self, item: Item, data: &[u8]) -> Result<(), Flow> {
        let total_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let peer = self.link.peer_max_frame();
        let mut attempts = 0;
        // A chunk given up to be sent shorter may have reached the device
        // (only its answers were lost): the next one is then refused with
        // `BadOffset`, and `WriteBegin` tells where the device stands. Such
        // a resync is not a restart; it is bounded on its own.
        let mut abandoned = false;
        let mut resyncs = 0;
        'begin: loop {
            if !std::mem::take(&mut abandoned) {
                attempts += 1;
            }
            let chunker = Chunker::new(item, data, peer).map_err(|e| {
                fail(SessionError::Capability {
                    port: self.port(),
                    serial: self.serial(),
                    reason: e.to_string(),
                })
            })?;
            let ready = self.ask(chunker.begin(), 64, None)?;
            let offset = match ready {
                Message::WriteReady { item: got, offset } if got == item && offset <= total_len => {
                    offset
                }
                other => return Err(self.unexpected("WriteBegin", &other)),
            };
            let mut offset = offset;
            while offset < total_len {
                // A chunker per chunk: its size follows the line's noise.
                let limit = self.write_limit.min(peer);
                let mut chunker = Chunker::new(item, data, limit).map_err(|e| {
                    fail(SessionError::Capability {
                        port: self.port(),
                        serial: self.serial(),
                        reason: e.to_string(),
                    })
                })?;
                let _ = chunker.resume_at(offset);
                let Some(chunk) = chunker.next() else { break };
                let sent = chunk_len(&chunk);
                let retries = self.link.stats().retries;
                let answer = if limit > MIN_FRAME {
                    // A retry repeats the same bytes: a chunk too long for
                    // the line's noise is given up soon and sent shorter.
                    match self.link.request_tries(chunk, 64, SHRINK_AFTER_TRIES) {
                        Err(LinkError::NoResponse { .. }) => {
                            self.write_limit = (limit / 2).max(MIN_FRAME);
                            abandoned = true;
                            continue;
                        }
                        answer => answer?,
                    }
                } else {
                    self.link.request(chunk, 64, None)?
                };
                self.write_limit = adapt(limit, peer, self.link.stats().retries > retries);
                match answer {
                    Message::Ack => {
                        offset += sent;
                        abandoned = false;
                    }
                    Message::Nak {
                        code: ErrorCode::BadOffset,
                    } if abandoned && resyncs < WRITE_RESYNCS => {
                        resyncs += 1;
                        continue 'begin;
                    }
                    Message::Nak {
                        code: ErrorCode::BadOffset,
                    } if attempts <= WRITE_RESTARTS => continue 'begin,
                    Message::Nak {
                        code: code @ (ErrorCode::BadSequence | ErrorCode::NotAllowedInState),
                    } => return Err(Flow::Restart(format!("WriteChunk answered {code}"))),
                    Message::Nak { code } => {
                        return Err(fail(SessionError::Refused {
                            port: self.port(),
                            serial: self.serial(),
                            request: "WriteChunk",
                            code,
                        }))
                    }
                    other => return Err(self.unexpected("WriteChunk", &other)),
                }
            }
            match self.ask(chunker.end(), 64, None)? {
                Message::Ack => return Ok(()),
                other => return Err(self.unexpected("WriteEnd", &other)),
            }
        }
    }

    fn commit(&mut self) -> Result<State, Flow> {
        let next = if self.bundles()? {
            State::ReadBackSet
        } else {
            State::ReadBack(0)
        };
        match self.ask(Message::Commit, 64, Some(COMMIT_TIMEOUT))? {
            Message::Ack => Ok(next),
            other => Err(self.unexpected("Commit", &other)),
        }
    }

    fn read_back(&mut self, i: usize) -> Result<State, Flow> {
        self.check_digest(i)?;
        if i + 1 < self.items.len() {
            return Ok(State::ReadBack(i + 1));
        }
        self.delivered()?;
        Ok(State::Prove)
    }

    /// One `ReadDigestSet` over every item provisioned, compared with the
    /// digest of what was written. On a mismatch the items are read back
    /// one by one to name the bad one; the device fails either way.
    fn read_back_set(&mut self) -> Result<State, Flow> {
        let mut set = ItemSet::default();
        let mut sorted: Vec<&(Item, Vec<u8>)> = self.items.iter().collect();
        sorted.sort_by_key(|(item, _)| u8::from(*item));
        for (item, _) in &sorted {
            set.insert(*item);
        }
        let expected = bundle::set_digest(sorted.iter().map(|(_, data)| data.as_slice()));
        let expected_len = sorted.iter().map(|(_, data)| data.len()).sum::<usize>();
        let expected_len = u32::try_from(expected_len).unwrap_or(u32::MAX);
        match self.ask(Message::ReadDigestSet { items: set }, 64, None)? {
            Message::Digest {
                item: Item::Bundle,
                total_len,
                sha256: found,
            } => {
                if total_len != expected_len || found != expected {
                    for i in 0..self.items.len() {
                        self.check_digest(i)?;
                    }
                    return Err(fail(SessionError::DigestMismatch {
                        port: self.port(),
                        serial: self.serial(),
                        item: "set of items".into(),
                        expected_len,
                        expected: hex(&expected),
                        found_len: total_len,
                        found: hex(&found),
                    }));
                }
            }
            other => return Err(self.unexpected("ReadDigestSet", &other)),
        }
        self.delivered()?;
        Ok(State::Prove)
    }

    /// The written items are in the device and read back: `delivered`.
    fn delivered(&mut self) -> Result<(), Flow> {
        let detail = self
            .cert
            .as_ref()
            .map(|c| c.serial_hex.clone())
            .unwrap_or_default();
        self.advance(DeviceState::Delivered, &detail)
    }

    /// Compares the stored digest of the `i`-th item with what was written.
    fn check_digest(&mut self, i: usize) -> Result<(), Flow> {
        let (item, data) = &self.items[i];
        let item = *item;
        let expected = sha256(data);
        let expected_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        match self.ask(Message::ReadDigest { item }, 64, None)? {
            Message::Digest {
                item: got,
                total_len,
                sha256: found,
            } if got == item => {
                if total_len != expected_len || found != expected {
                    return Err(fail(SessionError::DigestMismatch {
                        port: self.port(),
                        serial: self.serial(),
                        item: item_name(item),
                        expected_len,
                        expected: hex(&expected),
                        found_len: total_len,
                        found: hex(&found),
                    }));
                }
            }
            other => return Err(self.unexpected("ReadDigest", &other)),
        }
        Ok(())
    }

    fn prove(&mut self) -> Result<State, Flow> {
        let mut nonce = [0u8; NONCE_LEN];
        let _ = self.rng.fill(&mut nonce);
        let proof = self.ask(Message::Prove { nonce }, 600, None)?;
        let Message::Proof { signature } = proof else {
            return Err(self.unexpected("Prove", &proof));
        };
        let public = self.cert.as_ref().and_then(|c| key_of_certificate(&c.der));
        let ok = public.is_some_and(|key| verify_proof(&key, &nonce, &signature));
        if !ok {
            return Err(fail(SessionError::BadProof {
                port: self.port(),
                serial: self.serial(),
            }));
        }
        self.advance(DeviceState::Verified, "proof of possession")?;
        Ok(State::Done)
    }
}

/// Smallest frame the station falls back to on a noisy line (wire bytes).
const MIN_FRAME: u16 = 32;

/// Tries of a chunk longer than [`MIN_FRAME`] before it is sent shorter.
const SHRINK_AFTER_TRIES: u32 = 3;

/// The next frame size: halved after a request that needed a retry (long
/// frames are the ones noise destroys), grown by an eighth after one that
/// did not, never above `ceiling`.
fn adapt(limit: u16, ceiling: u16, retried: bool) -> u16 {
    let next = if retried {
        (limit / 2).max(MIN_FRAME)
    } else {
        limit.saturating_add(limit / 8 + 1)
    };
    next.min(ceiling)
}

/// Data bytes of a `WriteChunk`.
fn chunk_len(m: &Message) -> u32 {
    match m {
        Message::WriteChunk { data, .. } => u32::try_from(data.len()).unwrap_or(u32::MAX),
        _ => 0,
    }
}

fn mode_detail(mode: KeyMode) -> &'static str {
    match mode {
        KeyMode::Device => "device key, CSR checked",
        KeyMode::Station => "station key",
    }
}

/// The protocol's code for a key type.
pub fn wire_key(key: KeyType) -> WireKey {
    match key {
        KeyType::P256 => WireKey::P256,
        KeyType::P384 => WireKey::P384,
        KeyType::Rsa2048 => WireKey::Rsa2048,
        KeyType::Rsa3072 => WireKey::Rsa3072,
    }
}

/// The public key a DER certificate certifies, if it is one the station allows.
pub fn key_of_certificate(der: &[u8]) -> Option<PublicKey> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    crate::csr::allowed_key(cert.public_key()).ok()
}

/// Whether `signature` is the device's signature over the proof prefix and
/// `nonce` under `key` (protocol 3.3, Prove).
pub fn verify_proof(key: &PublicKey, nonce: &[u8], signature: &[u8]) -> bool {
    let alg: &dyn VerificationAlgorithm = match key.alg() {
        KeyAlg::P256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyAlg::P384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyAlg::Rsa { .. } => &signature::RSA_PKCS1_2048_8192_SHA256,
    };
    let mut message = Vec::with_capacity(PROOF_PREFIX.len() + nonce.len());
    message.extend_from_slice(PROOF_PREFIX);
    message.extend_from_slice(nonce);
    UnparsedPublicKey::new(alg, key.raw())
        .verify(&message, signature)
        .is_ok()
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    crate::ca::serial::hex(bytes)
}
