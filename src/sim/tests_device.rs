//! Unit tests of the device state machine against the protocol page:
//! section 7's table state by state, section 6's duplicates, section 3.3's
//! answers, resume offsets after a reset, and the lying digest.

use ring::rand::SystemRandom;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};

use super::device::{Device, Profile, State, ITEM_LIMIT};
use super::key::PROOF_PREFIX;
use super::tests_pty::{credentials, test_ca};
use super::SimKeyMode;
use crate::device::{
    sha256, Capabilities, Chunker, DecodeError, ErrorCode, Frame, Item, ItemSet, KeyType, Message,
};
use crate::keygen;

fn profile(key_mode: SimKeyMode) -> Profile {
    Profile {
        serial: "SN-UNIT".into(),
        firmware: "1.0".into(),
        key_mode,
        max_frame: 64,
        resumable: false,
        lie_digest: false,
        bundle: true,
    }
}

/// A device and the next seq a station would use.
struct Bench {
    device: Device,
    seq: u16,
}

impl Bench {
    fn new(profile: Profile) -> Bench {
        Bench {
            device: Device::new(profile),
            seq: 100,
        }
    }

    /// Sends a new request (next seq) and returns the answer.
    fn send(&mut self, message: Message) -> Message {
        self.seq = self.seq.wrapping_add(1);
        self.again(message)
    }

    /// Sends a request with the current seq (a retry).
    /// A key generation ends at once here (the link times it).
    fn again(&mut self, message: Message) -> Message {
        let reply = self
            .device
            .on_frame(&Frame::new(self.seq, message))
            .or_else(|| self.device.finish_generation())
            .expect("a request is always answered");
        assert_eq!(reply.seq, self.seq, "the answer echoes the seq");
        reply.message
    }

    fn hello(&mut self) -> Message {
        self.send(Message::Hello {
            protocol_version: 1,
            max_frame: 1024,
            station_nonce: None,
        })
    }

    fn write(&mut self, item: Item, data: &[u8]) -> Message {
        let mut chunker = Chunker::new(item, data, 64).unwrap();
        let ready = self.send(chunker.begin());
        let Message::WriteReady { offset, .. } = ready else {
            return ready;
        };
        chunker.resume_at(offset).unwrap();
        for chunk in chunker.by_ref() {
            let reply = self.send(chunk);
            if reply != Message::Ack {
                return reply;
            }
        }
        self.send(chunker.end())
    }
}

fn nak(code: ErrorCode) -> Message {
    Message::Nak { code }
}

fn every_request() -> Vec<Message> {
    vec![
        Message::GenerateKey {
            key_type: KeyType::P256,
        },
        Message::WriteBegin {
            item: Item::ThingName,
            total_len: 3,
            sha256: sha256(b"abc"),
        },
        Message::WriteChunk {
            item: Item::ThingName,
            offset: 0,
            data: b"abc".to_vec(),
        },
        Message::WriteEnd {
            item: Item::ThingName,
        },
        Message::ReadBegin { item: Item::Csr },
        Message::ReadChunk {
            item: Item::Csr,
            offset: 0,
            max_len: 10,
        },
        Message::ReadDigest {
            item: Item::ThingName,
        },
        Message::Prove { nonce: [1; 32] },
        Message::Commit,
        Message::Abort,
        Message::Reset,
    ]
}

#[test]
fn idle_allows_only_hello() {
    let mut b = Bench::new(profile(SimKeyMode::Device));
    for request in every_request() {
        assert_eq!(
            b.send(request.clone()),
            nak(ErrorCode::NotAllowedInState),
            "{request:?} in IDLE"
        );
    }
    assert_eq!(
        b.send(Message::Hello {
            protocol_version: 0,
            max_frame: 1024,
            station_nonce: None
        }),
        nak(ErrorCode::VersionUnsupported)
    );
    assert_eq!(b.device.state(), &State::Idle);
    let Message::HelloReply {
        protocol_version,
        max_frame,
        capabilities,
        holds,
        device_serial,
        firmware_version,
    } = b.hello()
    else {
        panic!("no HelloReply")
    };
    assert_eq!(protocol_version, 1);
    assert_eq!(max_frame, 64);
    assert!(capabilities.contains(Capabilities::CAN_GENERATE_KEY.union(Capabilities::KEY_P256)));
    assert!(!capabilities.contains(Capabilities::ACCEPTS_PRIVATE_KEY));
    assert!(!capabilities.contains(Capabilities::RESUMABLE));
    assert_eq!(holds.iter().count(), 0);
    assert_eq!(
        (device_serial.as_str(), firmware_version.as_str()),
        ("SN-UNIT", "1.0")
    );
    assert_eq!(b.device.state(), &State::Ready);
    // A later protocol version is answered with the device's own.
    let Message::HelloReply {
        protocol_version, ..
    } = b.send(Message::Hello {
        protocol_version: 9,
        max_frame: 1024,
        station_nonce: Some([3; 16]),
    })
    else {
        panic!("no HelloReply")
    };
    assert_eq!(protocol_version, 1);
}

#[test]
fn writing_state_refuses_what_the_table_forbids() {
    let mut b = Bench::new(profile(SimKeyMode::Device));
    b.hello();
    let data = b"a-thing-name-longer-than-one-chunk-of-a-64-byte-frame-0123456789";
    let mut chunker = Chunker::new(Item::ThingName, data, 64).unwrap();
    assert_eq!(
        b.send(chunker.begin()),
        Message::WriteReady {
            item: Item::ThingName,
            offset: 0
        }
    );
    let first = chunker.next().unwrap();
    assert_eq!(b.send(first), Message::Ack);
    assert_eq!(b.device.state(), &State::Writing(Item::ThingName));
    for forbidden in [
        Message::Commit,
        Message::GenerateKey {
            key_type: KeyType::P256,
        },
        Message::ReadBegin {
            item: Item::ThingName,
        },
        Message::ReadChunk {
            item: Item::Csr,
            offset: 0,
            max_len: 8,
        },
    ] {
        assert_eq!(
            b.send(forbidden.clone()),
            nak(ErrorCode::NotAllowedInState),
            "{forbidden:?} in WRITING"
        );
    }
    // Allowed while writing, answered on their merits, state unchanged.
    assert_eq!(
        b.send(Message::ReadDigest {
            item: Item::Endpoint
        }),
        nak(ErrorCode::NoTransfer)
    );
    assert_eq!(
        b.send(Message::Prove { nonce: [0; 32] }),
        nak(ErrorCode::NoKey)
    );
    assert_eq!(
        b.send(Message::WriteChunk {
            item: Item::Chain,
            offset: 0,
            data: vec![1]
        }),
        nak(ErrorCode::NoTransfer)
    );
    assert_eq!(
        b.send(Message::WriteChunk {
            item: Item::ThingName,
            offset: 3,
            data: vec![1]
        }),
        nak(ErrorCode::BadOffset)
    );
    assert_eq!(b.device.state(), &State::Writing(Item::ThingName));
    // A Hello keeps the partial write: WriteBegin resumes where it stood,
    // and Commit stays refused while the transfer is open.
    assert!(matches!(b.hello(), Message::HelloReply { .. }));
    assert_eq!(b.send(Message::Commit), nak(ErrorCode::NotAllowedInState));
    let Message::WriteReady { offset, .. } = b.send(chunker.begin()) else {
        panic!("no WriteReady")
    };
    assert_eq!(usize::try_from(offset).unwrap(), chunker.chunk_len());
    // Abort drops it.
    assert_eq!(b.send(Message::Abort), Message::Ack);
    assert_eq!(b.device.state(), &State::Ready);
    assert_eq!(
        b.send(chunker.begin()),
        Message::WriteReady {
            item: Item::ThingName,
            offset: 0
        }
    );
    assert_eq!(b.send(Message::Reset), Message::Ack);
    assert_eq!(b.device.state(), &State::Idle);
}

#[test]
fn write_requests_answer_as_section_3_says() {
    let mut b = Bench::new(profile(SimKeyMode::Device));
    b.hello();
    let begin = |item, total_len| Message::WriteBegin {
        item,
        total_len,
        sha256: [0; 32],
    };
    assert_eq!(b.send(begin(Item::Csr, 10)), nak(ErrorCode::AccessDenied));
    assert_eq!(
        b.send(begin(Item::PrivateKey, 10)),
        nak(ErrorCode::AccessDenied),
        "a device-key device takes no private key"
    );
    assert_eq!(
        b.send(begin(Item::Unknown(9), 10)),
        nak(ErrorCode::UnknownItem)
    );
    assert_eq!(
        b.send(begin(Item::Chain, ITEM_LIMIT + 1)),
        nak(ErrorCode::ItemTooLarge)
    );
    assert_eq!(
        b.send(Message::WriteEnd {
            item: Item::Endpoint
        }),
        nak(ErrorCode::NoTransfer)
    );
    // A chunk past total_len is a bad payload; a wrong digest fails WriteEnd.
    assert!(matches!(
        b.send(begin(Item::Endpoint, 2)),
        Message::WriteReady { offset: 0, .. }
    ));
    assert_eq!(
        b.send(Message::WriteChunk {
            item: Item::Endpoint,
            offset: 0,
            data: vec![1, 2, 3]
        }),
        nak(ErrorCode::BadPayload)
    );
    assert_eq!(
        b.send(Message::WriteChunk {
            item: Item::Endpoint,
            offset: 0,
            data: vec![1, 2]
        }),
        Message::Ack
    );
    assert_eq!(
        b.send(Message::WriteEnd {
            item: Item::Endpoint
        }),
        nak(ErrorCode::DigestMismatch)
    );
    assert_eq!(b.device.state(), &State::Ready);
    assert!(b.device.staged().is_empty());
    // Key types: RSA is not generated here, unknown types neither.
    for key_type in [KeyType::Rsa2048, KeyType::Unknown(77)] {
        assert_eq!(
            b.send(Message::GenerateKey { key_type }),
            nak(ErrorCode::UnsupportedKeyType)
        );
    }
    let mut s = Bench::new(profile(SimKeyMode::Station));
    s.hello();
    assert_eq!(
        s.send(Message::GenerateKey {
            key_type: KeyType::P256
        }),
        nak(ErrorCode::UnsupportedKeyType),
        "a station-key device makes no key"
    );
    assert_eq!(
        s.send(Message::ReadBegin {
            item: Item::PrivateKey
        }),
        nak(ErrorCode::AccessDenied)
    );
    assert_eq!(
        s.send(Message::ReadBegin { item: Item::Csr }),
        nak(ErrorCode::NoKey)
    );
}

#[test]
fn reading_a_csr_and_what_ends_a_read() {
    let mut b = Bench::new(profile(SimKeyMode::Device));
    b.hello();
    assert_eq!(
        b.send(Message::ReadBegin { item: Item::Csr }),
        nak(ErrorCode::NoKey)
    );
    let info = b.send(Message::GenerateKey {
        key_type: KeyType::P256,
    });
    let Message::ReadInfo {
        item: Item::Csr,
        total_len,
        sha256: digest,
    } = info
    else {
        panic!("GenerateKey answers ReadInfo{{Csr}}: {info:?}")
    };
    assert!(matches!(
        b.device.state(),
        State::Reading {
            item: Item::Csr,
            ..
        }
    ));
    assert_eq!(
        b.send(Message::ReadChunk {
            item: Item::Chain,
            offset: 0,
            max_len: 16
        }),
        nak(ErrorCode::NoTransfer)
    );
    assert_eq!(
        b.send(Message::ReadChunk {
            item: Item::Csr,
            offset: total_len + 1,
            max_len: 16
        }),
        nak(ErrorCode::BadOffset)
    );
    let mut csr = Vec::new();
    loop {
        let reply = b.send(Message::ReadChunk {
            item: Item::Csr,
            offset: u32::try_from(csr.len()).unwrap(),
            max_len: 100,
        });
        let Message::ReadData { data, .. } = reply else {
            panic!("{reply:?}")
        };
        if data.is_empty() {
            break;
        }
        assert!(data.len() <= 100);
        csr.extend(data);
    }
    assert_eq!(u32::try_from(csr.len()).unwrap(), total_len);
    assert_eq!(sha256(&csr), digest);
    let checked = crate::csr::check_der(&csr).expect("the CSR verifies");
    let spki = b.device.device_key_spki().unwrap();
    assert!(spki.ends_with(checked.public_key.raw()));
    // ReadDigest ends the read; the CSR is still there to read again.
    assert!(matches!(
        b.send(Message::ReadDigest { item: Item::Csr }),
        Message::Digest { total_len: t, sha256: d, .. } if t == total_len && d == digest
    ));
    assert_eq!(b.device.state(), &State::Ready);
    assert_eq!(
        b.send(Message::ReadChunk {
            item: Item::Csr,
            offset: 0,
            max_len: 8
        }),
        nak(ErrorCode::NoTransfer)
    );
    assert_eq!(b.send(Message::ReadBegin { item: Item::Csr }), info);
}

#[test]
fn duplicates_are_answered_from_the_cache_and_not_redone() {
    let mut b = Bench::new(profile(SimKeyMode::Device));
    b.hello();
    let data = vec![0xAB; 100];
    let mut chunker = Chunker::new(Item::Chain, &data, 64).unwrap();
    b.send(chunker.begin());
    let first = chunker.next().unwrap();
    assert_eq!(b.send(first.clone()), Message::Ack);
    // The Ack was lost: the same chunk, same seq, is answered again but not appended twice.
    assert_eq!(b.again(first), Message::Ack);
    for chunk in chunker.by_ref() {
        assert_eq!(b.send(chunk), Message::Ack);
    }
    assert_eq!(b.send(chunker.end()), Message::Ack);
    assert_eq!(b.device.staged().get(&Item::Chain), Some(&data));
    // A repeated GenerateKey does not make a second key.
    let info = b.send(Message::GenerateKey {
        key_type: KeyType::P256,
    });
    let key = b.device.device_key_spki();
    assert_eq!(
        b.again(Message::GenerateKey {
            key_type: KeyType::P256
        }),
        info
    );
    assert_eq!(b.device.device_key_spki(), key);
    // Neither the last seq nor the next: BadSequence, not remembered.
    b.seq = b.seq.wrapping_add(5);
    assert_eq!(b.again(Message::Abort), nak(ErrorCode::BadSequence));
    b.seq = b.seq.wrapping_sub(5);
    assert_eq!(b.send(Message::Commit), Message::Ack);
    assert!(b.device.committed().contains_key(&Item::Chain));
    // A Hello is never a duplicate, even with the last seq.
    assert!(matches!(
        b.again(Message::Hello {
            protocol_version: 1,
            max_frame: 1024,
            station_nonce: None
        }),
        Message::HelloReply { holds, .. } if holds.contains(Item::Chain)
    ));
    // Frames that fail before the header can be trusted are not answered;
    // unknown types and bad payloads are, with their seq.
    assert_eq!(
        b.device.on_bad_frame(&DecodeError::BadCrc {
            expected: 1,
            found: 2
        }),
        None
    );
    assert_eq!(
        b.device.on_bad_frame(&DecodeError::UnknownType {
            msg_type: 0x33,
            seq: 9
        }),
        Some(Frame::new(9, nak(ErrorCode::UnknownMessage)))
    );
    // A response frame is not for the device.
    assert_eq!(
        b.device.on_frame(&Frame::new(b.seq + 1, Message::Ack)),
        None
    );
}

#[test]
fn resume_offsets_after_a_reset() {
    let data: Vec<u8> = (0..200u8).collect();
    for resumable in [false, true] {
        let mut b = Bench::new(Profile {
            resumable,
            ..profile(SimKeyMode::Device)
        });
        assert_eq!(
            b.device
                .profile()
                .capabilities()
                .contains(Capabilities::RESUMABLE),
            resumable
        );
        b.hello();
        assert_eq!(b.write(Item::Endpoint, b"host.example"), Message::Ack);
        let mut chunker = Chunker::new(Item::Chain, &data, 64).unwrap();
        b.send(chunker.begin());
        for chunk in chunker.by_ref().take(2) {
            assert_eq!(b.send(chunk), Message::Ack);
        }
        assert_eq!(b.device.writing(), Some((Item::Chain, 92, 200)));
        b.device.reset();
        assert_eq!(b.device.state(), &State::Idle);
        assert_eq!(b.send(Message::Commit), nak(ErrorCode::NotAllowedInState));
        b.hello();
        let Message::WriteReady { offset, .. } = b.send(chunker.begin()) else {
            panic!("no WriteReady")
        };
        let staged = b.send(Message::ReadDigest {
            item: Item::Endpoint,
        });
        if resumable {
            assert_eq!(offset, 92, "the partial write survived");
            assert!(matches!(staged, Message::Digest { total_len: 12, .. }));
        } else {
            assert_eq!(offset, 0, "the partial write was lost");
            assert_eq!(
                staged,
                nak(ErrorCode::NoTransfer),
                "the staged item was lost"
            );
        }
        chunker.resume_at(offset).unwrap();
        for chunk in chunker.by_ref() {
            assert_eq!(b.send(chunk), Message::Ack);
        }
        assert_eq!(b.send(chunker.end()), Message::Ack);
        // Begun again after it was staged: nothing left to send.
        assert_eq!(
            b.send(chunker.begin()),
            Message::WriteReady {
                item: Item::Chain,
                offset: 200
            }
        );
        assert_eq!(b.send(chunker.end()), Message::Ack);
        assert_eq!(b.send(Message::Commit), Message::Ack);
        assert_eq!(b.device.committed().get(&Item::Chain), Some(&data));
        // Committed items survive a reset on every device.
        b.device.reset();
        b.hello();
        assert!(matches!(
            b.send(Message::ReadDigest { item: Item::Chain }),
            Message::Digest { total_len: 200, .. }
        ));
    }
}

#[test]
fn a_lying_device_reports_a_wrong_digest() {
    let mut b = Bench::new(Profile {
        lie_digest: true,
        ..profile(SimKeyMode::Device)
    });
    b.hello();
    assert_eq!(b.write(Item::ThingName, b"sensor_1"), Message::Ack);
    let Message::Digest {
        total_len,
        sha256: reported,
        ..
    } = b.send(Message::ReadDigest {
        item: Item::ThingName,
    })
    else {
        panic!("no Digest")
    };
    assert_eq!(total_len, 8);
    assert_ne!(reported, sha256(b"sensor_1"));
    assert_eq!(b.device.lied_digests(), 1);
    assert_eq!(
        b.device.staged().get(&Item::ThingName).unwrap(),
        b"sensor_1"
    );
}

#[test]
fn commit_abort_reset_and_the_key_check() {
    let rng = SystemRandom::new();
    let mut b = Bench::new(profile(SimKeyMode::Station));
    b.hello();
    assert_eq!(
        b.send(Message::Prove { nonce: [1; 32] }),
        nak(ErrorCode::NoKey)
    );
    let key = keygen::generate(keygen::KeyType::P256, &rng).unwrap();
    let other = keygen::generate(keygen::KeyType::P256, &rng).unwrap();
    let creds = credentials(test_ca(), "SN-UNIT", other.public_key(), None);
    let foreign_cert = &creds.items[0].1;
    assert_eq!(b.write(Item::PrivateKey, key.pkcs8_der()), Message::Ack);
    assert_eq!(
        b.write(Item::Certificate, foreign_cert),
        nak(ErrorCode::KeyMismatch),
        "a certificate for another key"
    );
    let creds = credentials(test_ca(), "SN-UNIT", key.public_key(), None);
    let cert = creds.items[0].1.clone();
    assert_eq!(b.write(Item::Certificate, &cert), Message::Ack);
    // The proof is made with the staged key, before the commit too.
    let Message::Proof { signature } = b.send(Message::Prove { nonce: [9; 32] }) else {
        panic!("no proof")
    };
    let mut signed = PROOF_PREFIX.to_vec();
    signed.extend([9; 32]);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().raw())
        .verify(&signed, &signature)
        .unwrap();
    assert_eq!(b.send(Message::Commit), Message::Ack);
    assert_eq!(b.device.generation(), 1);
    assert!(b.device.staged().is_empty());
    // Abort drops staged items only.
    assert_eq!(b.write(Item::ThingName, b"x"), Message::Ack);
    assert_eq!(b.send(Message::Abort), Message::Ack);
    assert!(b.device.staged().is_empty());
    assert_eq!(b.device.committed().len(), 2);
    assert_eq!(b.send(Message::Commit), Message::Ack, "nothing staged");
    assert_eq!(b.device.generation(), 1);
    // Reset erases everything and needs a new Hello.
    assert_eq!(b.send(Message::Reset), Message::Ack);
    assert!(b.device.committed().is_empty());
    assert_eq!(b.device.generation(), 2);
    assert_eq!(b.send(Message::Abort), nak(ErrorCode::NotAllowedInState));
    b.hello();
    assert_eq!(
        b.send(Message::Prove { nonce: [1; 32] }),
        nak(ErrorCode::NoKey)
    );
}

#[test]
fn device_key_commit_checks_the_certificate() {
    let mut b = Bench::new(profile(SimKeyMode::Device));
    b.hello();
    b.send(Message::GenerateKey {
        key_type: KeyType::P256,
    });
    let other = keygen::generate(keygen::KeyType::P256, &SystemRandom::new()).unwrap();
    let creds = credentials(test_ca(), "SN-UNIT", other.public_key(), None);
    assert_eq!(
        b.write(Item::Certificate, &creds.items[0].1),
        nak(ErrorCode::KeyMismatch)
    );
    assert!(b.device.committed().is_empty());
    // Commit makes the generated key current; Abort of a new key keeps it.
    assert_eq!(b.send(Message::Commit), Message::Ack);
    let key = b.device.device_key_spki();
    assert!(key.is_some());
    b.send(Message::GenerateKey {
        key_type: KeyType::P384,
    });
    assert_ne!(b.device.device_key_spki(), key);
    assert_eq!(b.send(Message::Abort), Message::Ack);
    assert_eq!(
        b.device.device_key_spki(),
        key,
        "the uncommitted key is gone"
    );
}

#[test]
fn a_replaced_transfer_keeps_its_data_only_on_a_resumable_device() {
    let data = vec![7u8; 120];
    for resumable in [false, true] {
        let mut b = Bench::new(Profile {
            resumable,
            ..profile(SimKeyMode::Device)
        });
        b.hello();
        let mut chain = Chunker::new(Item::Chain, &data, 64).unwrap();
        b.send(chain.begin());
        assert_eq!(b.send(chain.next().unwrap()), Message::Ack);
        // Another item's WriteBegin replaces the open transfer.
        assert_eq!(b.write(Item::ThingName, b"t"), Message::Ack);
        assert_eq!(
            b.send(Message::WriteChunk {
                item: Item::Chain,
                offset: 46,
                data: vec![7]
            }),
            nak(ErrorCode::NoTransfer),
            "the chain's transfer is no longer open"
        );
        let Message::WriteReady { offset, .. } = b.send(chain.begin()) else {
            panic!("no WriteReady")
        };
        assert_eq!(offset, if resumable { 46 } else { 0 });
    }
}

#[test]
fn generating_answers_busy_to_everything_until_the_key_is_made() {
    let mut b = Bench::new(profile(SimKeyMode::Device));
    b.hello();
    b.seq += 1;
    let generate = Frame::new(
        b.seq,
        Message::GenerateKey {
            key_type: KeyType::P256,
        },
    );
    assert_eq!(
        b.device.on_frame(&generate),
        None,
        "answered when the key is made"
    );
    assert!(b.device.generating());
    assert_eq!(
        b.device.state(),
        &State::Generating {
            seq: b.seq,
            key_type: KeyType::P256
        }
    );
    // The GenerateKey again, a Hello, anything: Busy, with its own seq.
    assert_eq!(
        b.device.on_frame(&generate),
        Some(Frame::new(b.seq, nak(ErrorCode::Busy)))
    );
    for request in every_request().into_iter().chain([Message::Hello {
        protocol_version: 1,
        max_frame: 1024,
        station_nonce: None,
    }]) {
        assert_eq!(
            b.device
                .on_frame(&Frame::new(b.seq.wrapping_add(7), request.clone())),
            Some(Frame::new(b.seq.wrapping_add(7), nak(ErrorCode::Busy))),
            "{request:?} while GENERATING"
        );
    }
    assert_eq!(b.device.device_key_spki(), None);
    let done = b.device.finish_generation().unwrap();
    assert_eq!(done.seq, b.seq, "the answer carries the GenerateKey's seq");
    assert!(matches!(
        done.message,
        Message::ReadInfo {
            item: Item::Csr,
            ..
        }
    ));
    assert!(matches!(
        b.device.state(),
        State::Reading {
            item: Item::Csr,
            ..
        }
    ));
    assert_eq!(b.device.finish_generation(), None);
    // Busy was not remembered: the retry is a duplicate of the ReadInfo.
    assert_eq!(b.device.on_frame(&generate), Some(done));
    assert!(b.device.device_key_spki().is_some());
    // A reset while generating loses the generation.
    b.send(Message::Abort);
    b.seq += 1;
    let again = Frame::new(
        b.seq,
        Message::GenerateKey {
            key_type: KeyType::P384,
        },
    );
    assert_eq!(b.device.on_frame(&again), None);
    b.device.reset();
    assert_eq!(b.device.state(), &State::Idle);
    assert_eq!(b.device.finish_generation(), None);
    // Refused before generating: no GENERATING state.
    b.hello();
    assert_eq!(
        b.send(Message::GenerateKey {
            key_type: KeyType::Rsa3072
        }),
        nak(ErrorCode::UnsupportedKeyType)
    );
    assert!(!b.device.generating());
}

/// A bundle's content, as the station builds it.
fn bundle_of(items: &[(Item, &[u8])]) -> Vec<u8> {
    crate::device::bundle::encode(items).unwrap()
}

#[test]
fn a_bundle_stages_each_item_as_if_written_alone() {
    let rng = SystemRandom::new();
    let key = keygen::generate(keygen::KeyType::P256, &rng).unwrap();
    let creds = credentials(test_ca(), "SN-UNIT", key.public_key(), None);
    let cert = creds.items[0].1.clone();
    let mut b = Bench::new(profile(SimKeyMode::Station));
    assert!(b
        .device
        .profile()
        .capabilities()
        .contains(Capabilities::BUNDLE));
    b.hello();
    // The certificate (item 1) comes before the key (item 3) it must match.
    let content = bundle_of(&[
        (Item::Certificate, &cert),
        (Item::PrivateKey, key.pkcs8_der()),
        (Item::ThingName, b"sensor_SN-UNIT"),
    ]);
    assert_eq!(b.write(Item::Bundle, &content), Message::Ack);
    let staged = b.device.staged();
    assert_eq!(staged.len(), 3, "the items, not the bundle");
    assert_eq!(staged[&Item::Certificate], cert);
    assert_eq!(staged[&Item::PrivateKey], key.pkcs8_der());
    assert_eq!(staged[&Item::ThingName], b"sensor_SN-UNIT");
    // Each is read back alone as if written alone, before the commit too.
    assert_eq!(
        b.send(Message::ReadDigest {
            item: Item::ThingName
        }),
        Message::Digest {
            item: Item::ThingName,
            total_len: 14,
            sha256: sha256(b"sensor_SN-UNIT"),
        }
    );
    assert_eq!(
        b.send(Message::ReadDigest { item: Item::Bundle }),
        nak(ErrorCode::NoTransfer),
        "a bundle is never stored as itself"
    );
    assert!(matches!(
        b.send(Message::Prove { nonce: [3; 32] }),
        Message::Proof { .. }
    ));
    assert_eq!(b.send(Message::Commit), Message::Ack);
    assert_eq!(b.device.committed().len(), 3);
}

#[test]
fn a_bad_bundle_stages_nothing_and_says_why() {
    let rng = SystemRandom::new();
    let key = keygen::generate(keygen::KeyType::P256, &rng).unwrap();
    let other = keygen::generate(keygen::KeyType::P256, &rng).unwrap();
    let foreign = credentials(test_ca(), "SN-UNIT", other.public_key(), None).items[0]
        .1
        .clone();
    let mut b = Bench::new(profile(SimKeyMode::Station));
    b.hello();
    let cases: Vec<(Vec<u8>, ErrorCode)> = vec![
        // Cut inside the content, out of order, repeated, nested: BadPayload.
        (vec![4, 5, 0, b'a', b'b'], ErrorCode::BadPayload),
        (vec![5, 1, 0, b'e', 4, 1, 0, b't'], ErrorCode::BadPayload),
        (vec![4, 1, 0, b'a', 4, 1, 0, b'b'], ErrorCode::BadPayload),
        (vec![4, 1, 0, b'a', 8, 0, 0], ErrorCode::BadPayload),
        (vec![4, 1], ErrorCode::BadPayload),
        // An item the device does not store, or may not be written.
        (vec![4, 1, 0, b'a', 9, 1, 0, b'x'], ErrorCode::UnknownItem),
        (vec![7, 1, 0, b'c'], ErrorCode::AccessDenied),
        // A certificate for another key than the bundle's.
        (
            bundle_of(&[
                (Item::Certificate, &foreign),
                (Item::PrivateKey, key.pkcs8_der()),
            ]),
            ErrorCode::KeyMismatch,
        ),
    ];
    for (content, code) in cases {
        assert_eq!(b.write(Item::Bundle, &content), nak(code), "{content:02x?}");
        assert!(b.device.staged().is_empty(), "{content:02x?}");
        assert_eq!(*b.device.state(), State::Ready);
    }
    // An empty bundle is well-formed and stages nothing.
    assert_eq!(b.write(Item::Bundle, &[]), Message::Ack);
    assert!(b.device.staged().is_empty());
}

#[test]
fn a_device_without_bundle_refuses_it_as_a_version_1_device_would() {
    let mut b = Bench::new(Profile {
        bundle: false,
        ..profile(SimKeyMode::Station)
    });
    let Message::HelloReply { capabilities, .. } = b.hello() else {
        panic!("no HelloReply")
    };
    assert!(!capabilities.contains(Capabilities::BUNDLE));
    assert_eq!(
        b.write(Item::Bundle, &bundle_of(&[(Item::ThingName, b"t")])),
        nak(ErrorCode::UnknownItem)
    );
    assert_eq!(
        b.send(Message::ReadDigestSet {
            items: ItemSet::default()
        }),
        nak(ErrorCode::UnknownMessage)
    );
}

#[test]
fn read_digest_set_digests_the_committed_items_in_item_order() {
    let mut b = Bench::new(profile(SimKeyMode::Station));
    b.hello();
    let content = bundle_of(&[
        (Item::ThingName, b"sensor_1"),
        (Item::Endpoint, b"a1-ats.iot.eu-west-1.amazonaws.com"),
        (Item::RootCa, &[0x30; 100]),
    ]);
    assert_eq!(b.write(Item::Bundle, &content), Message::Ack);
    let mut set = ItemSet::default();
    set.insert(Item::RootCa);
    set.insert(Item::ThingName);
    assert_eq!(
        b.send(Message::ReadDigestSet { items: set }),
        nak(ErrorCode::NoTransfer),
        "staged is not committed"
    );
    assert_eq!(b.send(Message::Commit), Message::Ack);
    // SHA-256 over SHA-256(thing name) | SHA-256(root CA), by hand.
    let mut concat = sha256(b"sensor_1").to_vec();
    concat.extend(sha256(&[0x30; 100]));
    assert_eq!(
        b.send(Message::ReadDigestSet { items: set }),
        Message::Digest {
            item: Item::Bundle,
            total_len: 108,
            sha256: sha256(&concat),
        }
    );
    set.insert(Item::Certificate);
    assert_eq!(
        b.send(Message::ReadDigestSet { items: set }),
        nak(ErrorCode::NoTransfer),
        "an item the device does not hold"
    );
    assert_eq!(
        b.send(Message::ReadDigestSet {
            items: ItemSet(1 << 12)
        }),
        nak(ErrorCode::UnknownItem)
    );
}

#[test]
fn a_bundle_write_resumes_after_a_reset_on_a_resumable_device() {
    let data: Vec<u8> = (0..200u8).collect();
    let content = bundle_of(&[(Item::Chain, &data), (Item::ThingName, b"sensor_2")]);
    let mut b = Bench::new(Profile {
        resumable: true,
        ..profile(SimKeyMode::Station)
    });
    b.hello();
    let mut chunker = Chunker::new(Item::Bundle, &content, 64).unwrap();
    assert!(matches!(
        b.send(chunker.begin()),
        Message::WriteReady { offset: 0, .. }
    ));
    for chunk in chunker.by_ref().take(2) {
        assert_eq!(b.send(chunk), Message::Ack);
    }
    let (_, held, _) = b.device.writing().unwrap();
    b.device.reset();
    b.hello();
    let Message::WriteReady { offset, .. } = b.send(chunker.begin()) else {
        panic!("no WriteReady")
    };
    assert_eq!(offset, held, "resumes where the bytes stopped");
    assert!(offset > 0);
    chunker.resume_at(offset).unwrap();
    for chunk in chunker.by_ref() {
        assert_eq!(b.send(chunk), Message::Ack);
    }
    assert_eq!(b.send(chunker.end()), Message::Ack);
    assert_eq!(b.device.staged()[&Item::Chain], data);
}
