//! Certificate signing requests a device made itself.
//!
//! A CSR from outside is parsed, its self-signature verified (proof that the
//! device holds the key), and its key and signature algorithm checked
//! against the station's allowlist. Nothing else is taken from it: the
//! subject and every extension of the certificate come from the station's
//! profile, whatever the CSR asks for.

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey as ParsedKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::keygen::{KeyAlg, PublicKey};

const RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const CURVE_P256: &str = "1.2.840.10045.3.1.7";
const CURVE_P384: &str = "1.3.132.0.34";

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// The file held nothing.
    #[error("the CSR file is empty")]
    Empty,
    /// Neither a PEM block nor DER.
    #[error("not a PEM or DER certificate request: {0}")]
    NotPem(String),
    /// A PEM block of another kind.
    #[error("PEM block is {0:?}, expected CERTIFICATE REQUEST")]
    WrongPemTag(String),
    /// The DER inside does not parse as PKCS#10.
    #[error("malformed certificate request: {0}")]
    Malformed(String),
    /// The self-signature does not verify with the key in the CSR.
    #[error("CSR signature does not verify with its own public key")]
    BadSignature,
    /// The key is not on the allowlist.
    #[error("key not allowed: {0} (allowed: P-256, P-384, RSA 2048/3072/4096 with e=65537)")]
    KeyNotAllowed(String),
    /// The signature algorithm is not on the allowlist.
    #[error("signature algorithm not allowed: {0} (allowed: ECDSA or RSA PKCS#1 v1.5 with SHA-256/384/512)")]
    SignatureNotAllowed(String),
}

/// A CSR whose signature verified and whose key is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    /// The key to certify.
    pub public_key: PublicKey,
}

/// Parses a CSR (PEM or DER), verifies it and checks it against the allowlist.
pub fn check(input: &[u8]) -> Result<CheckedCsr, CsrError> {
    if input.iter().all(u8::is_ascii_whitespace) {
        return Err(CsrError::Empty);
    }
    let der;
    let der_ref: &[u8] = if input.first() == Some(&0x30) {
        input
    } else {
        let block = pem::parse(input).map_err(|e| CsrError::NotPem(e.to_string()))?;
        if !matches!(
            block.tag(),
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
        ) {
            return Err(CsrError::WrongPemTag(block.tag().to_string()));
        }
        der = block.into_contents();
        &der
    };
    check_der(der_ref)
}

/// [`check`] for DER input.
pub fn check_der(der: &[u8]) -> Result<CheckedCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    let public_key = allowed_key(&info.subject_pki)?;
    let verify_alg = verification_alg(
        public_key.alg(),
        &csr.signature_algorithm.algorithm.to_id_string(),
    )?;
    UnparsedPublicKey::new(verify_alg, public_key.raw())
        .verify(info.raw, &csr.signature_value.data)
        .map_err(|_| CsrError::BadSignature)?;
    Ok(CheckedCsr { public_key })
}

/// Checks a SubjectPublicKeyInfo against the allowlist.
pub fn allowed_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<PublicKey, CsrError> {
    let alg_oid = spki.algorithm.algorithm.to_id_string();
    let raw = spki.subject_public_key.data.to_vec();
    match alg_oid.as_str() {
        EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string())
                .ok_or_else(|| CsrError::KeyNotAllowed("EC key without a named curve".into()))?;
            let (alg, len) = match curve.as_str() {
                CURVE_P256 => (KeyAlg::P256, 65),
                CURVE_P384 => (KeyAlg::P384, 97),
                "1.2.840.10045.3.1.1" => {
                    return Err(CsrError::KeyNotAllowed("EC curve P-192".into()))
                }
                "1.3.132.0.35" => {
                    return Err(CsrError::KeyNotAllowed(
                        "EC curve P-521 (AWS takes it; this station does not)".into(),
                    ))
                }
                other => return Err(CsrError::KeyNotAllowed(format!("EC curve {other}"))),
            };
            if raw.len() != len || raw[0] != 0x04 {
                return Err(CsrError::KeyNotAllowed(format!(
                    "{alg} point is not uncompressed ({} bytes)",
                    raw.len()
                )));
            }
            Ok(PublicKey::new(alg, raw))
        }
        RSA_ENCRYPTION => {
            let Ok(ParsedKey::RSA(rsa)) = spki.parsed() else {
                return Err(CsrError::Malformed("RSA public key does not parse".into()));
            };
            let modulus = strip_zeros(rsa.modulus);
            let bits = match modulus.first() {
                Some(&top) => modulus.len() * 8 - top.leading_zeros() as usize,
                None => 0,
            };
            if strip_zeros(rsa.exponent) != [0x01, 0x00, 0x01] {
                return Err(CsrError::KeyNotAllowed(format!(
                    "RSA-{bits} with public exponent other than 65537"
                )));
            }
            match u32::try_from(bits) {
                Ok(bits @ (2048 | 3072 | 4096)) => Ok(PublicKey::new(KeyAlg::Rsa { bits }, raw)),
                _ => Err(CsrError::KeyNotAllowed(format!("RSA-{bits}"))),
            }
        }
        "1.3.101.112" => Err(CsrError::KeyNotAllowed("Ed25519".into())),
        "1.3.101.113" => Err(CsrError::KeyNotAllowed("Ed448".into())),
        "1.2.840.10040.4.1" => Err(CsrError::KeyNotAllowed("DSA".into())),
        "1.2.840.113549.1.1.10" => Err(CsrError::KeyNotAllowed("RSASSA-PSS-only key".into())),
        other => Err(CsrError::KeyNotAllowed(format!("key algorithm {other}"))),
    }
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

fn verification_alg(
    key: KeyAlg,
    sig_oid: &str,
) -> Result<&'static dyn VerificationAlgorithm, CsrError> {
    let refuse = |name: &str| Err(CsrError::SignatureNotAllowed(name.to_string()));
    match (key, sig_oid) {
        (_, "1.2.840.113549.1.1.5" | "1.2.840.10045.4.1" | "1.3.14.3.2.29") => refuse("SHA-1"),
        (_, "1.2.840.113549.1.1.4" | "1.2.840.113549.1.1.2") => refuse("MD5/MD2"),
        (KeyAlg::P256, "1.2.840.10045.4.3.2") => Ok(&signature::ECDSA_P256_SHA256_ASN1),
        (KeyAlg::P256, "1.2.840.10045.4.3.3") => Ok(&signature::ECDSA_P256_SHA384_ASN1),
        (KeyAlg::P384, "1.2.840.10045.4.3.2") => Ok(&signature::ECDSA_P384_SHA256_ASN1),
        (KeyAlg::P384, "1.2.840.10045.4.3.3") => Ok(&signature::ECDSA_P384_SHA384_ASN1),
        (KeyAlg::Rsa { .. }, "1.2.840.113549.1.1.11") => Ok(&signature::RSA_PKCS1_2048_8192_SHA256),
        (KeyAlg::Rsa { .. }, "1.2.840.113549.1.1.12") => Ok(&signature::RSA_PKCS1_2048_8192_SHA384),
        (KeyAlg::Rsa { .. }, "1.2.840.113549.1.1.13") => Ok(&signature::RSA_PKCS1_2048_8192_SHA512),
        (KeyAlg::P256 | KeyAlg::P384, "1.2.840.10045.4.3.4") => refuse("ECDSA with SHA-512"),
        (key, oid) => Err(CsrError::SignatureNotAllowed(format!(
            "{oid} with a {key} key"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygen::{self, KeyType};

    fn csr_for(key: KeyType) -> (Vec<u8>, PublicKey) {
        let k = keygen::generate(key, &ring::rand::SystemRandom::new()).unwrap();
        let pkcs8 = rustls_pki_types::PrivatePkcs8KeyDer::from(k.pkcs8_der().to_vec());
        let pair = rcgen::KeyPair::try_from(&pkcs8).unwrap();
        let csr = rcgen::CertificateParams::new(vec!["x.example".to_string()])
            .unwrap()
            .serialize_request(&pair)
            .unwrap();
        (csr.der().to_vec(), k.public_key().clone())
    }

    #[test]
    fn accepts_a_good_csr_and_returns_its_key() {
        for key in [KeyType::P256, KeyType::P384] {
            let (der, public) = csr_for(key);
            assert_eq!(check_der(&der).unwrap().public_key, public);
        }
    }

    #[test]
    fn refuses_a_flipped_signature_byte() {
        let (mut der, _) = csr_for(KeyType::P256);
        let last = der.len() - 3;
        der[last] ^= 0x01;
        assert_eq!(check_der(&der), Err(CsrError::BadSignature));
    }

    #[test]
    fn refuses_empty_and_garbage() {
        assert_eq!(check(b""), Err(CsrError::Empty));
        assert!(matches!(check(b"hello"), Err(CsrError::NotPem(_))));
        assert!(matches!(
            check(&[0x30, 0x03, 0x01, 0x01, 0x00]),
            Err(CsrError::Malformed(_))
        ));
    }
}
