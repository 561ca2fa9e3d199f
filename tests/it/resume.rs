//! Running a job again, and what a batch reports: a finished job issues
//! nothing and touches nothing; a device of another job is refused unless a
//! re-issue is asked for; the bulk-registration file, the ledger export and
//! the summary say what the contract says.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::util::py::{device_facts, py_json};
use crate::util::*;

/// Every file of every device folder: contents and modification time.
fn snapshot(out: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    let mut files = BTreeMap::new();
    for dir in device_dirs(out) {
        for entry in fs::read_dir(&dir).expect("read device folder") {
            let p = entry.expect("entry").path();
            let meta = fs::metadata(&p).expect("stat");
            files.insert(
                p.clone(),
                (fs::read(&p).expect("read"), meta.modified().expect("mtime")),
            );
        }
    }
    files
}

fn by_serial(rows: &[ManifestRow]) -> BTreeMap<String, ManifestRow> {
    let mut map = BTreeMap::new();
    for r in rows {
        assert!(
            map.insert(r.serial.clone(), r.clone()).is_none(),
            "serial {} twice in the manifest: {rows:#?}",
            r.serial
        );
    }
    map
}

#[test]
fn rerun_of_a_finished_job_issues_nothing_and_leaves_every_file_as_it_was() {
    const N: usize = 40;
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let job = tmp.path().join("job.csv");
    write_serial_job(&job, N);
    let out = tmp.path().join("out");
    let ledger = tmp.path().join("out.ledger.sqlite");

    let first = batch(tmp.path(), &job, &ca, &out, &["--json"]);
    first.expect_code(0);
    assert_eq!(
        summary_count(&summary_json(&first.stdout), "issued"),
        N as u64
    );
    let before = snapshot(&out);
    assert_eq!(before.len(), N * 4, "four files per device\n{first}");
    let manifest_before = by_serial(&read_manifest(&out));
    let export_before = ledger_export(tmp.path(), &ledger);
    assert_eq!(export_before.len(), N, "one certificate per device");

    // Let a rewrite show in the modification times even on coarse clocks.
    std::thread::sleep(Duration::from_millis(1100));
    let second = batch(tmp.path(), &job, &ca, &out, &["--json"]);
    second.expect_code(0);
    let s = summary_json(&second.stdout);
    assert_eq!(
        (
            summary_count(&s, "issued"),
            summary_count(&s, "skipped"),
            summary_count(&s, "failed")
        ),
        (0, N as u64, 0),
        "issued, skipped, failed on the re-run\n{second}"
    );
    assert_eq!(s["interrupted"], Value::Bool(false), "{second}");

    let after = snapshot(&out);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the re-run changed the set of files"
    );
    for (path, (bytes, mtime)) in &before {
        let (bytes2, mtime2) = &after[path];
        assert!(bytes == bytes2, "{} was rewritten", path.display());
        assert_eq!(mtime, mtime2, "{} was touched", path.display());
    }
    // The manifest lists every row again, as issued with its original certificate.
    let manifest_after = by_serial(&read_manifest(&out));
    assert_eq!(manifest_after.len(), N);
    for (serial, m) in &manifest_before {
        let m2 = &manifest_after[serial];
        assert_eq!(
            (
                &m2.status,
                &m2.certificate_id,
                &m2.cert_serial,
                &m2.not_after
            ),
            (&m.status, &m.certificate_id, &m.cert_serial, &m.not_after),
            "manifest row of {serial} after the re-run"
        );
    }
    // Nothing new signed, nothing changed in the ledger's certificates.
    assert_eq!(ledger_export(tmp.path(), &ledger), export_before);
}

#[test]
fn a_device_of_another_job_is_refused_unless_reissued_and_then_superseded() {
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let ledger = tmp.path().join("shared.ledger.sqlite");
    let first_job = tmp.path().join("first-job.csv");
    let second_job = tmp.path().join("second-job.csv");
    write_job(&first_job, "serial", &["SN-A".into(), "SN-B".into()]);
    write_job(&second_job, "serial", &["SN-B".into(), "SN-C".into()]);
    let out_a = tmp.path().join("out-a");
    let out_b = tmp.path().join("out-b");
    let ledger_arg = ["--ledger", ledger.to_str().expect("utf-8 path")];

    batch(tmp.path(), &first_job, &ca, &out_a, &ledger_arg).expect_code(0);
    let first_rows = by_serial(&read_manifest(&out_a));
    let old_b = first_rows["SN-B"].clone();
    let old_b_pem = fs::read(out_a.join(&old_b.thing_name).join("cert.pem")).expect("old cert");

    // Without --reissue: SN-B fails naming the first job; SN-C is issued.
    let refused = batch(tmp.path(), &second_job, &ca, &out_b, &ledger_arg);
    refused.expect_code(1);
    let rows = by_serial(&read_manifest(&out_b));
    assert_eq!(rows.len(), 2, "{refused}");
    let b = &rows["SN-B"];
    assert_eq!(b.status, "failed", "{refused}");
    assert!(
        b.error.contains("first-job.csv"),
        "the refusal does not name the job that holds the device: {}",
        b.error
    );
    assert!(
        b.certificate_id.is_empty() && b.cert_serial.is_empty(),
        "a refused row names a certificate: {b:?}"
    );
    assert!(
        !out_b.join(&b.thing_name).exists(),
        "a folder was written for the refused device"
    );
    assert_eq!(rows["SN-C"].status, "issued", "{refused}");
    let export = ledger_export(tmp.path(), &ledger);
    assert_ledger_consistent(&export, true);
    let b_certs: Vec<&ExportRow> = export
        .iter()
        .filter(|r| r.device_serial == "SN-B")
        .collect();
    assert_eq!(
        b_certs.len(),
        1,
        "the refusal signed something: {b_certs:#?}"
    );
    assert_eq!(
        (b_certs[0].state.as_str(), &b_certs[0].cert_serial),
        ("live", &old_b.cert_serial)
    );

    // With --reissue: the old certificate superseded, a new one live.
    let mut args = ledger_arg.to_vec();
    args.extend(["--reissue", "--json"]);
    let reissued = batch(tmp.path(), &second_job, &ca, &out_b, &args);
    reissued.expect_code(0);
    let s = summary_json(&reissued.stdout);
    assert_eq!(
        (summary_count(&s, "issued"), summary_count(&s, "skipped")),
        (1, 1),
        "SN-B issued anew, SN-C already done\n{reissued}"
    );
    let rows = by_serial(&read_manifest(&out_b));
    let new_b = &rows["SN-B"];
    assert_eq!(new_b.status, "issued", "{reissued}");
    assert_ne!(new_b.cert_serial, old_b.cert_serial);
    let export = ledger_export(tmp.path(), &ledger);
    assert_ledger_consistent(&export, true);
    let b_certs: HashMap<&str, &ExportRow> = export
        .iter()
        .filter(|r| r.device_serial == "SN-B")
        .map(|r| (r.cert_serial.as_str(), r))
        .collect();
    assert_eq!(b_certs.len(), 2, "SN-B's certificates: {b_certs:#?}");
    let old = b_certs[old_b.cert_serial.as_str()];
    assert_eq!(
        (old.state.as_str(), old.reason.as_str()),
        ("superseded", "reissue"),
        "the old certificate of SN-B"
    );
    let new = b_certs[new_b.cert_serial.as_str()];
    assert_eq!(new.state, "live", "the new certificate of SN-B");
    assert_eq!(new.certificate_id, new_b.certificate_id);
    // The first job's folder is not touched; the new bundle is sound.
    assert!(
        fs::read(out_a.join(&old_b.thing_name).join("cert.pem")).expect("old cert") == old_b_pem,
        "the first job's certificate of SN-B was rewritten"
    );
    let facts = device_facts(&ca.join("ca.pem"), &[out_b.join(&new_b.thing_name)]);
    assert_eq!(facts[0]["signed_by_ca"], "ok", "{}", facts[0]);
    assert_eq!(facts[0]["sha256_der"], new_b.certificate_id.as_str());
    assert_eq!(
        facts[0]["private_key"]["spki"], facts[0]["spki"],
        "private.key does not match the new certificate"
    );
}

/// For every bulk line: its CSR loaded by `cryptography`, its signature,
/// and its public key beside the one of OUT/<ThingName>/cert.pem.
const BULK_FACTS: &str = r#"
import hashlib, json, sys
from cryptography import x509
from cryptography.hazmat.primitives import serialization
def spki(k):
    return hashlib.sha256(k.public_bytes(serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
out = []
for line in open(sys.argv[1]):
    d = json.loads(line)
    req = x509.load_pem_x509_csr(d['CSR'].encode())
    cert = x509.load_pem_x509_certificate(
        open(sys.argv[2] + '/' + d['ThingName'] + '/cert.pem', 'rb').read())
    out.append({'thing': d['ThingName'], 'csr_signature_valid': req.is_signature_valid,
                'csr_spki': spki(req.public_key()), 'cert_spki': spki(cert.public_key())})
print(json.dumps(out))
"#;

#[test]
fn bulk_jsonl_has_one_line_per_issued_device_with_a_csr_for_its_key() {
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let csr = fixture("csrs/good-p256.csr");
    let mut rows: Vec<String> = (1..=5).map(|i| format!("SN-BULK-{i},,,hall-{i}")).collect();
    rows.push(format!("SN-BULK-CSR,dev-from-csr,{},hall-9", csr.display()));
    rows.push("SN-BULK-BAD,bad name,,hall-0".into());
    let job = tmp.path().join("job.csv");
    write_job(&job, "serial,thing_name,csr,location", &rows);
    let out = tmp.path().join("out");
    let bulk = tmp.path().join("bulk.jsonl");
    let r = batch(
        tmp.path(),
        &job,
        &ca,
        &out,
        &["--bulk-jsonl", bulk.to_str().expect("utf-8"), "--json"],
    );
    r.expect_code(1);
    let manifest = by_serial(&read_manifest(&out));
    let issued: BTreeSet<(String, String)> = manifest
        .values()
        .filter(|m| m.status == "issued")
        .map(|m| (m.thing_name.clone(), m.serial.clone()))
        .collect();
    assert_eq!(issued.len(), 6, "{r}");

    let text = fs::read_to_string(&bulk).expect("read the bulk file");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("bulk line is not JSON ({e}): {l}"))
        })
        .collect();
    let in_bulk: BTreeSet<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["ThingName"].as_str().expect("ThingName").to_owned(),
                l["SerialNumber"].as_str().expect("SerialNumber").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        lines.len(),
        issued.len(),
        "one bulk line per issued device:\n{text}"
    );
    assert_eq!(in_bulk, issued, "bulk lines vs issued devices");
    let job_location: HashMap<String, String> = rows
        .iter()
        .map(|r| {
            let f: Vec<&str> = r.split(',').collect();
            (f[0].to_owned(), f[3].to_owned())
        })
        .collect();
    for l in &lines {
        let serial = l["SerialNumber"].as_str().expect("serial");
        assert_eq!(
            l["location"].as_str(),
            Some(job_location[serial].as_str()),
            "the job's attribute column is not a parameter of {serial}'s line: {l}"
        );
    }
    let csr_line = lines
        .iter()
        .find(|l| l["SerialNumber"] == "SN-BULK-CSR")
        .expect("a line for the CSR row");
    let csr_text = fs::read_to_string(&csr).expect("read CSR fixture");
    assert_eq!(
        csr_line["CSR"].as_str().map(str::trim),
        Some(csr_text.trim()),
        "the CSR row's line does not carry the device's CSR"
    );

    let facts = py_json(BULK_FACTS, &[bulk.as_os_str(), out.as_os_str()]);
    let facts = facts.as_array().expect("array");
    assert_eq!(facts.len(), lines.len());
    for f in facts {
        assert_eq!(f["csr_signature_valid"], true, "{f}");
        assert_eq!(
            f["csr_spki"], f["cert_spki"],
            "the CSR's key is not the certificate's: {f}"
        );
    }
}

#[test]
fn ledger_export_csv_has_the_contract_header_and_jsonl_parses_line_by_line() {
    const N: usize = 12;
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let job = tmp.path().join("job.csv");
    write_serial_job(&job, N);
    let out = tmp.path().join("out");
    let ledger = tmp.path().join("out.ledger.sqlite");
    batch(tmp.path(), &job, &ca, &out, &[]).expect_code(0);

    let csv_rows = ledger_export(tmp.path(), &ledger);
    assert_eq!(csv_rows.len(), N);
    assert_ledger_consistent(&csv_rows, true);
    let manifest = by_serial(&read_manifest(&out));
    for r in &csv_rows {
        let m = &manifest[&r.device_serial];
        assert_eq!(
            (
                &r.cert_serial,
                &r.certificate_id,
                &r.thing_name,
                r.state.as_str()
            ),
            (&m.cert_serial, &m.certificate_id, &m.thing_name, "live"),
            "export row vs manifest"
        );
    }

    let default = provline(
        tmp.path(),
        &[
            "ledger".as_ref(),
            "export".as_ref(),
            "--ledger".as_ref(),
            ledger.as_os_str(),
        ],
    );
    default.expect_code(0);
    assert!(
        default.stdout.starts_with(&EXPORT_HEADER.join(",")),
        "the default format is not the CSV\n{default}"
    );

    let jsonl = provline(
        tmp.path(),
        &[
            "ledger".as_ref(),
            "export".as_ref(),
            "--ledger".as_ref(),
            ledger.as_os_str(),
            "--format".as_ref(),
            "jsonl".as_ref(),
        ],
    );
    jsonl.expect_code(0);
    let objs: Vec<serde_json::Map<String, Value>> = jsonl
        .stdout
        .lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(o)) => o,
            other => panic!("export line is not a JSON object ({other:?}): {l}"),
        })
        .collect();
    assert_eq!(objs.len(), N, "{jsonl}");
    let want_keys: BTreeSet<&str> = EXPORT_HEADER.iter().copied().collect();
    for o in &objs {
        let keys: BTreeSet<&str> = o.keys().map(String::as_str).collect();
        assert_eq!(keys, want_keys, "keys of an export line");
    }
    let from_json: BTreeSet<(String, String, String)> = objs
        .iter()
        .map(|o| {
            let s = |k: &str| o[k].as_str().unwrap_or_default().to_owned();
            (s("device_serial"), s("cert_serial"), s("state"))
        })
        .collect();
    let from_csv: BTreeSet<(String, String, String)> = csv_rows
        .iter()
        .map(|r| {
            (
                r.device_serial.clone(),
                r.cert_serial.clone(),
                r.state.clone(),
            )
        })
        .collect();
    assert_eq!(from_json, from_csv, "jsonl and csv exports differ");
}

/// A job of good rows and one with a thing name AWS refuses.
fn job_with_one_bad_row(tmp: &Path, good: usize) -> PathBuf {
    let mut rows: Vec<String> = (1..=good).map(|i| format!("SN-{i:04},")).collect();
    rows.insert(good / 2, "SN-BAD,bad name".into());
    let job = tmp.join("job.csv");
    write_job(&job, "serial,thing_name", &rows);
    job
}

#[test]
fn json_summary_reports_counts_rate_and_paths() {
    const GOOD: usize = 7;
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let job = job_with_one_bad_row(tmp.path(), GOOD);
    let out = tmp.path().join("out");
    let r = batch(tmp.path(), &job, &ca, &out, &["--json"]);
    r.expect_code(1);
    let s: Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e})\n{r}"));
    let keys: BTreeSet<&str> = s
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    for k in [
        "issued",
        "skipped",
        "failed",
        "interrupted",
        "seconds",
        "devices_per_sec",
        "out",
        "ledger",
    ] {
        assert!(keys.contains(k), "summary lacks `{k}`: {s}");
    }
    let manifest = read_manifest(&out);
    let count = |status: &str| manifest.iter().filter(|m| m.status == status).count() as u64;
    assert_eq!(summary_count(&s, "issued"), count("issued"), "{s}");
    assert_eq!(summary_count(&s, "failed"), count("failed"), "{s}");
    assert_eq!((count("issued"), count("failed")), (GOOD as u64, 1), "{r}");
    assert_eq!(summary_count(&s, "skipped"), 0, "{s}");
    assert_eq!(s["interrupted"], Value::Bool(false));
    let seconds = s["seconds"].as_f64().expect("seconds");
    let rate = s["devices_per_sec"].as_f64().expect("devices_per_sec");
    assert!(seconds > 0.0, "{s}");
    let want_rate = (GOOD + 1) as f64 / seconds;
    assert!(
        (rate - want_rate).abs() <= want_rate * 0.01,
        "devices_per_sec {rate} is not (issued + failed + skipped) / seconds = {want_rate}"
    );
    assert_eq!(s["out"].as_str(), out.to_str(), "{s}");
    let ledger = s["ledger"].as_str().expect("ledger path");
    assert_eq!(
        Path::new(ledger),
        tmp.path().join("out.ledger.sqlite"),
        "the default ledger is OUT.ledger.sqlite beside OUT"
    );
    assert!(Path::new(ledger).is_file(), "{ledger} does not exist");
}

#[test]
fn without_a_terminal_a_run_prints_one_summary_line_and_no_progress_bar() {
    const GOOD: usize = 9;
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let job = job_with_one_bad_row(tmp.path(), GOOD);
    let out = tmp.path().join("out");
    let r = batch(tmp.path(), &job, &ca, &out, &[]);
    r.expect_code(1);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is not one summary line\n{r}");
    let words: Vec<&str> = lines[0]
        .split(|c: char| !c.is_ascii_alphanumeric())
        .collect();
    assert!(
        words.contains(&GOOD.to_string().as_str()) && words.contains(&"1"),
        "the summary line does not give the counts ({GOOD} issued, 1 failed)\n{r}"
    );
    for (what, text) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
        assert!(
            !text.contains('\u{1b}') && !text.contains('\r'),
            "{what} holds terminal escape codes or carriage returns without a terminal\n{r}"
        );
    }
    assert!(
        r.stderr.contains("SN-BAD"),
        "the failed row is not reported on stderr\n{r}"
    );
}

#[test]
fn quiet_prints_nothing_on_stdout() {
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let job = job_with_one_bad_row(tmp.path(), 4);
    let out = tmp.path().join("out");
    let r = batch(tmp.path(), &job, &ca, &out, &["-q"]);
    r.expect_code(1);
    assert!(r.stdout.is_empty(), "-q printed on stdout\n{r}");
    assert_eq!(
        read_manifest(&out)
            .iter()
            .filter(|m| m.status == "issued")
            .count(),
        4,
        "{r}"
    );

    let good = tmp.path().join("good.csv");
    write_serial_job(&good, 3);
    let out2 = tmp.path().join("out2");
    let r = batch(tmp.path(), &good, &ca, &out2, &["-q"]);
    r.expect_code(0);
    assert!(
        r.stdout.is_empty() && r.stderr.is_empty(),
        "-q printed something on a run without errors\n{r}"
    );
}

#[test]
fn a_certificate_standing_in_a_device_folder_is_left_alone_and_only_its_device_fails() {
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let job = tmp.path().join("job.csv");
    write_serial_job(&job, 5);
    let out = tmp.path().join("out");
    let foreign = out.join("sensor_SN-000003");
    fs::create_dir_all(&foreign).expect("foreign folder");
    fs::write(foreign.join("cert.pem"), b"not the station's").expect("foreign cert");

    let run = batch(tmp.path(), &job, &ca, &out, &["--json"]);
    run.expect_code(1);
    let rows = by_serial(&read_manifest(&out));
    assert_eq!(rows.len(), 5, "{run}");
    let refused = &rows["SN-000003"];
    assert_eq!(refused.status, "failed", "{refused:?}");
    assert!(
        refused.error.contains("already holds a certificate"),
        "{refused:?}"
    );
    for serial in ["SN-000001", "SN-000002", "SN-000004", "SN-000005"] {
        assert_eq!(rows[serial].status, "issued", "{serial}: {run}");
    }
    assert_eq!(
        fs::read(foreign.join("cert.pem")).expect("foreign cert"),
        b"not the station's"
    );
    assert!(!foreign.join("private.key").exists());
    // Refused before signing: no certificate of the ledger is spent on it.
    let export = ledger_export(tmp.path(), &tmp.path().join("out.ledger.sqlite"));
    assert_eq!(export.len(), 4, "{export:#?}");
}
