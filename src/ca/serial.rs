//! Certificate serial numbers: positive, 16 octets, 80 random bits after
//! a 48-bit millisecond clock (RFC 5280 allows 20 octets; CA/B and Boulder
//! ask for at least 64 bits from a CSPRNG).
//!
//! The clock prefix only orders serials roughly by issuance: the ledger's
//! unique index on certificate serials then grows at its right edge, one
//! page written per commit, instead of taking every new serial on a random
//! page. Uniqueness rests on the random part and on that index, never on
//! the clock.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};

/// Length of a serial number in octets.
pub const SERIAL_LEN: usize = 16;

/// Octets of the clock prefix.
const CLOCK_LEN: usize = 6;

/// A fresh serial number: the clock of this machine, then 80 random bits.
pub fn random(rng: &SystemRandom) -> Result<[u8; SERIAL_LEN], ring::error::Unspecified> {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    ordered(rng, millis)
}

/// A serial number with the clock prefix `millis` (milliseconds since the
/// Unix epoch, the low 46 bits) and 80 random bits. The top bit is cleared
/// (positive) and the next one set, so every serial encodes in exactly 16
/// octets.
pub fn ordered(
    rng: &dyn SecureRandom,
    millis: u64,
) -> Result<[u8; SERIAL_LEN], ring::error::Unspecified> {
    let mut serial = [0u8; SERIAL_LEN];
    serial[..CLOCK_LEN].copy_from_slice(&millis.to_be_bytes()[8 - CLOCK_LEN..]);
    rng.fill(&mut serial[CLOCK_LEN..])?;
    serial[0] = (serial[0] & 0x3f) | 0x40;
    Ok(serial)
}

/// Lower-case hex of bytes (certificate ids and serials as AWS shows them).
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
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

    #[test]
    fn serials_follow_the_clock_then_differ_at_random() {
        let rng = SystemRandom::new();
        let now = 1_796_400_000_000; // 2026-12-04
        let a = ordered(&rng, now).unwrap();
        let b = ordered(&rng, now + 1).unwrap();
        let c = ordered(&rng, now + 60_000).unwrap();
        assert!(
            a[..CLOCK_LEN] < b[..CLOCK_LEN] && b < c,
            "{a:?} {b:?} {c:?}"
        );
        // Same millisecond: the random part alone tells them apart.
        let d = ordered(&rng, now).unwrap();
        assert_eq!(a[..CLOCK_LEN], d[..CLOCK_LEN]);
        assert_ne!(a[CLOCK_LEN..], d[CLOCK_LEN..]);
        let zero = ordered(&rng, 0).unwrap();
        assert_eq!(zero[..CLOCK_LEN], [0x40, 0, 0, 0, 0, 0]);
    }
}
