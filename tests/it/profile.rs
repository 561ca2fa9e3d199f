//! The device certificate profile under the batch options, serial number
//! randomness, the development CA, and the bundled Amazon Root CA 1.

use std::collections::HashSet;
use std::fs;

use super::verifiers::check_issued_devices;
use crate::util::py::{cert_facts, device_facts, oid};
use crate::util::*;

const AMAZON_ROOT_CA1_SHA256: &str =
    "8E:CD:E6:88:4F:3D:87:B1:12:5B:A3:1A:C3:FC:B1:3D:70:16:DE:7F:57:CC:90:4F:E1:CB:97:C6:AE:98:19:6E";

#[test]
fn serials_are_random_positive_distinct_and_at_most_20_octets_across_50_certs() {
    let tmp = tempdir();
    let ca = init_ca(tmp.path(), "ca", "p256");
    let rows: Vec<String> = (0..50).map(|i| format!("SN-RAND-{i:03}")).collect();
    let job = tmp.path().join("job.csv");
    write_job(&job, "serial", &rows);
    let out = tmp.path().join("out");
    batch(tmp.path(), &job, &ca, &out, &["--threads", "2"]).expect_code(0);
    let dirs: Vec<_> = read_manifest(&out)
        .iter()
        .map(|r| out.join(&r.thing_name))
        .collect();
    assert_eq!(dirs.len(), 50);
    let facts = device_facts(&ca.join("ca.pem"), &dirs);
    let serials: HashSet<&str> = facts
        .iter()
        .map(|f| f["serial"].as_str().unwrap())
        .collect();
    assert_eq!(serials.len(), 50, "certificate serials repeat");
    let mut bits: Vec<u64> = facts
        .iter()
        .map(|f| f["serial_bits"].as_u64().unwrap())
        .collect();
    bits.sort_unstable();
    assert!(
        serials.iter().all(|s| !s.starts_with('-') && *s != "0"),
        "non-positive serial"
    );
    assert!(bits[49] <= 159, "a serial longer than 20 octets: {bits:?}");
    assert!(
        bits[49] >= 63,
        "serials look shorter than 64 random bits: {bits:?}"
    );
    assert!(bits[25] >= 57, "median serial under 57 bits: {bits:?}");
    let spkis: HashSet<&str> = facts.iter().map(|f| f["spki"].as_str().unwrap()).collect();
    assert_eq!(spkis.len(), 50, "station-made device keys repeat");
}

#[test]
fn thing_name_pattern_subject_options_and_days_shape_the_certificate() {
    let tmp = tempdir();
    let ca = init_ca(tmp.path(), "ca", "p256");
    let job = tmp.path().join("job.csv");
    write_job(
        &job,
        "serial,thing_name,location",
        &[
            "SN-PAT-1,,hall-1".into(),
            "SN-PAT-2,explicit-name,hall-2".into(),
        ],
    );
    let out = tmp.path().join("out");
    let opts = [
        "--thing-name-pattern",
        "dev_{serial}_x",
        "--days",
        "10",
        "--subject-o",
        "Acme Factory",
        "--subject-ou",
        "Line 7",
        "--subject-c",
        "DE",
        "--subject-st",
        "Bavaria",
        "--subject-dnq",
        "batch-42",
    ];
    let r = batch(tmp.path(), &job, &ca, &out, &opts);
    r.expect_code(0);
    assert!(
        out.join("dev_SN-PAT-1_x/cert.pem").is_file(),
        "pattern not applied\n{r}"
    );
    assert!(
        out.join("explicit-name/cert.pem").is_file(),
        "thing_name column ignored\n{r}"
    );
    let facts = check_issued_devices(&ca, &out, 2);
    for f in &facts {
        let s = &f["subject"];
        let one = |v: &str| serde_json::json!([v]);
        assert_eq!(s[oid::O], one("Acme Factory"), "O: {s}");
        assert_eq!(s[oid::OU], one("Line 7"), "OU: {s}");
        assert_eq!(s[oid::C], one("DE"), "C: {s}");
        assert_eq!(s[oid::ST], one("Bavaria"), "ST: {s}");
        assert_eq!(s[oid::DNQ], one("batch-42"), "dnQualifier: {s}");
        let days = (f["not_after"].as_f64().unwrap() - f["now"].as_f64().unwrap()) / 86400.0;
        assert!(
            (9.0..=10.5).contains(&days),
            "--days 10 gave {days:.2} days"
        );
    }
}

#[test]
fn key_option_sets_the_device_key_type_and_the_row_overrides_it() {
    let tmp = tempdir();
    let ca = init_ca(tmp.path(), "ca", "p256");
    let job = tmp.path().join("job.csv");
    write_job(
        &job,
        "serial,key",
        &["SN-KEY-1,".into(), "SN-KEY-2,rsa2048".into()],
    );
    let out = tmp.path().join("out");
    let opts = ["--key", "p384", "--thing-name-pattern", "k_{serial}"];
    batch(tmp.path(), &job, &ca, &out, &opts).expect_code(0);
    let f1 = cert_facts(&out.join("k_SN-KEY-1/cert.pem"));
    let f2 = cert_facts(&out.join("k_SN-KEY-2/cert.pem"));
    assert_eq!(
        f1["key_kind"], "ec-secp384r1",
        "--key p384 for a row without a key"
    );
    assert_eq!(
        f2["key_kind"], "rsa-2048-e65537",
        "the row's key column wins"
    );
}

#[test]
fn unknown_key_type_option_is_bad_usage() {
    let tmp = tempdir();
    let ca = init_ca(tmp.path(), "ca", "p256");
    let job = tmp.path().join("job.csv");
    write_job(&job, "serial", &["SN-USAGE-1".into()]);
    let out = tmp.path().join("out");
    let r = batch(tmp.path(), &job, &ca, &out, &["--key", "dsa1024"]);
    r.expect_code(2);
    assert_nothing_issued(&out, &r);
    let r = provline(tmp.path(), &["ca", "init", "--dir", "x", "--key", "ed448"]);
    r.expect_code(2);
    assert!(
        !tmp.path().join("x/ca.key").exists(),
        "ca init with a bad key type wrote a key"
    );
}

#[test]
fn batch_without_ca_creates_then_reuses_a_development_ca_in_the_current_folder() {
    let tmp = tempdir();
    let job = tmp.path().join("job.csv");
    write_job(&job, "serial", &["SN-DEV-1".into()]);
    let dev = tmp.path().join("provline-dev-ca");
    let r = provline(tmp.path(), &["batch", "job.csv", "--out", "out1"]);
    r.expect_code(0);
    assert!(
        dev.join("ca.pem").is_file() && dev.join("ca.key").is_file(),
        "no dev CA\n{r}"
    );
    assert_eq!(mode(&dev.join("ca.key")), 0o600, "dev CA key mode");
    let ca_before = fs::read(dev.join("ca.pem")).unwrap();
    check_issued_devices(&dev, &tmp.path().join("out1"), 1);

    write_job(&job, "serial", &["SN-DEV-2".into()]);
    provline(tmp.path(), &["batch", "job.csv", "--out", "out2"]).expect_code(0);
    assert!(
        fs::read(dev.join("ca.pem")).unwrap() == ca_before,
        "dev CA was replaced"
    );
    check_issued_devices(&dev, &tmp.path().join("out2"), 1);
}

#[test]
fn amazon_root_ca1_is_bundled_byte_for_byte_with_the_documented_fingerprint() {
    let tmp = tempdir();
    let fx = fixture("AmazonRootCA1.pem");
    let r = openssl(
        tmp.path(),
        &[
            "x509".as_ref(),
            "-noout".as_ref(),
            "-fingerprint".as_ref(),
            "-sha256".as_ref(),
            "-in".as_ref(),
            fx.as_os_str(),
        ],
    );
    r.expect_code(0);
    let fp = r
        .stdout
        .trim()
        .rsplit('=')
        .next()
        .unwrap_or("")
        .to_uppercase();
    assert_eq!(
        fp, AMAZON_ROOT_CA1_SHA256,
        "fixtures/AmazonRootCA1.pem fingerprint\n{r}"
    );

    let ca = init_ca(tmp.path(), "ca", "p256");
    let job = tmp.path().join("job.csv");
    write_job(&job, "serial", &["SN-AMZ-1".into(), "SN-AMZ-2".into()]);
    let out = tmp.path().join("out");
    batch(tmp.path(), &job, &ca, &out, &[]).expect_code(0);
    let want = fs::read(&fx).unwrap();
    let dirs = device_dirs(&out);
    assert_eq!(dirs.len(), 2);
    for d in dirs {
        let got = fs::read(d.join("AmazonRootCA1.pem")).expect("AmazonRootCA1.pem in output");
        assert!(
            got == want,
            "{}: AmazonRootCA1.pem differs from the fixture",
            d.display()
        );
    }
}
