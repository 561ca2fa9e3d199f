//! Pseudo-terminal tests: a small station loop, written here from
//! `provline::device` alone, provisions simulated devices over real ptys.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use serialport::TTYPort;
use time::OffsetDateTime;

use super::key::PROOF_PREFIX;
use super::{SimConfig, SimDevice, SimKeyMode, Stored};
use crate::ca::{CaInit, DeviceProfile, LocalCa};
use crate::device::{
    encode, sha256, Capabilities, Chunker, ErrorCode, Flags, Frame, FrameDecoder, Item, KeyType,
    Message, Reassembler,
};
use crate::keygen;

/// A stop-and-wait station: one request outstanding, retries with the same seq.
pub(super) struct Station {
    port: TTYPort,
    decoder: FrameDecoder,
    seq: u16,
    /// The device's receive limit, from its `HelloReply`.
    pub device_max_frame: u16,
    /// Requests sent again after a timeout.
    pub retries: u32,
    /// Frames from the device that did not decode.
    pub bad_frames: u32,
    /// Tries per request.
    pub tries: u32,
    /// Wait for an answer before trying again.
    pub timeout: Duration,
}

impl Station {
    pub(super) fn open(path: &std::path::Path) -> Station {
        let port = serialport::new(path.to_string_lossy(), 115_200)
            .timeout(Duration::from_millis(20))
            .open_native()
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        Station {
            port,
            decoder: FrameDecoder::new(1024),
            seq: 0x4000,
            device_max_frame: 64,
            retries: 0,
            bad_frames: 0,
            tries: 10,
            timeout: Duration::from_millis(400),
        }
    }

    /// Sends `message` and returns the response with its seq; panics after
    /// the last try.
    pub(super) fn request(&mut self, message: Message) -> Message {
        let shown = format!("{message:?}");
        self.try_request(message)
            .unwrap_or_else(|| panic!("no answer to {shown}"))
    }

    /// Sends `message`, trying again with the same seq after each timeout;
    /// `None` when no try was answered.
    pub(super) fn try_request(&mut self, message: Message) -> Option<Message> {
        self.seq = self.seq.wrapping_add(1);
        let mut frame = Frame::new(self.seq, message);
        for attempt in 0..self.tries {
            if attempt > 0 {
                frame.flags = Flags::RETRANSMIT;
                self.retries += 1;
            }
            self.port.write_all(&encode(&frame).unwrap()).unwrap();
            if let Some(reply) = self.wait(self.seq) {
                return Some(reply);
            }
        }
        None
    }

    fn wait(&mut self, seq: u16) -> Option<Message> {
        let deadline = Instant::now() + self.timeout;
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            while let Some(result) = self.decoder.next_frame() {
                match result {
                    Ok(frame) if frame.seq == seq && !frame.message.is_request() => {
                        return Some(frame.message)
                    }
                    Ok(_) => {}
                    Err(_) => self.bad_frames += 1,
                }
            }
            match self.port.read(&mut buf) {
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("reading the port: {e}"),
            }
        }
        None
    }

    /// Opens the session; returns the `HelloReply` fields.
    pub(super) fn hello(&mut self) -> (Capabilities, String, crate::device::ItemSet) {
        let reply = self.try_hello().expect("no answer to Hello");
        let Message::HelloReply {
            max_frame,
            capabilities,
            holds,
            device_serial,
            ..
        } = reply
        else {
            panic!("not a HelloReply: {reply:?}")
        };
        self.device_max_frame = max_frame;
        (capabilities, device_serial, holds)
    }

    /// The seq of the last request sent.
    pub(super) fn last_seq(&self) -> u16 {
        self.seq
    }

    /// Waits for the answer to the request with `seq` (one timeout).
    pub(super) fn wait_for(&mut self, seq: u16) -> Option<Message> {
        self.wait(seq)
    }

    /// Writes bytes as they are.
    pub(super) fn write_raw(&mut self, bytes: &[u8]) {
        self.port.write_all(bytes).unwrap();
    }

    /// Sends a lone 0x00 and a `Hello`; the answer, if any.
    pub(super) fn try_hello(&mut self) -> Option<Message> {
        self.port.write_all(&[0]).unwrap();
        self.try_request(Message::Hello {
            protocol_version: 1,
            max_frame: 1024,
            station_nonce: Some([7; 16]),
        })
    }

    /// Writes an item, resuming where the device says it stands.
    pub(super) fn write_item(&mut self, item: Item, data: &[u8]) {
        let mut chunker = Chunker::new(item, data, self.device_max_frame).unwrap();
        let reply = self.request(chunker.begin());
        let Message::WriteReady { offset, .. } = reply else {
            panic!("WriteBegin {item:?}: {reply:?}")
        };
        chunker.resume_at(offset).unwrap();
        for chunk in chunker.by_ref() {
            let reply = self.request(chunk);
            assert_eq!(reply, Message::Ack, "chunk of {item:?}");
        }
        let reply = self.request(chunker.end());
        assert_eq!(reply, Message::Ack, "WriteEnd {item:?}");
    }

    /// Reads an item announced by a `ReadInfo`, checking its SHA-256.
    pub(super) fn read_item(&mut self, info: Message) -> Vec<u8> {
        let Message::ReadInfo {
            item,
            total_len,
            sha256,
        } = info
        else {
            panic!("not a ReadInfo: {info:?}")
        };
        let mut r = Reassembler::new(item, total_len, sha256, 1 << 16).unwrap();
        while let Some(request) = r.next_read(900) {
            let reply = self.request(request);
            let Message::ReadData { item, offset, data } = reply else {
                panic!("not ReadData: {reply:?}")
            };
            r.accept(item, offset, &data).unwrap();
        }
        r.finish().unwrap()
    }

    pub(super) fn digest(&mut self, item: Item) -> Message {
        self.request(Message::ReadDigest { item })
    }
}

pub(super) struct Credentials {
    pub ca: LocalCa,
    pub items: Vec<(Item, Vec<u8>)>,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

pub(super) fn test_ca() -> LocalCa {
    LocalCa::ephemeral(&CaInit::new(keygen::KeyType::P256, "sim test CA"), now()).unwrap()
}

/// The items a station writes for a certified key (private key first if given).
pub(super) fn credentials(
    ca: LocalCa,
    serial: &str,
    key: &keygen::PublicKey,
    pkcs8: Option<&[u8]>,
) -> Credentials {
    let thing = format!("sensor_{serial}");
    let cert = ca
        .issue_device(&DeviceProfile::default(), &thing, serial, key, now())
        .unwrap();
    let chain = format!("{}{}", cert.pem(), ca.cert_pem());
    let mut items = Vec::new();
    if let Some(pkcs8) = pkcs8 {
        items.push((Item::PrivateKey, pkcs8.to_vec()));
    }
    items.extend([
        (Item::Certificate, cert.der.clone()),
        (Item::Chain, chain.into_bytes()),
        (Item::ThingName, thing.into_bytes()),
        (
            Item::Endpoint,
            b"a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com".to_vec(),
        ),
        (Item::RootCa, ca.cert_der().to_vec()),
    ]);
    Credentials { ca, items }
}

/// Commit, read every digest back, prove: what a station does after writing.
pub(super) fn commit_and_check(station: &mut Station, items: &[(Item, Vec<u8>)]) -> Vec<u8> {
    assert_eq!(station.request(Message::Commit), Message::Ack);
    for (item, data) in items {
        let reply = station.digest(*item);
        assert_eq!(
            reply,
            Message::Digest {
                item: *item,
                total_len: u32::try_from(data.len()).unwrap(),
                sha256: sha256(data)
            }
        );
    }
    let cert = &items
        .iter()
        .find(|(item, _)| *item == Item::Certificate)
        .unwrap()
        .1;
    let nonce = [0x5A; 32];
    let Message::Proof { signature } = station.request(Message::Prove { nonce }) else {
        panic!("no proof")
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).unwrap();
    let mut signed = PROOF_PREFIX.to_vec();
    signed.extend_from_slice(&nonce);
    UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        parsed.public_key().subject_public_key.data.as_ref(),
    )
    .verify(&signed, &signature)
    .expect("the proof verifies with the certificate's key");
    parsed.public_key().raw.to_vec()
}

fn assert_holds(stored: &Stored, items: &[(Item, Vec<u8>)]) {
    assert_eq!(stored.items.len(), items.len());
    for (item, data) in items {
        assert_eq!(stored.item(*item), Some(data.as_slice()), "{item:?}");
    }
}

#[test]
fn station_key_provisioning_over_a_pty() {
    let store = tempfile::tempdir().unwrap();
    let config = SimConfig {
        store_dir: Some(store.path().to_path_buf()),
        ..SimConfig::new("SN-PTY-1", SimKeyMode::Station)
    };
    let sim = SimDevice::spawn(config).unwrap();
    let mut station = Station::open(sim.port_path());
    let (caps, serial, holds) = station.hello();
    assert_eq!(serial, "SN-PTY-1");
    assert!(caps.contains(Capabilities::ACCEPTS_PRIVATE_KEY));
    assert!(!caps.contains(Capabilities::CAN_GENERATE_KEY));
    assert_eq!(holds.iter().count(), 0);
    assert_eq!(station.device_max_frame, 256);

    let key = keygen::generate(keygen::KeyType::P256, &SystemRandom::new()).unwrap();
    let creds = credentials(test_ca(), &serial, key.public_key(), Some(key.pkcs8_der()));
    for (item, data) in &creds.items {
        station.write_item(*item, data);
    }
    let spki = commit_and_check(&mut station, &creds.items);
    assert!(!spki.is_empty());

    let stored = sim.stored();
    assert_holds(&stored, &creds.items);
    assert_eq!(stored.device_key_spki, None, "the station made the key");
    assert_eq!(stored.resets, 0);
    assert_eq!(stored.bad_frames, 0);
    // The store folder has every item; the key is private to its owner.
    let dir = store.path().join("SN-PTY-1");
    for (item, data) in &creds.items {
        let path = dir.join(super::item_file_name(*item));
        assert_eq!(&std::fs::read(&path).unwrap(), data, "{}", path.display());
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join(super::item_file_name(Item::PrivateKey)))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second session sees what was committed.
    let (_, _, holds) = station.hello();
    assert!(holds.contains(Item::PrivateKey) && holds.contains(Item::RootCa));
    assert!(!holds.contains(Item::Csr));
    drop(creds.ca);
}

#[test]
fn device_key_provisioning_over_a_pty_with_small_frames() {
    let config = SimConfig {
        max_frame: 64,
        ..SimConfig::new("SN-PTY-2", SimKeyMode::Device)
    };
    let sim = SimDevice::spawn(config).unwrap();
    let mut station = Station::open(sim.port_path());
    let (caps, serial, _) = station.hello();
    assert!(caps.contains(Capabilities::CAN_GENERATE_KEY.union(Capabilities::KEY_P256)));
    assert!(!caps.contains(Capabilities::ACCEPTS_PRIVATE_KEY));
    assert_eq!(station.device_max_frame, 64);

    let info = station.request(Message::GenerateKey {
        key_type: KeyType::P256,
    });
    let csr = station.read_item(info);
    let checked = crate::csr::check_der(&csr).expect("the device's CSR verifies");
    let creds = credentials(test_ca(), &serial, &checked.public_key, None);
    // The device refuses a private key: it keeps its own.
    let key = keygen::generate(keygen::KeyType::P256, &SystemRandom::new()).unwrap();
    let refused = station.request(
        Chunker::new(Item::PrivateKey, key.pkcs8_der(), 64)
            .unwrap()
            .begin(),
    );
    assert_eq!(
        refused,
        Message::Nak {
            code: ErrorCode::AccessDenied
        }
    );
    for (item, data) in &creds.items {
        station.write_item(*item, data);
    }
    let cert_spki = commit_and_check(&mut station, &creds.items);

    let stored = sim.stored();
    assert_holds(&stored, &creds.items);
    assert!(stored.item(Item::PrivateKey).is_none());
    assert_eq!(
        stored.device_key_spki.as_deref(),
        Some(cert_spki.as_slice()),
        "the certificate certifies the key the device made"
    );
    assert!(stored.frames_in > 40, "64-byte frames: many chunks");
}

#[test]
fn a_partial_frame_is_dropped_after_a_second_of_silence() {
    let sim = SimDevice::spawn(SimConfig::new("SN-PARTIAL", SimKeyMode::Station)).unwrap();
    let mut station = Station::open(sim.port_path());
    station.timeout = Duration::from_millis(200);
    station.tries = 1;
    let hello = Message::Hello {
        protocol_version: 1,
        max_frame: 1024,
        station_nonce: None,
    };
    // Without a pause, the start of a frame glues to the next one: no answer.
    station.write_raw(&[0, 0x11, 0x22, 0x33]);
    assert_eq!(station.try_request(hello.clone()), None);
    // After more than a second of silence the device has dropped it.
    station.write_raw(&[0x11, 0x22, 0x33]);
    std::thread::sleep(super::link::PARTIAL_FRAME_TIMEOUT + Duration::from_millis(500));
    assert!(matches!(
        station.try_request(hello),
        Some(Message::HelloReply { .. })
    ));
    assert_eq!(sim.stored().bad_frames, 1);
}

#[test]
fn a_slow_key_generation_answers_busy_meanwhile() {
    let config = SimConfig {
        keygen_time: Duration::from_millis(600),
        ..SimConfig::new("SN-SLOWKEY", SimKeyMode::Device)
    };
    let sim = SimDevice::spawn(config).unwrap();
    let mut station = Station::open(sim.port_path());
    station.hello();
    station.timeout = Duration::from_millis(50);
    station.tries = 1;
    let generate = Message::GenerateKey {
        key_type: KeyType::P256,
    };
    assert_eq!(
        station.try_request(generate),
        None,
        "no answer while generating"
    );
    let generate_seq = station.last_seq();
    assert_eq!(
        station.try_hello(),
        Some(Message::Nak {
            code: ErrorCode::Busy
        })
    );
    station.timeout = Duration::from_secs(5);
    let info = station
        .wait_for(generate_seq)
        .expect("the answer once the key is made");
    assert!(matches!(
        info,
        Message::ReadInfo {
            item: Item::Csr,
            ..
        }
    ));
    // The Busy Hello was not carried out: the session goes on from a new one.
    station.hello();
    assert_eq!(
        station.request(Message::ReadBegin { item: Item::Csr }),
        info
    );
    let csr = station.read_item(info);
    let checked = crate::csr::check_der(&csr).unwrap();
    let spki = sim.stored().device_key_spki.unwrap();
    assert!(spki.ends_with(checked.public_key.raw()));
}
