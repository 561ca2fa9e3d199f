//! The station configuration file (TOML): what `cloud setup` creates and
//! what per-device registration uses. Paths in it are relative to the file.
//!
//! ```toml
//! [account]
//! share = 1.0                 # this station's share of the account quotas
//! [rates]                     # calls per second per API, for the account
//! CreateThing = 100
//! [[policy]]
//! name = "SensorPolicy"
//! document = "policies/SensorPolicy.json"
//! [thing_type]
//! name = "Sensor"
//! searchable_attributes = ["model"]
//! [[thing_group]]
//! name = "line-1"
//! [device]
//! policy = "SensorPolicy"
//! thing_type = "Sensor"
//! groups = ["line-1"]
//! attach = "exclusive"
//! [profile]                   # subject fields the device certificates carry
//! organization = "Acme"       # (checked against the JITP template)
//! [jitp]
//! ca = "../ca"
//! template = "templates/jitp.json"
//! role_arn = "arn:aws:iam::123456789012:role/JITPRole"
//! mode = "default"            # or "sni-only"
//! [fleet]
//! template_name = "SensorFleet"
//! template = "templates/fleet.json"
//! role_arn = "arn:aws:iam::123456789012:role/FleetRole"
//! claim_policy = "FleetClaimPolicy"
//! claim_dir = "claim"
//! [register_thing]
//! template = "templates/register-thing.json"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::limits::{Api, Limits};
use crate::ca::DeviceProfile;

/// A configuration file that cannot be used: the file, and the key or line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Unreadable file.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Not TOML, or a key of the wrong type, unknown or missing.
    #[error("{path}: line {line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Line of the problem (1-based; 0 when TOML gives no place).
        line: usize,
        /// TOML's message (it names the key).
        message: String,
    },
    /// A key whose value cannot be used.
    #[error("{path}: {key}: {problem}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key, dotted (`account.share`, `rates.CreateThing`).
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// `[account]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Account {
    /// AWS region; else the default chain's.
    pub region: Option<String>,
    /// This station's share of the account's quotas, in (0, 1].
    pub share: Option<f64>,
}

/// `[[policy]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    /// The policy name.
    pub name: String,
    /// The JSON policy document (relative to the file).
    pub document: PathBuf,
}

/// `[thing_type]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThingTypeEntry {
    /// The thing type name.
    pub name: String,
    /// Searchable attributes (at most three).
    #[serde(default)]
    pub searchable_attributes: Vec<String>,
}

/// `[[thing_group]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThingGroupEntry {
    /// The group name.
    pub name: String,
}

/// How a certificate is attached to its thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Attach {
    /// `EXCLUSIVE_THING`: the certificate belongs to this thing only.
    #[default]
    Exclusive,
    /// `NON_EXCLUSIVE_THING`.
    NonExclusive,
}

/// `[device]`: what per-device registration uses.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// The policy attached to every device certificate.
    pub policy: Option<String>,
    /// Thing type when the job row names none.
    pub thing_type: Option<String>,
    /// Groups every thing joins (with the row's).
    #[serde(default)]
    pub groups: Vec<String>,
    /// AttachThingPrincipal type.
    #[serde(default)]
    pub attach: Attach,
}

/// `[profile]`: subject fields the device certificates carry.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProfileEntry {
    /// O.
    pub organization: Option<String>,
    /// OU.
    pub organizational_unit: Option<String>,
    /// C.
    pub country: Option<String>,
    /// ST.
    pub state: Option<String>,
    /// dnQualifier.
    pub dn_qualifier: Option<String>,
}

/// JITP CA registration mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CaMode {
    /// One account; a verification certificate proves the CA key.
    #[default]
    Default,
    /// Multi-account: no verification certificate.
    SniOnly,
}

/// `[jitp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JitpEntry {
    /// The CA folder (ca.pem, ca.key).
    pub ca: PathBuf,
    /// The provisioning template.
    pub template: PathBuf,
    /// The JITP role.
    pub role_arn: String,
    /// `default` or `sni-only`.
    #[serde(default)]
    pub mode: CaMode,
}

/// `[fleet]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetEntry {
    /// The provisioning template's name.
    pub template_name: String,
    /// The template body file.
    pub template: PathBuf,
    /// The provisioning role.
    pub role_arn: String,
    /// A pre-provisioning hook Lambda ARN.
    pub pre_provisioning_hook: Option<String>,
    /// The policy attached to the claim certificate.
    pub claim_policy: String,
    /// Where claim.pem, claim.key (0600) and claim.json go.
    pub claim_dir: PathBuf,
}

/// `[register_thing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterThingEntry {
    /// The template RegisterThing renders.
    pub template: PathBuf,
}

/// The whole file, paths resolved against its folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationConfig {
    /// `[account]`.
    #[serde(default)]
    pub account: Account,
    /// `[rates]`: calls per second, by API name.
    #[serde(default)]
    pub rates: BTreeMap<String, f64>,
    /// `[[policy]]`.
    #[serde(default)]
    pub policy: Vec<PolicyEntry>,
    /// `[thing_type]`.
    pub thing_type: Option<ThingTypeEntry>,
    /// `[[thing_group]]`.
    #[serde(default)]
    pub thing_group: Vec<ThingGroupEntry>,
    /// `[device]`.
    #[serde(default)]
    pub device: DeviceEntry,
    /// `[profile]`.
    #[serde(default)]
    pub profile: ProfileEntry,
    /// `[jitp]`.
    pub jitp: Option<JitpEntry>,
    /// `[fleet]`.
    pub fleet: Option<FleetEntry>,
    /// `[register_thing]`.
    pub register_thing: Option<RegisterThingEntry>,
    /// The file it was read from.
    #[serde(skip)]
    pub path: PathBuf,
}

impl StationConfig {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(path, &text)
    }

    /// [`Self::load`] for text already read.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: StationConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(0);
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                message: e.message().to_string(),
            }
        })?;
        config.path = path.to_path_buf();
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        config
            .policy
            .iter_mut()
            .for_each(|p| resolve(&mut p.document));
        if let Some(j) = &mut config.jitp {
            resolve(&mut j.ca);
            resolve(&mut j.template);
        }
        if let Some(f) = &mut config.fleet {
            resolve(&mut f.template);
            resolve(&mut f.claim_dir);
        }
        if let Some(r) = &mut config.register_thing {
            resolve(&mut r.template);
        }
        config.limits()?;
        if let Some(policy) = &config.device.policy {
            if !config.policy.iter().any(|p| &p.name == policy) {
                return Err(config.value_error(
                    "device.policy",
                    format!("{policy:?} is not one of the [[policy]] entries"),
                ));
            }
        }
        if let Some(fleet) = &config.fleet {
            if !config.policy.iter().any(|p| p.name == fleet.claim_policy) {
                return Err(config.value_error(
                    "fleet.claim_policy",
                    format!(
                        "{:?} is not one of the [[policy]] entries",
                        fleet.claim_policy
                    ),
                ));
            }
        }
        if let Some(t) = &config.thing_type {
            if t.searchable_attributes.len() > 3 {
                return Err(config.value_error(
                    "thing_type.searchable_attributes",
                    "AWS takes at most three",
                ));
            }
        }
        config.device_profile()?;
        Ok(config)
    }

    fn value_error(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Value {
            path: self.path.clone(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    /// The rate limits the file sets: `[rates]` and `account.share`.
    pub fn limits(&self) -> Result<Limits, ConfigError> {
        let mut limits = Limits::default();
        for (name, rate) in &self.rates {
            let api: Api = name.parse().map_err(|e: super::limits::LimitsError| {
                self.value_error(&format!("rates.{name}"), e.to_string())
            })?;
            limits = limits
                .with_rate(api, *rate)
                .map_err(|e| self.value_error(&format!("rates.{name}"), e.to_string()))?;
        }
        if let Some(share) = self.account.share {
            limits = limits
                .with_account_share(share)
                .map_err(|e| self.value_error("account.share", e.to_string()))?;
        }
        Ok(limits)
    }

    /// The certificate profile `[profile]` describes (CN and serialNumber
    /// are always filled).
    pub fn device_profile(&self) -> Result<DeviceProfile, ConfigError> {
        let p = &self.profile;
        let profile = DeviceProfile {
            organization: p.organization.clone(),
            organizational_unit: p.organizational_unit.clone(),
            country: p.country.clone(),
            state: p.state.clone(),
            dn_qualifier: p.dn_qualifier.clone(),
            ..DeviceProfile::default()
        };
        profile
            .fixed_subject()
            .map_err(|e| self.value_error("profile", e.to_string()))?;
        Ok(profile)
    }

    /// The thing type of a device: the row's, else `[device] thing_type`.
    pub fn thing_type_for(&self, row: Option<&str>) -> Option<String> {
        row.map(str::to_string)
            .or_else(|| self.device.thing_type.clone())
    }

    /// The groups of a device: the row's and `[device] groups`, once each.
    pub fn groups_for(&self, row: &[String]) -> Vec<String> {
        let mut groups: Vec<String> = Vec::new();
        for g in row.iter().chain(&self.device.groups) {
            if !groups.contains(g) {
                groups.push(g.clone());
            }
        }
        groups
    }
}

/// Reads a policy document and checks it is JSON with `Version` and
/// `Statement` (AWS checks this; moto does not).
pub fn read_policy_document(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    check_policy_document(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text)
}

/// Checks a policy document's shape.
pub fn check_policy_document(text: &str) -> Result<(), String> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("not JSON: line {}, column {}: {e}", e.line(), e.column()))?;
    let obj = value
        .as_object()
        .ok_or("a policy document is a JSON object")?;
    if !obj.get("Version").is_some_and(serde_json::Value::is_string) {
        return Err("no \"Version\" string (e.g. \"2012-10-17\")".into());
    }
    match obj.get("Statement") {
        Some(serde_json::Value::Array(s)) if !s.is_empty() => Ok(()),
        Some(serde_json::Value::Object(_)) => Ok(()),
        _ => Err("no \"Statement\" (an object or a non-empty list)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[account]
share = 0.5
[rates]
CreateThing = 40
[[policy]]
name = "SensorPolicy"
document = "policies/SensorPolicy.json"
[device]
policy = "SensorPolicy"
groups = ["line-1"]
attach = "non-exclusive"
[jitp]
ca = "../ca"
template = "templates/jitp.json"
role_arn = "arn:aws:iam::123456789012:role/JITPRole"
mode = "sni-only"
"#;

    #[test]
    fn reads_the_file_and_resolves_paths() {
        let c = StationConfig::parse(Path::new("/etc/st/station.toml"), GOOD).unwrap();
        assert_eq!(
            c.policy[0].document,
            Path::new("/etc/st/policies/SensorPolicy.json")
        );
        let jitp = c.jitp.as_ref().unwrap();
        assert_eq!(jitp.ca, Path::new("/etc/st/../ca"));
        assert_eq!(jitp.mode, CaMode::SniOnly);
        assert_eq!(c.device.attach, Attach::NonExclusive);
        let limits = c.limits().unwrap();
        assert_eq!(limits.configured_rate(Api::CreateThing), 20.0);
        assert_eq!(limits.configured_rate(Api::AttachPolicy), 7.5);
        assert_eq!(
            c.groups_for(&["a".into(), "line-1".into()]),
            vec!["a".to_string(), "line-1".to_string()]
        );
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let p = Path::new("s.toml");
        let e = StationConfig::parse(p, "[account]\nshare = 2.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("s.toml: account.share:"), "{e}");
        let e = StationConfig::parse(p, "[rates]\nCreateThingz = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rates.CreateThingz"), "{e}");
        let e = StationConfig::parse(p, "[account]\n\nsharre = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("sharre"), "{e}");
        let e = StationConfig::parse(p, "[device]\npolicy = \"Nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("device.policy") && e.contains("Nope"), "{e}");
        let e = StationConfig::parse(p, "[[policy]]\nname = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("document"), "{e}");
    }

    #[test]
    fn policy_documents_need_version_and_statement() {
        assert!(check_policy_document(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#
        )
        .is_ok());
        assert!(check_policy_document(r#"{"Statement":[]}"#).is_err());
        assert!(check_policy_document(r#"{"Version":"2012-10-17"}"#).is_err());
        assert!(check_policy_document(r#"{"Version":"2012-10-17","Statement":[]}"#).is_err());
        assert!(check_policy_document("[1]").is_err());
        assert!(check_policy_document("{").unwrap_err().contains("not JSON"));
    }
}
