//! Bad rows fail one by one with their line and reason; device-made CSRs are
//! certified for their own key and nothing else they ask for; a job that
//! cannot start issues nothing.

use std::fs;
use std::path::Path;

use super::verifiers::check_issued_devices;
use crate::util::py::{csr_spki, key_facts};
use crate::util::*;

/// The line number of the first "line N" in an error message.
fn first_line_number(err: &str) -> Option<usize> {
    let lower = err.to_lowercase();
    let i = lower.find("line ")?;
    let digits: String = lower[i + 5..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

const PATTERN: [&str; 2] = ["--thing-name-pattern", "sensor_{serial}"];

#[test]
fn bad_rows_fail_alone_with_line_and_reason_and_good_rows_are_issued() {
    // (line, serial, words of which the error must contain at least one);
    // see fixtures/README.md for what is wrong with each line.
    let bad: [(usize, &str, &[&str]); 13] = [
        (3, "SN-OK-1", &["duplicate"]),
        (4, "", &["empty", "missing", "required", "blank"]),
        (
            5,
            "SN-BAD-NAME",
            &["invalid", "allows only", "character", "not allowed"],
        ),
        (6, "SN-LONG-NAME", &["128", "129", "long", "length"]),
        (
            7,
            "SN-BAD-KEY",
            &["key type", "unknown key", "unsupported key"],
        ),
        (8, "SN-BAD-SIG", &["signature"]),
        (9, "SN-RSA1024", &["1024"]),
        (10, "SN-SHA1", &["sha1", "sha-1"]),
        (11, "SN-ED25519", &["ed25519"]),
        (12, "SN-P192", &["192"]),
        (
            13,
            "SN-GARBAGE",
            &["parse", "decode", "malformed", "not a valid", "not der"],
        ),
        (14, "SN-EMPTY-CSR", &["empty", "no pem", "no csr"]),
        (
            15,
            "SN-MISSING-CSR",
            &["not found", "no such file", "does not exist"],
        ),
    ];
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let out = tmp.path().join("out");
    let job = fixture("jobs/bad-rows.csv");
    let r = batch(tmp.path(), &job, &ca, &out, &PATTERN);
    r.expect_code(1);

    let data_rows = fs::read_to_string(&job).unwrap().lines().skip(1).count();
    let rows = read_manifest(&out);
    assert_eq!(
        rows.len(),
        data_rows,
        "one manifest row per job row: {rows:#?}\n{r}"
    );

    for (line, serial, words) in bad {
        let hits: Vec<&ManifestRow> = rows
            .iter()
            .filter(|m| first_line_number(&m.error) == Some(line))
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "line {line}: one manifest row whose error starts with it: {rows:#?}"
        );
        let m = hits[0];
        assert_eq!(m.status, "failed", "line {line}: {m:?}");
        assert_eq!(m.serial, serial, "line {line}: serial in the manifest");
        let err = reason_words(&m.error);
        assert!(
            words.iter().any(|w| err.contains(w)),
            "line {line}: error {:?} should give the reason (one of {words:?})",
            m.error
        );
        assert!(
            m.certificate_id.is_empty(),
            "line {line}: failed row has a certificate_id"
        );
        // A failed device leaves nothing behind, unless its folder belongs to
        // an issued row with the same name (the duplicate serial).
        let shared = rows
            .iter()
            .any(|o| o.status == "issued" && o.thing_name == m.thing_name);
        if !m.thing_name.is_empty() && !shared {
            let d = out.join(&m.thing_name);
            for f in ["cert.pem", "private.key", "chain.pem"] {
                assert!(!d.join(f).exists(), "line {line}: half a device left: {f}");
            }
        }
    }
    let mut issued_names: Vec<String> = rows
        .iter()
        .filter(|m| m.status == "issued")
        .map(|m| m.thing_name.clone())
        .collect();
    issued_names.sort();
    let mut folders: Vec<String> = device_dirs(&out)
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    assert_eq!(
        folders, issued_names,
        "device folders besides the issued devices"
    );
    for good in ["SN-OK-1", "SN-OK-2", "SN-OK-3"] {
        let n = rows
            .iter()
            .filter(|m| m.serial == good && m.status == "issued")
            .count();
        assert_eq!(n, 1, "{good} issued once: {rows:#?}");
    }
    let facts = check_issued_devices(&ca, &out, 3);
    let p384 = facts
        .iter()
        .find(|f| f["subject"]["2.5.4.5"][0] == "SN-OK-3")
        .expect("SN-OK-3 issued");
    assert_eq!(
        p384["key_kind"], "ec-secp384r1",
        "line 17 asks for key p384"
    );
}

#[test]
fn device_csrs_get_certs_for_their_own_key_and_only_the_station_profile() {
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-sec1", tmp.path());
    let out = tmp.path().join("out");
    let job = fixture("jobs/with-csrs.csv");
    let r = batch(tmp.path(), &job, &ca, &out, &[]);
    r.expect_code(0);
    let facts = check_issued_devices(&ca, &out, 4);
    let csv = fs::read_to_string(&job).unwrap();
    for line in csv.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').collect();
        let (serial, thing, csr_rel) = (cols[0], cols[1], cols[2]);
        let csr = job.parent().unwrap().join(csr_rel);
        let key = csr.with_extension("key");
        let f = facts
            .iter()
            .find(|f| f["subject"]["2.5.4.5"][0] == serial)
            .unwrap_or_else(|| panic!("no certificate for {serial}"));
        let want = key_facts(&key)["spki"].clone();
        assert_eq!(
            f["spki"], want,
            "{serial}: cert key is not the device's key"
        );
        assert_eq!(
            f["spki"],
            csr_spki(&csr),
            "{serial}: cert key is not the CSR's key"
        );
        assert!(
            f["private_key"].is_null(),
            "{serial}: private.key written for a CSR row"
        );
        assert!(
            !out.join(thing).join("private.key").exists(),
            "{serial}: private.key"
        );
        // asks-ca.csr requests CA:TRUE, keyCertSign and a SAN: none of it may pass.
        assert_eq!(
            f["basic_constraints"]["ca"], false,
            "{serial}: CA:TRUE copied from CSR"
        );
        assert_eq!(f["has_san"], false, "{serial}: SAN copied from the CSR");
    }
}

fn assert_refused(tmp: &Path, job: &Path, ca: &Path, what: &str) {
    let out = tmp.join(format!("out-{what}"));
    let r = batch(tmp, job, ca, &out, &[]);
    assert_eq!(r.code, 2, "{what}: must be refused with exit 2\n{r}");
    assert_nothing_issued(&out, &r);
}

#[test]
fn empty_or_missing_job_is_refused_with_exit_2() {
    let tmp = tempdir();
    let ca = init_ca(tmp.path(), "ca", "p256");
    let header_only = tmp.path().join("header-only.csv");
    fs::write(&header_only, "serial,thing_name\n").unwrap();
    assert_refused(tmp.path(), &header_only, &ca, "header-only");
    let empty = tmp.path().join("empty.csv");
    fs::write(&empty, "").unwrap();
    assert_refused(tmp.path(), &empty, &ca, "empty-file");
    let no_serial_column = tmp.path().join("no-serial.csv");
    fs::write(&no_serial_column, "thing_name\nsensor-1\n").unwrap();
    assert_refused(tmp.path(), &no_serial_column, &ca, "no-serial-column");
    let missing = tmp.path().join("does-not-exist.csv");
    assert_refused(tmp.path(), &missing, &ca, "missing-file");
}
