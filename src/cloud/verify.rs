//! `cloud verify`: does AWS IoT hold what the ledger says it registered?
//!
//! For every device the ledger holds as registered, with the thing and
//! certificate its steps recorded: the thing exists (DescribeThing), its
//! only principal is that certificate (ListThingPrincipals), and the
//! certificate has the device policy attached (ListAttachedPolicies). A
//! device registered by certificate only is checked with
//! DescribeCertificate.

use serde::Serialize;

use super::limits::Api;
use super::registry::{Cloud, CloudError};
use crate::ledger::registration::RegisteredDevice;

/// One difference between the ledger and AWS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The device serial.
    pub serial: String,
    /// The thing name.
    pub thing_name: String,
    /// What differs.
    pub what: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.serial, self.thing_name, self.what)
    }
}

/// The certificate id a device's steps hold: the last one recorded.
pub fn certificate_id(dev: &RegisteredDevice) -> Option<&str> {
    dev.steps
        .iter()
        .rev()
        .map(|s| s.certificate_id.as_str())
        .find(|id| !id.is_empty())
}

/// Checks one device; its differences (none: AWS agrees).
pub async fn verify_device(
    cloud: &Cloud,
    dev: &RegisteredDevice,
    policy: Option<&str>,
) -> Result<Vec<Difference>, CloudError> {
    let serial = Some(dev.serial.as_str());
    let thing_name = dev
        .steps
        .first()
        .map(|s| s.thing_name.clone())
        .unwrap_or_else(|| dev.thing_name.clone());
    let mut diffs = Vec::new();
    let mut differ = |what: String| {
        diffs.push(Difference {
            serial: dev.serial.clone(),
            thing_name: thing_name.clone(),
            what,
        })
    };
    let Some(id) = certificate_id(dev) else {
        differ("the ledger holds no certificate id for it".into());
        return Ok(diffs);
    };
    let mode = dev.steps.first().map(|s| s.mode.as_str()).unwrap_or("");
    let held = cloud
        .call_value(Api::DescribeCertificate, serial, |r| {
            r.describe_certificate(id)
        })
        .await?;
    let Some((cert_arn, status)) = held else {
        differ(format!("certificate {id} is not in AWS IoT"));
        return Ok(diffs);
    };
    if !status.eq_ignore_ascii_case("ACTIVE") {
        differ(format!("certificate {id} is {status}, not ACTIVE"));
    }
    if mode == "certificate" {
        return Ok(diffs);
    }
    let thing = cloud
        .call_value(Api::DescribeThing, serial, |r| {
            r.describe_thing(&thing_name)
        })
        .await?;
    if thing.is_none() {
        differ("no such thing in AWS IoT".into());
        return Ok(diffs);
    }
    let principals = cloud
        .call_value(Api::ListThingPrincipals, serial, |r| {
            r.list_thing_principals(&thing_name)
        })
        .await?;
    let ours = |p: &String| p == &cert_arn || p.ends_with(&format!("/{id}"));
    match principals.as_slice() {
        [only] if ours(only) => {}
        [] => differ(format!("no principal attached; expected certificate {id}")),
        list if list.iter().any(ours) => differ(format!(
            "{} principals attached; expected only certificate {id}: {}",
            list.len(),
            list.join(", ")
        )),
        list => differ(format!(
            "principal(s) {} attached, not certificate {id}",
            list.join(", ")
        )),
    }
    if let Some(policy) = policy {
        let attached = cloud
            .call_value(Api::ListAttachedPolicies, serial, |r| {
                r.list_attached_policies(&cert_arn)
            })
            .await?;
        if !attached.iter().any(|p| p == policy) {
            differ(format!(
                "policy {policy} is not attached to certificate {id} (attached: {})",
                if attached.is_empty() {
                    "none".to_string()
                } else {
                    attached.join(", ")
                }
            ));
        }
    }
    Ok(diffs)
}
