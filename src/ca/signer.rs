//! The CA's signing key, behind the [`Signer`] trait: a key in a file today,
//! a PKCS#11 token on a production line tomorrow.

use std::fmt;
use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};

use crate::keygen::{KeyAlg, PublicKey};

/// Something that signs certificates for the CA. Implementations must be
/// usable from every worker thread at once.
pub trait Signer: Send + Sync + fmt::Debug {
    /// The CA's public key, which must be the one in the CA certificate.
    fn public_key(&self) -> &PublicKey;

    /// Signs `message` (a TBSCertificate) and returns the signature as it
    /// goes into the certificate (DER `ECDSA-Sig-Value`, or the RSA block).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError>;
}

/// A signature could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the CA signer failed: {0}")]
pub struct SignError(pub String);

/// Why a CA key file could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyLoadError {
    /// Not PEM, or no key block in it.
    #[error("not a PEM private key: {0}")]
    NotPem(String),
    /// A passphrase-protected key.
    #[error("the key is encrypted; decrypt it first (openssl pkey -in KEY -out KEY.plain)")]
    Encrypted,
    /// A key of a kind or size the station cannot sign with.
    #[error("unsupported or malformed {kind} key: {reason}")]
    Unsupported {
        /// The PEM label.
        kind: String,
        /// What the crypto library said.
        reason: String,
    },
}

/// A CA key held in memory, loaded from a PEM file.
pub struct FileSigner {
    key: FileKey,
    public: PublicKey,
    rng: SystemRandom,
}

enum FileKey {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl fmt::Debug for FileSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSigner")
            .field("public", &self.public)
            .field("private", &"[redacted]")
            .finish()
    }
}

impl FileSigner {
    /// Loads a CA key from PEM: PKCS#8 (`PRIVATE KEY`: EC P-256/P-384 or
    /// RSA), PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`), as
    /// openssl writes them.
    pub fn from_pem(pem_text: &[u8]) -> Result<Self, KeyLoadError> {
        let blocks = pem::parse_many(pem_text).map_err(|e| KeyLoadError::NotPem(e.to_string()))?;
        let block = blocks
            .iter()
            .find(|b| b.tag().ends_with("PRIVATE KEY"))
            .ok_or_else(|| KeyLoadError::NotPem("no PRIVATE KEY block".into()))?;
        let der = block.contents();
        let unsupported = |reason: String| KeyLoadError::Unsupported {
            kind: block.tag().to_string(),
            reason,
        };
        match block.tag() {
            "PRIVATE KEY" => Self::from_pkcs8(der).map_err(unsupported),
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(der)
                .map(Self::rsa)
                .map_err(|e| unsupported(e.to_string())),
            "EC PRIVATE KEY" => sec1_to_pkcs8(der)
                .and_then(|pkcs8| Self::from_pkcs8(&pkcs8))
                .map_err(unsupported),
            "ENCRYPTED PRIVATE KEY" => Err(KeyLoadError::Encrypted),
            other => Err(KeyLoadError::NotPem(format!("unexpected block {other:?}"))),
        }
    }

    /// Loads a PKCS#8 DER key: EC P-256, EC P-384 or RSA.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let rng = SystemRandom::new();
        for (alg, key_alg) in [
            (&signature::ECDSA_P256_SHA256_ASN1_SIGNING, KeyAlg::P256),
            (&signature::ECDSA_P384_SHA384_ASN1_SIGNING, KeyAlg::P384),
        ] {
            if let Ok(pair) = EcdsaKeyPair::from_pkcs8(alg, der, &rng) {
                let public = PublicKey::new(key_alg, pair.public_key().as_ref().to_vec());
                return Ok(FileSigner {
                    key: FileKey::Ecdsa(pair),
                    public,
                    rng,
                });
            }
        }
        RsaKeyPair::from_pkcs8(der)
            .map(Self::rsa)
            .map_err(|e| format!("neither P-256, P-384 nor RSA ({e})"))
    }

    fn rsa(pair: RsaKeyPair) -> Self {
        let bits = u32::try_from(pair.public().modulus_len() * 8).unwrap_or(u32::MAX);
        let public = PublicKey::new(KeyAlg::Rsa { bits }, pair.public().as_ref().to_vec());
        FileSigner {
            key: FileKey::Rsa(pair),
            public,
            rng: SystemRandom::new(),
        }
    }
}

/// Re-wraps a SEC1 `ECPrivateKey` (as `openssl ecparam -genkey` writes it)
/// into PKCS#8 through aws-lc-rs, which reads SEC1; ring reads only PKCS#8.
fn sec1_to_pkcs8(der: &[u8]) -> Result<Vec<u8>, String> {
    use aws_lc_rs::signature::{
        EcdsaKeyPair as LcPair, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
    };
    for alg in [
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &ECDSA_P384_SHA384_ASN1_SIGNING,
    ] {
        if let Ok(pair) = LcPair::from_private_key_der(alg, der) {
            return pair
                .to_pkcs8v1()
                .map(|doc| doc.as_ref().to_vec())
                .map_err(|_| "re-encoding as PKCS#8 failed".to_string());
        }
    }
    Err("not a P-256 or P-384 SEC1 key".into())
}

impl Signer for FileSigner {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match &self.key {
            FileKey::Ecdsa(pair) => pair
                .sign(&self.rng, message)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| SignError("ECDSA signing failed".into())),
            FileKey::Rsa(pair) => {
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &self.rng, message, &mut sig)
                    .map_err(|_| SignError("RSA signing failed".into()))?;
                Ok(sig)
            }
        }
    }
}

/// Lets rcgen sign through any [`Signer`].
#[derive(Clone, Debug)]
pub(crate) struct RcgenSigner(pub(crate) Arc<dyn Signer>);

impl rcgen::PublicKeyData for RcgenSigner {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key().raw()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        rcgen::PublicKeyData::algorithm(self.0.public_key())
    }
}

impl rcgen::SigningKey for RcgenSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg).map_err(|_| rcgen::Error::RingUnspecified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygen::{self, KeyType};

    #[test]
    fn signs_with_each_generated_key_type() {
        let rng = SystemRandom::new();
        for key in [KeyType::P256, KeyType::P384, KeyType::Rsa2048] {
            let k = keygen::generate(key, &rng).unwrap();
            let pem = k.pkcs8_pem();
            let signer = FileSigner::from_pem(pem.as_bytes()).unwrap();
            assert_eq!(signer.public_key(), k.public_key(), "{key}");
            let sig = signer.sign(b"tbs").unwrap();
            let verify: &dyn signature::VerificationAlgorithm = match key {
                KeyType::P256 => &signature::ECDSA_P256_SHA256_ASN1,
                KeyType::P384 => &signature::ECDSA_P384_SHA384_ASN1,
                _ => &signature::RSA_PKCS1_2048_8192_SHA256,
            };
            signature::UnparsedPublicKey::new(verify, k.public_key().raw())
                .verify(b"tbs", &sig)
                .unwrap();
        }
    }

    #[test]
    fn refuses_encrypted_and_non_keys() {
        let enc =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert_eq!(
            FileSigner::from_pem(enc.as_bytes()).unwrap_err(),
            KeyLoadError::Encrypted
        );
        assert!(matches!(
            FileSigner::from_pem(b"junk"),
            Err(KeyLoadError::NotPem(_))
        ));
    }
}
