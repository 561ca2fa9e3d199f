//! JITP provisioning templates.
//!
//! On a device's first connect AWS renders the CA's template with the
//! certificate's subject fields. A field the template references but the
//! certificate lacks leaves the device in PENDING_ACTIVATION, discovered in
//! the field. The station reads the template and refuses to start a job
//! whose profile does not fill every field it references.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::ca::{CertField, DeviceProfile};

/// AWS's limit on a registration template body.
pub const MAX_TEMPLATE_BODY: usize = 10_240;
const CERT_PREFIX: &str = "AWS::IoT::Certificate::";

/// Why a template cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// Unreadable file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not JSON, or a templateBody string that is not JSON.
    #[error("{path}: not valid JSON: {reason}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Where and why.
        reason: String,
    },
    /// JSON, but not shaped like a provisioning template.
    #[error("{path}: {reason}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// The body is over AWS's limit.
    #[error("{path}: template body is {len} characters; AWS takes at most {MAX_TEMPLATE_BODY}")]
    TooLong {
        /// The file.
        path: PathBuf,
        /// Its body length.
        len: usize,
    },
    /// A parameter JITP cannot supply.
    #[error("{path}: parameter {name:?} {reason}")]
    Parameter {
        /// The file.
        path: PathBuf,
        /// The parameter.
        name: String,
        /// Why JITP cannot fill it.
        reason: String,
    },
    /// Fields the template references that the profile does not fill.
    #[error("{path}: the template references certificate field(s) the station does not fill: {}", list_missing(.missing))]
    Unfilled {
        /// The file.
        path: PathBuf,
        /// The fields.
        missing: Vec<CertField>,
    },
}

fn list_missing(fields: &[CertField]) -> String {
    fields
        .iter()
        .map(|f| format!("{}{} (set {})", CERT_PREFIX, f.aws_name(), f.option()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A JITP provisioning template, read and checked for shape.
#[derive(Debug, Clone)]
pub struct JitpTemplate {
    path: PathBuf,
    body: String,
    role_arn: Option<String>,
    fields: BTreeSet<CertField>,
}

impl JitpTemplate {
    /// Reads a template: a bare body (`Parameters`, `Resources`), the AWS
    /// guide's `{"templateBody": {...}}`, or RegisterCACertificate's
    /// registration config `{"templateBody": "...", "roleArn": "..."}`.
    pub fn from_file(path: &Path) -> Result<Self, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(path, &text)
    }

    /// [`Self::from_file`] for text already read.
    pub fn from_json(path: &Path, text: &str) -> Result<Self, TemplateError> {
        let path = path.to_path_buf();
        let json_err = |e: serde_json::Error, what: &str| TemplateError::Json {
            path: path.clone(),
            reason: format!("{what}line {}, column {}: {e}", e.line(), e.column()),
        };
        let outer: Value = serde_json::from_str(text).map_err(|e| json_err(e, ""))?;
        let role_arn = outer
            .get("roleArn")
            .and_then(Value::as_str)
            .map(str::to_string);
        let (body, text_body) = match outer.get("templateBody") {
            Some(Value::String(s)) => (
                serde_json::from_str::<Value>(s)
                    .map_err(|e| json_err(e, "templateBody string, "))?,
                s.clone(),
            ),
            Some(obj @ Value::Object(_)) => (obj.clone(), obj.to_string()),
            Some(_) => {
                return Err(TemplateError::Shape {
                    path,
                    reason: "templateBody is neither a string nor an object".into(),
                })
            }
            None => (outer.clone(), outer.to_string()),
        };
        if text_body.chars().count() > MAX_TEMPLATE_BODY {
            return Err(TemplateError::TooLong {
                path,
                len: text_body.chars().count(),
            });
        }
        if !body.get("Resources").is_some_and(Value::is_object) {
            return Err(TemplateError::Shape {
                path,
                reason: "no \"Resources\" object: not a provisioning template".into(),
            });
        }
        let fields = referenced_fields(&path, &body)?;
        Ok(JitpTemplate {
            path,
            body: text_body,
            role_arn,
            fields,
        })
    }

    /// The certificate fields the template needs.
    pub fn fields(&self) -> &BTreeSet<CertField> {
        &self.fields
    }

    /// The template body as AWS takes it (a JSON string).
    pub fn body(&self) -> &str {
        &self.body
    }

    /// The provisioning role, when the file named one.
    pub fn role_arn(&self) -> Option<&str> {
        self.role_arn.as_deref()
    }

    /// Refuses a profile that leaves a referenced field empty.
    pub fn check(&self, profile: &DeviceProfile) -> Result<(), TemplateError> {
        let missing: Vec<CertField> = self
            .fields
            .iter()
            .copied()
            .filter(|f| !profile.fills(*f))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(TemplateError::Unfilled {
                path: self.path.clone(),
                missing,
            })
        }
    }
}

/// Every certificate field the body declares without a default or refers
/// to; any other parameter without a default is an error, since JITP
/// passes nothing but certificate fields.
fn referenced_fields(path: &Path, body: &Value) -> Result<BTreeSet<CertField>, TemplateError> {
    let mut names: BTreeSet<String> = BTreeSet::new();
    let mut defaults: BTreeSet<String> = BTreeSet::new();
    if let Some(params) = body.get("Parameters").and_then(Value::as_object) {
        for (name, decl) in params {
            if decl.get("Default").is_some() {
                defaults.insert(name.clone());
            } else {
                names.insert(name.clone());
            }
        }
    }
    collect_refs(body.get("Resources").unwrap_or(&Value::Null), &mut names);
    let resources: BTreeSet<&String> = body
        .get("Resources")
        .and_then(Value::as_object)
        .map(|r| r.keys().collect())
        .unwrap_or_default();
    let mut fields = BTreeSet::new();
    for name in names {
        if let Some(field) = name.strip_prefix(CERT_PREFIX) {
            if field == "Id" {
                continue;
            }
            let known = CertField::ALL.iter().find(|f| f.aws_name() == field);
            match known {
                Some(f) => {
                    fields.insert(*f);
                }
                None => {
                    return Err(TemplateError::Parameter {
                        path: path.to_path_buf(),
                        name,
                        reason: format!(
                            "is not a certificate field AWS IoT passes to JITP (known: {}, Id)",
                            CertField::ALL.map(CertField::aws_name).join(", ")
                        ),
                    })
                }
            }
        } else if !defaults.contains(&name)
            && !resources.contains(&name)
            && !name.starts_with("AWS::")
        {
            return Err(TemplateError::Parameter {
                path: path.to_path_buf(),
                name,
                reason: "has no Default, and JITP supplies only AWS::IoT::Certificate::* values"
                    .into(),
            });
        }
    }
    Ok(fields)
}

fn collect_refs(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("Ref", Value::String(name)) => {
                        out.insert(name.clone());
                    }
                    ("Fn::Sub", Value::String(s)) => {
                        let mut rest = s.as_str();
                        while let Some(start) = rest.find("${") {
                            let Some(end) = rest[start..].find('}') else {
                                break;
                            };
                            out.insert(rest[start + 2..start + end].to_string());
                            rest = &rest[start + end + 1..];
                        }
                    }
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> Result<JitpTemplate, TemplateError> {
        JitpTemplate::from_json(Path::new("t.json"), text)
    }

    #[test]
    fn finds_fields_in_refs_and_parameters() {
        let t = template(
            r#"{"Parameters":{"AWS::IoT::Certificate::Country":{"Type":"String"}},
                "Resources":{"thing":{"Properties":{"ThingName":{"Ref":"AWS::IoT::Certificate::CommonName"},
                "AttributePayload":{"o":{"Fn::Sub":"${AWS::IoT::Certificate::Organization}-x"}}}}}}"#,
        )
        .unwrap();
        let want: BTreeSet<_> = [
            CertField::CommonName,
            CertField::Country,
            CertField::Organization,
        ]
        .into();
        assert_eq!(t.fields(), &want);
        let mut profile = DeviceProfile::default();
        let err = t.check(&profile).unwrap_err().to_string();
        assert!(
            err.contains("Country") && err.contains("--subject-c") && err.contains("--subject-o"),
            "{err}"
        );
        profile.country = Some("DE".into());
        profile.organization = Some("Acme".into());
        t.check(&profile).unwrap();
    }

    #[test]
    fn string_template_body_is_parsed() {
        let t = template(r#"{"templateBody":"{\"Resources\":{\"a\":{\"Ref\":\"AWS::IoT::Certificate::StateName\"}}}","roleArn":"arn:x"}"#).unwrap();
        assert!(t.fields().contains(&CertField::StateName));
        assert_eq!(t.role_arn(), Some("arn:x"));
    }

    #[test]
    fn refuses_unknown_fields_and_unsupplied_parameters() {
        let unknown = template(r#"{"Resources":{"a":{"Ref":"AWS::IoT::Certificate::Locality"}}}"#);
        assert!(matches!(unknown, Err(TemplateError::Parameter { .. })));
        let free = template(r#"{"Parameters":{"Location":{"Type":"String"}},"Resources":{}}"#);
        assert!(matches!(free, Err(TemplateError::Parameter { .. })));
        let with_default = template(
            r#"{"Parameters":{"Location":{"Type":"String","Default":"x"}},"Resources":{}}"#,
        );
        assert!(with_default.is_ok());
        assert!(matches!(template("{"), Err(TemplateError::Json { .. })));
        assert!(matches!(template("{}"), Err(TemplateError::Shape { .. })));
    }
}
