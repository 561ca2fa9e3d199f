//! The worked examples of `docs/device-protocol.md`, byte for byte.

use super::bundle;
use super::codec::{decode, encode, Frame};
use super::message::Message;
use super::values::{Capabilities, ErrorCode, Item, ItemSet};

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// The worked examples of `docs/device-protocol.md`, computed independently
/// (Python's `zlib.crc32` and a separate COBS encoder).
#[test]
fn golden_frames_of_the_protocol_page() {
    let mut holds = ItemSet::default();
    holds.insert(Item::RootCa);
    let cases = [
        (
            Frame::new(
                1,
                Message::Hello {
                    protocol_version: 1,
                    max_frame: 2048,
                    station_nonce: None,
                },
            ),
            "01 01 00 01 00 03 00 01 00 08 6A 84 FD F5",
            "03 01 01 02 01 02 03 02 01 06 08 6A 84 FD F5 00",
        ),
        (
            Frame::new(
                1,
                Message::HelloReply {
                    protocol_version: 1,
                    max_frame: 64,
                    capabilities: Capabilities::CAN_GENERATE_KEY.union(Capabilities::KEY_P256),
                    holds,
                    device_serial: "SN-0042".into(),
                    firmware_version: "1.4.2".into(),
                },
            ),
            "01 81 00 01 00 15 00 01 40 00 11 00 40 00 07 53 4E 2D 30 30 34 32 05 31 2E 34 2E 32 6F 92 B9 5A",
            "03 01 81 02 01 02 15 03 01 40 02 11 02 40 13 07 53 4E 2D 30 30 34 32 05 31 2E 34 2E 32 6F 92 B9 5A 00",
        ),
        (
            Frame::new(
                5,
                Message::WriteChunk {
                    item: Item::Chain,
                    offset: 46,
                    data: vec![0x30, 0x82, 0x00, 0x10],
                },
            ),
            "01 04 00 05 00 09 00 02 2E 00 00 00 30 82 00 10 F8 4D EA 63",
            "03 01 04 02 05 02 09 03 02 2E 01 01 03 30 82 06 10 F8 4D EA 63 00",
        ),
        (
            Frame::new(5, Message::Ack),
            "01 82 00 05 00 00 00 2B 91 BD 5F",
            "03 01 82 02 05 01 01 05 2B 91 BD 5F 00",
        ),
        (
            Frame::new(
                9,
                Message::ReadDigestSet {
                    items: ItemSet(0x003E),
                },
            ),
            "01 0D 00 09 00 02 00 3E 00 02 97 B4 A6",
            "03 01 0D 02 09 02 02 02 3E 05 02 97 B4 A6 00",
        ),
        (
            Frame::new(
                3,
                Message::WriteChunk {
                    item: Item::Bundle,
                    offset: 0,
                    data: bundle::encode(&[(Item::ThingName, b"sn-1"), (Item::Endpoint, b"ep")])
                        .unwrap(),
                },
            ),
            "01 04 00 03 00 11 00 08 00 00 00 00 04 04 00 73 6E 2D 31 05 02 00 65 70 AE 58 AC 8F",
            "03 01 04 02 03 02 11 02 08 01 01 01 03 04 04 07 73 6E 2D 31 05 02 07 65 70 AE 58 AC 8F 00",
        ),
        (
            Frame::new(
                6,
                Message::Nak {
                    code: ErrorCode::BadOffset,
                },
            ),
            "01 83 00 06 00 01 00 13 D1 F1 4A 1A",
            "03 01 83 02 06 02 01 06 13 D1 F1 4A 1A 00",
        ),
    ];
    for (frame, raw, wire) in cases {
        assert_eq!(frame.to_raw().unwrap(), hex(raw), "{frame:?}");
        assert_eq!(encode(&frame).unwrap(), hex(wire), "{frame:?}");
        assert_eq!(decode(&hex(wire)).unwrap(), frame);
    }
}
