//! `batch --register MODE` against moto through the proxy, one test per
//! mode, and `cloud verify` finding what changed behind its back.
//!
//! moto accepts what AWS refuses (a certificate under a CA that is not
//! active, a certificate from CreateCertificateFromCsr over another key):
//! these tests prove the station's own checks catch those, before the
//! call where they can.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::json;

use super::cloud::{json_string, read_json, Bed};
use crate::util::proxy::Faults;
use crate::util::*;

/// A batch of `n` devices `SN-000001`.. through the bed's proxy, with the
/// station's configuration file `config` and `extra` arguments.
pub fn register_batch(bed: &Bed, n: usize, mode: &str, config: &str, extra: &[&str]) -> Run {
    let job = bed.tmp.path().join("job.csv");
    if !job.exists() {
        write_serial_job(&job, n);
    }
    let mut args = batch_args(
        &job,
        &bed.ca,
        &out_dir(bed),
        &["--ledger", ledger(bed).to_str().expect("utf-8 path")],
    );
    let cfg = bed.config(config);
    args.extend([
        "--register".into(),
        mode.into(),
        "--cloud-config".into(),
        cfg.into_os_string(),
        "--json".into(),
    ]);
    args.extend(extra.iter().map(Into::into));
    bed.run(&args)
}

pub fn out_dir(bed: &Bed) -> PathBuf {
    bed.tmp.path().join("out")
}

pub fn ledger(bed: &Bed) -> PathBuf {
    bed.tmp.path().join("ledger.sqlite")
}

/// `provline cloud verify` through the proxy.
pub fn verify(bed: &Bed, config: &str) -> Run {
    let cfg = bed.config(config);
    let l = ledger(bed);
    bed.run(&[
        "cloud".as_ref(),
        "verify".as_ref(),
        "--ledger".as_ref(),
        l.as_os_str(),
        "--ca".as_ref(),
        bed.ca.as_os_str(),
        "--config".as_ref(),
        cfg.as_os_str(),
    ])
}

/// Manifest rows by serial.
pub fn manifest_by_serial(bed: &Bed) -> BTreeMap<String, ManifestRow> {
    read_manifest(&out_dir(bed))
        .into_iter()
        .map(|r| (r.serial.clone(), r))
        .collect()
}

/// Sets up the station from `config` straight away (no faults).
pub fn setup_ok(bed: &Bed, config: &str) {
    bed.setup(config, &[]).expect_code(0);
    bed.proxy.clear_calls();
}

#[test]
fn register_none_makes_no_call() {
    let bed = Bed::new(Faults::none());
    let run = register_batch(&bed, 5, "none", "station-devices.toml", &[]);
    run.expect_code(0);
    assert_eq!(manifest_by_serial(&bed).len(), 5);
    assert!(
        bed.proxy.calls().is_empty(),
        "--register none called AWS: {:?}",
        bed.proxy.tally()
    );
}

#[test]
fn register_certificate_registers_each_certificate_once_with_the_aws_id() {
    let bed = Bed::new(Faults::none());
    setup_ok(&bed, "station-devices.toml");
    let run = register_batch(&bed, 6, "certificate", "station-devices.toml", &[]);
    run.expect_code(0);
    let manifest = manifest_by_serial(&bed);
    // The CA is not registered: RegisterCertificateWithoutCA, one per device.
    assert_eq!(
        bed.proxy.calls_of("RegisterCertificateWithoutCA").len(),
        6,
        "{:?}",
        bed.proxy.tally()
    );
    assert!(bed.proxy.calls_of("CreateThing").is_empty());
    let ids: Vec<String> = bed
        .moto
        .certificates()
        .iter()
        .filter_map(|c| c["certificateId"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 6, "{ids:?}");
    for m in manifest.values() {
        assert!(
            ids.contains(&m.certificate_id),
            "{}: certificate {} is not in moto",
            m.serial,
            m.certificate_id
        );
        let c = bed.moto.certificate(&m.certificate_id).expect("described");
        assert_eq!(c["status"], json!("ACTIVE"), "{}", m.serial);
    }
    verify(&bed, "station-devices.toml").expect_code(0);
}

#[test]
fn register_certificate_under_an_inactive_ca_is_refused_before_the_call() {
    let bed = Bed::new(Faults::none());
    setup_ok(&bed, "station.toml");
    // The CA is registered and ACTIVE: RegisterCertificate with the CA.
    let run = register_batch(&bed, 2, "certificate", "station.toml", &[]);
    run.expect_code(0);
    assert_eq!(bed.proxy.calls_of("RegisterCertificate").len(), 2);
    for c in bed.proxy.calls_of("RegisterCertificate") {
        assert!(
            c.json()["caCertificatePem"].is_string(),
            "RegisterCertificate without the CA: {}",
            c.json()
        );
    }

    // Behind the station's back the CA goes INACTIVE. moto would still
    // register certificates under it; AWS would not. A new job's devices
    // fail naming the API, and no RegisterCertificate call is made.
    let r = bed.moto.call(
        "PUT",
        &format!("/cacertificate/{}?newStatus=INACTIVE", bed.ca_id()),
        None,
    );
    assert_eq!(r.status, 200, "UpdateCACertificate");
    bed.proxy.clear_calls();
    let job = bed.tmp.path().join("job2.csv");
    write_job(&job, "serial", &["SN-100001".into(), "SN-100002".into()]);
    let out = bed.tmp.path().join("out2");
    let mut args = batch_args(
        &job,
        &bed.ca,
        &out,
        &[
            "--ledger",
            bed.tmp.path().join("l2.sqlite").to_str().expect("utf-8"),
        ],
    );
    let cfg = bed.config("station.toml");
    args.extend([
        "--register".into(),
        "certificate".into(),
        "--cloud-config".into(),
        cfg.into(),
    ]);
    let run = bed.run(&args);
    run.expect_code(1);
    let rows = read_manifest(&out);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r.status, "failed", "{r:?}\n{run}");
        assert!(
            r.error.starts_with("RegisterCertificate") && r.error.contains("ACTIVE"),
            "{}: error does not name the API and the CA state: {}",
            r.serial,
            r.error
        );
    }
    assert!(
        bed.proxy.calls_of("RegisterCertificate").is_empty(),
        "a certificate was sent under an inactive CA"
    );
    let claim = super::cloud::pem_der_sha256(&bed.station.join("claim/claim.pem"));
    let device_certs = bed
        .moto
        .certificates()
        .iter()
        .filter(|c| c["certificateId"] != json!(bed.ca_id()) && c["certificateId"] != json!(claim))
        .count();
    assert_eq!(device_certs, 2, "only the first job's certificates");
}

#[test]
fn register_thing_makes_thing_principal_policy_and_group_and_verify_agrees() {
    let bed = Bed::new(Faults::none());
    setup_ok(&bed, "station-devices.toml");
    let run = register_batch(&bed, 8, "thing", "station-devices.toml", &[]);
    run.expect_code(0);
    let manifest = manifest_by_serial(&bed);
    assert_eq!(manifest.len(), 8);
    for m in manifest.values() {
        let thing = bed
            .moto
            .thing(&m.thing_name)
            .unwrap_or_else(|| panic!("{}: no thing {}\n{run}", m.serial, m.thing_name));
        assert_eq!(thing["thingTypeName"], json!("Sensor"), "{thing}");
        let principals = bed.moto.thing_principals(&m.thing_name);
        assert_eq!(principals.len(), 1, "{}: {principals:?}", m.thing_name);
        assert!(
            principals[0].ends_with(&format!("cert/{}", m.certificate_id)),
            "{}: principal {} is not certificate {}",
            m.thing_name,
            principals[0],
            m.certificate_id
        );
        assert_eq!(
            bed.moto.attached_policies(&principals[0]),
            vec!["SensorPolicy".to_string()]
        );
        assert_eq!(
            bed.moto.thing_groups_of(&m.thing_name),
            vec!["line-1".to_string()]
        );
    }
    for c in bed.proxy.calls_of("AttachThingPrincipal") {
        assert!(
            c.path.contains("thingPrincipalType=EXCLUSIVE_THING"),
            "attach = exclusive: {}",
            c.path
        );
    }
    let v = verify(&bed, "station-devices.toml");
    v.expect_code(0);

    // A principal detached behind the station's back: verify names the
    // device and exits 1; the others still agree.
    let victim = manifest.values().nth(3).expect("a device");
    let p = bed.moto.thing_principals(&victim.thing_name);
    bed.moto.detach_thing_principal(&victim.thing_name, &p[0]);
    let v = verify(&bed, "station-devices.toml");
    v.expect_code(1);
    let lines: Vec<&str> = v.stdout.lines().filter(|l| l.starts_with("SN-")).collect();
    assert_eq!(lines.len(), 1, "one difference\n{v}");
    assert!(
        lines[0].starts_with(&format!("{} {}:", victim.serial, victim.thing_name)),
        "the difference names the device\n{v}"
    );
}

#[test]
fn register_thing_call_carries_the_template_and_the_device() {
    let bed = Bed::new(Faults::none());
    setup_ok(&bed, "station-devices.toml");
    let run = register_batch(&bed, 3, "register-thing", "station-devices.toml", &[]);
    run.expect_code(0);
    let calls = bed.proxy.calls_of("RegisterThing");
    assert_eq!(calls.len(), 3, "{:?}", bed.proxy.tally());
    let want_body = read_json(&bed.config("templates/register-thing.json"));
    let manifest = manifest_by_serial(&bed);
    for c in &calls {
        let body = c.json();
        assert_eq!(
            json_string(&body["templateBody"], "templateBody"),
            want_body,
            "RegisterThing templateBody"
        );
        let p = &body["parameters"];
        let serial = p["SerialNumber"].as_str().expect("SerialNumber");
        let m = manifest
            .get(serial)
            .unwrap_or_else(|| panic!("RegisterThing for an unknown serial: {body}"));
        assert_eq!(p["ThingName"], json!(m.thing_name));
        assert_eq!(p["CertificateId"], json!(m.certificate_id));
        // Only the parameters the template declares.
        let keys: Vec<&String> = p.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["CertificateId", "SerialNumber", "ThingName"]);
    }
    // Nothing else was called per device.
    let others: Vec<String> = bed
        .proxy
        .calls()
        .iter()
        .filter(|c| c.op != "RegisterThing" && !super::cloud::is_read_only(&c.op))
        .map(|c| c.op.clone())
        .collect();
    assert!(others.is_empty(), "{others:?}");
}

#[test]
fn aws_signed_certificate_over_another_key_fails_the_device() {
    let bed = Bed::new(Faults::none());
    setup_ok(&bed, "station-devices.toml");
    // moto's CreateCertificateFromCsr returns a certificate over a key of
    // its own, not the CSR's: the station must catch it.
    let run = register_batch(&bed, 2, "aws-signed", "station-devices.toml", &[]);
    run.expect_code(1);
    let calls = bed.proxy.calls_of("CreateCertificateFromCsr");
    assert_eq!(calls.len(), 2, "{:?}", bed.proxy.tally());
    for c in &calls {
        let csr = c.json()["certificateSigningRequest"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(csr.contains("BEGIN CERTIFICATE REQUEST"), "{}", c.json());
    }
    for m in manifest_by_serial(&bed).values() {
        assert_eq!(m.status, "failed", "{m:?}\n{run}");
        assert!(
            m.error.starts_with("CreateCertificateFromCsr") && m.error.contains("key"),
            "{}: error does not say the key differs: {}",
            m.serial,
            m.error
        );
    }
    assert!(
        bed.moto.thing_names().is_empty(),
        "a thing was made for a bad certificate"
    );
    assert!(bed.proxy.calls_of("AttachThingPrincipal").is_empty());
    // The ledger holds no registered device: verify checks none.
    let v = verify(&bed, "station-devices.toml");
    v.expect_code(0);
    assert!(v.stdout.contains("0 registered device(s) checked"), "{v}");
}

#[test]
fn batch_dry_run_prints_every_registration_call_and_makes_none() {
    let bed = Bed::new(Faults::none());
    let job = bed.tmp.path().join("job.csv");
    write_serial_job(&job, 3);
    let cfg = bed.config("station-devices.toml");
    let mut args = batch_args(&job, &bed.ca, &out_dir(&bed), &["--dry-run"]);
    args.extend([
        "--register".into(),
        "thing".into(),
        "--cloud-config".into(),
        cfg.into_os_string(),
    ]);
    let run = bed.run(&args);
    run.expect_code(0);
    for i in 1..=3 {
        let thing = format!("sensor_SN-{i:06}");
        for want in [
            format!("would call CreateThing {thing}"),
            format!("would call AddThingToThingGroup {thing} line-1"),
            format!("would call RegisterCertificate {thing}"),
            format!("would call AttachThingPrincipal {thing}"),
            format!("would call AttachPolicy {thing}"),
        ] {
            assert!(run.stdout.contains(&want), "missing `{want}`\n{run}");
        }
    }
    assert!(
        bed.proxy.calls().is_empty(),
        "--dry-run called AWS: {:?}",
        bed.proxy.tally()
    );
    assert_eq!(
        count_device_dirs(&out_dir(&bed)),
        0,
        "--dry-run issued devices"
    );
}
