//! Certificate serial numbers: random, positive, 126 bits of entropy in 16
//! octets (RFC 5280 allows 20; CA/B and Boulder ask for at least 64 bits).

use ring::rand::{SecureRandom, SystemRandom};

/// Length of a serial number in octets.
pub const SERIAL_LEN: usize = 16;

/// A fresh random serial number. The top bit is cleared (positive) and the
/// next one set, so every serial encodes in exactly 16 octets.
pub fn random(rng: &SystemRandom) -> Result<[u8; SERIAL_LEN], ring::error::Unspecified> {
    let mut serial = [0u8; SERIAL_LEN];
    rng.fill(&mut serial)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// Lower-case hex of bytes (certificate ids and serials as AWS shows them).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_full_length_and_distinct() {
        let rng = SystemRandom::new();
        let a = random(&rng).unwrap();
        let b = random(&rng).unwrap();
        assert_ne!(a, b);
        for s in [a, b] {
            assert_eq!(s[0] & 0xc0, 0x40);
        }
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
    }
}
