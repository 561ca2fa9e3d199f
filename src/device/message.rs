//! The messages of the link protocol and their payload layouts.
//!
//! Every multi-byte integer is little-endian. Requests (station to device)
//! have type codes below 0x80, responses (device to station) have the top
//! bit set. `docs/device-protocol.md` gives each layout byte by byte.

use super::error::{DecodeError, EncodeError};
use super::values::{Capabilities, ErrorCode, Item, ItemSet, KeyType};

/// The message-set version this station speaks (negotiated in the hello).
pub const PROTOCOL_VERSION: u8 = 1;
/// Longest device serial in a `HelloReply`, in bytes of UTF-8.
pub const MAX_SERIAL_LEN: usize = 64;
/// Longest firmware version string in a `HelloReply`, in bytes of UTF-8.
pub const MAX_FIRMWARE_LEN: usize = 32;
/// Length of the nonce a device signs in answer to `Prove`.
pub const NONCE_LEN: usize = 32;
/// Length of the optional station nonce in `Hello`.
pub const STATION_NONCE_LEN: usize = 16;
/// Bytes of a `WriteChunk` or `ReadData` payload before the data: item and offset.
pub const CHUNK_HEADER_LEN: usize = 5;

/// Message type codes (the second header byte).
pub mod msg_type {
    /// `Hello`.
    pub const HELLO: u8 = 0x01;
    /// `GenerateKey`.
    pub const GENERATE_KEY: u8 = 0x02;
    /// `WriteBegin`.
    pub const WRITE_BEGIN: u8 = 0x03;
    /// `WriteChunk`.
    pub const WRITE_CHUNK: u8 = 0x04;
    /// `WriteEnd`.
    pub const WRITE_END: u8 = 0x05;
    /// `ReadBegin`.
    pub const READ_BEGIN: u8 = 0x06;
    /// `ReadChunk`.
    pub const READ_CHUNK: u8 = 0x07;
    /// `ReadDigest`.
    pub const READ_DIGEST: u8 = 0x08;
    /// `Prove`.
    pub const PROVE: u8 = 0x09;
    /// `Commit`.
    pub const COMMIT: u8 = 0x0A;
    /// `Abort`.
    pub const ABORT: u8 = 0x0B;
    /// `Reset`.
    pub const RESET: u8 = 0x0C;
    /// `ReadDigestSet`.
    pub const READ_DIGEST_SET: u8 = 0x0D;
    /// `HelloReply`.
    pub const HELLO_REPLY: u8 = 0x81;
    /// `Ack`.
    pub const ACK: u8 = 0x82;
    /// `Nak`.
    pub const NAK: u8 = 0x83;
    /// `WriteReady`.
    pub const WRITE_READY: u8 = 0x84;
    /// `ReadInfo`.
    pub const READ_INFO: u8 = 0x85;
    /// `ReadData`.
    pub const READ_DATA: u8 = 0x86;
    /// `Digest`.
    pub const DIGEST: u8 = 0x87;
    /// `Proof`.
    pub const PROOF: u8 = 0x88;
}

/// A message of the link protocol, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Station: opens (or reopens) a session. Never a duplicate.
    Hello {
        /// Highest message-set version the station speaks.
        protocol_version: u8,
        /// Largest frame the station receives, on the wire, delimiter included.
        max_frame: u16,
        /// Optional random value identifying this session in device logs.
        station_nonce: Option<[u8; STATION_NONCE_LEN]>,
    },
    /// Station: make a key pair of this type and a CSR for it. Answered by
    /// `ReadInfo` for [`Item::Csr`].
    GenerateKey {
        /// The key type.
        key_type: KeyType,
    },
    /// Station: start (or resume) writing an item. Answered by `WriteReady`.
    WriteBegin {
        /// The item.
        item: Item,
        /// Its full length in bytes.
        total_len: u32,
        /// SHA-256 of the whole item.
        sha256: [u8; 32],
    },
    /// Station: bytes of the item at `offset`. Answered by `Ack`.
    WriteChunk {
        /// The item.
        item: Item,
        /// Where the data goes; must be where the transfer stands.
        offset: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Station: the item is complete; the device checks length and SHA-256
    /// and stages it. Answered by `Ack`.
    WriteEnd {
        /// The item.
        item: Item,
    },
    /// Station: start reading an item. Answered by `ReadInfo`.
    ReadBegin {
        /// The item.
        item: Item,
    },
    /// Station: send up to `max_len` bytes of the item from `offset`.
    /// Answered by `ReadData`.
    ReadChunk {
        /// The item.
        item: Item,
        /// Where to read from.
        offset: u32,
        /// The most bytes wanted.
        max_len: u16,
    },
    /// Station: report the SHA-256 of a stored item. Answered by `Digest`.
    ReadDigest {
        /// The item.
        item: Item,
    },
    /// Station: sign this fresh nonce with the device key. Answered by `Proof`.
    Prove {
        /// The nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// Station: make every staged item current, atomically. Answered by `Ack`.
    Commit,
    /// Station: drop staged items and transfers in progress. Answered by `Ack`.
    Abort,
    /// Station: erase every item and the device key. Answered by `Ack`.
    Reset,
    /// Station: report one digest over several committed items (devices
    /// with `BUNDLE`). Answered by `Digest` for [`Item::Bundle`]: the
    /// items' total length and [`super::bundle::set_digest`] of them.
    ReadDigestSet {
        /// The items, in ascending item order.
        items: ItemSet,
    },
    /// Device: answer to `Hello`.
    HelloReply {
        /// The message-set version chosen (at most the station's).
        protocol_version: u8,
        /// Largest frame the device receives, on the wire, delimiter included.
        max_frame: u16,
        /// What the device can do.
        capabilities: Capabilities,
        /// Items the device already holds (committed).
        holds: ItemSet,
        /// The device's own serial number.
        device_serial: String,
        /// Firmware version, free text.
        firmware_version: String,
    },
    /// Device: the request was carried out.
    Ack,
    /// Device: the request was refused.
    Nak {
        /// Why.
        code: ErrorCode,
    },
    /// Device: answer to `WriteBegin`: how many bytes of this item (same
    /// length and SHA-256) it already has; the station resumes there.
    WriteReady {
        /// The item.
        item: Item,
        /// Bytes already received.
        offset: u32,
    },
    /// Device: answer to `ReadBegin` and `GenerateKey`.
    ReadInfo {
        /// The item.
        item: Item,
        /// Its length.
        total_len: u32,
        /// Its SHA-256.
        sha256: [u8; 32],
    },
    /// Device: answer to `ReadChunk`.
    ReadData {
        /// The item.
        item: Item,
        /// Offset of the data.
        offset: u32,
        /// The bytes (empty at the end of the item).
        data: Vec<u8>,
    },
    /// Device: answer to `ReadDigest`.
    Digest {
        /// The item.
        item: Item,
        /// Length of the stored item.
        total_len: u32,
        /// SHA-256 of the stored item.
        sha256: [u8; 32],
    },
    /// Device: answer to `Prove`: a signature, DER for ECDSA.
    Proof {
        /// The signature.
        signature: Vec<u8>,
    },
}

impl Message {
    /// The message type code.
    pub fn msg_type(&self) -> u8 {
        use msg_type as t;
        match self {
            Message::Hello { .. } => t::HELLO,
            Message::GenerateKey { .. } => t::GENERATE_KEY,
            Message::WriteBegin { .. } => t::WRITE_BEGIN,
            Message::WriteChunk { .. } => t::WRITE_CHUNK,
            Message::WriteEnd { .. } => t::WRITE_END,
            Message::ReadBegin { .. } => t::READ_BEGIN,
            Message::ReadChunk { .. } => t::READ_CHUNK,
            Message::ReadDigest { .. } => t::READ_DIGEST,
            Message::Prove { .. } => t::PROVE,
            Message::Commit => t::COMMIT,
            Message::Abort => t::ABORT,
            Message::Reset => t::RESET,
            Message::ReadDigestSet { .. } => t::READ_DIGEST_SET,
            Message::HelloReply { .. } => t::HELLO_REPLY,
            Message::Ack => t::ACK,
            Message::Nak { .. } => t::NAK,
            Message::WriteReady { .. } => t::WRITE_READY,
            Message::ReadInfo { .. } => t::READ_INFO,
            Message::ReadData { .. } => t::READ_DATA,
            Message::Digest { .. } => t::DIGEST,
            Message::Proof { .. } => t::PROOF,
        }
    }

    /// Whether the station sends this message (type below 0x80).
    pub fn is_request(&self) -> bool {
        self.msg_type() < 0x80
    }

    /// Appends the payload to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Message::Hello {
                protocol_version,
                max_frame,
                station_nonce,
            } => {
                out.push(*protocol_version);
                out.extend(max_frame.to_le_bytes());
                if let Some(nonce) = station_nonce {
                    out.extend(nonce);
                }
            }
            Message::GenerateKey { key_type } => out.push(u8::from(*key_type)),
            Message::WriteBegin {
                item,
                total_len,
                sha256,
            }
            | Message::ReadInfo {
                item,
                total_len,
                sha256,
            }
            | Message::Digest {
                item,
                total_len,
                sha256,
            } => {
                out.push(u8::from(*item));
                out.extend(total_len.to_le_bytes());
                out.extend(sha256);
            }
            Message::WriteChunk { item, offset, data }
            | Message::ReadData { item, offset, data } => {
                out.push(u8::from(*item));
                out.extend(offset.to_le_bytes());
                out.extend(data);
            }
            Message::WriteEnd { item }
            | Message::ReadBegin { item }
            | Message::ReadDigest { item } => out.push(u8::from(*item)),
            Message::ReadChunk {
                item,
                offset,
                max_len,
            } => {
                out.push(u8::from(*item));
                out.extend(offset.to_le_bytes());
                out.extend(max_len.to_le_bytes());
            }
            Message::Prove { nonce } => out.extend(nonce),
            Message::ReadDigestSet { items } => out.extend(items.0.to_le_bytes()),
            Message::Commit | Message::Abort | Message::Reset | Message::Ack => {}
            Message::HelloReply {
                protocol_version,
                max_frame,
                capabilities,
                holds,
                device_serial,
                firmware_version,
            } => {
                out.push(*protocol_version);
                out.extend(max_frame.to_le_bytes());
                out.extend(capabilities.0.to_le_bytes());
                out.extend(holds.0.to_le_bytes());
                put_str(out, "device_serial", device_serial, MAX_SERIAL_LEN)?;
                put_str(out, "firmware_version", firmware_version, MAX_FIRMWARE_LEN)?;
            }
            Message::Nak { code } => out.push(u8::from(*code)),
            Message::WriteReady { item, offset } => {
                out.push(u8::from(*item));
                out.extend(offset.to_le_bytes());
            }
            Message::Proof { signature } => out.extend(signature),
        }
        Ok(())
    }

    /// Parses the payload of a frame of type `msg_type` with sequence `seq`.
    pub fn decode_payload(type_code: u8, seq: u16, payload: &[u8]) -> Result<Message, DecodeError> {
        use self::msg_type as t;
        let mut r = Reader {
            buf: payload,
            msg_type: type_code,
            seq,
        };
        let message = match type_code {
            t::HELLO => {
                let protocol_version = r.u8("protocol_version")?;
                let max_frame = r.u16("max_frame")?;
                let station_nonce = if r.buf.is_empty() {
                    None
                } else {
                    Some(r.array("station_nonce")?)
                };
                Message::Hello {
                    protocol_version,
                    max_frame,
                    station_nonce,
                }
            }
            t::GENERATE_KEY => Message::GenerateKey {
                key_type: KeyType::from(r.u8("key_type")?),
            },
            t::WRITE_BEGIN | t::READ_INFO | t::DIGEST => {
                let item = r.item()?;
                let total_len = r.u32("total_len")?;
                let sha256 = r.array("sha256")?;
                match type_code {
                    t::WRITE_BEGIN => Message::WriteBegin {
                        item,
                        total_len,
                        sha256,
                    },
                    t::READ_INFO => Message::ReadInfo {
                        item,
                        total_len,
                        sha256,
                    },
                    _ => Message::Digest {
                        item,
                        total_len,
                        sha256,
                    },
                }
            }
            t::WRITE_CHUNK | t::READ_DATA => {
                let item = r.item()?;
                let offset = r.u32("offset")?;
                let data = r.rest();
                if type_code == t::WRITE_CHUNK {
                    Message::WriteChunk { item, offset, data }
                } else {
                    Message::ReadData { item, offset, data }
                }
            }
            t::WRITE_END => Message::WriteEnd { item: r.item()? },
            t::READ_BEGIN => Message::ReadBegin { item: r.item()? },
            t::READ_DIGEST => Message::ReadDigest { item: r.item()? },
            t::READ_CHUNK => Message::ReadChunk {
                item: r.item()?,
                offset: r.u32("offset")?,
                max_len: r.u16("max_len")?,
            },
            t::PROVE => Message::Prove {
                nonce: r.array("nonce")?,
            },
            t::COMMIT => Message::Commit,
            t::ABORT => Message::Abort,
            t::RESET => Message::Reset,
            t::READ_DIGEST_SET => Message::ReadDigestSet {
                items: ItemSet(r.u16("items")?),
            },
            t::ACK => Message::Ack,
            t::HELLO_REPLY => Message::HelloReply {
                protocol_version: r.u8("protocol_version")?,
                max_frame: r.u16("max_frame")?,
                capabilities: Capabilities(r.u16("capabilities")?),
                holds: ItemSet(r.u16("holds")?),
                device_serial: r.string("device_serial", MAX_SERIAL_LEN)?,
                firmware_version: r.string("firmware_version", MAX_FIRMWARE_LEN)?,
            },
            t::NAK => Message::Nak {
                code: ErrorCode::from(r.u8("code")?),
            },
            t::WRITE_READY => Message::WriteReady {
                item: r.item()?,
                offset: r.u32("offset")?,
            },
            t::PROOF => Message::Proof {
                signature: r.rest(),
            },
            other => {
                return Err(DecodeError::UnknownType {
                    msg_type: other,
                    seq,
                })
            }
        };
        r.finish()?;
        Ok(message)
    }
}

fn put_str(out: &mut Vec<u8>, field: &'static str, s: &str, max: usize) -> Result<(), EncodeError> {
    let too_long = EncodeError::TooLong {
        field,
        len: s.len(),
        max,
    };
    if s.len() > max {
        return Err(too_long);
    }
    out.push(u8::try_from(s.len()).map_err(|_| too_long)?);
    out.extend(s.as_bytes());
    Ok(())
}

/// Reads a payload field by field; every short read is a `BadPayload`.
struct Reader<'a> {
    buf: &'a [u8],
    msg_type: u8,
    seq: u16,
}

impl<'a> Reader<'a> {
    fn bad(&self, field: &'static str, reason: &'static str) -> DecodeError {
        DecodeError::BadPayload {
            msg_type: self.msg_type,
            seq: self.seq,
            field,
            reason,
        }
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.bad(field, "payload ends inside this field"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(field, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn item(&mut self) -> Result<Item, DecodeError> {
        Ok(Item::from(self.u8("item")?))
    }

    fn string(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u8(field)?);
        if len > max {
            return Err(self.bad(field, "longer than the protocol allows"));
        }
        let bytes = self.take(field, len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.bad(field, "not UTF-8"))
    }

    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).to_vec()
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad("payload", "trailing bytes after the last field"))
        }
    }
}
