//! Every issued device passes every independent verifier: OpenSSL's strict
//! client check, pkilint's RFC 5280 linters, and Python `cryptography`
//! (profile, key match, manifest, and its client verifier), for every CA key
//! type and every device key type.

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::util::py::{device_facts, oid};
use crate::util::*;

/// Normalises a hex serial: lowercase, no separators, no leading zeros.
fn norm_hex(s: &str) -> String {
    let h: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .collect::<String>()
        .to_lowercase();
    let h = h.strip_prefix("0x").unwrap_or(&h).trim_start_matches('0');
    if h.is_empty() {
        "0".into()
    } else {
        h.into()
    }
}

fn decimal_to_hex(dec: &str) -> String {
    // Long division by 16 over the decimal digits: serials exceed u128.
    let mut digits: Vec<u32> = dec.bytes().map(|b| u32::from(b - b'0')).collect();
    let mut out = Vec::new();
    while !(digits.is_empty() || digits == [0]) {
        let mut rem = 0;
        let mut next = Vec::new();
        for d in digits {
            let cur = rem * 10 + d;
            let q = cur / 16;
            rem = cur % 16;
            if !(next.is_empty() && q == 0) {
                next.push(q);
            }
        }
        out.push(std::char::from_digit(rem, 16).unwrap());
        digits = next;
    }
    if out.is_empty() {
        return "0".into();
    }
    out.iter().rev().collect()
}

/// Checks the device profile, the manifest row and the files of every issued
/// device in `out`, with OpenSSL, pkilint and `cryptography`. Returns the
/// per-device facts.
#[track_caller]
pub fn check_issued_devices(ca_dir: &Path, out: &Path, expect_issued: usize) -> Vec<Value> {
    let ca_pem = ca_dir.join("ca.pem");
    let rows = read_manifest(out);
    let issued: Vec<&ManifestRow> = rows.iter().filter(|r| r.status == "issued").collect();
    assert_eq!(
        issued.len(),
        expect_issued,
        "issued rows in manifest: {rows:?}"
    );
    let amazon = fs::read(fixture("AmazonRootCA1.pem")).expect("read AmazonRootCA1.pem");

    let dirs: Vec<_> = issued.iter().map(|r| out.join(&r.thing_name)).collect();
    for (row, d) in issued.iter().zip(&dirs) {
        for f in ["cert.pem", "chain.pem", "AmazonRootCA1.pem"] {
            assert!(d.join(f).is_file(), "{}: {f} missing", row.serial);
        }
        assert!(
            fs::read(d.join("AmazonRootCA1.pem")).unwrap() == amazon,
            "{}: AmazonRootCA1.pem differs from fixtures/AmazonRootCA1.pem",
            row.serial
        );
        if d.join("private.key").exists() {
            assert_eq!(
                mode(&d.join("private.key")),
                0o600,
                "{}: private.key mode",
                row.serial
            );
        }
        assert_openssl_verifies(&ca_pem, &d.join("cert.pem"));
        assert_pkilint_cert_clean(&d.join("cert.pem"));
        assert_pkilint_chain_clean(&ca_pem, &d.join("cert.pem"));
    }
    let facts = device_facts(&ca_pem, &dirs);
    for (row, f) in issued.iter().zip(&facts) {
        let who = &row.serial;
        assert_eq!(f["version"], "v3", "{who}: version");
        assert_eq!(
            f["subject"][oid::CN],
            serde_json::json!([row.thing_name]),
            "{who}: CN"
        );
        assert_eq!(
            f["subject"][oid::SERIAL_NUMBER],
            serde_json::json!([row.serial]),
            "{who}: subject serialNumber"
        );
        let bits = f["serial_bits"].as_u64().unwrap();
        assert!(
            !f["serial"].as_str().unwrap().starts_with('-'),
            "{who}: negative serial"
        );
        assert!(
            (1..=159).contains(&bits),
            "{who}: serial of {bits} bits (max 20 octets)"
        );
        let (now, nb, na) = (
            f["now"].as_f64().unwrap(),
            f["not_before"].as_f64().unwrap(),
            f["not_after"].as_f64().unwrap(),
        );
        assert!(
            nb <= now - 60.0,
            "{who}: notBefore only {:.0} s in the past",
            now - nb
        );
        assert!(na > now, "{who}: already expired");
        let bc = &f["basic_constraints"];
        assert_eq!(
            bc["ca"], false,
            "{who}: basicConstraints must be CA:FALSE: {f}"
        );
        assert_eq!(f["key_usage"]["critical"], true, "{who}: keyUsage critical");
        assert_eq!(
            f["key_usage"]["set"],
            serde_json::json!(["digital_signature"]),
            "{who}: keyUsage"
        );
        assert_eq!(
            f["eku"],
            serde_json::json!([oid::CLIENT_AUTH]),
            "{who}: extKeyUsage"
        );
        assert!(f["ski"].is_string(), "{who}: subjectKeyIdentifier missing");
        assert!(f["ca_ski"].is_string(), "CA has no subjectKeyIdentifier");
        assert_eq!(f["aki"], f["ca_ski"], "{who}: AKI must equal the CA's SKI");
        assert_eq!(f["signed_by_ca"], "ok", "{who}: signature under the CA");
        assert_eq!(
            f["client_verifier"], "ok",
            "{who}: cryptography client verifier"
        );
        assert_eq!(
            f["chain"],
            serde_json::json!([f["sha256_der"], f["ca_sha256"]]),
            "{who}: chain.pem must be the cert then the CA cert"
        );
        assert_eq!(
            row.certificate_id,
            f["sha256_der"].as_str().unwrap(),
            "{who}: certificate_id"
        );
        assert_eq!(
            norm_hex(&row.cert_serial),
            decimal_to_hex(f["serial"].as_str().unwrap()),
            "{who}: manifest cert_serial {} is not the certificate's serial",
            row.cert_serial
        );
        let date = f["not_after_date"].as_str().unwrap();
        assert!(
            row.not_after.contains(date),
            "{who}: manifest not_after {:?} does not name the cert's notAfter date {date}",
            row.not_after
        );
        assert!(
            row.error.is_empty(),
            "{who}: issued row with an error: {}",
            row.error
        );
        if let Some(k) = f["private_key"].as_object() {
            assert_eq!(k["pkcs8"], true, "{who}: private.key must be PKCS#8");
            assert_eq!(
                k["spki"], f["spki"],
                "{who}: private.key does not match cert.pem"
            );
        }
    }
    facts
}

/// A batch with one device of every key type under a CA of `ca_key`.
fn every_device_key_type_under(ca_key: &str, ca_hash: &str) {
    let tmp = tempdir();
    let ca = init_ca(tmp.path(), "ca", ca_key);
    assert_pkilint_cert_clean(&ca.join("ca.pem"));
    let kinds = [
        ("p256", "ec-secp256r1"),
        ("p384", "ec-secp384r1"),
        ("rsa2048", "rsa-2048-e65537"),
        ("rsa3072", "rsa-3072-e65537"),
    ];
    let tag = random_hex(3);
    let rows: Vec<String> = kinds
        .iter()
        .map(|(k, _)| format!("SN-{tag}-{k},{k}"))
        .collect();
    let job = tmp.path().join("job.csv");
    write_job(&job, "serial,key", &rows);
    let out = tmp.path().join("out");
    batch(tmp.path(), &job, &ca, &out, &[]).expect_code(0);
    let facts = check_issued_devices(&ca, &out, kinds.len());
    for (k, kind) in kinds {
        let serial = format!("SN-{tag}-{k}");
        let f = facts
            .iter()
            .find(|f| f["subject"][oid::SERIAL_NUMBER][0] == serial.as_str())
            .unwrap_or_else(|| panic!("no certificate for {serial}"));
        assert_eq!(
            f["key_kind"], kind,
            "{serial}: device key type from the `key` column"
        );
        assert!(
            f["private_key"].is_object(),
            "{serial}: station-made key not written"
        );
        assert_eq!(
            f["sig_hash"], ca_hash,
            "{serial}: signature hash under a {ca_key} CA"
        );
    }
}

#[test]
fn every_verifier_accepts_devices_under_a_p256_ca() {
    every_device_key_type_under("p256", "sha256");
}

#[test]
fn every_verifier_accepts_devices_under_a_p384_ca() {
    every_device_key_type_under("p384", "sha384");
}

#[test]
fn every_verifier_accepts_devices_under_an_rsa2048_ca() {
    every_device_key_type_under("rsa2048", "sha256");
}

#[test]
fn every_verifier_accepts_devices_under_an_rsa3072_ca() {
    every_device_key_type_under("rsa3072", "sha256");
}

#[test]
fn every_verifier_accepts_the_sample_job_under_an_openssl_made_ca() {
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let out = tmp.path().join("out");
    let job = fixture("jobs/sample.csv");
    let pattern = ["--thing-name-pattern", "sensor_{serial}"];
    batch(tmp.path(), &job, &ca, &out, &pattern).expect_code(0);
    let data_rows = fs::read_to_string(&job).unwrap().lines().skip(1).count();
    check_issued_devices(&ca, &out, data_rows);
    let names: Vec<String> = read_manifest(&out)
        .into_iter()
        .map(|r| r.thing_name)
        .collect();
    assert!(
        names.contains(&"sensor-001".to_string()),
        "thing_name column used: {names:?}"
    );
    assert!(
        names.contains(&"sensor_SN-2026-000004".to_string()),
        "empty thing_name follows the pattern: {names:?}"
    );
}

#[test]
fn hex_helpers_agree() {
    assert_eq!(decimal_to_hex("255"), "ff");
    assert_eq!(decimal_to_hex("18446744073709551616"), "10000000000000000");
    assert_eq!(norm_hex("00:AB:cd"), "abcd");
}
