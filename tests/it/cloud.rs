//! `provline cloud setup` against moto through the fault proxy, with the
//! real aws-sdk-iot client: what it creates, that a second run changes
//! nothing, that `--dry-run` makes no call, that JITP and fleet set-up send
//! what AWS needs, and that bad configurations are refused before any call.
//!
//! [`Bed`] is the test bed the other cloud tests share: a moto server, a
//! proxy in front of it, the `fixtures/cloud` folder copied beside a CA.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::util::moto::{provline_aws, Moto};
use crate::util::proxy::{Call, Faults, Proxy};
use crate::util::py::{cert_facts, key_facts, oid};
use crate::util::*;

/// A moto server, a proxy in front of it, and a station folder: the
/// `fixtures/cloud` files in `TMP/station/` and a P-256 CA in `TMP/ca/`
/// (which `station.toml` names as `../ca`).
pub struct Bed {
    // Field order is drop order: the proxy before moto.
    pub proxy: Proxy,
    pub moto: Moto,
    pub station: PathBuf,
    pub ca: PathBuf,
    pub tmp: tempfile::TempDir,
}

impl Bed {
    pub fn new(faults: Faults) -> Bed {
        let tmp = tempdir();
        let station = tmp.path().join("station");
        copy_dir(&fixture("cloud"), &station);
        let ca = tmp.path().join("ca");
        fs::create_dir_all(&ca).expect("mkdir ca");
        for f in ["ca.pem", "ca.key"] {
            fs::copy(fixture(&format!("cas/ec-p256-pkcs8/{f}")), ca.join(f)).expect("copy CA");
        }
        fs::set_permissions(ca.join("ca.key"), fs::Permissions::from_mode(0o600)).expect("chmod");
        let moto = Moto::start();
        let proxy = Proxy::start(moto.port, faults);
        Bed {
            proxy,
            moto,
            station,
            ca,
            tmp,
        }
    }

    /// A file of the station folder.
    pub fn config(&self, name: &str) -> PathBuf {
        self.station.join(name)
    }

    /// `provline ARGS` in the temporary folder, through the proxy.
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Run {
        provline_aws(self.tmp.path(), args, &self.proxy.endpoint(), &[])
    }

    /// `provline cloud setup --config FILE [EXTRA]`.
    pub fn setup(&self, config: &str, extra: &[&str]) -> Run {
        let cfg = self.config(config);
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "cloud".as_ref(),
            "setup".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ];
        args.extend(extra.iter().map(|e| std::ffi::OsStr::new(*e)));
        self.run(&args)
    }

    /// The CA's certificate id (SHA-256 of its DER).
    pub fn ca_id(&self) -> String {
        pem_der_sha256(&self.ca.join("ca.pem"))
    }

    /// The calls the proxy saw that change something in AWS.
    pub fn writes(&self) -> Vec<Call> {
        self.proxy
            .calls()
            .into_iter()
            .filter(|c| !is_read_only(&c.op))
            .collect()
    }
}

/// The operations that only read.
pub fn is_read_only(op: &str) -> bool {
    ["Describe", "Get", "List"]
        .iter()
        .any(|p| op.starts_with(p))
}

/// SHA-256 of the DER of the first certificate in a PEM file.
pub fn pem_der_sha256(path: &Path) -> String {
    let text = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let block = pem::parse(&text).unwrap_or_else(|e| panic!("{} is not PEM: {e}", path.display()));
    sha256_hex(block.contents())
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read fixture folder") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), dest).expect("copy fixture");
        }
    }
}

/// A JSON file of the station folder.
pub fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A JSON value held as a string (a policy document, a template body).
#[track_caller]
pub fn json_string(v: &Value, what: &str) -> Value {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {s}"))
}

/// The resource lines of a setup run: (status, kind, name).
fn setup_lines(run: &Run) -> Vec<(String, String, String)> {
    run.stdout
        .lines()
        .filter_map(|l| {
            let mut p = l.splitn(3, ' ');
            let (s, k, n) = (p.next()?, p.next()?, p.next()?);
            ["created", "updated", "unchanged"]
                .contains(&s)
                .then(|| (s.to_string(), k.to_string(), n.to_string()))
        })
        .collect()
}

#[test]
fn setup_creates_everything_and_a_second_run_changes_nothing() {
    let bed = Bed::new(Faults::none());
    let first = bed.setup("station.toml", &[]);
    first.expect_code(0);
    let lines = setup_lines(&first);
    let kinds: Vec<&str> = lines.iter().map(|(_, k, _)| k.as_str()).collect();
    for want in [
        "policy",
        "thing-type",
        "thing-group",
        "ca-certificate",
        "provisioning-template",
        "claim-certificate",
    ] {
        assert!(kinds.contains(&want), "no {want} line\n{first}");
    }
    assert!(
        lines.iter().all(|(s, _, _)| s == "created"),
        "a first run creates everything\n{first}"
    );

    // Policies: the guide's documents, as the station read them.
    let moto = &bed.moto;
    assert_eq!(
        moto.policy_names(),
        vec!["FleetClaimPolicy".to_string(), "SensorPolicy".to_string()]
    );
    for name in ["SensorPolicy", "FleetClaimPolicy"] {
        let p = moto.policy(name).expect("policy");
        assert_eq!(
            json_string(&p["policyDocument"], name),
            read_json(&bed.config(&format!("policies/{name}.json"))),
            "document of {name}"
        );
    }
    let types = moto.thing_types();
    assert_eq!(types.len(), 1, "{types:?}");
    assert_eq!(types[0]["thingTypeName"], json!("Sensor"));
    assert_eq!(
        types[0]["thingTypeProperties"]["searchableAttributes"],
        json!(["model"])
    );
    assert_eq!(moto.thing_group_names(), vec!["line-1".to_string()]);

    // JITP: the CA registered ACTIVE, auto-registration on, the template
    // and role as configured.
    let ca = moto
        .ca_certificate(&bed.ca_id())
        .unwrap_or_else(|| panic!("CA {} not registered\n{first}", bed.ca_id()));
    let desc = &ca["certificateDescription"];
    assert_eq!(desc["status"], json!("ACTIVE"), "{ca}");
    assert_eq!(desc["autoRegistrationStatus"], json!("ENABLE"), "{ca}");
    let reg = &ca["registrationConfig"];
    assert_eq!(
        json_string(&reg["templateBody"], "registrationConfig.templateBody"),
        read_json(&bed.config("templates/jitp.json"))["templateBody"],
        "JITP template body"
    );
    assert_eq!(
        reg["roleArn"],
        json!("arn:aws:iam::123456789012:role/JITPRole")
    );
    let register_ca = bed.proxy.calls_of("RegisterCACertificate");
    assert_eq!(register_ca.len(), 1);
    let body = register_ca[0].json();
    // Both flags travel in the query string.
    let path = &register_ca[0].path;
    assert!(
        path.contains("setAsActive=true") && path.contains("allowAutoRegistration=true"),
        "RegisterCACertificate {path}"
    );
    // The verification certificate: signed by the CA, for the code AWS gave.
    let codes: Vec<String> = bed
        .proxy
        .calls_of("GetRegistrationCode")
        .iter()
        .filter_map(|c| {
            c.response_json()["registrationCode"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    let verification = bed.tmp.path().join("verification.pem");
    fs::write(
        &verification,
        body["verificationCertificate"]
            .as_str()
            .unwrap_or_else(|| panic!("DEFAULT mode sends a verification certificate: {body}")),
    )
    .expect("write verification.pem");
    let ca_pem = bed.ca.join("ca.pem");
    let v = openssl(
        bed.tmp.path(),
        &[
            "verify".as_ref(),
            "-CAfile".as_ref(),
            ca_pem.as_os_str(),
            verification.as_os_str(),
        ],
    );
    assert!(
        v.code == 0 && v.stdout.contains(": OK"),
        "verification certificate\n{v}"
    );
    let facts = cert_facts(&verification);
    let cn = facts["subject"][oid::CN].get(0).cloned();
    assert!(
        cn.as_ref()
            .and_then(Value::as_str)
            .is_some_and(|cn| codes.iter().any(|c| c == cn)),
        "verification certificate CN {cn:?} is none of the registration codes {codes:?}"
    );

    // Fleet: CreateProvisioningTemplate carries the template, the role and
    // the hook.
    let create = bed.proxy.calls_of("CreateProvisioningTemplate");
    assert_eq!(create.len(), 1, "one CreateProvisioningTemplate");
    let body = create[0].json();
    assert_eq!(body["templateName"], json!("FleetSensorTemplate"));
    assert_eq!(
        json_string(&body["templateBody"], "templateBody"),
        read_json(&bed.config("templates/fleet.json"))
    );
    assert_eq!(
        body["provisioningRoleArn"],
        json!("arn:aws:iam::123456789:role/IoTFleetProvisioningRole")
    );
    assert_eq!(
        body["preProvisioningHook"]["targetArn"],
        json!("arn:aws:lambda:us-east-1:123456789012:function:hook")
    );

    // The claim certificate: files, mode 0600 key, the key matches, moto
    // holds it ACTIVE with the claim policy attached.
    let claim = bed.station.join("claim");
    let (pem_path, key_path) = (claim.join("claim.pem"), claim.join("claim.key"));
    assert_eq!(mode(&key_path), 0o600, "claim.key mode");
    assert_eq!(
        cert_facts(&pem_path)["spki"],
        key_facts(&key_path)["spki"],
        "claim.key is the key of claim.pem"
    );
    let claim_json = read_json(&claim.join("claim.json"));
    let id = pem_der_sha256(&pem_path);
    assert_eq!(
        claim_json["certificateId"]
            .as_str()
            .or(claim_json["certificate_id"].as_str()),
        Some(id.as_str()),
        "claim.json: {claim_json}"
    );
    let cert = moto.certificate(&id).expect("claim certificate in moto");
    assert_eq!(cert["status"], json!("ACTIVE"));
    let arn = cert["certificateArn"].as_str().expect("arn").to_string();
    assert_eq!(
        moto.attached_policies(&arn),
        vec!["FleetClaimPolicy".to_string()]
    );

    // The second run: every resource unchanged, moto's state the same,
    // nothing written.
    let before = moto.snapshot(&[bed.ca_id()]);
    let templates = bed.proxy.templates();
    let claim_files: Vec<Vec<u8>> = ["claim.pem", "claim.key", "claim.json"]
        .iter()
        .map(|f| fs::read(claim.join(f)).expect("claim file"))
        .collect();
    bed.proxy.clear_calls();
    let second = bed.setup("station.toml", &[]);
    second.expect_code(0);
    let lines2 = setup_lines(&second);
    assert_eq!(lines2.len(), lines.len(), "{second}");
    assert!(
        lines2.iter().all(|(s, _, _)| s == "unchanged"),
        "second run\n{second}"
    );
    assert_eq!(
        second.stdout.lines().last(),
        Some("nothing to change"),
        "{second}"
    );
    assert_eq!(
        moto.snapshot(&[bed.ca_id()]),
        before,
        "moto's state changed"
    );
    assert_eq!(bed.proxy.templates(), templates);
    let writes: Vec<String> = bed.writes().iter().map(|c| c.op.clone()).collect();
    assert!(writes.is_empty(), "the second run wrote: {writes:?}");
    for (f, was) in ["claim.pem", "claim.key", "claim.json"]
        .iter()
        .zip(&claim_files)
    {
        assert_eq!(
            &fs::read(claim.join(f)).expect("claim file"),
            was,
            "{f} changed"
        );
    }
}

#[test]
fn setup_dry_run_prints_the_calls_and_makes_none() {
    let bed = Bed::new(Faults::none());
    let run = bed.setup("station.toml", &["--dry-run"]);
    run.expect_code(0);
    for want in [
        "would call CreatePolicy SensorPolicy",
        "would call CreatePolicy FleetClaimPolicy",
        "would call CreateThingType Sensor",
        "would call CreateThingGroup line-1",
        "would call GetRegistrationCode",
        "would call RegisterCACertificate",
        "would call CreateProvisioningTemplate FleetSensorTemplate",
        "would call CreateKeysAndCertificate",
        "would call AttachPolicy FleetClaimPolicy",
    ] {
        assert!(run.stdout.contains(want), "missing `{want}`\n{run}");
    }
    assert!(
        bed.proxy.calls().is_empty(),
        "--dry-run called AWS: {:?}",
        bed.proxy.tally()
    );
    assert!(
        !bed.station.join("claim").exists(),
        "--dry-run wrote claim files"
    );

    // No credentials and no reachable endpoint: a dry run still works.
    let cfg = bed.config("station.toml");
    let r = provline_aws(
        bed.tmp.path(),
        &[
            "cloud".as_ref(),
            "setup".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--dry-run".as_ref(),
        ],
        "http://127.0.0.1:9",
        &[
            ("AWS_ACCESS_KEY_ID", String::new()),
            ("AWS_SECRET_ACCESS_KEY", String::new()),
        ],
    );
    r.expect_code(0);
    assert!(
        r.stdout.contains("would call CreatePolicy SensorPolicy"),
        "{r}"
    );
}

#[test]
fn bad_configurations_are_refused_before_any_call_naming_file_and_key() {
    let bed = Bed::new(Faults::none());
    // (config file, words the message must hold)
    let cases: &[(&str, &[&str])] = &[
        ("bad-unknown-key.toml", &["bad-unknown-key.toml", "colour"]),
        ("bad-missing-file.toml", &["NoSuchPolicy.json"]),
        ("bad-policy-not-json.toml", &["not-json.json"]),
        (
            "bad-jitp-unfilled-field.toml",
            &["jitp-needs-ou.json", "OrganizationalUnit"],
        ),
        ("no-such-station.toml", &["no-such-station.toml"]),
    ];
    for (file, words) in cases {
        bed.proxy.clear_calls();
        let run = bed.setup(file, &[]);
        assert_eq!(run.code, 2, "{file}: exit code\n{run}");
        let text = run.text();
        for w in *words {
            assert!(
                text.contains(w),
                "{file}: the message does not name `{w}`\n{run}"
            );
        }
        assert!(
            bed.proxy.calls().is_empty(),
            "{file}: calls were made before the refusal: {:?}",
            bed.proxy.tally()
        );
        // A dry run refuses the same configuration.
        let dry = bed.setup(file, &["--dry-run"]);
        assert_eq!(dry.code, 2, "{file}: --dry-run exit code\n{dry}");
    }
    let empty = bed.moto.snapshot(&[]);
    assert_eq!(empty["policies"], json!({}), "nothing was created: {empty}");
}

#[test]
fn setup_survives_throttling_and_dropped_connections() {
    let bed = Bed::new(Faults {
        throttle: 0.3,
        server_error: 0.05,
        drop_before: 0.05,
        drop_after: 0.05,
        seed: 7,
        only: None,
    });
    let first = bed.setup("station.toml", &[]);
    first.expect_code(0);
    let faults = bed
        .proxy
        .calls()
        .iter()
        .filter(|c| c.outcome.is_fault())
        .count();
    assert!(faults > 0, "no fault was injected: {:?}", bed.proxy.tally());
    bed.proxy.set_faults(Faults::none());
    let before = bed.moto.snapshot(&[bed.ca_id()]);
    // CreateKeysAndCertificate cannot be repeated safely: an answer lost
    // after moto made the certificate leaves one the station never saw.
    let lost = bed
        .proxy
        .calls_of("CreateKeysAndCertificate")
        .iter()
        .filter(|c| matches!(c.outcome, crate::util::proxy::Outcome::DroppedAfter(_)))
        .count();
    assert_eq!(
        before["certificates"].as_array().map(Vec::len),
        Some(1 + lost),
        "one claim certificate plus those whose answer was lost: {before}"
    );
    let claim_id = pem_der_sha256(&bed.station.join("claim/claim.pem"));
    let arn = bed.moto.certificate(&claim_id).expect("claim certificate")["certificateArn"]
        .as_str()
        .expect("arn")
        .to_string();
    assert_eq!(
        bed.moto.attached_policies(&arn),
        vec!["FleetClaimPolicy".to_string()]
    );
    let second = bed.setup("station.toml", &[]);
    second.expect_code(0);
    assert_eq!(
        second.stdout.lines().last(),
        Some("nothing to change"),
        "{second}"
    );
    assert_eq!(bed.moto.snapshot(&[bed.ca_id()]), before);
}

/// Multi-account: the same CA registered in SNI_ONLY mode, which needs no
/// registration code and no verification certificate.
#[test]
fn setup_registers_the_ca_sni_only_without_a_verification_certificate() {
    let bed = Bed::new(Faults::none());
    let cfg = bed.config("station.toml");
    let text = fs::read_to_string(&cfg).expect("read station.toml");
    assert!(text.contains("mode = \"default\""), "fixture changed");
    fs::write(
        bed.config("station-sni.toml"),
        text.replace("mode = \"default\"", "mode = \"sni-only\""),
    )
    .expect("write station-sni.toml");
    let run = bed.setup("station-sni.toml", &[]);
    run.expect_code(0);
    assert!(
        bed.proxy.calls_of("GetRegistrationCode").is_empty(),
        "SNI_ONLY needs no registration code\n{run}"
    );
    let register_ca = bed.proxy.calls_of("RegisterCACertificate");
    assert_eq!(register_ca.len(), 1, "{run}");
    let body = register_ca[0].json();
    assert_eq!(body["certificateMode"], json!("SNI_ONLY"), "{body}");
    assert!(
        body.get("verificationCertificate").is_none(),
        "a verification certificate was sent in SNI_ONLY mode: {body}"
    );
    assert!(
        bed.moto.ca_certificate(&bed.ca_id()).is_some(),
        "the CA is not registered in moto\n{run}"
    );
}
