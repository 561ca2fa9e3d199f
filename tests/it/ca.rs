//! `provline ca init` and `ca verification-cert`, and loading CAs made by
//! openssl.

use std::fs;
use std::path::Path;

use crate::util::py::{cert_facts, key_facts, oid};
use crate::util::*;

const KEY_TYPES: [(&str, &str); 4] = [
    ("p256", "ec-secp256r1"),
    ("p384", "ec-secp384r1"),
    ("rsa2048", "rsa-2048-e65537"),
    ("rsa3072", "rsa-3072-e65537"),
];

/// The CA certificate profile every station CA must have.
#[track_caller]
fn assert_ca_profile(ca_pem: &Path) {
    let f = cert_facts(ca_pem);
    assert_eq!(f["version"], "v3", "CA version: {f}");
    let bc = &f["basic_constraints"];
    assert_eq!(bc["ca"], true, "CA basicConstraints CA:TRUE: {f}");
    assert_eq!(bc["critical"], true, "CA basicConstraints critical: {f}");
    let ku = &f["key_usage"];
    assert_eq!(ku["critical"], true, "CA keyUsage critical: {f}");
    let set: Vec<&str> = ku["set"]
        .as_array()
        .expect("CA keyUsage present")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        set.contains(&"key_cert_sign") && set.contains(&"crl_sign"),
        "CA keyUsage keyCertSign+cRLSign: {set:?}"
    );
    assert!(f["ski"].is_string(), "CA subjectKeyIdentifier: {f}");
    assert_eq!(f["subject"], f["issuer"], "CA is self-issued: {f}");
}

#[test]
fn ca_init_makes_a_clean_ca_for_every_key_type() {
    let tmp = tempdir();
    for (key, kind) in KEY_TYPES {
        let dir = init_ca(tmp.path(), &format!("ca-{key}"), key);
        let (pem, k) = (dir.join("ca.pem"), dir.join("ca.key"));
        assert_eq!(mode(&k), 0o600, "{key}: ca.key mode");
        let kf = key_facts(&k);
        assert_eq!(kf["pkcs8"], true, "{key}: ca.key must be PKCS#8 PEM");
        assert_eq!(kf["key_kind"], kind, "{key}: CA key type");
        let cf = cert_facts(&pem);
        assert_eq!(
            cf["spki"], kf["spki"],
            "{key}: ca.key does not match ca.pem"
        );
        assert_ca_profile(&pem);
        let r = openssl(
            tmp.path(),
            &[
                "verify".as_ref(),
                "-x509_strict".as_ref(),
                "-CAfile".as_ref(),
                pem.as_os_str(),
                pem.as_os_str(),
            ],
        );
        assert!(r.code == 0 && r.stdout.contains(": OK"), "{key}: {r}");
        assert_pkilint_cert_clean(&pem);
    }
}

#[test]
fn ca_init_honours_subject_in_both_dn_spellings_and_days() {
    let tmp = tempdir();
    for (i, dn) in ["/CN=My IoT CA/O=Acme", "CN=My IoT CA,O=Acme"]
        .iter()
        .enumerate()
    {
        let dir = tmp.path().join(format!("ca{i}"));
        let dir_s = dir.to_str().unwrap();
        provline(
            tmp.path(),
            &[
                "ca",
                "init",
                "--dir",
                dir_s,
                "--subject",
                dn,
                "--days",
                "30",
            ],
        )
        .expect_code(0);
        let f = cert_facts(&dir.join("ca.pem"));
        assert_eq!(
            f["subject"][oid::CN],
            serde_json::json!(["My IoT CA"]),
            "{dn}: {f}"
        );
        assert_eq!(
            f["subject"][oid::O],
            serde_json::json!(["Acme"]),
            "{dn}: {f}"
        );
        let days = (f["not_after"].as_f64().unwrap() - f["now"].as_f64().unwrap()) / 86400.0;
        assert!(
            (29.0..=31.0).contains(&days),
            "{dn}: --days 30 gave {days:.2} days"
        );
    }
}

#[test]
fn ca_init_refuses_to_overwrite_an_existing_ca() {
    let tmp = tempdir();
    let dir = init_ca(tmp.path(), "ca", "p256");
    let before = (
        fs::read(dir.join("ca.pem")).unwrap(),
        fs::read(dir.join("ca.key")).unwrap(),
    );
    let dir_s = dir.to_str().unwrap();
    let r = provline(tmp.path(), &["ca", "init", "--dir", dir_s]);
    r.expect_code(2);
    let after = (
        fs::read(dir.join("ca.pem")).unwrap(),
        fs::read(dir.join("ca.key")).unwrap(),
    );
    assert!(before == after, "ca init changed an existing CA\n{r}");

    // Either file alone is enough to refuse.
    for keep in ["ca.pem", "ca.key"] {
        let d = tmp.path().join(format!("only-{keep}"));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(keep), b"placeholder").unwrap();
        let r = provline(tmp.path(), &["ca", "init", "--dir", d.to_str().unwrap()]);
        r.expect_code(2);
        assert_eq!(
            fs::read(d.join(keep)).unwrap(),
            b"placeholder",
            "{keep} overwritten\n{r}"
        );
    }
}

#[test]
fn openssl_made_ca_fixtures_load_and_sign_devices() {
    // (fixture, signature hash the device certs must carry)
    let cases = [
        ("guide-rsa", "sha256"),
        ("rsa-pkcs1", "sha256"),
        ("ec-p256-pkcs8", "sha256"),
        ("ec-p256-sec1", "sha256"),
        ("ec-p384-sec1", "sha384"),
    ];
    let tmp = tempdir();
    let job = tmp.path().join("job.csv");
    write_job(&job, "serial", &["SN-CA-1".into(), "SN-CA-2".into()]);
    for (name, hash) in cases {
        let ca = copy_ca(name, tmp.path());
        let out = tmp.path().join(format!("out-{name}"));
        let r = batch(tmp.path(), &job, &ca, &out, &[]);
        r.expect_code(0);
        let dirs = device_dirs(&out);
        assert_eq!(dirs.len(), 2, "{name}: device folders {dirs:?}\n{r}");
        // OpenSSL's -x509_strict demands keyUsage in a CA; the guide's CAs have
        // none, so those are checked without it.
        let strict = !cert_facts(&ca.join("ca.pem"))["key_usage"].is_null();
        for d in &dirs {
            if strict {
                assert_openssl_verifies(&ca.join("ca.pem"), &d.join("cert.pem"));
            } else {
                let r = openssl(
                    tmp.path(),
                    &[
                        "verify".as_ref(),
                        "-purpose".as_ref(),
                        "sslclient".as_ref(),
                        "-CAfile".as_ref(),
                        ca.join("ca.pem").as_os_str(),
                        d.join("cert.pem").as_os_str(),
                    ],
                );
                assert!(r.code == 0 && r.stdout.contains(": OK"), "{name}: {r}");
            }
            assert_pkilint_chain_clean(&ca.join("ca.pem"), &d.join("cert.pem"));
            let f = cert_facts(&d.join("cert.pem"));
            assert_eq!(f["sig_hash"], hash, "{name}: signature hash");
        }
    }
}

#[test]
fn bad_ca_fixtures_are_refused_with_the_reason() {
    // (fixture, words of which the message must contain at least one)
    let cases: [(&str, &[&str]); 3] = [
        (
            "bad-not-ca",
            &[
                "ca:true",
                "basic constraints",
                "basicconstraints",
                "not a ca",
            ],
        ),
        ("bad-expired", &["expired"]),
        (
            "bad-key-mismatch",
            &["not match", "mismatch", "doesn't match"],
        ),
    ];
    let tmp = tempdir();
    let job = tmp.path().join("job.csv");
    write_job(&job, "serial", &["SN-BADCA-1".into()]);
    for (name, words) in cases {
        let ca = copy_ca(name, tmp.path());
        let out = tmp.path().join(format!("out-{name}"));
        let r = batch(tmp.path(), &job, &ca, &out, &[]);
        r.expect_code(2);
        let text = reason_words(&r.text());
        assert!(
            words.iter().any(|w| text.contains(w)),
            "{name}: the refusal should say why (one of {words:?})\n{r}"
        );
        assert_nothing_issued(&out, &r);
    }
}

#[test]
fn verification_cert_carries_the_registration_code_and_is_signed_by_the_ca() {
    let tmp = tempdir();
    for key in ["p256", "rsa2048"] {
        let ca = init_ca(tmp.path(), &format!("ca-{key}"), key);
        let code = random_hex(32);
        let out = tmp.path().join(format!("verification-{key}.pem"));
        provline(
            tmp.path(),
            &[
                "ca".as_ref(),
                "verification-cert".as_ref(),
                "--ca".as_ref(),
                ca.as_os_str(),
                "--registration-code".as_ref(),
                code.as_ref(),
                "--out".as_ref(),
                out.as_os_str(),
            ],
        )
        .expect_code(0);
        let f = cert_facts(&out);
        assert_eq!(
            f["subject"][oid::CN],
            serde_json::json!([code]),
            "{key}: {f}"
        );
        let ca_f = cert_facts(&ca.join("ca.pem"));
        assert_eq!(f["issuer"], ca_f["subject"], "{key}: issuer is the CA");
        let r = openssl(
            tmp.path(),
            &[
                "verify".as_ref(),
                "-CAfile".as_ref(),
                ca.join("ca.pem").as_os_str(),
                out.as_os_str(),
            ],
        );
        assert!(r.code == 0 && r.stdout.contains(": OK"), "{key}: {r}");
    }
}
