//! Faults a simulated device injects, and the seeded generator behind them.
//!
//! Every random choice (which byte to flip, which frame to drop, what
//! garbage to send) comes from one [`Rng`] seeded from [`Faults::seed`], so
//! a failing run repeats with the same seed (as far as the station's timing
//! lets it: the faults hit the same bytes of the stream).

use serde::Serialize;

use crate::device::Item;

/// What goes wrong on the line and in the device; all off by default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Share of bytes flipped, in both directions (0.01 = 1%).
    pub corrupt_rate: f64,
    /// Share of whole frames dropped, in both directions.
    pub drop_rate: f64,
    /// The device resets once, after it has received this many bytes.
    pub reset_after_bytes: Option<u64>,
    /// Or: the device resets once in the middle of writing this item (after
    /// a chunk that brings it past half its length, before answering it).
    pub reset_during: Option<Item>,
    /// The device stops answering for good after receiving this many bytes.
    pub stall_after_bytes: Option<u64>,
    /// The device never answers anything.
    pub silent: bool,
    /// The device answers with random bytes instead of frames.
    pub garbage: bool,
    /// `ReadDigest` answers a wrong SHA-256.
    pub lie_digest: bool,
    /// Seed of the generator that picks corrupted bytes and dropped frames.
    pub seed: u64,
}

impl Faults {
    /// Whether any fault is switched on.
    pub fn any(&self) -> bool {
        self.corrupt_rate > 0.0
            || self.drop_rate > 0.0
            || self.reset_after_bytes.is_some()
            || self.reset_during.is_some()
            || self.stall_after_bytes.is_some()
            || self.silent
            || self.garbage
            || self.lie_digest
    }

    /// Checks the rates: each between 0 and 1.
    pub fn check(&self) -> Result<(), String> {
        for (name, rate) in [
            ("corrupt_rate", self.corrupt_rate),
            ("drop_rate", self.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} {rate} is not between 0 and 1"));
            }
        }
        Ok(())
    }
}

/// How many faults were injected, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    /// Bytes flipped on their way in.
    pub corrupted_in: u64,
    /// Bytes flipped on their way out.
    pub corrupted_out: u64,
    /// Request frames dropped before the device saw them.
    pub dropped_in: u64,
    /// Response frames dropped before they reached the wire.
    pub dropped_out: u64,
    /// Resets injected (after N bytes, or in the middle of an item).
    pub resets: u64,
    /// Whether the device has stalled for good.
    pub stalled: bool,
    /// Responses held back because the device is silent or stalled.
    pub unanswered: u64,
    /// Responses replaced by random bytes.
    pub garbage: u64,
    /// `Digest` answers that carried a wrong SHA-256.
    pub lied_digests: u64,
}

/// SplitMix64: a small, fast, seedable generator, good enough to decide
/// which bytes to damage (not for keys: those come from ring's system RNG).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator with this seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform value in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        let top = u32::try_from(self.next_u64() >> 32).unwrap_or(u32::MAX);
        f64::from(top) / 4_294_967_296.0
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }

    /// A random non-zero byte (an XOR mask that always changes the byte).
    pub fn nonzero_byte(&mut self) -> u8 {
        loop {
            let b = self.byte();
            if b != 0 {
                return b;
            }
        }
    }

    /// Flips each byte of `bytes` with probability `rate`; returns how many.
    pub fn corrupt(&mut self, bytes: &mut [u8], rate: f64) -> u64 {
        if rate <= 0.0 {
            return 0;
        }
        let mut flipped = 0;
        for b in bytes {
            if self.chance(rate) {
                *b ^= self.nonzero_byte();
                flipped += 1;
            }
        }
        flipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_damage() {
        let mut a = vec![0x55u8; 10_000];
        let mut b = a.clone();
        let na = Rng::new(7).corrupt(&mut a, 0.01);
        let nb = Rng::new(7).corrupt(&mut b, 0.01);
        assert_eq!(a, b);
        assert_eq!(na, nb);
        // About 1% of 10 000 bytes, every counted byte changed.
        assert!((50..=150).contains(&na), "{na} bytes flipped");
        let changed = a.iter().filter(|&&x| x != 0x55).count();
        assert_eq!(u64::try_from(changed).unwrap(), na);
        let mut c = vec![0x55u8; 10_000];
        Rng::new(8).corrupt(&mut c, 0.01);
        assert_ne!(a, c);
    }

    #[test]
    fn unit_is_in_range_and_rates_are_checked() {
        let mut rng = Rng::new(1);
        for _ in 0..10_000 {
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
        }
        assert!(!rng.chance(0.0));
        assert!(Faults::default().check().is_ok());
        assert!(!Faults::default().any());
        let bad = Faults {
            drop_rate: 1.5,
            ..Faults::default()
        };
        assert!(bad.check().unwrap_err().contains("drop_rate"));
        assert!(bad.any());
    }
}
