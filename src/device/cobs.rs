//! Consistent Overhead Byte Stuffing (Cheshire and Baker, 1999).
//!
//! COBS rewrites a frame so that it holds no 0x00 byte; 0x00 then ends each
//! frame on the wire. The frame is cut into blocks, each a code byte `n`
//! (1..=255) followed by `n - 1` non-zero bytes; a block with a code below
//! 0xFF stands for its bytes followed by a zero, except the last block of the
//! frame. Overhead: at most one byte per 254 bytes, and at least one.

/// Why a COBS block sequence is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CobsError {
    /// A 0x00 byte inside the encoded frame (only the delimiter may be zero).
    #[error("zero byte at {at} inside a COBS frame")]
    ZeroByte {
        /// Offset in the encoded frame.
        at: usize,
    },
    /// A code byte promises more bytes than the frame holds.
    #[error("COBS block at {at} runs {missing} bytes past the end of the frame")]
    Overrun {
        /// Offset of the code byte.
        at: usize,
        /// Bytes missing.
        missing: usize,
    },
}

/// The largest number of bytes [`encode`] writes for `len` input bytes
/// (without the delimiter): `len + max(1, ceil(len / 254))`.
pub const fn max_encoded_len(len: usize) -> usize {
    let blocks = len.div_ceil(254);
    len + if blocks == 0 { 1 } else { blocks }
}

/// Appends the COBS encoding of `input` to `out` (no delimiter).
pub fn encode(input: &[u8], out: &mut Vec<u8>) {
    out.reserve(max_encoded_len(input.len()));
    let mut code_at = out.len();
    out.push(0);
    let mut code: u8 = 1;
    for (i, &byte) in input.iter().enumerate() {
        if byte == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
            continue;
        }
        out.push(byte);
        code += 1;
        // A full block (254 data bytes) ends without an implied zero; a new
        // block starts only if more input follows.
        if code == 0xFF && i + 1 < input.len() {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        }
    }
    out[code_at] = code;
}

/// Appends the decoding of one COBS frame (delimiter removed) to `out`.
pub fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), CobsError> {
    let mut at = 0;
    while at < input.len() {
        let code = input[at];
        if code == 0 {
            return Err(CobsError::ZeroByte { at });
        }
        let start = at + 1;
        let end = start + usize::from(code) - 1;
        if end > input.len() {
            return Err(CobsError::Overrun {
                at,
                missing: end - input.len(),
            });
        }
        let block = &input[start..end];
        if let Some(zero) = block.iter().position(|&b| b == 0) {
            return Err(CobsError::ZeroByte { at: start + zero });
        }
        out.extend_from_slice(block);
        at = end;
        if code != 0xFF && at < input.len() {
            out.push(0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(input, &mut out);
        out
    }

    fn dec(input: &[u8]) -> Result<Vec<u8>, CobsError> {
        let mut out = Vec::new();
        decode(input, &mut out).map(|()| out)
    }

    fn check(raw: &[u8], encoded: &[u8]) {
        assert_eq!(enc(raw), encoded, "encoding {raw:02x?}");
        assert_eq!(dec(encoded).unwrap(), raw, "decoding {encoded:02x?}");
        assert!(encoded.len() <= max_encoded_len(raw.len()));
    }

    /// The examples of the COBS article on Wikipedia (delimiter left off).
    #[test]
    fn wikipedia_examples() {
        check(&[], &[0x01]);
        check(&[0x00], &[0x01, 0x01]);
        check(&[0x00, 0x00], &[0x01, 0x01, 0x01]);
        check(&[0x00, 0x11, 0x00], &[0x01, 0x02, 0x11, 0x01]);
        check(&[0x11, 0x22, 0x00, 0x33], &[0x03, 0x11, 0x22, 0x02, 0x33]);
        check(&[0x11, 0x22, 0x33, 0x44], &[0x05, 0x11, 0x22, 0x33, 0x44]);
        check(&[0x11, 0x00, 0x00, 0x00], &[0x02, 0x11, 0x01, 0x01, 0x01]);
    }

    #[test]
    fn wikipedia_long_examples() {
        // 01..FE (254 non-zero bytes): one full block, no trailing code.
        let raw: Vec<u8> = (0x01..=0xFE).collect();
        let mut encoded = vec![0xFF];
        encoded.extend(&raw);
        check(&raw, &encoded);

        // 00 01..FE
        let mut raw0 = vec![0x00];
        raw0.extend(0x01..=0xFEu8);
        let mut encoded0 = vec![0x01, 0xFF];
        encoded0.extend(0x01..=0xFEu8);
        check(&raw0, &encoded0);

        // 01..FF (255 bytes): a full block, then a block of one.
        let raw1: Vec<u8> = (0x01..=0xFF).collect();
        let mut encoded1 = vec![0xFF];
        encoded1.extend(0x01..=0xFEu8);
        encoded1.extend([0x02, 0xFF]);
        check(&raw1, &encoded1);

        // 02..FF 00
        let mut raw2: Vec<u8> = (0x02..=0xFF).collect();
        raw2.push(0x00);
        let mut encoded2 = vec![0xFF];
        encoded2.extend(0x02..=0xFFu8);
        encoded2.extend([0x01, 0x01]);
        check(&raw2, &encoded2);

        // 03..FF 00 01
        let mut raw3: Vec<u8> = (0x03..=0xFF).collect();
        raw3.extend([0x00, 0x01]);
        let mut encoded3 = vec![0xFE];
        encoded3.extend(0x03..=0xFFu8);
        encoded3.extend([0x02, 0x01]);
        check(&raw3, &encoded3);
    }

    #[test]
    fn malformed_input_is_refused() {
        assert_eq!(
            dec(&[0x05, 0x11, 0x22]),
            Err(CobsError::Overrun { at: 0, missing: 2 })
        );
        assert_eq!(dec(&[0x03, 0x11, 0x00]), Err(CobsError::ZeroByte { at: 2 }));
        assert_eq!(dec(&[0x00]), Err(CobsError::ZeroByte { at: 0 }));
    }

    #[test]
    fn every_length_round_trips_and_stays_within_the_bound() {
        for len in 0..700 {
            for fill in [0x00u8, 0x01, 0xFF] {
                let raw: Vec<u8> = (0..len)
                    .map(|i| if i % 97 == 3 { 0 } else { fill })
                    .collect();
                let e = enc(&raw);
                assert!(!e.contains(&0));
                assert!(e.len() <= max_encoded_len(len), "len {len}");
                assert_eq!(dec(&e).unwrap(), raw);
            }
        }
    }
}
