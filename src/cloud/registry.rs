//! The edge between the station and AWS IoT Core: every control-plane call
//! the station makes, with typed requests and answers.
//!
//! [`Registry`] is implemented over aws-sdk-iot by
//! [`AwsRegistry`](super::aws::AwsRegistry); setup, registration and
//! verification see only the trait. A call answers one attempt: pacing and
//! retries are the caller's ([`Cloud::call`] puts every attempt through the
//! API's limiter and [`run_with_retry`]).
//!
//! "Not found" is an answer, not an error: the describe and get calls
//! return `Ok(None)` for a resource that does not exist.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::limits::{Api, ApiLimiters};
use super::retry::{run_with_retry, CallError, Outcome, RetryError, RetryPolicy};

/// The future of one attempt of a call.
pub type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, CallError>> + Send + 'a>>;

/// A certificate AWS IoT holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRef {
    /// The certificate id (SHA-256 hex of its DER).
    pub id: String,
    /// Its ARN.
    pub arn: String,
}

/// A certificate AWS made or signed, with its PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCert {
    /// Id and ARN.
    pub cert: CertRef,
    /// The certificate, PEM.
    pub pem: String,
    /// The private key AWS made (CreateKeysAndCertificate only), PEM.
    pub private_key_pem: Option<String>,
}

/// A CA certificate as AWS IoT describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaInfo {
    /// Its ARN.
    pub arn: String,
    /// `ACTIVE`, `INACTIVE`.
    pub status: String,
    /// Whether JITP auto-registration is on (`None`: the answer did not say).
    pub auto_registration: Option<bool>,
    /// `DEFAULT` or `SNI_ONLY`.
    pub mode: String,
}

impl CaInfo {
    /// Whether device certificates may be registered under it.
    pub fn is_active(&self) -> bool {
        self.status.eq_ignore_ascii_case("ACTIVE")
    }
}

/// RegisterCACertificate's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterCa {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The verification certificate (`DEFAULT` mode), PEM.
    pub verification_pem: Option<String>,
    /// JITP template body and role, set as the registration config.
    pub template_body: String,
    /// The JITP role.
    pub role_arn: String,
    /// `SNI_ONLY` mode (multi-account; no verification certificate).
    pub sni_only: bool,
}

/// CreateProvisioningTemplate's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTemplate {
    /// The template name.
    pub name: String,
    /// The template body (JSON text).
    pub body: String,
    /// The provisioning role.
    pub role_arn: String,
    /// A pre-provisioning hook Lambda, if any.
    pub pre_provisioning_hook: Option<String>,
}

/// CreateThing's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewThing {
    /// The thing name.
    pub name: String,
    /// Its thing type.
    pub thing_type: Option<String>,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
}

/// A thing as DescribeThing answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThingInfo {
    /// Its ARN.
    pub arn: String,
    /// Its thing type.
    pub thing_type: Option<String>,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
}

/// RegisterThing's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredThing {
    /// The certificate, PEM, when the template made or registered one.
    pub certificate_pem: Option<String>,
    /// The ARNs of what it made, by resource kind (`thing`, `certificate`, `policy`).
    pub resource_arns: BTreeMap<String, String>,
}

/// Every AWS IoT control-plane call the station makes, one attempt each.
pub trait Registry: Send + Sync {
    /// GetPolicy: the default version's document, `None` if there is no such policy.
    fn get_policy<'a>(&'a self, name: &'a str) -> Call<'a, Option<String>>;
    /// CreatePolicy: the policy's ARN.
    fn create_policy<'a>(&'a self, name: &'a str, document: &'a str) -> Call<'a, String>;
    /// DescribeThingType: whether it exists.
    fn describe_thing_type<'a>(&'a self, name: &'a str) -> Call<'a, bool>;
    /// CreateThingType.
    fn create_thing_type<'a>(&'a self, name: &'a str, searchable: &'a [String]) -> Call<'a, ()>;
    /// DescribeThingGroup: whether it exists.
    fn describe_thing_group<'a>(&'a self, name: &'a str) -> Call<'a, bool>;
    /// CreateThingGroup.
    fn create_thing_group<'a>(&'a self, name: &'a str) -> Call<'a, ()>;
    /// GetRegistrationCode.
    fn get_registration_code(&self) -> Call<'_, String>;
    /// DescribeCACertificate by id.
    fn describe_ca_certificate<'a>(&'a self, id: &'a str) -> Call<'a, Option<CaInfo>>;
    /// RegisterCACertificate, set active, auto-registration on.
    fn register_ca_certificate<'a>(&'a self, req: &'a RegisterCa) -> Call<'a, CertRef>;
    /// UpdateCACertificate to ACTIVE with auto-registration on.
    fn activate_ca_certificate<'a>(&'a self, id: &'a str) -> Call<'a, ()>;
    /// DescribeProvisioningTemplate: its body, `None` if there is none.
    fn describe_provisioning_template<'a>(&'a self, name: &'a str) -> Call<'a, Option<String>>;
    /// CreateProvisioningTemplate (enabled): its ARN.
    fn create_provisioning_template<'a>(&'a self, req: &'a NewTemplate) -> Call<'a, String>;
    /// CreateKeysAndCertificate, set active.
    fn create_keys_and_certificate(&self) -> Call<'_, NewCert>;
    /// DescribeCertificate: its ARN and status, `None` if AWS does not hold it.
    fn describe_certificate<'a>(&'a self, id: &'a str) -> Call<'a, Option<(String, String)>>;
    /// AttachPolicy to a target (a certificate ARN).
    fn attach_policy<'a>(&'a self, policy: &'a str, target: &'a str) -> Call<'a, ()>;
    /// ListAttachedPolicies of a target: the policy names.
    fn list_attached_policies<'a>(&'a self, target: &'a str) -> Call<'a, Vec<String>>;
    /// RegisterCertificate under a registered CA, set active.
    fn register_certificate<'a>(&'a self, pem: &'a str, ca_pem: &'a str) -> Call<'a, CertRef>;
    /// RegisterCertificateWithoutCA, set active.
    fn register_certificate_without_ca<'a>(&'a self, pem: &'a str) -> Call<'a, CertRef>;
    /// CreateCertificateFromCsr, set active: Amazon's CA signs the CSR.
    fn create_certificate_from_csr<'a>(&'a self, csr_pem: &'a str) -> Call<'a, NewCert>;
    /// CreateThing: its ARN.
    fn create_thing<'a>(&'a self, thing: &'a NewThing) -> Call<'a, String>;
    /// DescribeThing, `None` if there is no such thing.
    fn describe_thing<'a>(&'a self, name: &'a str) -> Call<'a, Option<ThingInfo>>;
    /// AddThingToThingGroup.
    fn add_thing_to_thing_group<'a>(&'a self, thing: &'a str, group: &'a str) -> Call<'a, ()>;
    /// AttachThingPrincipal (`EXCLUSIVE_THING` or `NON_EXCLUSIVE_THING`).
    fn attach_thing_principal<'a>(
        &'a self,
        thing: &'a str,
        principal: &'a str,
        exclusive: bool,
    ) -> Call<'a, ()>;
    /// ListThingPrincipals: the principal ARNs.
    fn list_thing_principals<'a>(&'a self, thing: &'a str) -> Call<'a, Vec<String>>;
    /// RegisterThing with a template body and its parameters.
    fn register_thing<'a>(
        &'a self,
        template_body: &'a str,
        parameters: &'a BTreeMap<String, String>,
    ) -> Call<'a, RegisteredThing>;
}

/// What went wrong in a cloud step, apart from the API and the device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloudErrorKind {
    /// The call failed for good, or ran out of attempts.
    #[error("{}", describe_retry(.0))]
    Call(#[source] RetryError),
    /// AWS's answer (or what the station was about to send) failed one of
    /// the station's own checks.
    #[error("{0}")]
    Check(String),
}

fn describe_retry(err: &RetryError) -> String {
    let last = err.last();
    let mut text = match &last.code {
        Some(code) => code.clone(),
        None => match last.kind {
            super::retry::FailureKind::Service => "service error".into(),
            super::retry::FailureKind::Timeout => "timed out".into(),
            super::retry::FailureKind::Connection => "connection failed".into(),
            super::retry::FailureKind::Request => "request not sent".into(),
        },
    };
    if let Some(status) = last.status {
        text.push_str(&format!(" (HTTP {status})"));
    }
    if let Some(message) = &last.message {
        text.push_str(": ");
        text.push_str(message);
    } else if last.code.is_none() {
        if let Some(source) = std::error::Error::source(last) {
            text.push_str(&format!(": {source}"));
        }
    }
    if let RetryError::Exhausted { attempts, .. } = err {
        text.push_str(&format!(" (gave up after {attempts} attempts)"));
    }
    text
}

/// A cloud step that failed: which API, for which device, and why.
#[derive(Debug, thiserror::Error)]
#[error("{api}{}: {kind}", device_note(.device))]
pub struct CloudError {
    /// The API whose call failed (or whose answer failed a check).
    pub api: Api,
    /// The device serial, for per-device steps.
    pub device: Option<String>,
    /// What went wrong (in the message, so not repeated as the source).
    pub kind: CloudErrorKind,
}

fn device_note(device: &Option<String>) -> String {
    device
        .as_deref()
        .map(|d| format!(" (device {d})"))
        .unwrap_or_default()
}

impl CloudError {
    /// A failed station check on `api`'s answer or request.
    pub fn check(api: Api, device: Option<&str>, problem: impl Into<String>) -> Self {
        CloudError {
            api,
            device: device.map(str::to_string),
            kind: CloudErrorKind::Check(problem.into()),
        }
    }

    /// `<Api>: <error code/message>`, as the manifest records it.
    pub fn manifest_text(&self) -> String {
        format!("{}: {}", self.api, self.kind)
    }
}

/// A [`Registry`] behind the station's pacing: every attempt waits for its
/// API's limiter and goes through [`run_with_retry`].
#[derive(Clone)]
pub struct Cloud {
    /// The registry.
    pub registry: Arc<dyn Registry>,
    /// One limiter per API.
    pub limits: Arc<ApiLimiters>,
    /// Backoff and attempt budget.
    pub policy: RetryPolicy,
}

impl fmt::Debug for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cloud")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// A paced call's good ending: done now, or found done already
/// (`ResourceAlreadyExistsException`).
#[derive(Debug)]
pub enum Answer<T> {
    /// The call succeeded.
    Done(T),
    /// AWS says the resource exists already.
    AlreadyDone,
}

impl Cloud {
    /// Runs one call with pacing and retries; `device` names the device in
    /// the error.
    pub async fn call<'a, T, F>(
        &'a self,
        api: Api,
        device: Option<&str>,
        call: F,
    ) -> Result<Answer<T>, CloudError>
    where
        F: Fn(&'a dyn Registry) -> Call<'a, T>,
    {
        let registry: &'a dyn Registry = self.registry.as_ref();
        match run_with_retry(&self.limits, &self.policy, api, || call(registry)).await {
            Ok(done) => Ok(match done.outcome {
                Outcome::Done(value) => Answer::Done(value),
                Outcome::AlreadyDone(_) => Answer::AlreadyDone,
            }),
            Err(e) => Err(CloudError {
                api,
                device: device.map(str::to_string),
                kind: CloudErrorKind::Call(e),
            }),
        }
    }

    /// [`Self::call`] for a call whose "already exists" is an error here.
    pub async fn call_value<'a, T, F>(
        &'a self,
        api: Api,
        device: Option<&str>,
        call: F,
    ) -> Result<T, CloudError>
    where
        F: Fn(&'a dyn Registry) -> Call<'a, T>,
    {
        match self.call(api, device, call).await? {
            Answer::Done(value) => Ok(value),
            Answer::AlreadyDone => Err(CloudError::check(
                api,
                device,
                "ResourceAlreadyExistsException where none was expected",
            )),
        }
    }
}
