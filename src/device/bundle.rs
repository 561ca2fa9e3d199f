//! The content of an [`Item::Bundle`]: other items in one write, as a TLV
//! list (protocol section 4.4), and the digest `ReadDigestSet` answers.
//!
//! ```text
//!  entry = item: u8 | len: u16 LE | len bytes        entries in ascending item
//!  order, each item at most once, never a Bundle inside a Bundle
//! ```
//!
//! Pure functions, no I/O: the station builds a bundle with [`encode`], the
//! device takes it apart with [`parse`] (which never panics on any input).

use super::chunk::sha256;
use super::values::{ErrorCode, Item};

/// Bytes of an entry before its content: item and length.
pub const ENTRY_HEADER_LEN: usize = 3;

/// Why bytes are not a well-formed bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The bytes end inside an entry's header or content.
    #[error("bundle entry at offset {offset} is cut short: {needed} bytes needed, {left} left")]
    Truncated {
        /// Where the entry starts in the bundle.
        offset: usize,
        /// Bytes the entry needs from there.
        needed: usize,
        /// Bytes left from there.
        left: usize,
    },
    /// An entry whose item is not above the previous entry's (out of order
    /// or repeated).
    #[error("bundle entry at offset {offset}: item {item} after item {previous}; entries must be in ascending item order, each at most once")]
    Order {
        /// Where the entry starts in the bundle.
        offset: usize,
        /// The entry's item id.
        item: u8,
        /// The previous entry's item id.
        previous: u8,
    },
    /// A bundle inside a bundle.
    #[error("bundle entry at offset {offset} is itself a bundle")]
    Nested {
        /// Where the entry starts in the bundle.
        offset: usize,
    },
    /// An item longer than an entry's 16-bit length carries.
    #[error("item {item} of {len} bytes does not fit a bundle entry (at most 65535 bytes)")]
    TooLong {
        /// The item id.
        item: u8,
        /// Its length.
        len: usize,
    },
}

impl BundleError {
    /// The `Nak` code a device answers a malformed bundle with (at its
    /// `WriteEnd`): the content does not parse, so `BadPayload`.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::BadPayload
    }
}

/// Builds a bundle of `items`; they must be in ascending item order, each at
/// most once, none a Bundle, each at most 65535 bytes.
pub fn encode(items: &[(Item, &[u8])]) -> Result<Vec<u8>, BundleError> {
    let total: usize = items.iter().map(|(_, d)| ENTRY_HEADER_LEN + d.len()).sum();
    let mut out = Vec::with_capacity(total);
    let mut previous: Option<u8> = None;
    for (item, data) in items {
        let id = u8::from(*item);
        let offset = out.len();
        if *item == Item::Bundle {
            return Err(BundleError::Nested { offset });
        }
        if let Some(previous) = previous.filter(|&p| p >= id) {
            return Err(BundleError::Order {
                offset,
                item: id,
                previous,
            });
        }
        let len = u16::try_from(data.len()).map_err(|_| BundleError::TooLong {
            item: id,
            len: data.len(),
        })?;
        out.push(id);
        out.extend(len.to_le_bytes());
        out.extend_from_slice(data);
        previous = Some(id);
    }
    Ok(out)
}

/// Takes a bundle apart: its entries in order, each item's bytes borrowed
/// from `bytes`. Item ids are not checked here beyond order and nesting; a
/// device answers `Nak{UnknownItem}` for one it does not store.
pub fn parse(bytes: &[u8]) -> Result<Vec<(Item, &[u8])>, BundleError> {
    let mut entries = Vec::new();
    let mut offset = 0;
    let mut previous: Option<u8> = None;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let Some((header, body)) = rest.split_first_chunk::<ENTRY_HEADER_LEN>() else {
            return Err(BundleError::Truncated {
                offset,
                needed: ENTRY_HEADER_LEN,
                left: rest.len(),
            });
        };
        let [id, lo, hi] = *header;
        let len = usize::from(u16::from_le_bytes([lo, hi]));
        if Item::from(id) == Item::Bundle {
            return Err(BundleError::Nested { offset });
        }
        if let Some(previous) = previous.filter(|&p| p >= id) {
            return Err(BundleError::Order {
                offset,
                item: id,
                previous,
            });
        }
        let Some(data) = body.get(..len) else {
            return Err(BundleError::Truncated {
                offset,
                needed: ENTRY_HEADER_LEN + len,
                left: rest.len(),
            });
        };
        entries.push((Item::from(id), data));
        previous = Some(id);
        offset += ENTRY_HEADER_LEN + len;
    }
    Ok(entries)
}

/// The digest `ReadDigestSet` answers: SHA-256 over the SHA-256 of each
/// item's bytes, concatenated in ascending item order (the caller's order).
pub fn set_digest<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut concat = Vec::new();
    for data in items {
        concat.extend(sha256(data));
    }
    sha256(&concat)
}
