//! The simulated device's key: generated on the device (with its CSR), or
//! written by the station as PKCS#8; and the proof signature made with it.

use rcgen::{PublicKeyData, SigningKey};
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
};

use crate::device::KeyType;

/// The bytes a device signs for `Prove`: this prefix, then the nonce.
pub const PROOF_PREFIX: &[u8] = b"provline-proof-v1";

/// A key pair held by the device.
pub struct SimKey {
    pair: rcgen::KeyPair,
    csr: Option<Vec<u8>>,
}

impl std::fmt::Debug for SimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimKey")
            .field("spki_len", &self.spki().len())
            .field("csr", &self.csr.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

impl SimKey {
    /// Generates a key of `key_type` with ring and a CSR for it with rcgen;
    /// `None` for a type the device cannot generate (RSA) or on failure.
    pub fn generate(key_type: KeyType, serial: &str) -> Option<SimKey> {
        let alg = match key_type {
            KeyType::P256 => &ECDSA_P256_SHA256_ASN1_SIGNING,
            KeyType::P384 => &ECDSA_P384_SHA384_ASN1_SIGNING,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Unknown(_) => return None,
        };
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new()).ok()?;
        let pair = rcgen::KeyPair::try_from(pkcs8.as_ref()).ok()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, serial);
        let csr = params.serialize_request(&pair).ok()?.der().to_vec();
        Some(SimKey {
            pair,
            csr: Some(csr),
        })
    }

    /// A key the station wrote (PKCS#8 DER: P-256, P-384 or RSA).
    pub fn from_pkcs8(der: &[u8]) -> Option<SimKey> {
        let pair = rcgen::KeyPair::try_from(der).ok()?;
        Some(SimKey { pair, csr: None })
    }

    /// The CSR made with the key, if the device generated it.
    pub fn csr(&self) -> Option<&[u8]> {
        self.csr.as_deref()
    }

    /// The public key as a SubjectPublicKeyInfo, DER.
    pub fn spki(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    /// The raw public key: the EC point, or the DER `RSAPublicKey`.
    pub fn public_raw(&self) -> &[u8] {
        self.pair.public_key_raw()
    }

    /// Whether a DER certificate certifies this key.
    pub fn matches_certificate(&self, cert_der: &[u8]) -> bool {
        x509_parser::parse_x509_certificate(cert_der).is_ok_and(|(_, cert)| {
            cert.public_key().subject_public_key.data.as_ref() == self.public_raw()
        })
    }

    /// The signature for `Prove{nonce}`: ECDSA (DER) with SHA-256 or SHA-384
    /// by curve, or RSA PKCS#1 v1.5 with SHA-256.
    pub fn prove(&self, nonce: &[u8]) -> Option<Vec<u8>> {
        let mut message = PROOF_PREFIX.to_vec();
        message.extend_from_slice(nonce);
        self.pair.sign(&message).ok()
    }
}
