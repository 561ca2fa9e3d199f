//! The local CA: its certificate and signing key, the checks a CA must pass
//! before it signs anything, and the certificates it issues.
//!
//! - [`signer`]: the signing key behind a trait (file key today, HSM later);
//! - [`profile`]: the device certificate profile and issuance;
//! - [`dn`]: subject names;
//! - [`serial`]: random serial numbers.

pub mod dn;
pub mod profile;
pub mod serial;
pub mod signer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyUsagePurpose};
use ring::rand::SystemRandom;
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::fsx::{self, Durability};
use crate::keygen::{self, KeyType};
use signer::{FileSigner, RcgenSigner, Signer};

pub use profile::{CertField, DeviceProfile, IssueError, IssuedCert};

/// File name of the CA certificate inside a CA folder.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA key inside a CA folder.
pub const CA_KEY_FILE: &str = "ca.key";
/// How far notBefore is set back for clock skew between station and cloud.
pub const BACKDATE: Duration = Duration::minutes(5);

/// Why a CA cannot be made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `ca init` would overwrite a CA.
    #[error("{path} already exists: refusing to overwrite a CA")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The key file cannot be used.
    #[error("{path}: {source}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: signer::KeyLoadError,
    },
    /// The certificate file does not hold a certificate.
    #[error("{path}: not a PEM certificate: {reason}")]
    Cert {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The certificate is not a CA certificate.
    #[error("{path}: cannot sign: {reason}")]
    NotCa {
        /// The certificate file.
        path: PathBuf,
        /// Which rule it breaks.
        reason: String,
    },
    /// Outside its validity period.
    #[error("{path}: CA certificate expired on {not_after} (now {now})")]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// Its notAfter.
        not_after: OffsetDateTime,
        /// The station's time.
        now: OffsetDateTime,
    },
    /// Before its validity period.
    #[error(
        "{path}: CA certificate is not valid before {not_before} (now {now}); check the clock"
    )]
    NotYetValid {
        /// The certificate file.
        path: PathBuf,
        /// Its notBefore.
        not_before: OffsetDateTime,
        /// The station's time.
        now: OffsetDateTime,
    },
    /// The key does not belong to the certificate.
    #[error("{key} does not match the public key in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The CA subject cannot be reproduced exactly as an issuer name.
    #[error("{path}: {reason}")]
    Unsupported {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Bad parameters for a new CA.
    #[error("invalid CA parameters: {0}")]
    Params(String),
}

/// A CA ready to sign: its certificate checked, its key matched to it.
pub struct LocalCa {
    cert_der: Vec<u8>,
    cert_pem: String,
    not_after: OffsetDateTime,
    signer: Arc<dyn Signer>,
    issuer: rcgen::Issuer<'static, RcgenSigner>,
    rng: SystemRandom,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("not_after", &self.not_after)
            .field("signer", &self.signer)
            .finish()
    }
}

/// What `ca init` makes.
#[derive(Debug, Clone)]
pub struct CaInit {
    /// Key type of the CA.
    pub key: KeyType,
    /// CA subject.
    pub subject: DistinguishedName,
    /// Validity in days.
    pub days: u32,
}

impl CaInit {
    /// A CA with the given key and common name, valid ten years.
    pub fn new(key: KeyType, common_name: &str) -> Self {
        let mut subject = DistinguishedName::new();
        subject.push(
            rcgen::DnType::CommonName,
            rcgen::DnValue::Utf8String(common_name.to_string()),
        );
        CaInit {
            key,
            subject,
            days: 3650,
        }
    }
}

impl LocalCa {
    /// Loads `DIR/ca.pem` and `DIR/ca.key` and checks they can sign at `now`.
    pub fn load(dir: &Path, now: OffsetDateTime) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| CaError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let signer = FileSigner::from_pem(&key_pem).map_err(|source| CaError::Key {
            path: key_path.clone(),
            source,
        })?;
        Self::from_parts(&cert_pem, Arc::new(signer), now).map_err(|e| match e {
            CaError::KeyMismatch { .. } => CaError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            },
            other => other.with_path(&cert_path),
        })
    }

    /// A CA from a PEM certificate and any signer, checked at `now`.
    pub fn from_parts(
        cert_pem: &[u8],
        signer: Arc<dyn Signer>,
        now: OffsetDateTime,
    ) -> Result<Self, CaError> {
        let here = PathBuf::from(CA_CERT_FILE);
        let cert_err = |reason: String| CaError::Cert {
            path: here.clone(),
            reason,
        };
        let block = pem::parse_many(cert_pem)
            .map_err(|e| cert_err(e.to_string()))?
            .into_iter()
            .find(|b| b.tag() == "CERTIFICATE")
            .ok_or_else(|| cert_err("no CERTIFICATE block".into()))?;
        let cert_der = block.into_contents();
        let (_, x509) =
            X509Certificate::from_der(&cert_der).map_err(|e| cert_err(e.to_string()))?;
        let not_ca = |reason: &str| CaError::NotCa {
            path: here.clone(),
            reason: reason.to_string(),
        };
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(Some(_)) => return Err(not_ca("basicConstraints is CA:FALSE")),
            Ok(None) => {
                return Err(not_ca(
                    "no basicConstraints extension (CA:TRUE is required)",
                ))
            }
            Err(e) => return Err(not_ca(&format!("basicConstraints does not parse: {e}"))),
        }
        if let Ok(Some(ku)) = x509.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(not_ca("keyUsage lacks keyCertSign"));
            }
        }
        let not_before = x509.validity().not_before.to_datetime();
        let not_after = x509.validity().not_after.to_datetime();
        if now > not_after {
            return Err(CaError::Expired {
                path: here,
                not_after,
                now,
            });
        }
        if now < not_before {
            return Err(CaError::NotYetValid {
                path: here,
                not_before,
                now,
            });
        }
        if x509.public_key().subject_public_key.data.as_ref() != signer.public_key().raw() {
            return Err(CaError::KeyMismatch {
                cert: here,
                key: PathBuf::from(CA_KEY_FILE),
            });
        }
        let issuer = rcgen::Issuer::from_ca_cert_der(
            &cert_der.as_slice().into(),
            RcgenSigner(signer.clone()),
        )
        .map_err(|e| CaError::Unsupported {
            path: here.clone(),
            reason: format!(
                "CA subject or extensions not supported ({e}); multi-valued RDNs are not"
            ),
        })?;
        let subject_raw = x509.subject().as_raw().to_vec();
        let ca = LocalCa {
            cert_pem: crate::pem_encode("CERTIFICATE", &cert_der),
            cert_der,
            not_after,
            signer,
            issuer,
            rng: SystemRandom::new(),
        };
        ca.self_test(&subject_raw, now)?;
        Ok(ca)
    }

    /// Issues one probe certificate and checks it chains: its issuer name is
    /// the CA subject byte for byte and its signature verifies.
    fn self_test(&self, subject_raw: &[u8], now: OffsetDateTime) -> Result<(), CaError> {
        let here = PathBuf::from(CA_CERT_FILE);
        let probe = self
            .issue_device(
                &DeviceProfile::default(),
                "provline-self-test",
                "SELFTEST",
                self.signer.public_key(),
                now,
            )
            .map_err(|e| CaError::Unsupported {
                path: here.clone(),
                reason: format!("self-test issuance failed: {e}"),
            })?;
        let (_, cert) =
            X509Certificate::from_der(&probe.der).map_err(|e| CaError::Unsupported {
                path: here.clone(),
                reason: format!("self-test certificate does not parse: {e}"),
            })?;
        if cert.issuer().as_raw() != subject_raw {
            return Err(CaError::Unsupported {
                path: here,
                reason: "the CA subject cannot be re-encoded byte for byte as the issuer name \
                         (repeated attribute or unusual string type)"
                    .into(),
            });
        }
        let verify: &dyn ring::signature::VerificationAlgorithm =
            match self.signer.public_key().alg() {
                keygen::KeyAlg::P256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
                keygen::KeyAlg::P384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
                keygen::KeyAlg::Rsa { .. } => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            };
        ring::signature::UnparsedPublicKey::new(verify, self.signer.public_key().raw())
            .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
            .map_err(|_| CaError::KeyMismatch {
                cert: here,
                key: PathBuf::from(CA_KEY_FILE),
            })
    }

    /// Makes a new self-signed CA in memory: its certificate (PEM) and key.
    pub fn generate(
        params: &CaInit,
        now: OffsetDateTime,
    ) -> Result<(String, keygen::DeviceKey), CaError> {
        if params.days == 0 {
            return Err(CaError::Params("validity must be at least one day".into()));
        }
        let rng = SystemRandom::new();
        let key = keygen::generate(params.key, &rng).map_err(|e| CaError::Params(e.to_string()))?;
        let signer = FileSigner::from_pkcs8(key.pkcs8_der()).map_err(CaError::Params)?;
        let mut cert = CertificateParams::default();
        cert.distinguished_name = params.subject.clone();
        cert.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        cert.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        cert.serial_number = Some(
            serial::random(&rng)
                .map_err(|_| CaError::Params("no randomness".into()))?
                .to_vec()
                .into(),
        );
        cert.not_before = now - BACKDATE;
        cert.not_after = now + Duration::days(i64::from(params.days));
        let cert = cert
            .self_signed(&RcgenSigner(Arc::new(signer)))
            .map_err(|e| CaError::Params(e.to_string()))?;
        Ok((cert.pem(), key))
    }

    /// A new CA held in memory only (benchmarks, tests).
    pub fn ephemeral(params: &CaInit, now: OffsetDateTime) -> Result<Self, CaError> {
        let (cert_pem, key) = Self::generate(params, now)?;
        let signer = FileSigner::from_pkcs8(key.pkcs8_der()).map_err(CaError::Params)?;
        Self::from_parts(cert_pem.as_bytes(), Arc::new(signer), now)
    }

    /// Creates a new CA in `dir`: `ca.key` (PKCS#8, mode 0600) and `ca.pem`.
    /// Refuses if either exists.
    pub fn init(dir: &Path, params: &CaInit, now: OffsetDateTime) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        for path in [&key_path, &cert_path] {
            if path.exists() {
                return Err(CaError::Exists { path: path.clone() });
            }
        }
        let (cert_pem, key) = Self::generate(params, now)?;
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let write = |path: &Path, bytes: &[u8], mode| {
            fsx::write_new(path, bytes, mode, Durability::Sync).map_err(|source| {
                match source.kind() {
                    std::io::ErrorKind::AlreadyExists => CaError::Exists {
                        path: path.to_path_buf(),
                    },
                    _ => CaError::Io {
                        path: path.to_path_buf(),
                        source,
                    },
                }
            })
        };
        write(&key_path, key.pkcs8_pem().as_bytes(), fsx::SECRET)?;
        write(&cert_path, cert_pem.as_bytes(), fsx::PUBLIC)?;
        Self::load(dir, now)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate's notAfter: no certificate it issues outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The signer behind this CA.
    pub fn signer(&self) -> &Arc<dyn Signer> {
        &self.signer
    }

    /// The JITP verification certificate: subject CN = the account's
    /// registration code, signed by this CA, for a throwaway P-256 key.
    pub fn verification_cert(
        &self,
        registration_code: &str,
        now: OffsetDateTime,
    ) -> Result<IssuedCert, IssueError> {
        let code = registration_code.trim();
        // AWS's codes are 64 hex digits; local stand-ins answer a UUID.
        if code.is_empty()
            || code.len() > 64
            || !code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(IssueError::Subject(dn::DnError::BadValue {
                attr: "CN".into(),
                reason: format!(
                    "{code:?} is not a registration code (1-64 letters, digits and dashes)"
                ),
            }));
        }
        let key = keygen::generate(KeyType::P256, &self.rng)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        let mut subject = DistinguishedName::new();
        subject.push(
            rcgen::DnType::CommonName,
            rcgen::DnValue::Utf8String(code.to_string()),
        );
        let cert_serial = self.new_serial()?;
        let mut params =
            self.leaf_params(subject, &cert_serial, Duration::days(365), BACKDATE, now);
        params.extended_key_usages.clear();
        self.sign_leaf(params, key.public_key())
    }
}

impl CaError {
    fn with_path(self, path: &Path) -> Self {
        let path = path.to_path_buf();
        match self {
            CaError::Cert { reason, .. } => CaError::Cert { path, reason },
            CaError::NotCa { reason, .. } => CaError::NotCa { path, reason },
            CaError::Expired { not_after, now, .. } => CaError::Expired {
                path,
                not_after,
                now,
            },
            CaError::NotYetValid {
                not_before, now, ..
            } => CaError::NotYetValid {
                path,
                not_before,
                now,
            },
            CaError::Unsupported { reason, .. } => CaError::Unsupported { path, reason },
            other => other,
        }
    }
}
