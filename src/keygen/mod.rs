//! Key pairs: the device keys the station makes, and the public keys it
//! certifies (its own or those a device sent in a CSR).
//!
//! ring makes the elliptic-curve keys on the hot path. ring cannot generate
//! RSA keys, so RSA key generation goes to aws-lc-rs (the same AWS-LC that
//! the AWS SDK's HTTPS client already builds). Measured here, release build,
//! two rounds of 20 RSA-2048 keys each, interleaved: aws-lc-rs 125 and 136 ms
//! a key, the pure-Rust `rsa` 0.9 crate 362 and 207 ms (1.5x to 2.9x slower;
//! prime search makes single keys vary widely). `rsa` 0.9 also carries the
//! Marvin timing advisory (RUSTSEC-2023-0071); AWS-LC is constant-time.

use std::fmt;
use std::str::FromStr;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _};

/// A key type the station can generate for a device (and for its CA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// NIST P-256, ECDSA with SHA-256. The default.
    P256,
    /// NIST P-384, ECDSA with SHA-384.
    P384,
    /// RSA 2048 bits, e = 65537.
    Rsa2048,
    /// RSA 3072 bits, e = 65537.
    Rsa3072,
}

impl KeyType {
    /// Every key type, in the order reports list them.
    pub const ALL: [KeyType; 4] = [
        KeyType::P256,
        KeyType::P384,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
    ];

    /// The name used on the command line and in job files.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::P256 => "p256",
            KeyType::P384 => "p384",
            KeyType::Rsa2048 => "rsa2048",
            KeyType::Rsa3072 => "rsa3072",
        }
    }

    /// The algorithm of a key of this type.
    pub fn alg(self) -> KeyAlg {
        match self {
            KeyType::P256 => KeyAlg::P256,
            KeyType::P384 => KeyAlg::P384,
            KeyType::Rsa2048 => KeyAlg::Rsa { bits: 2048 },
            KeyType::Rsa3072 => KeyAlg::Rsa { bits: 3072 },
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyType {
    type Err = UnknownKeyType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s
            .trim()
            .to_ascii_lowercase()
            .replace(['-', '_'], "")
            .as_str()
        {
            "p256" | "ecp256" | "prime256v1" | "secp256r1" => Ok(KeyType::P256),
            "p384" | "ecp384" | "secp384r1" => Ok(KeyType::P384),
            "rsa2048" => Ok(KeyType::Rsa2048),
            "rsa3072" => Ok(KeyType::Rsa3072),
            _ => Err(UnknownKeyType(s.to_string())),
        }
    }
}

/// A key type name the station does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key type {0:?} (expected p256, p384, rsa2048 or rsa3072)")]
pub struct UnknownKeyType(pub String);

/// The algorithm of a public key the station will certify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyAlg {
    /// ECDSA on NIST P-256.
    P256,
    /// ECDSA on NIST P-384.
    P384,
    /// RSA with e = 65537 and a modulus of `bits` bits.
    Rsa {
        /// Modulus size.
        bits: u32,
    },
}

impl fmt::Display for KeyAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyAlg::P256 => f.write_str("P-256"),
            KeyAlg::P384 => f.write_str("P-384"),
            KeyAlg::Rsa { bits } => write!(f, "RSA-{bits}"),
        }
    }
}

/// A public key, as it goes into a certificate's SubjectPublicKeyInfo.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    alg: KeyAlg,
    /// The uncompressed EC point, or the DER `RSAPublicKey`.
    raw: Vec<u8>,
}

impl PublicKey {
    /// A public key from its algorithm and raw bytes (EC point or DER `RSAPublicKey`).
    pub fn new(alg: KeyAlg, raw: Vec<u8>) -> Self {
        PublicKey { alg, raw }
    }

    /// The key's algorithm.
    pub fn alg(&self) -> KeyAlg {
        self.alg
    }

    /// The raw key bytes: the uncompressed EC point, or the DER `RSAPublicKey`.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}, {} bytes)", self.alg, self.raw.len())
    }
}

impl rcgen::PublicKeyData for PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.alg {
            KeyAlg::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlg::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyAlg::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

/// A key pair the station made for a device: the PKCS#8 private key and its
/// public half. `Debug` never shows the private key.
pub struct DeviceKey {
    pkcs8: Vec<u8>,
    public: PublicKey,
}

impl DeviceKey {
    /// The private key, PKCS#8 DER.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The private key, PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub fn pkcs8_pem(&self) -> String {
        crate::pem_encode("PRIVATE KEY", &self.pkcs8)
    }

    /// The public key to certify.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Splits the key into its PKCS#8 DER and its public key.
    pub fn into_parts(self) -> (Vec<u8>, PublicKey) {
        (self.pkcs8, self.public)
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKey")
            .field("public", &self.public)
            .field("pkcs8", &"[redacted]")
            .finish()
    }
}

/// Key generation failed in the crypto library (no entropy, or an internal error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("generating a {key} key failed in the crypto library")]
pub struct KeyGenError {
    /// The key type asked for.
    pub key: KeyType,
}

/// Generates a fresh key pair of the given type.
pub fn generate(key: KeyType, rng: &SystemRandom) -> Result<DeviceKey, KeyGenError> {
    let err = || KeyGenError { key };
    match key {
        KeyType::P256 => ec(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            KeyAlg::P256,
            rng,
        ),
        KeyType::P384 => ec(
            &ring::signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            KeyAlg::P384,
            rng,
        ),
        KeyType::Rsa2048 | KeyType::Rsa3072 => rsa(key),
    }
    .ok_or_else(err)
}

fn ec(
    alg: &'static ring::signature::EcdsaSigningAlgorithm,
    key_alg: KeyAlg,
    rng: &SystemRandom,
) -> Option<DeviceKey> {
    let doc = EcdsaKeyPair::generate_pkcs8(alg, rng).ok()?;
    let pkcs8 = doc.as_ref().to_vec();
    let point = match ec_point_of_pkcs8(&pkcs8, key_alg) {
        Some(point) => point.to_vec(),
        // Not the layout ring writes today: take the slow, certain way.
        None => EcdsaKeyPair::from_pkcs8(alg, &pkcs8, rng)
            .ok()?
            .public_key()
            .as_ref()
            .to_vec(),
    };
    Some(DeviceKey {
        pkcs8,
        public: PublicKey::new(key_alg, point),
    })
}

/// ring's PKCS#8 for an EC key ends with the public key as a BIT STRING
/// (`03 len 00 04 x y`). Reading it there saves re-parsing the key, which
/// costs as much as generating it.
fn ec_point_of_pkcs8(pkcs8: &[u8], alg: KeyAlg) -> Option<&[u8]> {
    let point_len = match alg {
        KeyAlg::P256 => 65,
        KeyAlg::P384 => 97,
        KeyAlg::Rsa { .. } => return None,
    };
    let start = pkcs8.len().checked_sub(point_len)?;
    let header = pkcs8.get(start.checked_sub(3)?..start)?;
    let point = &pkcs8[start..];
    let bit_string_len = u8::try_from(point_len + 1).ok()?;
    (header == [0x03, bit_string_len, 0x00] && point[0] == 0x04).then_some(point)
}

fn rsa(key: KeyType) -> Option<DeviceKey> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair as _;
    let size = match key {
        KeyType::Rsa2048 => aws_lc_rs::rsa::KeySize::Rsa2048,
        KeyType::Rsa3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
        KeyType::P256 | KeyType::P384 => return None,
    };
    let pair = aws_lc_rs::rsa::KeyPair::generate(size).ok()?;
    let pkcs8 = pair.as_der().ok()?.as_ref().to_vec();
    let public = pair.public_key().as_ref().to_vec();
    Some(DeviceKey {
        pkcs8,
        public: PublicKey::new(key.alg(), public),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_point_read_from_pkcs8_matches_ring_parse() {
        let rng = SystemRandom::new();
        for (key, alg) in [
            (
                KeyType::P256,
                &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            ),
            (
                KeyType::P384,
                &ring::signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            ),
        ] {
            let k = generate(key, &rng).unwrap();
            let parsed = EcdsaKeyPair::from_pkcs8(alg, k.pkcs8_der(), &rng).unwrap();
            assert_eq!(parsed.public_key().as_ref(), k.public_key().raw());
        }
    }

    #[test]
    fn rsa_key_has_the_asked_size() {
        let k = generate(KeyType::Rsa2048, &SystemRandom::new()).unwrap();
        let pair = ring::signature::RsaKeyPair::from_pkcs8(k.pkcs8_der()).unwrap();
        assert_eq!(pair.public().modulus_len(), 256);
        assert_eq!(pair.public().as_ref(), k.public_key().raw());
    }

    #[test]
    fn key_type_names_round_trip() {
        for k in KeyType::ALL {
            assert_eq!(k.name().parse::<KeyType>().unwrap(), k);
        }
        assert!("dsa1024".parse::<KeyType>().is_err());
    }

    #[test]
    fn debug_never_shows_the_private_key() {
        let k = generate(KeyType::P256, &SystemRandom::new()).unwrap();
        let shown = format!("{k:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains(&format!("{:?}", &k.pkcs8_der()[..8])));
    }
}
