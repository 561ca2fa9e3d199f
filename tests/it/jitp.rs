//! `--jitp-template`: the station refuses to start a batch whose template
//! references a certificate subject field it would not fill, and fills the
//! fields once configured.

use std::path::Path;

use super::verifiers::check_issued_devices;
use crate::util::py::oid;
use crate::util::*;

fn jitp_batch(tmp: &Path, template: &str, name: &str, extra: &[&str]) -> (Run, std::path::PathBuf) {
    let ca = tmp.join("ca");
    if !ca.join("ca.pem").exists() {
        init_ca(tmp, "ca", "p256");
    }
    let job = tmp.join("job.csv");
    write_job(&job, "serial", &["SN-JITP-1".into(), "SN-JITP-2".into()]);
    let out = tmp.join(format!("out-{name}"));
    let tpl = fixture(&format!("templates/{template}"));
    let mut args = vec!["--jitp-template", tpl.to_str().unwrap()];
    args.extend_from_slice(extra);
    (batch(tmp, &job, &ca, &out, &args), out)
}

#[track_caller]
fn assert_refused_naming(r: &Run, out: &Path, fields: &[&str]) {
    assert_eq!(
        r.code, 2,
        "template must stop the batch before it starts\n{r}"
    );
    let text = reason_words(&r.text());
    for f in fields {
        assert!(
            text.contains(&f.to_lowercase()),
            "the refusal should name {f}\n{r}"
        );
    }
    assert_nothing_issued(out, r);
}

#[test]
fn template_referencing_organization_needs_subject_o() {
    let tmp = tempdir();
    let t = "jitp-registration-config.json"; // CN, serialNumber, O, C, Id
    let (r, out) = jitp_batch(tmp.path(), t, "none", &[]);
    assert_refused_naming(&r, &out, &["Organization", "Country"]);
    let (r, out) = jitp_batch(tmp.path(), t, "c-only", &["--subject-c", "DE"]);
    assert_refused_naming(&r, &out, &["Organization"]);

    let opts = ["--subject-c", "DE", "--subject-o", "Acme"];
    let (r, out) = jitp_batch(tmp.path(), t, "both", &opts);
    r.expect_code(0);
    for f in check_issued_devices(&tmp.path().join("ca"), &out, 2) {
        assert_eq!(f["subject"][oid::O], serde_json::json!(["Acme"]), "O: {f}");
        assert_eq!(f["subject"][oid::C], serde_json::json!(["DE"]), "C: {f}");
    }
}

#[test]
fn template_referencing_ou_dnq_and_state_needs_all_three() {
    let tmp = tempdir();
    let t = "jitp-needs-ou-dnq.json";
    let (r, out) = jitp_batch(tmp.path(), t, "none", &[]);
    assert_refused_naming(
        &r,
        &out,
        &[
            "OrganizationalUnit",
            "DistinguishedNameQualifier",
            "StateName",
        ],
    );
    let two = ["--subject-ou", "Line 7", "--subject-st", "Bavaria"];
    let (r, out) = jitp_batch(tmp.path(), t, "two", &two);
    assert_refused_naming(&r, &out, &["DistinguishedNameQualifier"]);

    let all = [
        "--subject-ou",
        "Line 7",
        "--subject-st",
        "Bavaria",
        "--subject-dnq",
        "b42",
    ];
    let (r, out) = jitp_batch(tmp.path(), t, "all", &all);
    r.expect_code(0);
    for f in check_issued_devices(&tmp.path().join("ca"), &out, 2) {
        let s = &f["subject"];
        assert_eq!(s[oid::OU], serde_json::json!(["Line 7"]), "OU: {s}");
        assert_eq!(s[oid::ST], serde_json::json!(["Bavaria"]), "ST: {s}");
        assert_eq!(s[oid::DNQ], serde_json::json!(["b42"]), "dnQualifier: {s}");
    }
}

#[test]
fn aws_guide_template_needs_only_what_every_cert_has() {
    let tmp = tempdir();
    let (r, out) = jitp_batch(tmp.path(), "jitp-guide.json", "guide", &[]);
    r.expect_code(0);
    check_issued_devices(&tmp.path().join("ca"), &out, 2);
}

#[test]
fn unusable_templates_are_refused_before_any_device() {
    let tmp = tempdir();
    let (r, out) = jitp_batch(tmp.path(), "jitp-unknown-field.json", "unknown", &[]);
    assert_refused_naming(&r, &out, &["Locality"]);
    let (r, out) = jitp_batch(tmp.path(), "jitp-bad-json.json", "bad-json", &[]);
    assert_refused_naming(&r, &out, &["json"]);

    let job = tmp.path().join("job.csv");
    let out = tmp.path().join("out-missing");
    let missing = tmp.path().join("no-such-template.json");
    let args = ["--jitp-template", missing.to_str().unwrap()];
    let r = batch(tmp.path(), &job, &tmp.path().join("ca"), &out, &args);
    assert_eq!(r.code, 2, "missing template file\n{r}");
    assert_nothing_issued(&out, &r);
}
