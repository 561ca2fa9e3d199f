//! Chunked transfer of items larger than a frame, in either direction.
//!
//! Writing (station to device): `WriteBegin{item, total_len, sha256}`, the
//! device answers `WriteReady{offset}` (0, or how far an earlier transfer of
//! the same bytes got), then `WriteChunk{item, offset, data}` from there on,
//! then `WriteEnd{item}`. Reading (device to station): `ReadBegin{item}` (or
//! `GenerateKey` for the CSR) answered by `ReadInfo{item, total_len, sha256}`,
//! then `ReadChunk{item, offset, max_len}` answered by `ReadData`.
//! [`Chunker`] cuts an item for the sender, [`Reassembler`] puts it together
//! for the receiver, checking offsets, length and SHA-256.

use ring::digest;

use super::codec::chunk_capacity;
use super::message::Message;
use super::values::{ErrorCode, Item};

/// What went wrong in a chunked transfer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The peer's frames are too small to carry any data.
    #[error("a {max_frame}-byte frame carries no chunk data")]
    FrameTooSmall {
        /// The peer's receive limit.
        max_frame: u16,
    },
    /// The item is larger than the receiver accepts (or than 4 GiB).
    #[error("{item:?} of {len} bytes is larger than the {limit} bytes allowed")]
    TooLarge {
        /// The item.
        item: Item,
        /// Its length.
        len: u64,
        /// The most allowed.
        limit: u64,
    },
    /// A chunk for another item than the one being transferred.
    #[error("chunk for {found:?} while transferring {expected:?}")]
    WrongItem {
        /// The item being transferred.
        expected: Item,
        /// The item the chunk names.
        found: Item,
    },
    /// A chunk that does not start where the transfer stands.
    #[error("chunk at offset {found}, transfer stands at {expected}")]
    BadOffset {
        /// Where the transfer stands.
        expected: u32,
        /// The chunk's offset.
        found: u32,
    },
    /// A chunk that runs past the announced length.
    #[error("chunk ends at {end}, past the item's {total_len} bytes")]
    Overflow {
        /// Where the chunk would end.
        end: u64,
        /// The announced length.
        total_len: u32,
    },
    /// The transfer ended before all the bytes arrived.
    #[error("transfer ended at {received} of {total_len} bytes")]
    Incomplete {
        /// Bytes received.
        received: u32,
        /// The announced length.
        total_len: u32,
    },
    /// All the bytes arrived but their SHA-256 is not the announced one.
    #[error("SHA-256 of the received {item:?} does not match the announced one")]
    DigestMismatch {
        /// The item.
        item: Item,
    },
}

impl ChunkError {
    /// The `Nak` code a device answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ChunkError::FrameTooSmall { .. } | ChunkError::Overflow { .. } => ErrorCode::BadPayload,
            ChunkError::TooLarge { .. } => ErrorCode::ItemTooLarge,
            ChunkError::WrongItem { .. } => ErrorCode::NoTransfer,
            ChunkError::BadOffset { .. } => ErrorCode::BadOffset,
            ChunkError::Incomplete { .. } | ChunkError::DigestMismatch { .. } => {
                ErrorCode::DigestMismatch
            }
        }
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

/// Cuts an item into `WriteChunk` messages that fit the device's frames.
#[derive(Debug, Clone)]
pub struct Chunker<'a> {
    item: Item,
    data: &'a [u8],
    total_len: u32,
    chunk_len: usize,
    offset: usize,
}

impl<'a> Chunker<'a> {
    /// A chunker for `data`, in chunks that fit frames of `max_frame` wire bytes.
    pub fn new(item: Item, data: &'a [u8], max_frame: u16) -> Result<Chunker<'a>, ChunkError> {
        let chunk_len = chunk_capacity(max_frame).ok_or(ChunkError::FrameTooSmall { max_frame })?;
        let total_len = u32::try_from(data.len()).map_err(|_| ChunkError::TooLarge {
            item,
            len: u64::try_from(data.len()).unwrap_or(u64::MAX),
            limit: u64::from(u32::MAX),
        })?;
        Ok(Chunker {
            item,
            data,
            total_len,
            chunk_len,
            offset: 0,
        })
    }

    /// The `WriteBegin` that opens the transfer.
    pub fn begin(&self) -> Message {
        Message::WriteBegin {
            item: self.item,
            total_len: self.total_len,
            sha256: sha256(self.data),
        }
    }

    /// Continues from `offset`, as the device's `WriteReady` says.
    pub fn resume_at(&mut self, offset: u32) -> Result<(), ChunkError> {
        if offset > self.total_len {
            return Err(ChunkError::Overflow {
                end: u64::from(offset),
                total_len: self.total_len,
            });
        }
        self.offset = usize::try_from(offset).unwrap_or(usize::MAX);
        Ok(())
    }

    /// Data bytes per chunk.
    pub fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    /// The `WriteEnd` that closes the transfer.
    pub fn end(&self) -> Message {
        Message::WriteEnd { item: self.item }
    }
}

impl Iterator for Chunker<'_> {
    type Item = Message;

    /// The next `WriteChunk`, or `None` when every byte has been handed out.
    fn next(&mut self) -> Option<Message> {
        if self.offset >= self.data.len() {
            return None;
        }
        let end = self.data.len().min(self.offset + self.chunk_len);
        let offset = u32::try_from(self.offset).ok()?;
        let data = self.data[self.offset..end].to_vec();
        self.offset = end;
        Some(Message::WriteChunk {
            item: self.item,
            offset,
            data,
        })
    }
}

/// The slice of `data` a device sends for `ReadChunk{offset, max_len}`.
pub fn read_slice(data: &[u8], offset: u32, max_len: u16) -> Result<&[u8], ChunkError> {
    let total_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    if offset > total_len {
        return Err(ChunkError::BadOffset {
            expected: total_len,
            found: offset,
        });
    }
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let end = data.len().min(start.saturating_add(usize::from(max_len)));
    Ok(&data[start..end])
}

/// Puts an item together from chunks, in order, and checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reassembler {
    item: Item,
    total_len: u32,
    sha256: [u8; 32],
    data: Vec<u8>,
}

impl Reassembler {
    /// Starts receiving `item` as announced; refuses items over `limit` bytes
    /// before allocating anything.
    pub fn new(
        item: Item,
        total_len: u32,
        sha256: [u8; 32],
        limit: usize,
    ) -> Result<Reassembler, ChunkError> {
        let len = usize::try_from(total_len).unwrap_or(usize::MAX);
        if len > limit {
            return Err(ChunkError::TooLarge {
                item,
                len: u64::from(total_len),
                limit: u64::try_from(limit).unwrap_or(u64::MAX),
            });
        }
        Ok(Reassembler {
            item,
            total_len,
            sha256,
            data: Vec::with_capacity(len),
        })
    }

    /// The item.
    pub fn item(&self) -> Item {
        self.item
    }

    /// Bytes received so far: the offset the next chunk must have.
    pub fn received(&self) -> u32 {
        u32::try_from(self.data.len()).unwrap_or(u32::MAX)
    }

    /// The bytes received so far.
    pub fn received_bytes(&self) -> &[u8] {
        &self.data
    }

    /// Whether a new `WriteBegin` announces the same bytes, so that the
    /// transfer resumes at [`received`](Reassembler::received).
    pub fn same_transfer(&self, item: Item, total_len: u32, sha256: &[u8; 32]) -> bool {
        self.item == item && self.total_len == total_len && &self.sha256 == sha256
    }

    /// Takes a chunk; it must start exactly where the transfer stands.
    pub fn accept(&mut self, item: Item, offset: u32, data: &[u8]) -> Result<(), ChunkError> {
        if item != self.item {
            return Err(ChunkError::WrongItem {
                expected: self.item,
                found: item,
            });
        }
        if offset != self.received() {
            return Err(ChunkError::BadOffset {
                expected: self.received(),
                found: offset,
            });
        }
        let end = u64::from(offset) + u64::try_from(data.len()).unwrap_or(u64::MAX);
        if end > u64::from(self.total_len) {
            return Err(ChunkError::Overflow {
                end,
                total_len: self.total_len,
            });
        }
        self.data.extend_from_slice(data);
        Ok(())
    }

    /// The `ReadChunk` that asks for the next bytes (station side of a read).
    pub fn next_read(&self, max_len: u16) -> Option<Message> {
        (self.received() < self.total_len).then_some(Message::ReadChunk {
            item: self.item,
            offset: self.received(),
            max_len,
        })
    }

    /// Checks that every byte arrived and that the SHA-256 matches.
    pub fn verify(&self) -> Result<(), ChunkError> {
        if self.received() != self.total_len {
            return Err(ChunkError::Incomplete {
                received: self.received(),
                total_len: self.total_len,
            });
        }
        if sha256(&self.data) != self.sha256 {
            return Err(ChunkError::DigestMismatch { item: self.item });
        }
        Ok(())
    }

    /// The item, once [`verify`](Reassembler::verify) passes.
    pub fn finish(self) -> Result<Vec<u8>, ChunkError> {
        self.verify()?;
        Ok(self.data)
    }
}
