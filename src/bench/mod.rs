//! Throughput of the signing path, measured against the raw ring
//! operations the same work needs, in the same run on the same threads.
//!
//! - `station-key`: the station makes the key: keygen, certificate, PEM of
//!   cert and key, certificate id. Raw ceiling: ring key generation + one
//!   CA signature.
//! - `outside-csr`: the device sent a CSR: parse, verify, allowlist,
//!   certificate, PEM, certificate id. Raw ceiling: one ring signature
//!   verification + one CA signature.

mod batch;

use std::sync::Barrier;
use std::time::Instant;

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair, UnparsedPublicKey, VerificationAlgorithm};
use serde::Serialize;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::ca::{CaInit, DeviceProfile, LocalCa};
use crate::clock::{Clock, SystemClock};
use crate::csr;
use crate::keygen::{self, KeyAlg, KeyType};

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchConfig {
    /// Certificates per measurement.
    pub count: usize,
    /// Device key type.
    pub key: KeyType,
    /// The CA's key type.
    pub ca_key: KeyType,
    /// Threads working at once.
    pub threads: usize,
    /// Measurements of each mode; the median is reported.
    pub rounds: usize,
}

/// Runs [`run`], then the `batch` mode in a scratch folder under `dir`.
pub fn run_with_batch(
    config: &BenchConfig,
    dir: &std::path::Path,
) -> Result<Vec<BenchResult>, BenchError> {
    let mut results = run(config)?;
    let crypto = results
        .iter()
        .find(|r| r.mode == "station-key")
        .map(|r| r.certs_per_sec)
        .unwrap_or(1.0);
    let scratch = tempfile_in(dir)?;
    let clock = SystemClock;
    let ca = LocalCa::ephemeral(
        &CaInit::new(config.ca_key, "provline bench CA"),
        clock.now(),
    )
    .map_err(|e| BenchError(e.to_string()))?;
    let result = batch::run(config, &ca, crypto, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    results.push(result?);
    Ok(results)
}

fn tempfile_in(dir: &std::path::Path) -> Result<std::path::PathBuf, BenchError> {
    let path = dir.join(format!(".provline-bench-{}", std::process::id()));
    std::fs::create_dir_all(&path).map_err(|e| BenchError(format!("{}: {e}", path.display())))?;
    Ok(path)
}

/// One mode's figures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// `station-key` or `outside-csr`.
    pub mode: &'static str,
    /// Device key type.
    pub key: String,
    /// CA key type.
    pub ca_key: String,
    /// Threads.
    pub threads: usize,
    /// Certificates per measurement.
    pub count: usize,
    /// Median certificates per second through provline.
    pub certs_per_sec: f64,
    /// Median rate of the bare ring operations the same work needs.
    pub raw_ceiling_per_sec: f64,
    /// `certs_per_sec / raw_ceiling_per_sec`.
    pub efficiency: f64,
    /// `batch` mode: F, bare file writes per second for the same output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_per_sec: Option<f64>,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[error("benchmark setup failed: {0}")]
pub struct BenchError(String);

/// The CA key as ring sees it, for the raw ceiling.
enum RawSigner {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl RawSigner {
    fn sign(&self, rng: &SystemRandom, msg: &[u8]) -> usize {
        match self {
            RawSigner::Ecdsa(k) => k.sign(rng, msg).map(|s| s.as_ref().len()).unwrap_or(0),
            RawSigner::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, rng, msg, &mut sig)
                    .map_or(0, |()| sig.len())
            }
        }
    }
}

struct RawCsr {
    tbs: Vec<u8>,
    sig: Vec<u8>,
    key: Vec<u8>,
    alg: &'static dyn VerificationAlgorithm,
}

/// Runs both modes and returns their figures.
pub fn run(config: &BenchConfig) -> Result<Vec<BenchResult>, BenchError> {
    let err = |e: &dyn std::fmt::Display| BenchError(e.to_string());
    let clock = SystemClock;
    let rng = SystemRandom::new();
    let (ca_pem, ca_key) = LocalCa::generate(
        &CaInit::new(config.ca_key, "provline bench CA"),
        clock.now(),
    )
    .map_err(|e| err(&e))?;
    let signer =
        crate::ca::signer::FileSigner::from_pkcs8(ca_key.pkcs8_der()).map_err(|e| err(&e))?;
    let ca = LocalCa::from_parts(ca_pem.as_bytes(), std::sync::Arc::new(signer), clock.now())
        .map_err(|e| err(&e))?;
    let raw_signer = match config.ca_key.alg() {
        KeyAlg::P256 => RawSigner::Ecdsa(
            EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                ca_key.pkcs8_der(),
                &rng,
            )
            .map_err(|e| err(&e))?,
        ),
        KeyAlg::P384 => RawSigner::Ecdsa(
            EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                ca_key.pkcs8_der(),
                &rng,
            )
            .map_err(|e| err(&e))?,
        ),
        KeyAlg::Rsa { .. } => {
            RawSigner::Rsa(RsaKeyPair::from_pkcs8(ca_key.pkcs8_der()).map_err(|e| err(&e))?)
        }
    };
    let profile = DeviceProfile::default();
    // A real TBSCertificate, so the raw signature hashes as much as the real one.
    let sample = keygen::generate(config.key, &rng).map_err(|e| err(&e))?;
    let sample_cert = ca
        .issue_device(
            &profile,
            "sensor_bench",
            "BENCH-1",
            sample.public_key(),
            clock.now(),
        )
        .map_err(|e| err(&e))?;
    let tbs_len = sample_cert.der.len().saturating_sub(80);
    let tbs = &sample_cert.der[..tbs_len];

    let csr_count = config.count.clamp(1, 64);
    let mut csr_pems = Vec::with_capacity(csr_count);
    let mut raw_csrs = Vec::with_capacity(csr_count);
    for _ in 0..csr_count {
        let key = keygen::generate(config.key, &rng).map_err(|e| err(&e))?;
        let pair = rcgen::KeyPair::from_pem(&key.pkcs8_pem()).map_err(|e| err(&e))?;
        let request = rcgen::CertificateParams::default()
            .serialize_request(&pair)
            .map_err(|e| err(&e))?;
        let der = request.der().to_vec();
        let (_, parsed) = X509CertificationRequest::from_der(&der).map_err(|e| err(&e))?;
        raw_csrs.push(RawCsr {
            tbs: parsed.certification_request_info.raw.to_vec(),
            sig: parsed.signature_value.data.to_vec(),
            key: key.public_key().raw().to_vec(),
            alg: match config.key.alg() {
                KeyAlg::P256 => &signature::ECDSA_P256_SHA256_ASN1,
                KeyAlg::P384 => &signature::ECDSA_P384_SHA384_ASN1,
                KeyAlg::Rsa { .. } => &signature::RSA_PKCS1_2048_8192_SHA256,
            },
        });
        csr_pems.push(request.pem().map_err(|e| err(&e))?.into_bytes());
    }

    let station = |i: usize, rng: &SystemRandom| -> usize {
        let Ok(key) = keygen::generate(config.key, rng) else {
            return 0;
        };
        let Ok(cert) = ca.issue_device(
            &profile,
            "sensor_bench",
            &format!("SN-{i}"),
            key.public_key(),
            clock.now(),
        ) else {
            return 0;
        };
        cert.pem().len() + key.pkcs8_pem().len() + cert.certificate_id().len()
    };
    let station_raw = |_: usize, rng: &SystemRandom| -> usize {
        let doc_len = match config.key {
            KeyType::P256 => {
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, rng)
                    .map_or(0, |d| d.as_ref().len())
            }
            KeyType::P384 => {
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, rng)
                    .map_or(0, |d| d.as_ref().len())
            }
            // ring has no RSA key generation: the same library the station uses stands in.
            KeyType::Rsa2048 | KeyType::Rsa3072 => {
                keygen::generate(config.key, rng).map_or(0, |k| k.pkcs8_der().len())
            }
        };
        doc_len + raw_signer.sign(rng, tbs)
    };
    let outside = |i: usize, _: &SystemRandom| -> usize {
        let Ok(checked) = csr::check(&csr_pems[i % csr_pems.len()]) else {
            return 0;
        };
        let Ok(cert) = ca.issue_device(
            &profile,
            "sensor_bench",
            &format!("SN-{i}"),
            &checked.public_key,
            clock.now(),
        ) else {
            return 0;
        };
        cert.pem().len() + cert.certificate_id().len()
    };
    let outside_raw = |i: usize, rng: &SystemRandom| -> usize {
        let c = &raw_csrs[i % raw_csrs.len()];
        let ok = UnparsedPublicKey::new(c.alg, &c.key)
            .verify(&c.tbs, &c.sig)
            .is_ok();
        usize::from(ok) + raw_signer.sign(rng, tbs)
    };

    let mut results = Vec::new();
    for (mode, work, raw) in [
        (
            "station-key",
            &station as &(dyn Fn(usize, &SystemRandom) -> usize + Sync),
            &station_raw as &(dyn Fn(usize, &SystemRandom) -> usize + Sync),
        ),
        ("outside-csr", &outside, &outside_raw),
    ] {
        let mut ours = Vec::new();
        let mut ceiling = Vec::new();
        for _ in 0..config.rounds.max(1) {
            ceiling.push(rate(config, raw)?);
            ours.push(rate(config, work)?);
        }
        let certs_per_sec = median(&mut ours);
        let raw_ceiling_per_sec = median(&mut ceiling);
        results.push(BenchResult {
            mode,
            key: config.key.to_string(),
            ca_key: config.ca_key.to_string(),
            threads: config.threads,
            count: config.count,
            certs_per_sec,
            raw_ceiling_per_sec,
            efficiency: certs_per_sec / raw_ceiling_per_sec,
            files_per_sec: None,
        });
    }
    Ok(results)
}

/// Items per second of `work` over `config.count` items on `config.threads` threads.
fn rate(
    config: &BenchConfig,
    work: &(dyn Fn(usize, &SystemRandom) -> usize + Sync),
) -> Result<f64, BenchError> {
    let threads = config.threads.max(1);
    let count = config.count.max(threads);
    let barrier = Barrier::new(threads + 1);
    let mut produced = 0usize;
    let elapsed = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let rng = SystemRandom::new();
                    barrier.wait();
                    (t..count)
                        .step_by(threads)
                        .map(|i| work(i, &rng))
                        .filter(|&n| n > 0)
                        .count()
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for h in handles {
            produced += h.join().unwrap_or(0);
        }
        start.elapsed()
    });
    if produced != count {
        return Err(BenchError(format!(
            "{} of {count} items failed",
            count - produced
        )));
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_both_modes_with_positive_rates() {
        let config = BenchConfig {
            count: 20,
            key: KeyType::P256,
            ca_key: KeyType::P256,
            threads: 2,
            rounds: 1,
        };
        let results = run(&config).unwrap();
        let modes: Vec<_> = results.iter().map(|r| r.mode).collect();
        assert_eq!(modes, ["station-key", "outside-csr"]);
        for r in results {
            assert!(
                r.certs_per_sec > 0.0 && r.raw_ceiling_per_sec > 0.0,
                "{r:?}"
            );
        }
    }
}
