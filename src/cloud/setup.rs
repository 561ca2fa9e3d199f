//! One-time account setup from the station configuration: policies, thing
//! type, thing groups, the JITP CA, the fleet provisioning template and its
//! claim certificate.
//!
//! [`plan`] reads and checks everything local first (policy documents, the
//! CA, the templates against the certificate profile) and makes no call: it
//! is what `--dry-run` prints. [`apply`] then takes each [`Resource`] in
//! turn, looks whether AWS holds it already, and creates only what is
//! missing, so a second run changes nothing and says so.

use std::path::{Path, PathBuf};

use serde::Serialize;
use time::OffsetDateTime;

use super::config::{read_policy_document, CaMode, ConfigError, StationConfig};
use super::limits::Api;
use super::registry::{Answer, Cloud, CloudError, NewTemplate, RegisterCa};
use super::template::{JitpTemplate, TemplateError};
use crate::ca::{CaError, LocalCa};
use crate::fsx;

/// Setup that cannot start: the configuration or a file it names.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The configuration file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A policy document that is not a policy.
    #[error("policy {name}: {problem}")]
    Policy {
        /// The policy.
        name: String,
        /// The file and what is wrong.
        problem: String,
    },
    /// A provisioning template.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The JITP CA.
    #[error("jitp.ca")]
    Ca(#[from] CaError),
}

/// A resource setup makes sure of.
#[derive(Debug)]
pub enum Resource {
    /// An IoT policy.
    Policy {
        /// Its name.
        name: String,
        /// Its document (checked JSON).
        document: String,
    },
    /// The thing type.
    ThingType {
        /// Its name.
        name: String,
        /// Searchable attributes.
        searchable: Vec<String>,
    },
    /// A thing group.
    ThingGroup {
        /// Its name.
        name: String,
    },
    /// The local CA, registered for JITP.
    JitpCa {
        /// The CA.
        ca: Box<LocalCa>,
        /// The template body (checked against the profile).
        template_body: String,
        /// The JITP role.
        role_arn: String,
        /// `SNI_ONLY` mode.
        sni_only: bool,
    },
    /// The fleet provisioning template.
    FleetTemplate(NewTemplate),
    /// The fleet claim certificate and its policy.
    ClaimCertificate {
        /// Where claim.pem, claim.key and claim.json go.
        dir: PathBuf,
        /// The claim policy.
        policy: String,
    },
}

/// What setup did to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// It was not there; it is now.
    Created,
    /// It was there, not in the wanted state; it is now.
    Updated,
    /// It was there as wanted.
    Unchanged,
}

impl Change {
    /// The word printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Unchanged => "unchanged",
        }
    }
}

/// Claim certificate file names.
pub const CLAIM_CERT: &str = "claim.pem";
/// The claim's private key (0600).
pub const CLAIM_KEY: &str = "claim.key";
/// The claim certificate's id and ARN.
pub const CLAIM_JSON: &str = "claim.json";

impl Resource {
    /// What kind of resource it is.
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Policy { .. } => "policy",
            Resource::ThingType { .. } => "thing-type",
            Resource::ThingGroup { .. } => "thing-group",
            Resource::JitpCa { .. } => "ca-certificate",
            Resource::FleetTemplate(_) => "provisioning-template",
            Resource::ClaimCertificate { .. } => "claim-certificate",
        }
    }

    /// Its name.
    pub fn name(&self) -> String {
        match self {
            Resource::Policy { name, .. }
            | Resource::ThingType { name, .. }
            | Resource::ThingGroup { name } => name.clone(),
            Resource::JitpCa { ca, .. } => ca_id(ca),
            Resource::FleetTemplate(t) => t.name.clone(),
            Resource::ClaimCertificate { dir, .. } => dir.display().to_string(),
        }
    }

    /// The calls that create it, as `--dry-run` prints them.
    pub fn calls(&self) -> Vec<(Api, String)> {
        match self {
            Resource::Policy { name, .. } => vec![(Api::CreatePolicy, name.clone())],
            Resource::ThingType { name, .. } => vec![(Api::CreateThingType, name.clone())],
            Resource::ThingGroup { name } => vec![(Api::CreateThingGroup, name.clone())],
            Resource::JitpCa { ca, sni_only, .. } => {
                let mut calls = Vec::new();
                if !sni_only {
                    calls.push((Api::GetRegistrationCode, String::new()));
                }
                calls.push((
                    Api::RegisterCACertificate,
                    format!(
                        "{} ({})",
                        ca_id(ca),
                        if *sni_only { "SNI_ONLY" } else { "DEFAULT" }
                    ),
                ));
                calls
            }
            Resource::FleetTemplate(t) => vec![(Api::CreateProvisioningTemplate, t.name.clone())],
            Resource::ClaimCertificate { dir, policy } => vec![
                (Api::CreateKeysAndCertificate, dir.display().to_string()),
                (Api::AttachPolicy, policy.clone()),
            ],
        }
    }
}

fn ca_id(ca: &LocalCa) -> String {
    crate::ca::serial::hex(ring::digest::digest(&ring::digest::SHA256, ca.cert_der()).as_ref())
}

/// Reads and checks everything the configuration names; makes no call.
pub fn plan(config: &StationConfig, now: OffsetDateTime) -> Result<Vec<Resource>, SetupError> {
    let mut resources = Vec::new();
    for p in &config.policy {
        let document = read_policy_document(&p.document).map_err(|problem| SetupError::Policy {
            name: p.name.clone(),
            problem,
        })?;
        resources.push(Resource::Policy {
            name: p.name.clone(),
            document,
        });
    }
    if let Some(t) = &config.thing_type {
        resources.push(Resource::ThingType {
            name: t.name.clone(),
            searchable: t.searchable_attributes.clone(),
        });
    }
    for g in &config.thing_group {
        resources.push(Resource::ThingGroup {
            name: g.name.clone(),
        });
    }
    if let Some(j) = &config.jitp {
        let template = JitpTemplate::from_file(&j.template)?;
        template.check(&config.device_profile()?)?;
        let ca = LocalCa::load(&j.ca, now)?;
        resources.push(Resource::JitpCa {
            ca: Box::new(ca),
            template_body: template.body().to_string(),
            role_arn: j.role_arn.clone(),
            sni_only: j.mode == CaMode::SniOnly,
        });
    }
    if let Some(f) = &config.fleet {
        let body = read_template_body(&f.template)?;
        resources.push(Resource::FleetTemplate(NewTemplate {
            name: f.template_name.clone(),
            body,
            role_arn: f.role_arn.clone(),
            pre_provisioning_hook: f.pre_provisioning_hook.clone(),
        }));
        resources.push(Resource::ClaimCertificate {
            dir: f.claim_dir.clone(),
            policy: f.claim_policy.clone(),
        });
    }
    Ok(resources)
}

/// A provisioning template body: the file's `templateBody` (string or
/// object) or the whole file, as JSON text.
pub fn read_template_body(path: &Path) -> Result<String, TemplateError> {
    let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TemplateError::Json {
            path: path.to_path_buf(),
            reason: format!("line {}, column {}: {e}", e.line(), e.column()),
        })?;
    let body = match value.get("templateBody") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(obj) => obj.to_string(),
        None => value.to_string(),
    };
    let parsed: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| TemplateError::Json {
            path: path.to_path_buf(),
            reason: format!("templateBody: {e}"),
        })?;
    if !parsed
        .get("Resources")
        .is_some_and(serde_json::Value::is_object)
    {
        return Err(TemplateError::Shape {
            path: path.to_path_buf(),
            reason: "no \"Resources\" object: not a provisioning template".into(),
        });
    }
    Ok(body)
}

fn same_json(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.trim() == b.trim(),
    }
}

/// Makes sure of one resource: looks first, creates only what is missing.
pub async fn apply(
    cloud: &Cloud,
    resource: &Resource,
    now: OffsetDateTime,
) -> Result<Change, CloudError> {
    match resource {
        Resource::Policy { name, document } => {
            let found = cloud
                .call_value(Api::GetPolicy, None, |r| r.get_policy(name))
                .await?;
            match found {
                Some(doc) if same_json(&doc, document) => Ok(Change::Unchanged),
                Some(_) => Err(CloudError::check(
                    Api::GetPolicy,
                    None,
                    format!("policy {name} exists with another document; the station does not replace policies (delete it or rename yours)"),
                )),
                None => created(
                    cloud
                        .call(Api::CreatePolicy, None, |r| r.create_policy(name, document))
                        .await?,
                ),
            }
        }
        Resource::ThingType { name, searchable } => {
            if cloud
                .call_value(Api::DescribeThingType, None, |r| {
                    r.describe_thing_type(name)
                })
                .await?
            {
                return Ok(Change::Unchanged);
            }
            created(
                cloud
                    .call(Api::CreateThingType, None, |r| {
                        r.create_thing_type(name, searchable)
                    })
                    .await?,
            )
        }
        Resource::ThingGroup { name } => {
            if cloud
                .call_value(Api::DescribeThingGroup, None, |r| {
                    r.describe_thing_group(name)
                })
                .await?
            {
                return Ok(Change::Unchanged);
            }
            created(
                cloud
                    .call(Api::CreateThingGroup, None, |r| r.create_thing_group(name))
                    .await?,
            )
        }
        Resource::JitpCa {
            ca,
            template_body,
            role_arn,
            sni_only,
        } => apply_ca(cloud, ca, template_body, role_arn, *sni_only, now).await,
        Resource::FleetTemplate(t) => {
            let found = cloud
                .call_value(Api::DescribeProvisioningTemplate, None, |r| {
                    r.describe_provisioning_template(&t.name)
                })
                .await?;
            match found {
                Some(body) if same_json(&body, &t.body) => Ok(Change::Unchanged),
                Some(_) => Err(CloudError::check(
                    Api::DescribeProvisioningTemplate,
                    None,
                    format!("template {} exists with another body; the station does not replace templates", t.name),
                )),
                None => created(
                    cloud
                        .call(Api::CreateProvisioningTemplate, None, |r| {
                            r.create_provisioning_template(t)
                        })
                        .await?,
                ),
            }
        }
        Resource::ClaimCertificate { dir, policy } => apply_claim(cloud, dir, policy).await,
    }
}

fn created<T>(answer: Answer<T>) -> Result<Change, CloudError> {
    Ok(match answer {
        Answer::Done(_) => Change::Created,
        Answer::AlreadyDone => Change::Unchanged,
    })
}

async fn apply_ca(
    cloud: &Cloud,
    ca: &LocalCa,
    template_body: &str,
    role_arn: &str,
    sni_only: bool,
    now: OffsetDateTime,
) -> Result<Change, CloudError> {
    let id = ca_id(ca);
    let found = cloud
        .call_value(Api::DescribeCACertificate, None, |r| {
            r.describe_ca_certificate(&id)
        })
        .await?;
    if let Some(info) = found {
        if info.is_active() && info.auto_registration != Some(false) {
            return Ok(Change::Unchanged);
        }
        cloud
            .call_value(Api::UpdateCACertificate, None, |r| {
                r.activate_ca_certificate(&id)
            })
            .await?;
        return Ok(Change::Updated);
    }
    let verification_pem = if sni_only {
        None
    } else {
        let code = cloud
            .call_value(Api::GetRegistrationCode, None, |r| {
                r.get_registration_code()
            })
            .await?;
        let cert = ca.verification_cert(&code, now).map_err(|e| {
            CloudError::check(
                Api::GetRegistrationCode,
                None,
                format!("making the verification certificate: {e}"),
            )
        })?;
        check_verification(ca, &cert.der, &code)
            .map_err(|p| CloudError::check(Api::RegisterCACertificate, None, p))?;
        Some(cert.pem())
    };
    let req = RegisterCa {
        ca_pem: ca.cert_pem().to_string(),
        verification_pem,
        template_body: template_body.to_string(),
        role_arn: role_arn.to_string(),
        sni_only,
    };
    match cloud
        .call(Api::RegisterCACertificate, None, |r| {
            r.register_ca_certificate(&req)
        })
        .await?
    {
        Answer::Done(cert) if cert.id != id => Err(CloudError::check(
            Api::RegisterCACertificate,
            None,
            format!(
                "AWS answered certificate id {}, but the SHA-256 of the CA certificate is {id}",
                cert.id
            ),
        )),
        Answer::Done(_) => Ok(Change::Created),
        Answer::AlreadyDone => Ok(Change::Unchanged),
    }
}

/// The verification certificate's subject CN is the registration code and
/// its signature verifies under the CA's key.
pub fn check_verification(ca: &LocalCa, der: &[u8], code: &str) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("verification certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default();
    if cn != code.trim() {
        return Err(format!(
            "verification certificate CN {cn:?} is not the registration code {code:?}"
        ));
    }
    let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der())
        .map_err(|e| format!("CA certificate: {e}"))?;
    cert.verify_signature(Some(ca_cert.public_key()))
        .map_err(|e| format!("verification certificate does not chain to the CA: {e}"))
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct ClaimFile {
    certificate_id: String,
    certificate_arn: String,
}

async fn apply_claim(cloud: &Cloud, dir: &Path, policy: &str) -> Result<Change, CloudError> {
    let api = Api::CreateKeysAndCertificate;
    let local = |p: String| CloudError::check(api, None, p);
    let json_path = dir.join(CLAIM_JSON);
    let (claim, change) = if json_path.exists() {
        let text = std::fs::read_to_string(&json_path)
            .map_err(|e| local(format!("{}: {e}", json_path.display())))?;
        let claim: ClaimFile = serde_json::from_str(&text)
            .map_err(|e| local(format!("{}: {e}", json_path.display())))?;
        let held = cloud
            .call_value(Api::DescribeCertificate, None, |r| {
                r.describe_certificate(&claim.certificate_id)
            })
            .await?;
        if held.is_none() {
            return Err(CloudError::check(
                Api::DescribeCertificate,
                None,
                format!(
                    "{} names certificate {}, which AWS does not hold; move the folder away to make a new claim",
                    json_path.display(),
                    claim.certificate_id
                ),
            ));
        }
        (claim, Change::Unchanged)
    } else {
        let made = cloud
            .call_value(api, None, |r| r.create_keys_and_certificate())
            .await?;
        std::fs::create_dir_all(dir).map_err(|e| local(format!("{}: {e}", dir.display())))?;
        let write = |name: &str, bytes: &[u8], mode: u32| {
            let path = dir.join(name);
            fsx::write_atomic(&path, bytes, mode, fsx::Durability::Sync)
                .map_err(|e| local(format!("{}: {e}", path.display())))
        };
        write(
            CLAIM_KEY,
            made.private_key_pem
                .as_deref()
                .unwrap_or_default()
                .as_bytes(),
            fsx::SECRET,
        )?;
        write(CLAIM_CERT, made.pem.as_bytes(), fsx::PUBLIC)?;
        let claim = ClaimFile {
            certificate_id: made.cert.id,
            certificate_arn: made.cert.arn,
        };
        let json = serde_json::to_vec_pretty(&claim).unwrap_or_default();
        write(CLAIM_JSON, &json, fsx::PUBLIC)?;
        (claim, Change::Created)
    };
    let attached = cloud
        .call_value(Api::ListAttachedPolicies, None, |r| {
            r.list_attached_policies(&claim.certificate_arn)
        })
        .await?;
    if attached.iter().any(|p| p == policy) {
        return Ok(change);
    }
    cloud
        .call(Api::AttachPolicy, None, |r| {
            r.attach_policy(policy, &claim.certificate_arn)
        })
        .await?;
    Ok(if change == Change::Unchanged {
        Change::Updated
    } else {
        change
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaInit;
    use crate::keygen::KeyType;

    fn ca(name: &str) -> LocalCa {
        LocalCa::ephemeral(&CaInit::new(KeyType::P256, name), OffsetDateTime::now_utc()).unwrap()
    }

    #[test]
    fn the_verification_certificate_is_checked_before_it_is_sent() {
        let now = OffsetDateTime::now_utc();
        let ours = ca("Our CA");
        let code = "2ddd1eac-3fe0-492a-bdbb-13ed493ae778";
        let cert = ours.verification_cert(code, now).unwrap();
        check_verification(&ours, &cert.der, code).unwrap();
        let err = check_verification(&ours, &cert.der, "another-code").unwrap_err();
        assert!(err.contains("is not the registration code"), "{err}");
        let theirs = ca("Their CA").verification_cert(code, now).unwrap();
        let err = check_verification(&ours, &theirs.der, code).unwrap_err();
        assert!(err.contains("does not chain to the CA"), "{err}");
    }

    #[test]
    fn plan_reads_and_checks_everything_before_any_call() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "p.json",
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#,
        );
        write("bad.json", r#"{"Statement":[]}"#);
        write(
            "s.toml",
            "[[policy]]\nname = \"P\"\ndocument = \"p.json\"\n[[thing_group]]\nname = \"g\"\n",
        );
        let config = StationConfig::load(&dir.path().join("s.toml")).unwrap();
        let plan = plan(&config, OffsetDateTime::now_utc()).unwrap();
        let calls: Vec<_> = plan.iter().flat_map(Resource::calls).collect();
        assert_eq!(
            calls,
            [
                (Api::CreatePolicy, "P".to_string()),
                (Api::CreateThingGroup, "g".to_string())
            ]
        );
        write(
            "s.toml",
            "[[policy]]\nname = \"P\"\ndocument = \"bad.json\"\n",
        );
        let config = StationConfig::load(&dir.path().join("s.toml")).unwrap();
        let err = super::plan(&config, OffsetDateTime::now_utc())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.json") && err.contains("Version"), "{err}");
    }
}
