//! The line: the link protocol between the station and a device on a serial
//! or USB port.
//!
//! This module is the wire format only: bytes in, frames out, no I/O and no
//! clock, so that it can be unit-tested, property-tested and fuzzed without a
//! port. `docs/device-protocol.md` specifies the protocol for the device side.
//!
//! ```text
//!  Message ──encode_payload──> Frame::to_raw ──COBS──> wire bytes + 0x00
//!  wire bytes ──FrameDecoder::push / next_frame──> Result<Frame, DecodeError>
//! ```
//!
//! - [`codec`]: the frame header, CRC, [`encode`], the streaming [`FrameDecoder`],
//!   frame-size arithmetic ([`max_payload`], [`chunk_capacity`]);
//! - [`message`]: every [`Message`] and its payload layout;
//! - [`values`]: items, key types, error codes, capabilities, item sets;
//! - [`bundle`]: the TLV content of an [`Item::Bundle`] and the digest of an
//!   item set;
//! - [`chunk`]: [`Chunker`] and [`Reassembler`] for items larger than a frame;
//! - [`dup`]: the device's [`DuplicateFilter`] (last seq and its response);
//! - [`cobs`] and [`crc`]: COBS and CRC-32/ISO-HDLC, written out here so that
//!   the page a firmware team reads and the code agree byte for byte.

pub mod bundle;
pub mod chunk;
pub mod cobs;
pub mod codec;
pub mod crc;
pub mod dup;
pub mod error;
pub mod message;
pub mod values;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_golden;
#[cfg(test)]
mod tests_transfer;

pub use bundle::BundleError;
pub use chunk::{read_slice, sha256, ChunkError, Chunker, Reassembler};
pub use codec::{
    chunk_capacity, decode, encode, max_payload, Flags, Frame, FrameDecoder, FRAME_VERSION,
    MIN_MAX_FRAME, MIN_STATION_MAX_FRAME,
};
pub use dup::{DuplicateFilter, Verdict};
pub use error::{DecodeError, EncodeError};
pub use message::{Message, PROTOCOL_VERSION};
pub use values::{Capabilities, ErrorCode, Item, ItemSet, KeyType};
