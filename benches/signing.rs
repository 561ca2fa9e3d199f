//! The signing path, stage by stage, for each key type: key generation,
//! CSR verification, certificate signing, and the whole issuance.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ring::rand::SystemRandom;

use provline::ca::signer::FileSigner;
use provline::ca::{CaInit, DeviceProfile, LocalCa};
use provline::csr;
use provline::keygen::{self, KeyType};

fn ca_for(key: KeyType) -> LocalCa {
    let now = time::OffsetDateTime::now_utc();
    let (pem, ca_key) = LocalCa::generate(&CaInit::new(key, "bench CA"), now).unwrap();
    let signer = FileSigner::from_pkcs8(ca_key.pkcs8_der()).unwrap();
    LocalCa::from_parts(pem.as_bytes(), Arc::new(signer), now).unwrap()
}

fn csr_pem(key: KeyType, rng: &SystemRandom) -> Vec<u8> {
    let k = keygen::generate(key, rng).unwrap();
    let pair = rcgen::KeyPair::from_pem(&k.pkcs8_pem()).unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&pair)
        .unwrap()
        .pem()
        .unwrap()
        .into_bytes()
}

fn signing(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let profile = DeviceProfile::default();
    let now = time::OffsetDateTime::now_utc();
    for key in KeyType::ALL {
        let rsa = matches!(key, KeyType::Rsa2048 | KeyType::Rsa3072);
        let mut group = c.benchmark_group(format!("signing/{key}"));
        if rsa {
            group.sample_size(10);
        }
        // The CA of the same family as the device key: P-256 CA for P-256 devices, and so on.
        let ca = ca_for(key);
        let device = keygen::generate(key, &rng).unwrap();
        let csr = csr_pem(key, &rng);

        group.bench_function(BenchmarkId::new("keygen", key), |b| {
            b.iter(|| keygen::generate(key, &rng).unwrap())
        });
        group.bench_function(BenchmarkId::new("csr_verify", key), |b| {
            b.iter(|| csr::check(&csr).unwrap())
        });
        group.bench_function(BenchmarkId::new("cert_sign", key), |b| {
            b.iter(|| {
                ca.issue_device(&profile, "sensor_1", "SN-1", device.public_key(), now)
                    .unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("issue_station_key", key), |b| {
            b.iter(|| {
                let k = keygen::generate(key, &rng).unwrap();
                let cert = ca
                    .issue_device(&profile, "sensor_1", "SN-1", k.public_key(), now)
                    .unwrap();
                (cert.pem(), k.pkcs8_pem(), cert.certificate_id())
            })
        });
        group.bench_function(BenchmarkId::new("issue_outside_csr", key), |b| {
            b.iter(|| {
                let checked = csr::check(&csr).unwrap();
                let cert = ca
                    .issue_device(&profile, "sensor_1", "SN-1", &checked.public_key, now)
                    .unwrap();
                (cert.pem(), cert.certificate_id())
            })
        });
        group.finish();
    }
}

criterion_group!(benches, signing);
criterion_main!(benches);
