//! Unit tests: every message round trip, decoder behaviour, golden frames.

use super::chunk::sha256;
use super::codec::{
    chunk_capacity, decode, encode, max_payload, Flags, Frame, FrameDecoder, FRAME_OVERHEAD,
    MIN_MAX_FRAME,
};
use super::error::{DecodeError, EncodeError};
use super::message::Message;
use super::values::{Capabilities, ErrorCode, Item, ItemSet, KeyType};

/// One message of every type, with payloads of typical size.
pub(super) fn one_of_each() -> Vec<Message> {
    let mut holds = ItemSet::default();
    holds.insert(Item::RootCa);
    vec![
        Message::Hello {
            protocol_version: 1,
            max_frame: 2048,
            station_nonce: None,
        },
        Message::Hello {
            protocol_version: 1,
            max_frame: 2048,
            station_nonce: Some([0xA5; 16]),
        },
        Message::GenerateKey {
            key_type: KeyType::P256,
        },
        Message::WriteBegin {
            item: Item::Chain,
            total_len: 1300,
            sha256: sha256(b"chain"),
        },
        Message::WriteChunk {
            item: Item::Chain,
            offset: 46,
            data: (0..46).collect(),
        },
        Message::WriteEnd { item: Item::Chain },
        Message::ReadBegin { item: Item::Csr },
        Message::ReadChunk {
            item: Item::Csr,
            offset: 0,
            max_len: 1000,
        },
        Message::ReadDigest {
            item: Item::Certificate,
        },
        Message::Prove { nonce: [7; 32] },
        Message::Commit,
        Message::Abort,
        Message::Reset,
        Message::HelloReply {
            protocol_version: 1,
            max_frame: 64,
            capabilities: Capabilities::CAN_GENERATE_KEY.union(Capabilities::KEY_P256),
            holds,
            device_serial: "SN-0042".into(),
            firmware_version: "1.4.2".into(),
        },
        Message::Ack,
        Message::Nak {
            code: ErrorCode::StorageFull,
        },
        Message::WriteReady {
            item: Item::Chain,
            offset: 92,
        },
        Message::ReadInfo {
            item: Item::Csr,
            total_len: 250,
            sha256: [1; 32],
        },
        Message::ReadData {
            item: Item::Csr,
            offset: 0,
            data: vec![0x30, 0x82, 0x00, 0xF6],
        },
        Message::Digest {
            item: Item::Certificate,
            total_len: 500,
            sha256: [2; 32],
        },
        Message::Proof {
            signature: vec![0x30, 0x44, 0x02, 0x20, 0x00],
        },
        Message::ReadDigestSet {
            items: ItemSet(0x003E),
        },
    ]
}

#[test]
fn every_message_round_trips() {
    let mut types = std::collections::BTreeSet::new();
    for (i, message) in one_of_each().into_iter().enumerate() {
        types.insert(message.msg_type());
        let frame = Frame {
            flags: Flags(u8::try_from(i % 2).unwrap()),
            seq: u16::try_from(i * 4099 % 65536).unwrap(),
            message,
        };
        let wire = encode(&frame).unwrap();
        assert_eq!(wire.last(), Some(&0));
        assert!(!wire[..wire.len() - 1].contains(&0));
        assert_eq!(decode(&wire).unwrap(), frame);
    }
    assert_eq!(types.len(), 21, "one message of each of the 21 types");
}

#[test]
fn wire_enums_round_trip_and_unknown_values_survive() {
    for v in 0..=255u8 {
        assert_eq!(u8::from(Item::from(v)), v);
        assert_eq!(u8::from(KeyType::from(v)), v);
        assert_eq!(u8::from(ErrorCode::from(v)), v);
    }
    assert_eq!(Item::from(9), Item::Unknown(9));
    assert_eq!(ErrorCode::from(0x13), ErrorCode::BadOffset);
    assert_eq!(ErrorCode::BadOffset.to_string(), "BadOffset (0x13)");
}

#[test]
fn item_set_bits() {
    let mut set = ItemSet::default();
    assert!(set.insert(Item::Certificate));
    assert!(set.insert(Item::Csr));
    assert!(!set.insert(Item::Unknown(0)));
    assert!(!set.insert(Item::Unknown(16)));
    assert_eq!(set.0, 0b1000_0010);
    assert_eq!(
        set.iter().collect::<Vec<_>>(),
        [Item::Certificate, Item::Csr]
    );
    assert!(!set.contains(Item::Chain));
}

#[test]
fn frame_size_arithmetic() {
    assert_eq!(FRAME_OVERHEAD, 11);
    assert_eq!(max_payload(MIN_MAX_FRAME), Some(51));
    assert_eq!(chunk_capacity(MIN_MAX_FRAME), Some(46));
    assert_eq!(max_payload(12), None);
    assert_eq!(max_payload(13), Some(0));
    assert_eq!(chunk_capacity(18), None);
    assert_eq!(chunk_capacity(19), Some(1));
    assert_eq!(max_payload(256), Some(243));
    assert_eq!(max_payload(1024), Some(1007));
    assert_eq!(chunk_capacity(1024), Some(1002));
    // A full chunk of non-zero bytes (the worst case for COBS) fits exactly.
    for max_frame in [19u16, 64, 255, 256, 257, 300, 512, 1024, 4096] {
        let n = chunk_capacity(max_frame).unwrap();
        let frame = Frame::new(
            0x0101,
            Message::WriteChunk {
                item: Item::Chain,
                offset: 0x0101_0101,
                data: vec![0xFF; n],
            },
        );
        let wire = encode(&frame).unwrap();
        assert!(wire.len() <= usize::from(max_frame), "{max_frame}");
        assert!(
            wire.len() + 2 >= usize::from(max_frame),
            "{max_frame}: wastes room"
        );
    }
}

#[test]
fn hello_fits_the_smallest_frame() {
    let hello = Frame::new(
        0xFFFF,
        Message::Hello {
            protocol_version: 1,
            max_frame: 0xFFFF,
            station_nonce: Some([0xFF; 16]),
        },
    );
    assert!(encode(&hello).unwrap().len() <= usize::from(MIN_MAX_FRAME));
}

#[test]
fn encode_refuses_what_does_not_fit() {
    let reply = |serial: String| {
        Frame::new(
            0,
            Message::HelloReply {
                protocol_version: 1,
                max_frame: 64,
                capabilities: Capabilities::default(),
                holds: ItemSet::default(),
                device_serial: serial,
                firmware_version: String::new(),
            },
        )
    };
    assert!(encode(&reply("x".repeat(64))).is_ok());
    assert_eq!(
        encode(&reply("x".repeat(65))),
        Err(EncodeError::TooLong {
            field: "device_serial",
            len: 65,
            max: 64
        })
    );
    let proof = Frame::new(
        0,
        Message::Proof {
            signature: vec![1; 70_000],
        },
    );
    assert!(matches!(
        encode(&proof),
        Err(EncodeError::TooLong {
            field: "payload",
            ..
        })
    ));
}

fn raw_with_crc(mut body: Vec<u8>) -> Vec<u8> {
    let crc = super::crc::crc32(&body);
    body.extend(crc.to_le_bytes());
    body
}

#[test]
fn header_errors_are_typed() {
    let good = Frame::new(5, Message::Ack).to_raw().unwrap();
    assert_eq!(
        Frame::from_raw(&good[..10]),
        Err(DecodeError::Truncated { len: 10, min: 11 })
    );
    let mut bad_crc = good.clone();
    bad_crc[10] ^= 0x80;
    assert!(matches!(
        Frame::from_raw(&bad_crc),
        Err(DecodeError::BadCrc { .. })
    ));
    assert_eq!(
        Frame::from_raw(&raw_with_crc(vec![2, 0x82, 0, 5, 0, 0, 0])),
        Err(DecodeError::UnsupportedVersion(2))
    );
    assert_eq!(
        Frame::from_raw(&raw_with_crc(vec![1, 0x82, 0, 5, 0, 1, 0])),
        Err(DecodeError::LengthMismatch {
            declared: 1,
            actual: 0
        })
    );
    let unknown = Frame::from_raw(&raw_with_crc(vec![1, 0x40, 0, 5, 0, 0, 0])).unwrap_err();
    assert_eq!(
        unknown,
        DecodeError::UnknownType {
            msg_type: 0x40,
            seq: 5
        }
    );
    assert_eq!(unknown.nak(), Some((5, ErrorCode::UnknownMessage)));
    // WriteEnd with two bytes of payload instead of one.
    let trailing = Frame::from_raw(&raw_with_crc(vec![1, 0x05, 0, 9, 0, 2, 0, 1, 1])).unwrap_err();
    assert!(matches!(
        trailing,
        DecodeError::BadPayload {
            msg_type: 0x05,
            seq: 9,
            ..
        }
    ));
    assert_eq!(trailing.nak(), Some((9, ErrorCode::BadPayload)));
    // HelloReply whose serial is not UTF-8.
    let body = vec![1, 0x81, 0, 0, 0, 10, 0, 1, 64, 0, 0, 0, 0, 0, 1, 0xFF, 0];
    assert!(matches!(
        Frame::from_raw(&raw_with_crc(body)),
        Err(DecodeError::BadPayload {
            field: "device_serial",
            reason: "not UTF-8",
            ..
        })
    ));
}

fn drain(decoder: &mut FrameDecoder) -> Vec<Result<Frame, DecodeError>> {
    std::iter::from_fn(|| decoder.next_frame()).collect()
}

#[test]
fn decoder_resynchronises_after_garbage_and_damage() {
    let a = Frame::new(1, Message::Commit);
    let b = Frame::new(2, Message::WriteEnd { item: Item::Chain });
    let mut raw = a.to_raw().unwrap();
    raw[1] ^= 0x10;
    let mut damaged = Vec::new();
    super::cobs::encode(&raw, &mut damaged);
    damaged.push(0);
    let mut stream = vec![0x13, 0x37, 0xFF, 0x00, 0x00];
    stream.extend(&damaged);
    stream.extend(encode(&b).unwrap());
    let mut d = FrameDecoder::new(256);
    d.push(&stream);
    let out = drain(&mut d);
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(out[0].is_err());
    assert!(matches!(out[1], Err(DecodeError::BadCrc { .. })));
    assert_eq!(out[2], Ok(b));
    assert_eq!(d.buffered(), 0);
}

#[test]
fn decoder_takes_bytes_one_at_a_time() {
    let frames: Vec<Frame> = one_of_each()
        .into_iter()
        .enumerate()
        .map(|(i, m)| Frame::new(u16::try_from(i).unwrap(), m))
        .collect();
    let mut d = FrameDecoder::new(4096);
    let mut got = Vec::new();
    for f in &frames {
        for byte in encode(f).unwrap() {
            d.push(&[byte]);
            got.extend(drain(&mut d));
        }
    }
    let got: Vec<Frame> = got.into_iter().map(Result::unwrap).collect();
    assert_eq!(got, frames);
}

#[test]
fn over_long_frame_is_reported_once_and_skipped() {
    let small = Frame::new(3, Message::Ack);
    let mut d = FrameDecoder::new(32);
    d.push(&[0x55; 20]);
    assert!(d.next_frame().is_none());
    d.push(&[0x55; 20]);
    assert_eq!(
        d.next_frame(),
        Some(Err(DecodeError::TooLong { len: 40, max: 32 }))
    );
    d.push(&[0x55; 1000]);
    assert!(d.next_frame().is_none());
    assert_eq!(d.buffered(), 0);
    d.push(&[0x55, 0x00]);
    d.push(&encode(&small).unwrap());
    assert_eq!(drain(&mut d), [Ok(small)]);
}

#[test]
fn frame_of_exactly_the_limit_is_accepted() {
    let frame = Frame::new(
        1,
        Message::WriteChunk {
            item: Item::Certificate,
            offset: 0,
            data: vec![9; 46],
        },
    );
    let wire = encode(&frame).unwrap();
    assert_eq!(wire.len(), 64);
    let mut d = FrameDecoder::new(64);
    d.push(&wire);
    assert_eq!(drain(&mut d), [Ok(frame.clone())]);
    let mut d = FrameDecoder::new(63);
    d.push(&wire);
    assert!(matches!(
        drain(&mut d)[..],
        [Err(DecodeError::TooLong { max: 63, .. })]
    ));
}

#[test]
fn receive_limit_can_change_mid_frame() {
    let big = Frame::new(
        2,
        Message::Proof {
            signature: vec![0x42; 100],
        },
    );
    let wire = encode(&big).unwrap();
    let mut d = FrameDecoder::new(64);
    d.set_max_frame(1024);
    assert_eq!(d.max_frame(), 1024);
    d.push(&wire[..80]);
    assert!(d.next_frame().is_none());
    d.set_max_frame(64);
    d.push(&wire[80..]);
    assert!(d.next_frame().is_none(), "the rest of the frame is dropped");
    d.push(&encode(&Frame::new(3, Message::Ack)).unwrap());
    assert_eq!(d.next_frame(), Some(Ok(Frame::new(3, Message::Ack))));
    d.push(&[1, 2, 3]);
    d.clear();
    assert_eq!(d.buffered(), 0);
}

#[test]
fn bundle_tlv_layout_and_errors() {
    use super::bundle::{encode, parse, set_digest, BundleError};
    let content = encode(&[(Item::ThingName, b"sn-1"), (Item::Endpoint, b"ep")]).unwrap();
    assert_eq!(
        content,
        [4, 4, 0, b's', b'n', b'-', b'1', 5, 2, 0, b'e', b'p'],
        "item, length little-endian, bytes"
    );
    assert_eq!(
        parse(&content).unwrap(),
        vec![
            (Item::ThingName, &b"sn-1"[..]),
            (Item::Endpoint, &b"ep"[..])
        ]
    );
    assert_eq!(parse(&[]).unwrap(), vec![]);
    assert_eq!(
        parse(&content[..9]),
        Err(BundleError::Truncated {
            offset: 7,
            needed: 3,
            left: 2
        }),
        "inside the header"
    );
    assert_eq!(
        parse(&content[..11]),
        Err(BundleError::Truncated {
            offset: 7,
            needed: 5,
            left: 4
        }),
        "inside the content"
    );
    assert_eq!(
        parse(&[5, 0, 0, 4, 0, 0]),
        Err(BundleError::Order {
            offset: 3,
            item: 4,
            previous: 5
        })
    );
    assert!(matches!(
        parse(&[4, 0, 0, 4, 0, 0]),
        Err(BundleError::Order { .. })
    ));
    assert_eq!(parse(&[8, 0, 0]), Err(BundleError::Nested { offset: 0 }));
    assert_eq!(
        encode(&[(Item::Endpoint, b""), (Item::ThingName, b"")]),
        Err(BundleError::Order {
            offset: 3,
            item: 4,
            previous: 5
        })
    );
    assert!(matches!(
        encode(&[(Item::Chain, &vec![0; 65536])]),
        Err(BundleError::TooLong {
            item: 2,
            len: 65536
        })
    ));
    assert_eq!(
        BundleError::Nested { offset: 0 }.code(),
        ErrorCode::BadPayload
    );
    let mut concat = super::chunk::sha256(b"a").to_vec();
    concat.extend(super::chunk::sha256(b"bc"));
    assert_eq!(
        set_digest([&b"a"[..], &b"bc"[..]]),
        super::chunk::sha256(&concat)
    );
}
