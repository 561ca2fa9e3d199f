//! What can go wrong turning bytes into frames, and frames into bytes.

use super::cobs::CobsError;
use super::values::ErrorCode;

/// Why a frame received from the link was dropped.
///
/// Errors found before the header could be trusted (COBS, length, CRC,
/// version) are not answered: the peer retries. Errors found after it
/// ([`DecodeError::UnknownType`], [`DecodeError::BadPayload`]) carry the
/// frame's sequence number so that a device can answer with a `Nak`
/// (see [`DecodeError::nak`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The CRC-32 over the frame does not match the one it carries.
    #[error("bad CRC: computed {expected:#010x}, frame carries {found:#010x}")]
    BadCrc {
        /// CRC-32 computed over the received header and payload.
        expected: u32,
        /// CRC-32 in the frame's last four bytes.
        found: u32,
    },
    /// More bytes than the receive limit arrived without a delimiter; they
    /// were dropped up to the next 0x00. Reported once per over-long frame.
    #[error(
        "frame longer than {max} bytes (at least {len} seen); dropped up to the next delimiter"
    )]
    TooLong {
        /// Bytes of the frame seen when it was dropped (a lower bound).
        len: usize,
        /// The receive limit, delimiter included.
        max: usize,
    },
    /// The bytes between two delimiters are not valid COBS.
    #[error("bad COBS encoding: {0}")]
    BadCobs(#[from] CobsError),
    /// Fewer bytes than a header and a CRC.
    #[error("frame of {len} bytes is shorter than header and CRC ({min} bytes)")]
    Truncated {
        /// Decoded length of the frame.
        len: usize,
        /// The least a frame can be.
        min: usize,
    },
    /// The payload length field disagrees with the bytes received.
    #[error("header says {declared} payload bytes, frame holds {actual}")]
    LengthMismatch {
        /// Payload length in the header.
        declared: usize,
        /// Payload bytes actually present.
        actual: usize,
    },
    /// The frame's version byte is not one this station speaks.
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// A well-formed frame of a message type this side does not know.
    #[error("unknown message type {msg_type:#04x} (seq {seq})")]
    UnknownType {
        /// The type byte.
        msg_type: u8,
        /// The frame's sequence number.
        seq: u16,
    },
    /// A well-formed frame whose payload does not parse as its type says.
    #[error("bad payload for message type {msg_type:#04x} (seq {seq}): {field}: {reason}")]
    BadPayload {
        /// The type byte.
        msg_type: u8,
        /// The frame's sequence number.
        seq: u16,
        /// The field being read.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl DecodeError {
    /// The sequence number and error code a device answers this error with,
    /// or `None` when the frame must be dropped silently.
    pub fn nak(&self) -> Option<(u16, ErrorCode)> {
        match *self {
            DecodeError::UnknownType { seq, .. } => Some((seq, ErrorCode::UnknownMessage)),
            DecodeError::BadPayload { seq, .. } => Some((seq, ErrorCode::BadPayload)),
            _ => None,
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A field is longer than its length prefix or the frame allows.
    #[error("{field} is {len} bytes, at most {max} fit")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The most allowed.
        max: usize,
    },
}
