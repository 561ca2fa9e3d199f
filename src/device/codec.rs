//! Frames: the header, the CRC, COBS on the wire, and a streaming decoder.
//!
//! A decoded frame (before COBS) is
//!
//! ```text
//!  0        1      2      3..5       5..7          7..7+n    7+n..11+n
//!  version  type   flags  seq (LE)   length n (LE) payload   CRC-32 (LE)
//! ```
//!
//! The CRC-32/ISO-HDLC covers bytes `0..7+n`. On the wire the frame is COBS
//! encoded and followed by one 0x00. [`encode`] writes that; [`FrameDecoder`]
//! takes bytes as they come from the port and hands back frames, dropping
//! whatever is damaged and finding its feet again at the next 0x00.

use super::cobs;
use super::crc::crc32;
use super::error::{DecodeError, EncodeError};
use super::message::{Message, CHUNK_HEADER_LEN};

/// The frame format version (first header byte).
pub const FRAME_VERSION: u8 = 1;
/// Bytes of header: version, type, flags, seq, payload length.
pub const HEADER_LEN: usize = 7;
/// Bytes of CRC at the end of a frame.
pub const CRC_LEN: usize = 4;
/// Header and CRC together: the smallest decoded frame.
pub const FRAME_OVERHEAD: usize = HEADER_LEN + CRC_LEN;
/// Every device receives frames at least this long (on the wire, delimiter
/// included); the station sends nothing longer before the `HelloReply`.
pub const MIN_MAX_FRAME: u16 = 64;
/// The station receives frames at least this long; a device sends nothing
/// longer before it has seen the station's `Hello`.
pub const MIN_STATION_MAX_FRAME: u16 = 1024;

/// Header flag bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u8);

impl Flags {
    /// The station sends this request again (same seq) after a timeout.
    /// Informational: duplicates are recognised by their seq.
    pub const RETRANSMIT: Flags = Flags(0x01);

    /// Whether every bit of `other` is set here.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// One frame: header fields and the message it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Header flags.
    pub flags: Flags,
    /// Sequence number: chosen by the station, echoed by the device.
    pub seq: u16,
    /// The message.
    pub message: Message,
}

impl Frame {
    /// A frame with no flags.
    pub fn new(seq: u16, message: Message) -> Frame {
        Frame {
            flags: Flags::default(),
            seq,
            message,
        }
    }

    /// The decoded bytes (header, payload, CRC) before COBS.
    pub fn to_raw(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = vec![FRAME_VERSION, self.message.msg_type(), self.flags.0];
        out.extend(self.seq.to_le_bytes());
        out.extend([0, 0]);
        self.message.encode_payload(&mut out)?;
        let payload_len = out.len() - HEADER_LEN;
        let len = u16::try_from(payload_len).map_err(|_| EncodeError::TooLong {
            field: "payload",
            len: payload_len,
            max: usize::from(u16::MAX),
        })?;
        out[5..7].copy_from_slice(&len.to_le_bytes());
        let crc = crc32(&out);
        out.extend(crc.to_le_bytes());
        Ok(out)
    }

    /// Parses decoded bytes (header, payload, CRC), checking the CRC first.
    pub fn from_raw(raw: &[u8]) -> Result<Frame, DecodeError> {
        if raw.len() < FRAME_OVERHEAD {
            return Err(DecodeError::Truncated {
                len: raw.len(),
                min: FRAME_OVERHEAD,
            });
        }
        let (body, crc_bytes) = raw.split_at(raw.len() - CRC_LEN);
        let mut found = [0u8; CRC_LEN];
        found.copy_from_slice(crc_bytes);
        let found = u32::from_le_bytes(found);
        let expected = crc32(body);
        if expected != found {
            return Err(DecodeError::BadCrc { expected, found });
        }
        if body[0] != FRAME_VERSION {
            return Err(DecodeError::UnsupportedVersion(body[0]));
        }
        let msg_type = body[1];
        let flags = Flags(body[2]);
        let seq = u16::from_le_bytes([body[3], body[4]]);
        let declared = usize::from(u16::from_le_bytes([body[5], body[6]]));
        let payload = &body[HEADER_LEN..];
        if declared != payload.len() {
            return Err(DecodeError::LengthMismatch {
                declared,
                actual: payload.len(),
            });
        }
        let message = Message::decode_payload(msg_type, seq, payload)?;
        Ok(Frame {
            flags,
            seq,
            message,
        })
    }
}

/// The frame on the wire: COBS encoded, followed by the 0x00 delimiter.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, EncodeError> {
    let raw = frame.to_raw()?;
    let mut out = Vec::with_capacity(wire_len_bound(raw.len()));
    cobs::encode(&raw, &mut out);
    out.push(0);
    Ok(out)
}

/// Decodes one frame as it was on the wire, delimiter optional.
pub fn decode(wire: &[u8]) -> Result<Frame, DecodeError> {
    let body = wire.strip_suffix(&[0]).unwrap_or(wire);
    let mut raw = Vec::with_capacity(body.len());
    cobs::decode(body, &mut raw)?;
    Frame::from_raw(&raw)
}

/// The most bytes a decoded frame of `raw_len` bytes takes on the wire.
pub const fn wire_len_bound(raw_len: usize) -> usize {
    cobs::max_encoded_len(raw_len) + 1
}

/// The largest payload whose frame always fits `max_frame` wire bytes, or
/// `None` when not even an empty payload does.
pub fn max_payload(max_frame: u16) -> Option<usize> {
    let max_frame = usize::from(max_frame);
    if wire_len_bound(FRAME_OVERHEAD) > max_frame {
        return None;
    }
    // The bound grows by one or two bytes per payload byte: step down from
    // the frame size until it fits.
    let mut payload = max_frame.saturating_sub(FRAME_OVERHEAD + 1);
    while wire_len_bound(FRAME_OVERHEAD + payload) > max_frame {
        payload -= 1;
    }
    Some(payload)
}

/// The most data bytes one `WriteChunk` or `ReadData` carries within
/// `max_frame` wire bytes (`None` below the smallest usable frame).
pub fn chunk_capacity(max_frame: u16) -> Option<usize> {
    max_payload(max_frame)?
        .checked_sub(CHUNK_HEADER_LEN)
        .filter(|&n| n > 0)
}

/// A streaming frame decoder with a bounded buffer.
///
/// [`push`](FrameDecoder::push) bytes as they arrive, then call
/// [`next_frame`](FrameDecoder::next_frame) until it returns `None`. Every
/// 0x00 ends a frame; bytes between delimiters that do not make a valid frame
/// give one error and are dropped, so the decoder is back in step at the next
/// frame. An empty frame (two delimiters in a row) is ignored: a sender may
/// send a lone 0x00 to flush the receiver. A frame longer than the limit is
/// reported once ([`DecodeError::TooLong`]) and skipped to its delimiter
/// without being buffered. Never panics, whatever the input.
///
/// Memory: the bytes pushed and not yet consumed by `next_frame`, plus at most
/// `max_frame - 1` bytes of the frame being received.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    input: Vec<u8>,
    read: usize,
    frame: Vec<u8>,
    skipping: bool,
}

impl FrameDecoder {
    /// A decoder that accepts frames of at most `max_frame` wire bytes,
    /// delimiter included (at least 2).
    pub fn new(max_frame: usize) -> FrameDecoder {
        let max_frame = max_frame.max(2);
        FrameDecoder {
            max_frame,
            input: Vec::new(),
            read: 0,
            frame: Vec::with_capacity(max_frame - 1),
            skipping: false,
        }
    }

    /// The receive limit, delimiter included.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the receive limit (after the hello); a frame being received
    /// that is already longer than the new limit is dropped up to its delimiter.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame.max(2);
        if self.frame.len() > self.max_frame - 1 {
            self.frame = Vec::new();
            self.skipping = true;
        }
        self.frame.shrink_to(self.max_frame - 1);
    }

    /// Adds bytes received from the link.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.read == self.input.len() {
            self.input.clear();
            self.read = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Bytes held: pushed and not yet consumed, plus the partial frame.
    pub fn buffered(&self) -> usize {
        self.input.len() - self.read + self.frame.len()
    }

    /// Heap bytes held by the decoder's buffers.
    pub fn capacity(&self) -> usize {
        self.input.capacity() + self.frame.capacity()
    }

    /// Drops everything buffered, e.g. when the port is reopened.
    pub fn clear(&mut self) {
        self.input.clear();
        self.read = 0;
        self.frame.clear();
        self.skipping = false;
    }

    /// The next frame, or an error for the next damaged one; `None` when the
    /// bytes pushed so far hold no further complete frame.
    pub fn next_frame(&mut self) -> Option<Result<Frame, DecodeError>> {
        loop {
            let pending = &self.input[self.read..];
            if pending.is_empty() {
                self.release_input();
                return None;
            }
            let end = pending.iter().position(|&b| b == 0);
            let delimited = end.is_some();
            let chunk_len = end.unwrap_or(pending.len());
            let mut result = None;
            if !self.skipping {
                let room = self.max_frame - 1 - self.frame.len();
                if chunk_len > room {
                    result = Some(Err(DecodeError::TooLong {
                        len: self.frame.len() + chunk_len + usize::from(delimited),
                        max: self.max_frame,
                    }));
                    self.frame.clear();
                    self.skipping = true;
                } else {
                    self.frame.extend_from_slice(&pending[..chunk_len]);
                }
            }
            self.read += chunk_len + usize::from(delimited);
            if delimited {
                let was_skipping = std::mem::replace(&mut self.skipping, false);
                if result.is_none() && !was_skipping && !self.frame.is_empty() {
                    result = Some(decode(&self.frame));
                }
                self.frame.clear();
            }
            if result.is_some() {
                return result;
            }
        }
    }

    fn release_input(&mut self) {
        self.input.clear();
        self.read = 0;
        let keep = self.max_frame.saturating_mul(2);
        if self.input.capacity() > keep {
            self.input.shrink_to(keep);
        }
    }
}
