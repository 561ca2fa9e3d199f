//! Property tests: round trips, hostile input, corruption, chunking.

use proptest::collection::vec;
use proptest::prelude::*;

use super::bundle;
use super::chunk::{sha256, Chunker, Reassembler};
use super::codec::{chunk_capacity, decode, encode, Flags, Frame, FrameDecoder, MIN_MAX_FRAME};
use super::message::Message;
use super::values::{Capabilities, ErrorCode, Item, ItemSet, KeyType};

fn item() -> impl Strategy<Value = Item> {
    any::<u8>().prop_map(Item::from)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

/// A UTF-8 string of at most `max` bytes.
fn text(max: usize) -> impl Strategy<Value = String> {
    any::<String>().prop_map(move |s| {
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_string()
    })
}

/// Any message this version defines, with any field values that encode.
pub(super) fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u8>(), any::<u16>(), any::<Option<[u8; 16]>>()).prop_map(|(v, m, n)| {
            Message::Hello {
                protocol_version: v,
                max_frame: m,
                station_nonce: n,
            }
        }),
        any::<u8>().prop_map(|k| Message::GenerateKey {
            key_type: KeyType::from(k)
        }),
        (item(), any::<u32>(), any::<[u8; 32]>()).prop_map(|(item, total_len, sha256)| {
            Message::WriteBegin {
                item,
                total_len,
                sha256,
            }
        }),
        (item(), any::<u32>(), bytes(300)).prop_map(|(item, offset, data)| Message::WriteChunk {
            item,
            offset,
            data
        }),
        item().prop_map(|item| Message::WriteEnd { item }),
        item().prop_map(|item| Message::ReadBegin { item }),
        (item(), any::<u32>(), any::<u16>()).prop_map(|(item, offset, max_len)| {
            Message::ReadChunk {
                item,
                offset,
                max_len,
            }
        }),
        item().prop_map(|item| Message::ReadDigest { item }),
        any::<[u8; 32]>().prop_map(|nonce| Message::Prove { nonce }),
        Just(Message::Commit),
        Just(Message::Abort),
        Just(Message::Reset),
        any::<u16>().prop_map(|items| Message::ReadDigestSet {
            items: ItemSet(items)
        }),
        (
            any::<u8>(),
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
            text(64),
            text(32)
        )
            .prop_map(|(v, m, c, h, serial, fw)| Message::HelloReply {
                protocol_version: v,
                max_frame: m,
                capabilities: Capabilities(c),
                holds: ItemSet(h),
                device_serial: serial,
                firmware_version: fw,
            }),
        Just(Message::Ack),
        any::<u8>().prop_map(|c| Message::Nak {
            code: ErrorCode::from(c)
        }),
        (item(), any::<u32>()).prop_map(|(item, offset)| Message::WriteReady { item, offset }),
        (item(), any::<u32>(), any::<[u8; 32]>()).prop_map(|(item, total_len, sha256)| {
            Message::ReadInfo {
                item,
                total_len,
                sha256,
            }
        }),
        (item(), any::<u32>(), bytes(300)).prop_map(|(item, offset, data)| Message::ReadData {
            item,
            offset,
            data
        }),
        (item(), any::<u32>(), any::<[u8; 32]>()).prop_map(|(item, total_len, sha256)| {
            Message::Digest {
                item,
                total_len,
                sha256,
            }
        }),
        bytes(600).prop_map(|signature| Message::Proof { signature }),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (any::<u8>(), any::<u16>(), message()).prop_map(|(flags, seq, message)| Frame {
        flags: Flags(flags),
        seq,
        message,
    })
}

/// One way to damage a byte stream.
#[derive(Debug, Clone)]
enum Damage {
    Flip { at: usize, mask: u8 },
    Drop { at: usize, len: usize },
    Insert { at: usize, garbage: Vec<u8> },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        (any::<usize>(), 1..20usize).prop_map(|(at, len)| Damage::Drop { at, len }),
        (any::<usize>(), bytes(40)).prop_map(|(at, garbage)| Damage::Insert { at, garbage }),
    ]
}

/// Applies `damage` somewhere in `stream[..limit]`.
fn apply(stream: &mut Vec<u8>, limit: usize, damage: &Damage) {
    if limit == 0 {
        return;
    }
    match damage {
        Damage::Flip { at, mask } => stream[at % limit] ^= mask,
        Damage::Drop { at, len } => {
            let at = at % limit;
            let end = (at + len).min(limit);
            stream.drain(at..end);
        }
        Damage::Insert { at, garbage } => {
            let at = at % limit;
            stream.splice(at..at, garbage.iter().copied());
        }
    }
}

/// Feeds `stream` in pieces of the given sizes, collecting what comes out.
fn feed(d: &mut FrameDecoder, stream: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut rest = stream;
    let mut cut = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = (cut.next().copied().unwrap_or(rest.len()) % 97 + 1).min(rest.len());
        d.push(&rest[..n]);
        rest = &rest[n..];
        while let Some(r) = d.next_frame() {
            if let Ok(f) = r {
                out.push(f);
            }
        }
    }
    out
}

proptest! {
    /// (1) Every frame decodes to itself, from the wire and from raw bytes.
    #[test]
    fn encode_decode_round_trip(f in frame()) {
        let wire = encode(&f).unwrap();
        prop_assert_eq!(wire.iter().filter(|&&b| b == 0).count(), 1);
        prop_assert!(wire.len() <= super::codec::wire_len_bound(f.to_raw().unwrap().len()));
        prop_assert_eq!(decode(&wire).unwrap(), f.clone());
        prop_assert_eq!(Frame::from_raw(&f.to_raw().unwrap()).unwrap(), f.clone());
        let mut d = FrameDecoder::new(wire.len());
        d.push(&wire);
        prop_assert_eq!(d.next_frame(), Some(Ok(f)));
        prop_assert_eq!(d.next_frame(), None);
    }

    /// (2) Any bytes: no panic, memory bounded, and whatever decodes
    /// re-encodes to a frame that decodes the same.
    #[test]
    fn arbitrary_bytes_never_panic(
        pieces in vec(bytes(600), 0..12),
        max_frame in 2usize..700,
    ) {
        let mut d = FrameDecoder::new(max_frame);
        for piece in &pieces {
            d.push(piece);
            while let Some(result) = d.next_frame() {
                if let Ok(f) = result {
                    let wire = encode(&f).unwrap();
                    prop_assert_eq!(decode(&wire).unwrap(), f);
                }
            }
            prop_assert!(d.buffered() < max_frame);
            prop_assert!(d.capacity() <= 4 * max_frame + 64, "capacity {}", d.capacity());
        }
        let _ = decode(&pieces.concat());
    }

    /// (2b) Raw bytes with a valid CRC (so past the checksum): no panic, and
    /// whatever decodes re-encodes to the same bytes.
    #[test]
    fn arbitrary_bodies_with_valid_crc_never_panic(
        msg_type in any::<u8>(),
        payload in bytes(200),
    ) {
        let mut raw = vec![1, msg_type, 0, 0, 0];
        raw.extend(u16::try_from(payload.len()).unwrap().to_le_bytes());
        raw.extend(&payload);
        raw.extend(super::crc::crc32(&raw).to_le_bytes());
        if let Ok(f) = Frame::from_raw(&raw) {
            prop_assert_eq!(f.to_raw().unwrap(), raw);
        }
    }

    /// (3) A stream of frames damaged in its first part: every frame that
    /// comes out was sent, and every frame after the damage comes out.
    #[test]
    fn corruption_never_forges_and_decoder_recovers(
        messages in vec(message(), 2..12),
        damages in vec(damage(), 1..6),
        damaged_frames in 1usize..6,
        cuts in vec(any::<usize>(), 1..8),
    ) {
        let sent: Vec<Frame> = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| Frame::new(u16::try_from(i).unwrap(), m))
            .collect();
        let damaged_frames = damaged_frames.min(sent.len() - 1);
        let mut stream = vec![0u8];
        let mut clean_from = 0;
        for (i, f) in sent.iter().enumerate() {
            stream.extend(encode(f).unwrap());
            if i + 1 == damaged_frames {
                clean_from = stream.len();
            }
        }
        // Damage lands up to and including the delimiter that ends frame
        // `damaged_frames - 1`; frame `damaged_frames` may be lost with it,
        // but every later frame is preceded by an untouched delimiter.
        let tail_len = stream.len() - clean_from;
        for d in &damages {
            let limit = stream.len() - tail_len;
            apply(&mut stream, limit, d);
        }
        let mut decoder = FrameDecoder::new(2048);
        let got = feed(&mut decoder, &stream, &cuts);
        for f in &got {
            prop_assert!(sent.contains(f), "forged frame {:?}", f);
        }
        let must_survive = &sent[damaged_frames + 1..];
        prop_assert!(got.len() >= must_survive.len());
        prop_assert_eq!(&got[got.len() - must_survive.len()..], must_survive);
    }

    /// (4) Any item, any frame size: the chunks fit the frames, and the
    /// reassembler gives the item back, also after a resume.
    #[test]
    fn chunking_reassembles(
        data in bytes(3000),
        max_frame in MIN_MAX_FRAME..=2048u16,
        nonzero in any::<bool>(),
        stop_after in 0usize..40,
    ) {
        let data: Vec<u8> = if nonzero {
            data.into_iter().map(|b| b | 1).collect()
        } else {
            data
        };
        let mut r = Reassembler::new(
            Item::Chain,
            u32::try_from(data.len()).unwrap(),
            sha256(&data),
            4096,
        )
        .unwrap();
        let deliver = |r: &mut Reassembler, m: Message| -> Result<(), TestCaseError> {
            let wire = encode(&Frame::new(0xFFFF, m)).unwrap();
            prop_assert!(wire.len() <= usize::from(max_frame));
            let Message::WriteChunk { item, offset, data } = decode(&wire).unwrap().message else {
                return Err(TestCaseError::fail("not a chunk"));
            };
            prop_assert!(r.accept(item, offset, &data).is_ok());
            Ok(())
        };
        let first = Chunker::new(Item::Chain, &data, max_frame).unwrap();
        prop_assert!(first.chunk_len() >= chunk_capacity(MIN_MAX_FRAME).unwrap());
        for m in first.take(stop_after) {
            deliver(&mut r, m)?;
        }
        let mut resumed = Chunker::new(Item::Chain, &data, max_frame).unwrap();
        resumed.resume_at(r.received()).unwrap();
        for m in resumed {
            deliver(&mut r, m)?;
        }
        prop_assert_eq!(r.finish().unwrap(), data);
    }
}

/// Items for a bundle: distinct ids other than Bundle's, in ascending order.
fn bundle_items() -> impl Strategy<Value = Vec<(Item, Vec<u8>)>> {
    proptest::collection::btree_map(any::<u8>(), bytes(300), 0..8).prop_map(|m| {
        m.into_iter()
            .filter(|(id, _)| Item::from(*id) != Item::Bundle)
            .map(|(id, data)| (Item::from(id), data))
            .collect()
    })
}

proptest! {
    /// (5) A bundle parses back to the items it was built from.
    #[test]
    fn bundles_round_trip(items in bundle_items()) {
        let refs: Vec<(Item, &[u8])> = items.iter().map(|(i, d)| (*i, d.as_slice())).collect();
        let content = bundle::encode(&refs).unwrap();
        let total: usize = items.iter().map(|(_, d)| bundle::ENTRY_HEADER_LEN + d.len()).sum();
        prop_assert_eq!(content.len(), total);
        prop_assert_eq!(bundle::parse(&content).unwrap(), refs);
    }

    /// (6) Any bytes: the bundle parser never panics, and what it accepts is
    /// in ascending item order, has no Bundle inside, and re-encodes to the
    /// same bytes.
    #[test]
    fn arbitrary_bytes_never_panic_the_bundle_parser(content in bytes(1200)) {
        if let Ok(entries) = bundle::parse(&content) {
            let ids: Vec<u8> = entries.iter().map(|(i, _)| u8::from(*i)).collect();
            prop_assert!(ids.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(!entries.iter().any(|(i, _)| *i == Item::Bundle));
            prop_assert_eq!(bundle::encode(&entries).unwrap(), content);
        }
    }

    /// (7) A bundle damaged (a byte flipped, cut short) either parses to
    /// entries that re-encode to the damaged bytes, or is refused; never a panic.
    #[test]
    fn damaged_bundles_are_refused_or_consistent(
        items in bundle_items(),
        at in any::<usize>(),
        mask in 1u8..,
        cut in any::<bool>(),
    ) {
        let refs: Vec<(Item, &[u8])> = items.iter().map(|(i, d)| (*i, d.as_slice())).collect();
        let mut content = bundle::encode(&refs).unwrap();
        if !content.is_empty() {
            let at = at % content.len();
            if cut {
                content.truncate(at);
            } else {
                content[at] ^= mask;
            }
        }
        if let Ok(entries) = bundle::parse(&content) {
            prop_assert_eq!(bundle::encode(&entries).unwrap(), content);
        }
    }
}
