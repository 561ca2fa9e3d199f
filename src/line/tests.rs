//! Session tests against a small in-memory device double: the double speaks
//! the protocol through `provline::device` (duplicate filter, reassembler,
//! codec) and can drop answers, lie about a digest, reset in a write or
//! stay silent. The pseudo-terminal tests against the simulator are in
//! `tests/it/line.rs`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use time::OffsetDateTime;

use super::session::{key_of_certificate, Claims, KeyMode, Quiet, SessionConfig, Station};
use super::transport::Transport;
use super::{LinkTiming, SessionError};
use crate::ca::{CaInit, DeviceProfile, LocalCa};
use crate::clock::SystemClock;
use crate::device::{
    encode, read_slice, sha256, Capabilities, DuplicateFilter, ErrorCode, Frame, FrameDecoder,
    Item, ItemSet, Message, Reassembler, Verdict,
};
use crate::keygen::KeyType;
use crate::ledger::{CaId, CertState, DeviceState, JobId, Ledger, LedgerOptions};

#[derive(Default)]
struct Faults {
    /// Drop every n-th answer.
    drop_every: Option<u32>,
    /// Answer ReadDigest and ReadDigestSet with a wrong SHA-256.
    lie: bool,
    /// Answer ReadDigestSet (only) with a wrong SHA-256.
    lie_set: bool,
    /// Reset (once) on this WriteChunk (1 = the first) of this item.
    reset_at: Option<(Item, u32)>,
    /// A reset also loses the key generated and not committed.
    lose_key: bool,
    /// Never answer.
    silent: bool,
    /// At the reset, another device takes the port: this serial, empty storage.
    replace_with: Option<String>,
}

struct Double {
    serial: String,
    device_mode: bool,
    max_frame: u16,
    faults: Faults,
    decoder: FrameDecoder,
    out: VecDeque<u8>,
    filter: DuplicateFilter,
    key: Option<Vec<u8>>,
    csr: Option<Vec<u8>>,
    writing: Option<Reassembler>,
    staged: HashMap<Item, Vec<u8>>,
    committed: HashMap<Item, Vec<u8>>,
    answers: u32,
    chunks: u32,
    resets: u32,
    /// Announces BUNDLE: takes Bundle writes and answers ReadDigestSet.
    bundle: bool,
    /// Items of the fresh `WriteBegin`s, in order.
    begins: Vec<Item>,
    /// Fresh `ReadDigest`s and `ReadDigestSet`s.
    digests: u32,
    set_digests: u32,
}

impl Double {
    fn new(serial: &str, device_mode: bool, faults: Faults) -> Double {
        Double {
            serial: serial.into(),
            device_mode,
            max_frame: 64,
            faults,
            decoder: FrameDecoder::new(64),
            out: VecDeque::new(),
            filter: DuplicateFilter::new(),
            key: None,
            csr: None,
            writing: None,
            staged: HashMap::new(),
            committed: HashMap::new(),
            answers: 0,
            chunks: 0,
            resets: 0,
            bundle: false,
            begins: Vec::new(),
            digests: 0,
            set_digests: 0,
        }
    }

    fn holds(&self) -> ItemSet {
        let mut set = ItemSet::default();
        for item in self.committed.keys() {
            set.insert(*item);
        }
        set
    }

    fn stored(&self, item: Item) -> Option<&Vec<u8>> {
        self.staged.get(&item).or_else(|| self.committed.get(&item))
    }

    fn signing_key(&self) -> Option<EcdsaKeyPair> {
        let pkcs8 = match &self.key {
            Some(k) => k.clone(),
            None => self.stored(Item::PrivateKey)?.clone(),
        };
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &pkcs8,
            &SystemRandom::new(),
        )
        .ok()
    }

    fn reset(&mut self) {
        if let Some(serial) = self.faults.replace_with.take() {
            self.serial = serial;
            self.committed.clear();
            self.key = None;
            self.csr = None;
        }
        if self.faults.lose_key && !self.committed.contains_key(&Item::Certificate) {
            self.key = None;
            self.csr = None;
        }
        self.filter.clear();
        self.writing = None;
        self.staged.clear();
        self.decoder.clear();
        self.resets += 1;
    }

    fn carry_out(&mut self, message: &Message) -> Option<Message> {
        let nak = |code| Some(Message::Nak { code });
        if let Message::ReadDigest { .. } = message {
            self.digests += 1;
        }
        Some(match message {
            Message::Hello { .. } => {
                let mut caps = Capabilities::KEY_P256;
                caps = caps.union(if self.device_mode {
                    Capabilities::CAN_GENERATE_KEY
                } else {
                    Capabilities::ACCEPTS_PRIVATE_KEY
                });
                if self.bundle {
                    caps = caps.union(Capabilities::BUNDLE);
                }
                Message::HelloReply {
                    protocol_version: 1,
                    max_frame: self.max_frame,
                    capabilities: caps,
                    holds: self.holds(),
                    device_serial: self.serial.clone(),
                    firmware_version: "double".into(),
                }
            }
            Message::GenerateKey { .. } => {
                let key = rcgen::KeyPair::generate().ok()?;
                let csr = rcgen::CertificateParams::default()
                    .serialize_request(&key)
                    .ok()?
                    .der()
                    .to_vec();
                self.key = Some(key.serialize_der());
                let info = Message::ReadInfo {
                    item: Item::Csr,
                    total_len: csr.len() as u32,
                    sha256: sha256(&csr),
                };
                self.csr = Some(csr);
                info
            }
            Message::ReadBegin { item: Item::Csr } => match &self.csr {
                Some(csr) => Message::ReadInfo {
                    item: Item::Csr,
                    total_len: csr.len() as u32,
                    sha256: sha256(csr),
                },
                None => return nak(ErrorCode::NoKey),
            },
            Message::ReadChunk {
                item: Item::Csr,
                offset,
                max_len,
            } => {
                let csr = self.csr.clone().unwrap_or_default();
                match read_slice(&csr, *offset, *max_len) {
                    Ok(data) => Message::ReadData {
                        item: Item::Csr,
                        offset: *offset,
                        data: data.to_vec(),
                    },
                    Err(e) => return nak(e.code()),
                }
            }
            Message::WriteBegin {
                item,
                total_len,
                sha256: sha,
            } => {
                self.begins.push(*item);
                if let Some(w) = &self.writing {
                    if w.same_transfer(*item, *total_len, sha) {
                        return Some(Message::WriteReady {
                            item: *item,
                            offset: w.received(),
                        });
                    }
                }
                let mut asm = Reassembler::new(*item, *total_len, *sha, 8192).ok()?;
                if let Some(done) = self.staged.get(item) {
                    if sha256(done) == *sha {
                        let _ = asm.accept(*item, 0, &done.clone());
                    }
                }
                let offset = asm.received();
                self.writing = Some(asm);
                Message::WriteReady {
                    item: *item,
                    offset,
                }
            }
            Message::WriteChunk { item, offset, data } => {
                if let Some((target, n)) = self.faults.reset_at {
                    if *item == target {
                        self.chunks += 1;
                        if self.chunks == n {
                            self.faults.reset_at = None;
                            self.reset();
                            return None;
                        }
                    }
                }
                match self
                    .writing
                    .as_mut()
                    .map(|w| w.accept(*item, *offset, data))
                {
                    Some(Ok(())) => Message::Ack,
                    Some(Err(e)) => return nak(e.code()),
                    None => return nak(ErrorCode::NoTransfer),
                }
            }
            Message::WriteEnd { item } => match self.writing.take().map(Reassembler::finish) {
                Some(Ok(data)) if *item == Item::Bundle && self.bundle => {
                    match crate::device::bundle::parse(&data) {
                        Ok(entries) => {
                            for (item, content) in entries {
                                self.staged.insert(item, content.to_vec());
                            }
                            Message::Ack
                        }
                        Err(e) => return nak(e.code()),
                    }
                }
                Some(Ok(data)) => {
                    self.staged.insert(*item, data);
                    Message::Ack
                }
                Some(Err(e)) => return nak(e.code()),
                None => return nak(ErrorCode::NoTransfer),
            },
            Message::Commit => {
                let staged: Vec<_> = self.staged.drain().collect();
                self.committed.extend(staged);
                Message::Ack
            }
            Message::ReadDigestSet { items } if self.bundle => {
                self.set_digests += 1;
                let mut parts = Vec::new();
                for item in items.iter() {
                    match self.committed.get(&item) {
                        Some(data) => parts.push(data.as_slice()),
                        None => return nak(ErrorCode::NoTransfer),
                    }
                }
                let total: usize = parts.iter().map(|d| d.len()).sum();
                let mut sha = crate::device::bundle::set_digest(parts);
                if self.faults.lie || self.faults.lie_set {
                    sha[0] ^= 0xFF;
                }
                Message::Digest {
                    item: Item::Bundle,
                    total_len: total as u32,
                    sha256: sha,
                }
            }
            Message::ReadDigest { item } => match self.stored(*item) {
                Some(data) => {
                    let mut sha = sha256(data);
                    if self.faults.lie {
                        sha[0] ^= 0xFF;
                    }
                    Message::Digest {
                        item: *item,
                        total_len: data.len() as u32,
                        sha256: sha,
                    }
                }
                None => return nak(ErrorCode::NoTransfer),
            },
            Message::Prove { nonce } => {
                let key = self.signing_key()?;
                let mut msg = super::session::PROOF_PREFIX.to_vec();
                msg.extend_from_slice(nonce);
                let sig = key.sign(&SystemRandom::new(), &msg).ok()?;
                Message::Proof {
                    signature: sig.as_ref().to_vec(),
                }
            }
            _ => return nak(ErrorCode::NotAllowedInState),
        })
    }

    fn answer(&mut self, frame: &Frame) -> Option<Frame> {
        if matches!(frame.message, Message::Hello { .. }) {
            let response = self.carry_out(&frame.message)?;
            return Some(self.filter.record(frame.seq, response).clone());
        }
        match self.filter.check(frame) {
            Verdict::Duplicate(f) => Some(f.clone()),
            Verdict::NeedHello => Some(Frame::new(
                frame.seq,
                Message::Nak {
                    code: ErrorCode::NotAllowedInState,
                },
            )),
            Verdict::OutOfSequence { .. } => Some(DuplicateFilter::bad_sequence(frame.seq)),
            Verdict::Fresh => {
                let response = self.carry_out(&frame.message)?;
                Some(self.filter.record(frame.seq, response).clone())
            }
        }
    }
}

impl Transport for Double {
    fn name(&self) -> &str {
        "double"
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.faults.silent {
            return Ok(());
        }
        self.decoder.push(bytes);
        while let Some(next) = self.decoder.next_frame() {
            let Ok(frame) = next else { continue };
            if let Some(answer) = self.answer(&frame) {
                self.answers += 1;
                if self
                    .faults
                    .drop_every
                    .is_some_and(|n| self.answers.is_multiple_of(n))
                {
                    continue;
                }
                self.out.extend(encode(&answer).unwrap_or_default());
            }
        }
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        if self.out.is_empty() {
            std::thread::sleep(timeout.min(Duration::from_millis(2)));
            return Ok(0);
        }
        let n = buf.len().min(self.out.len());
        for (slot, byte) in buf.iter_mut().zip(self.out.drain(..n)) {
            *slot = byte;
        }
        Ok(n)
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    ca: LocalCa,
    ledger: Ledger,
    claims: Claims,
    profile: DeviceProfile,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = LocalCa::ephemeral(
            &CaInit::new(KeyType::P256, "Line Test CA"),
            OffsetDateTime::now_utc(),
        )
        .expect("CA");
        let ledger = Ledger::open(
            &dir.path().join("line.sqlite"),
            CaId::of_certificate(ca.cert_der()),
            LedgerOptions::default(),
        )
        .expect("ledger");
        Rig {
            _dir: dir,
            ca,
            ledger,
            claims: Claims::new(),
            profile: DeviceProfile::default(),
        }
    }

    fn config(mode: KeyMode) -> SessionConfig {
        SessionConfig {
            key_mode: mode,
            key_type: KeyType::P256,
            thing_name_pattern: "sensor_{serial}".into(),
            endpoint: "example-ats.iot.eu-west-1.amazonaws.com".into(),
            root_ca: None,
            job: JobId::new("line", "flash"),
            timing: LinkTiming {
                baud: 0,
                base: Duration::from_millis(20),
                tries: 10,
            },
            keep_keys: None,
            max_restarts: 5,
        }
    }

    fn run(
        &self,
        config: &SessionConfig,
        double: &mut Double,
    ) -> Result<super::Passed, Box<super::Failure>> {
        let station = Station {
            ca: &self.ca,
            profile: &self.profile,
            ledger: &self.ledger,
            clock: &SystemClock,
            claims: &self.claims,
            config,
        };
        let stop = AtomicBool::new(false);
        station.provision(double, &Quiet, &|| {
            stop.load(std::sync::atomic::Ordering::SeqCst)
        })
    }

    fn live_certs(&self, serial: &str) -> usize {
        let mut n = 0;
        self.ledger
            .for_each_certificate(|row| -> Result<(), crate::ledger::LedgerError> {
                if row.device_serial == serial && row.state == CertState::Live {
                    n += 1;
                }
                Ok(())
            })
            .expect("export");
        n
    }
}

#[test]
fn station_key_session_writes_every_item_and_verifies() {
    let rig = Rig::new();
    let config = Rig::config(KeyMode::Station);
    let mut dev = Double::new("SN-1", false, Faults::default());
    let passed = rig.run(&config, &mut dev).expect("passes");
    assert_eq!(passed.serial, "SN-1");
    let cert = dev.committed.get(&Item::Certificate).expect("certificate");
    let key = dev.committed.get(&Item::PrivateKey).expect("key");
    let signer =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key, &SystemRandom::new())
            .expect("PKCS#8");
    use ring::signature::KeyPair;
    assert_eq!(
        key_of_certificate(cert).expect("cert key").raw(),
        signer.public_key().as_ref()
    );
    assert_eq!(
        dev.committed.get(&Item::ThingName).map(Vec::as_slice),
        Some(&b"sensor_SN-1"[..])
    );
    let status = rig.ledger.device("SN-1").unwrap().expect("in ledger");
    assert_eq!(status.state, DeviceState::Verified);
    assert_eq!(
        status.live_certificate_id.as_deref(),
        Some(&*passed.certificate_id)
    );
}

#[test]
fn device_key_session_certifies_the_device_key() {
    let rig = Rig::new();
    let config = Rig::config(KeyMode::Device);
    let mut dev = Double::new("SN-2", true, Faults::default());
    rig.run(&config, &mut dev).expect("passes");
    assert!(!dev.committed.contains_key(&Item::PrivateKey));
    let pkcs8 = dev.key.clone().expect("device key");
    let own = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &pkcs8,
        &SystemRandom::new(),
    )
    .expect("PKCS#8");
    use ring::signature::KeyPair;
    let cert = dev.committed.get(&Item::Certificate).expect("certificate");
    assert_eq!(
        key_of_certificate(cert).expect("cert key").raw(),
        own.public_key().as_ref()
    );
}

#[test]
fn lost_answers_are_retried_under_the_same_seq() {
    let rig = Rig::new();
    let config = Rig::config(KeyMode::Station);
    let faults = Faults {
        drop_every: Some(4),
        ..Faults::default()
    };
    let mut dev = Double::new("SN-3", false, faults);
    let passed = rig.run(&config, &mut dev).expect("passes");
    assert!(passed.retries > 0, "no retry was needed: {passed:?}");
    assert_eq!(dev.resets, 0);
    assert_eq!(rig.live_certs("SN-3"), 1);
}

#[test]
fn a_lying_digest_fails_the_device() {
    let rig = Rig::new();
    let config = Rig::config(KeyMode::Station);
    let faults = Faults {
        lie: true,
        ..Faults::default()
    };
    let mut dev = Double::new("SN-4", false, faults);
    let failure = rig.run(&config, &mut dev).expect_err("must fail");
    assert!(
        matches!(failure.error, SessionError::DigestMismatch { .. }),
        "{}",
        failure.error
    );
    let status = rig.ledger.device("SN-4").unwrap().expect("in ledger");
    assert_eq!(status.state, DeviceState::Failed);
}

#[test]
fn a_reset_in_the_key_write_resumes_with_one_certificate() {
    let rig = Rig::new();
    let config = Rig::config(KeyMode::Station);
    let faults = Faults {
        reset_at: Some((Item::PrivateKey, 2)),
        ..Faults::default()
    };
    let mut dev = Double::new("SN-5", false, faults);
    let passed = rig.run(&config, &mut dev).expect("passes after the reset");
    assert_eq!(dev.resets, 1);
    assert_eq!(passed.restarts, 1);
    assert_eq!(rig.live_certs("SN-5"), 1);
    // A second session on the same device reuses the certificate it holds.
    let again = rig.run(&config, &mut dev).expect("passes again");
    assert!(again.reused);
    assert_eq!(again.cert_serial, passed.cert_serial);
    assert_eq!(rig.live_certs("SN-5"), 1);
}

#[test]
fn a_silent_device_fails_with_no_response() {
    let rig = Rig::new();
    let mut config = Rig::config(KeyMode::Station);
    config.timing.tries = 3;
    let faults = Faults {
        silent: true,
        ..Faults::default()
    };
    let mut dev = Double::new("SN-6", false, faults);
    let failure = rig.run(&config, &mut dev).expect_err("must fail");
    assert_eq!(failure.serial, None);
    let text = failure.error.to_string();
    assert!(
        text.contains("no response to Hello after 3 tries"),
        "{text}"
    );
    assert!(text.contains("double"), "{text}");
}

#[test]
fn a_serial_on_another_port_is_refused() {
    let rig = Rig::new();
    rig.claims.claim("SN-7", "other-port").expect("first claim");
    let config = Rig::config(KeyMode::Station);
    let mut dev = Double::new("SN-7", false, Faults::default());
    let failure = rig.run(&config, &mut dev).expect_err("refused");
    assert!(
        matches!(failure.error, SessionError::AlreadyClaimed { .. }),
        "{}",
        failure.error
    );
    assert!(dev.committed.is_empty());
}

#[test]
fn another_device_on_the_port_is_provisioned_as_new() {
    let rig = Rig::new();
    let config = Rig::config(KeyMode::Station);
    let faults = Faults {
        reset_at: Some((Item::PrivateKey, 2)),
        replace_with: Some("SN-9".into()),
        ..Faults::default()
    };
    let mut dev = Double::new("SN-8", false, faults);
    let passed = rig.run(&config, &mut dev).expect("the new device passes");
    assert_eq!(passed.serial, "SN-9");
    let old = rig.ledger.device("SN-8").unwrap().expect("old device");
    assert_eq!(old.state, DeviceState::Failed);
    assert!(old
        .error
        .unwrap_or_default()
        .contains("replaced by device SN-9"));
    assert_eq!(rig.live_certs("SN-9"), 1);
    let cert = dev.committed.get(&Item::Certificate).expect("certificate");
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).expect("DER");
    assert!(parsed.subject().to_string().contains("SN-9"));
}

#[test]
fn a_device_key_lost_in_a_reset_supersedes_its_certificate() {
    let rig = Rig::new();
    let config = Rig::config(KeyMode::Device);
    let faults = Faults {
        reset_at: Some((Item::Chain, 2)),
        lose_key: true,
        ..Faults::default()
    };
    let mut dev = Double::new("SN-10", true, faults);
    let passed = rig.run(&config, &mut dev).expect("passes with a new key");
    assert_eq!(passed.restarts, 1);
    assert_eq!(rig.live_certs("SN-10"), 1);
    let mut superseded = Vec::new();
    rig.ledger
        .for_each_certificate(|row| -> Result<(), crate::ledger::LedgerError> {
            if row.device_serial == "SN-10" && row.state == CertState::Superseded {
                superseded.push(row.reason.unwrap_or_default());
            }
            Ok(())
        })
        .expect("export");
    assert_eq!(
        superseded,
        vec!["the device lost its key in a reset".to_string()]
    );
    let pkcs8 = dev.key.clone().expect("device key");
    let own = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &pkcs8,
        &SystemRandom::new(),
    )
    .expect("PKCS#8");
    use ring::signature::KeyPair;
    let cert = dev.committed.get(&Item::Certificate).expect("certificate");
    assert_eq!(
        key_of_certificate(cert).expect("cert key").raw(),
        own.public_key().as_ref()
    );
}

#[test]
fn with_bundle_the_items_go_in_one_write_and_come_back_in_one_digest() {
    let rig = Rig::new();
    let config = Rig::config(KeyMode::Station);
    let mut dev = Double::new("SN-B1", false, Faults::default());
    dev.bundle = true;
    rig.run(&config, &mut dev).expect("passes");
    assert_eq!(dev.begins, [Item::Bundle]);
    assert_eq!((dev.digests, dev.set_digests), (0, 1));
    let mut held: Vec<Item> = dev.committed.keys().copied().collect();
    held.sort_by_key(|i| u8::from(*i));
    assert_eq!(
        held,
        [
            Item::Certificate,
            Item::Chain,
            Item::PrivateKey,
            Item::ThingName,
            Item::Endpoint
        ]
    );
    let status = rig.ledger.device("SN-B1").unwrap().expect("in ledger");
    assert_eq!(status.state, DeviceState::Verified);

    // A device that already holds items: each is checked with ReadDigest
    // first (only the thing name and the endpoint still match under another
    // CA), and the rest go in one Bundle.
    let mut again = Double::new("SN-B1", false, Faults::default());
    again.bundle = true;
    again.committed = dev.committed.clone();
    let passed = Rig::new().run(&config, &mut again).expect("passes");
    assert!(!passed.reused, "another ledger: a new certificate");
    assert_eq!(again.begins, [Item::Bundle]);
    assert_eq!((again.digests, again.set_digests), (5, 1));
}

#[test]
fn a_wrong_set_digest_fails_the_device_and_names_the_item_if_one_differs() {
    let rig = Rig::new();
    let config = Rig::config(KeyMode::Station);
    // Only the set digest is wrong: every item reads back right, the
    // device fails all the same.
    let mut dev = Double::new(
        "SN-B2",
        false,
        Faults {
            lie_set: true,
            ..Faults::default()
        },
    );
    dev.bundle = true;
    let failure = rig.run(&config, &mut dev).expect_err("must fail");
    match &failure.error {
        SessionError::DigestMismatch { item, .. } => assert_eq!(item, "set of items"),
        other => panic!("{other}"),
    }
    assert_eq!(
        dev.digests, 5,
        "each item was read back to find the bad one"
    );
    // Every digest wrong: the first item read back is named.
    let mut dev = Double::new(
        "SN-B3",
        false,
        Faults {
            lie: true,
            ..Faults::default()
        },
    );
    dev.bundle = true;
    let failure = rig.run(&config, &mut dev).expect_err("must fail");
    match &failure.error {
        SessionError::DigestMismatch { item, .. } => assert_eq!(item, "private key"),
        other => panic!("{other}"),
    }
    for serial in ["SN-B2", "SN-B3"] {
        let status = rig.ledger.device(serial).unwrap().expect("in ledger");
        assert_eq!(status.state, DeviceState::Failed);
    }
}

#[test]
fn a_reset_in_the_bundle_write_restarts_with_one_certificate() {
    let rig = Rig::new();
    let config = Rig::config(KeyMode::Station);
    let faults = Faults {
        reset_at: Some((Item::Bundle, 3)),
        ..Faults::default()
    };
    let mut dev = Double::new("SN-B4", false, faults);
    dev.bundle = true;
    let passed = rig.run(&config, &mut dev).expect("passes");
    assert_eq!(dev.resets, 1);
    assert!(passed.restarts >= 1);
    assert_eq!(dev.begins, [Item::Bundle, Item::Bundle]);
    assert_eq!(rig.live_certs("SN-B4"), 1);
}
