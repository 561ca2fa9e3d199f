//! Unit tests: duplicate detection and chunked transfers.

use super::chunk::{read_slice, sha256, ChunkError, Chunker, Reassembler};
use super::codec::{chunk_capacity, encode, Flags, Frame};
use super::dup::{DuplicateFilter, Verdict};
use super::message::Message;
use super::values::{ErrorCode, Item};

#[test]
fn duplicate_filter_answers_a_retry_without_redoing_it() {
    let mut filter = DuplicateFilter::new();
    assert_eq!(
        filter.check(&Frame::new(7, Message::Commit)),
        Verdict::NeedHello
    );
    let hello = Frame::new(
        100,
        Message::Hello {
            protocol_version: 1,
            max_frame: 1024,
            station_nonce: None,
        },
    );
    assert_eq!(filter.check(&hello), Verdict::Fresh);
    filter.record(100, Message::Ack);
    let commit = Frame::new(101, Message::Commit);
    assert_eq!(filter.check(&commit), Verdict::Fresh);
    let sent = filter.record(101, Message::Ack).clone();
    assert_eq!(sent.seq, 101);
    // The ack was lost; the station retries with the same seq.
    let retry = Frame {
        flags: Flags::RETRANSMIT,
        ..commit.clone()
    };
    assert_eq!(filter.check(&retry), Verdict::Duplicate(&sent));
    // Neither the last seq nor the next.
    assert_eq!(
        filter.check(&Frame::new(200, Message::Commit)),
        Verdict::OutOfSequence { expected: 102 }
    );
    assert_eq!(
        DuplicateFilter::bad_sequence(200).message,
        Message::Nak {
            code: ErrorCode::BadSequence
        }
    );
    // A Hello is always fresh, even with the last seq.
    let again = Frame::new(101, hello.message.clone());
    assert_eq!(filter.check(&again), Verdict::Fresh);
    // Wrapping.
    filter.record(0xFFFF, Message::Ack);
    assert_eq!(filter.check(&Frame::new(0, Message::Abort)), Verdict::Fresh);
    filter.clear();
    assert_eq!(filter.last_seq(), None);
    assert_eq!(
        filter.check(&Frame::new(1, Message::Abort)),
        Verdict::NeedHello
    );
}

#[test]
fn chunked_write_with_resume() {
    let item: Vec<u8> = (0..1300u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let mut chunker = Chunker::new(Item::Chain, &item, 64).unwrap();
    assert_eq!(chunker.chunk_len(), 46);
    let Message::WriteBegin {
        total_len, sha256, ..
    } = chunker.begin()
    else {
        panic!("not a WriteBegin")
    };
    let mut r = Reassembler::new(Item::Chain, total_len, sha256, 4096).unwrap();
    for message in chunker.by_ref().take(10) {
        let Message::WriteChunk { item, offset, data } = message else {
            panic!("not a chunk")
        };
        r.accept(item, offset, &data).unwrap();
    }
    // Cable pulled: a new chunker resumes where the device says it stands.
    assert!(r.same_transfer(Item::Chain, total_len, &sha256));
    let mut resumed = Chunker::new(Item::Chain, &item, 64).unwrap();
    resumed.resume_at(r.received()).unwrap();
    for message in resumed {
        let Message::WriteChunk { item, offset, data } = message else {
            panic!("not a chunk")
        };
        r.accept(item, offset, &data).unwrap();
    }
    assert_eq!(r.finish().unwrap(), item);
}

#[test]
fn reassembler_refuses_bad_chunks() {
    let data = b"certificate bytes";
    let digest = sha256(data);
    let len = u32::try_from(data.len()).unwrap();
    assert!(matches!(
        Reassembler::new(Item::Certificate, u32::MAX, digest, 4096),
        Err(ChunkError::TooLarge { .. })
    ));
    let mut r = Reassembler::new(Item::Certificate, len, digest, 4096).unwrap();
    let e = r.accept(Item::Certificate, 4, b"x").unwrap_err();
    assert_eq!(
        e,
        ChunkError::BadOffset {
            expected: 0,
            found: 4
        }
    );
    assert_eq!(e.code(), ErrorCode::BadOffset);
    assert!(matches!(
        r.accept(Item::Chain, 0, b"x"),
        Err(ChunkError::WrongItem { .. })
    ));
    assert!(matches!(
        r.accept(Item::Certificate, 0, &[0; 40]),
        Err(ChunkError::Overflow { .. })
    ));
    r.accept(Item::Certificate, 0, &data[..5]).unwrap();
    assert!(matches!(r.verify(), Err(ChunkError::Incomplete { .. })));
    r.accept(Item::Certificate, 5, b"XXXXXXXXXXXX").unwrap();
    let e = r.finish().unwrap_err();
    assert_eq!(e.code(), ErrorCode::DigestMismatch);
}

#[test]
fn chunked_read_of_a_csr() {
    let csr: Vec<u8> = (0..300u16)
        .map(|i| u8::try_from(i & 0xFF).unwrap())
        .collect();
    let max_len = u16::try_from(chunk_capacity(64).unwrap()).unwrap();
    let mut r = Reassembler::new(
        Item::Csr,
        u32::try_from(csr.len()).unwrap(),
        sha256(&csr),
        8192,
    )
    .unwrap();
    while let Some(Message::ReadChunk {
        item,
        offset,
        max_len,
    }) = r.next_read(max_len)
    {
        let data = read_slice(&csr, offset, max_len).unwrap();
        let reply = Frame::new(
            0,
            Message::ReadData {
                item,
                offset,
                data: data.to_vec(),
            },
        );
        assert!(encode(&reply).unwrap().len() <= 64);
        r.accept(item, offset, data).unwrap();
    }
    assert_eq!(r.finish().unwrap(), csr);
    assert!(read_slice(&csr, 301, 10).is_err());
    assert_eq!(read_slice(&csr, 300, 10).unwrap(), b"");
}
