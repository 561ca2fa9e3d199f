//! [`Registry`] over aws-sdk-iot.
//!
//! Settings come from aws-config's default chain (`AWS_PROFILE`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_IOT`, environment
//! credentials). The SDK's own retries are off: every attempt goes through
//! the station's limiter and [`run_with_retry`](super::retry::run_with_retry),
//! so a throttled answer slows that API down instead of being retried
//! unseen. Each attempt has its own timeout ([`TIMEOUT_ENV`]).

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_iot::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_iot::types::{
    AttributePayload, AutoRegistrationStatus, CaCertificateStatus, CertificateMode,
    CertificateStatus, ProvisioningHook, RegistrationConfig, ThingPrincipalType,
    ThingTypeProperties,
};
use aws_sdk_iot::Client;

use super::limits::Api;
use super::registry::{
    CaInfo, Call, CertRef, NewCert, NewTemplate, NewThing, RegisterCa, RegisteredThing, Registry,
    ThingInfo,
};
use super::retry::{CallError, FailureKind};

/// Per-attempt timeout in milliseconds (default 10000).
pub const TIMEOUT_ENV: &str = "PROVLINE_AWS_TIMEOUT_MS";
const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// The per-attempt timeout: [`TIMEOUT_ENV`] or 10 s.
pub fn attempt_timeout() -> Duration {
    Duration::from_millis(
        std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|ms| *ms > 0)
            .unwrap_or(DEFAULT_TIMEOUT_MS),
    )
}

/// AWS IoT Core through aws-sdk-iot.
#[derive(Debug, Clone)]
pub struct AwsRegistry {
    client: Client,
}

impl AwsRegistry {
    /// A client from the default chain; `region` overrides the chain's.
    /// Must run inside a tokio runtime.
    pub async fn from_env(region: Option<&str>) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(attempt_timeout())
                    .build(),
            );
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region.to_string()));
        }
        let config = loader.load().await;
        AwsRegistry {
            client: Client::new(&config),
        }
    }
}

/// An SDK error as the retry layer sees it.
fn call_error<E>(api: Api, err: SdkError<E>) -> CallError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let code = err.code().map(str::to_string);
    let message = err.message().map(str::to_string);
    let status = err.raw_response().map(|r| r.status().as_u16());
    let kind = match &err {
        SdkError::ConstructionFailure(_) => FailureKind::Request,
        SdkError::TimeoutError(_) => FailureKind::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => FailureKind::Timeout,
        SdkError::DispatchFailure(_) => FailureKind::Connection,
        _ => FailureKind::Service,
    };
    let mut e = CallError::bare(api, kind, status);
    e.code = code;
    // Without AWS's message, say what failed: the causes of a transport
    // failure (connection refused, ...); for an answer without an AWS error
    // shape (a proxy's HTML page) the status says enough.
    e.message = message.or_else(|| (kind != FailureKind::Service).then(|| causes(&err)));
    e
}

/// The messages of an error's chain, joined, at most 300 characters.
fn causes(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    let mut joined = parts.join(": ");
    if joined.len() > 300 {
        let cut = (0..=300)
            .rev()
            .find(|i| joined.is_char_boundary(*i))
            .unwrap_or(0);
        joined.truncate(cut);
    }
    joined
}

fn not_found<T, E>(api: Api, err: SdkError<E>) -> Result<Option<T>, CallError>
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    if err.code() == Some("ResourceNotFoundException") {
        Ok(None)
    } else {
        Err(call_error(api, err))
    }
}

fn missing(api: Api, what: &str) -> CallError {
    CallError::bare(api, FailureKind::Service, None)
        .with_message(format!("the answer holds no {what}"))
}

fn cert_ref(api: Api, id: Option<&str>, arn: Option<&str>) -> Result<CertRef, CallError> {
    Ok(CertRef {
        id: id.ok_or_else(|| missing(api, "certificateId"))?.to_string(),
        arn: arn
            .ok_or_else(|| missing(api, "certificateArn"))?
            .to_string(),
    })
}

impl Registry for AwsRegistry {
    fn get_policy<'a>(&'a self, name: &'a str) -> Call<'a, Option<String>> {
        Box::pin(async move {
            match self.client.get_policy().policy_name(name).send().await {
                Ok(out) => Ok(Some(out.policy_document().unwrap_or_default().to_string())),
                Err(e) => not_found(Api::GetPolicy, e),
            }
        })
    }

    fn create_policy<'a>(&'a self, name: &'a str, document: &'a str) -> Call<'a, String> {
        Box::pin(async move {
            let out = self
                .client
                .create_policy()
                .policy_name(name)
                .policy_document(document)
                .send()
                .await
                .map_err(|e| call_error(Api::CreatePolicy, e))?;
            Ok(out.policy_arn().unwrap_or_default().to_string())
        })
    }

    fn describe_thing_type<'a>(&'a self, name: &'a str) -> Call<'a, bool> {
        Box::pin(async move {
            match self
                .client
                .describe_thing_type()
                .thing_type_name(name)
                .send()
                .await
            {
                Ok(_) => Ok(true),
                Err(e) => not_found::<(), _>(Api::DescribeThingType, e).map(|_| false),
            }
        })
    }

    fn create_thing_type<'a>(&'a self, name: &'a str, searchable: &'a [String]) -> Call<'a, ()> {
        Box::pin(async move {
            let mut props = ThingTypeProperties::builder();
            for attr in searchable {
                props = props.searchable_attributes(attr);
            }
            self.client
                .create_thing_type()
                .thing_type_name(name)
                .thing_type_properties(props.build())
                .send()
                .await
                .map_err(|e| call_error(Api::CreateThingType, e))?;
            Ok(())
        })
    }

    fn describe_thing_group<'a>(&'a self, name: &'a str) -> Call<'a, bool> {
        Box::pin(async move {
            match self
                .client
                .describe_thing_group()
                .thing_group_name(name)
                .send()
                .await
            {
                Ok(_) => Ok(true),
                Err(e) => not_found::<(), _>(Api::DescribeThingGroup, e).map(|_| false),
            }
        })
    }

    fn create_thing_group<'a>(&'a self, name: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            self.client
                .create_thing_group()
                .thing_group_name(name)
                .send()
                .await
                .map_err(|e| call_error(Api::CreateThingGroup, e))?;
            Ok(())
        })
    }

    fn get_registration_code(&self) -> Call<'_, String> {
        Box::pin(async move {
            let out = self
                .client
                .get_registration_code()
                .send()
                .await
                .map_err(|e| call_error(Api::GetRegistrationCode, e))?;
            out.registration_code()
                .map(str::to_string)
                .ok_or_else(|| missing(Api::GetRegistrationCode, "registrationCode"))
        })
    }

    fn describe_ca_certificate<'a>(&'a self, id: &'a str) -> Call<'a, Option<CaInfo>> {
        Box::pin(async move {
            match self
                .client
                .describe_ca_certificate()
                .certificate_id(id)
                .send()
                .await
            {
                Ok(out) => {
                    let d = out.certificate_description();
                    Ok(Some(CaInfo {
                        arn: d
                            .and_then(|d| d.certificate_arn())
                            .unwrap_or_default()
                            .to_string(),
                        status: d
                            .and_then(|d| d.status())
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_default(),
                        auto_registration: d
                            .and_then(|d| d.auto_registration_status())
                            .map(|s| *s == AutoRegistrationStatus::Enable),
                        mode: d
                            .and_then(|d| d.certificate_mode())
                            .map(|m| m.as_str().to_string())
                            .unwrap_or_else(|| "DEFAULT".into()),
                    }))
                }
                Err(e) => not_found(Api::DescribeCACertificate, e),
            }
        })
    }

    fn register_ca_certificate<'a>(&'a self, req: &'a RegisterCa) -> Call<'a, CertRef> {
        Box::pin(async move {
            let api = Api::RegisterCACertificate;
            let mut call = self
                .client
                .register_ca_certificate()
                .ca_certificate(&req.ca_pem)
                .set_as_active(true)
                .allow_auto_registration(true)
                .registration_config(
                    RegistrationConfig::builder()
                        .template_body(&req.template_body)
                        .role_arn(&req.role_arn)
                        .build(),
                );
            if req.sni_only {
                call = call.certificate_mode(CertificateMode::SniOnly);
            }
            if let Some(v) = &req.verification_pem {
                call = call.verification_certificate(v);
            }
            let out = call.send().await.map_err(|e| call_error(api, e))?;
            cert_ref(api, out.certificate_id(), out.certificate_arn())
        })
    }

    fn activate_ca_certificate<'a>(&'a self, id: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            self.client
                .update_ca_certificate()
                .certificate_id(id)
                .new_status(CaCertificateStatus::Active)
                .new_auto_registration_status(AutoRegistrationStatus::Enable)
                .send()
                .await
                .map_err(|e| call_error(Api::UpdateCACertificate, e))?;
            Ok(())
        })
    }

    fn describe_provisioning_template<'a>(&'a self, name: &'a str) -> Call<'a, Option<String>> {
        Box::pin(async move {
            match self
                .client
                .describe_provisioning_template()
                .template_name(name)
                .send()
                .await
            {
                Ok(out) => Ok(Some(out.template_body().unwrap_or_default().to_string())),
                Err(e) => not_found(Api::DescribeProvisioningTemplate, e),
            }
        })
    }

    fn create_provisioning_template<'a>(&'a self, req: &'a NewTemplate) -> Call<'a, String> {
        Box::pin(async move {
            let api = Api::CreateProvisioningTemplate;
            let mut call = self
                .client
                .create_provisioning_template()
                .template_name(&req.name)
                .template_body(&req.body)
                .provisioning_role_arn(&req.role_arn)
                .enabled(true);
            if let Some(hook) = &req.pre_provisioning_hook {
                let hook = ProvisioningHook::builder()
                    .target_arn(hook)
                    .payload_version("2020-04-01")
                    .build()
                    .map_err(|e| {
                        CallError::bare(api, FailureKind::Request, None).with_message(e.to_string())
                    })?;
                call = call.pre_provisioning_hook(hook);
            }
            let out = call.send().await.map_err(|e| call_error(api, e))?;
            Ok(out.template_arn().unwrap_or_default().to_string())
        })
    }

    fn create_keys_and_certificate(&self) -> Call<'_, NewCert> {
        Box::pin(async move {
            let api = Api::CreateKeysAndCertificate;
            let out = self
                .client
                .create_keys_and_certificate()
                .set_as_active(true)
                .send()
                .await
                .map_err(|e| call_error(api, e))?;
            Ok(NewCert {
                cert: cert_ref(api, out.certificate_id(), out.certificate_arn())?,
                pem: out
                    .certificate_pem()
                    .ok_or_else(|| missing(api, "certificatePem"))?
                    .to_string(),
                private_key_pem: Some(
                    out.key_pair()
                        .and_then(|k| k.private_key())
                        .ok_or_else(|| missing(api, "keyPair.PrivateKey"))?
                        .to_string(),
                ),
            })
        })
    }

    fn describe_certificate<'a>(&'a self, id: &'a str) -> Call<'a, Option<(String, String)>> {
        Box::pin(async move {
            match self
                .client
                .describe_certificate()
                .certificate_id(id)
                .send()
                .await
            {
                Ok(out) => {
                    let d = out.certificate_description();
                    Ok(Some((
                        d.and_then(|d| d.certificate_arn())
                            .unwrap_or_default()
                            .to_string(),
                        d.and_then(|d| d.status())
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_default(),
                    )))
                }
                Err(e) => not_found(Api::DescribeCertificate, e),
            }
        })
    }

    fn attach_policy<'a>(&'a self, policy: &'a str, target: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            self.client
                .attach_policy()
                .policy_name(policy)
                .target(target)
                .send()
                .await
                .map_err(|e| call_error(Api::AttachPolicy, e))?;
            Ok(())
        })
    }

    fn list_attached_policies<'a>(&'a self, target: &'a str) -> Call<'a, Vec<String>> {
        Box::pin(async move {
            let mut names = Vec::new();
            let mut marker: Option<String> = None;
            loop {
                let out = self
                    .client
                    .list_attached_policies()
                    .target(target)
                    .set_marker(marker.take())
                    .send()
                    .await
                    .map_err(|e| call_error(Api::ListAttachedPolicies, e))?;
                names.extend(
                    out.policies()
                        .iter()
                        .filter_map(|p| p.policy_name().map(str::to_string)),
                );
                match out.next_marker() {
                    Some(m) if !m.is_empty() => marker = Some(m.to_string()),
                    _ => return Ok(names),
                }
            }
        })
    }

    fn register_certificate<'a>(&'a self, pem: &'a str, ca_pem: &'a str) -> Call<'a, CertRef> {
        Box::pin(async move {
            let api = Api::RegisterCertificate;
            let out = self
                .client
                .register_certificate()
                .certificate_pem(pem)
                .ca_certificate_pem(ca_pem)
                .status(CertificateStatus::Active)
                .send()
                .await
                .map_err(|e| call_error(api, e))?;
            cert_ref(api, out.certificate_id(), out.certificate_arn())
        })
    }

    fn register_certificate_without_ca<'a>(&'a self, pem: &'a str) -> Call<'a, CertRef> {
        Box::pin(async move {
            let api = Api::RegisterCertificateWithoutCA;
            let out = self
                .client
                .register_certificate_without_ca()
                .certificate_pem(pem)
                .status(CertificateStatus::Active)
                .send()
                .await
                .map_err(|e| call_error(api, e))?;
            cert_ref(api, out.certificate_id(), out.certificate_arn())
        })
    }

    fn create_certificate_from_csr<'a>(&'a self, csr_pem: &'a str) -> Call<'a, NewCert> {
        Box::pin(async move {
            let api = Api::CreateCertificateFromCsr;
            let out = self
                .client
                .create_certificate_from_csr()
                .certificate_signing_request(csr_pem)
                .set_as_active(true)
                .send()
                .await
                .map_err(|e| call_error(api, e))?;
            Ok(NewCert {
                cert: cert_ref(api, out.certificate_id(), out.certificate_arn())?,
                pem: out
                    .certificate_pem()
                    .ok_or_else(|| missing(api, "certificatePem"))?
                    .to_string(),
                private_key_pem: None,
            })
        })
    }

    fn create_thing<'a>(&'a self, thing: &'a NewThing) -> Call<'a, String> {
        Box::pin(async move {
            let mut call = self.client.create_thing().thing_name(&thing.name);
            if let Some(t) = &thing.thing_type {
                call = call.thing_type_name(t);
            }
            if !thing.attributes.is_empty() {
                let mut payload = AttributePayload::builder();
                for (k, v) in &thing.attributes {
                    payload = payload.attributes(k, v);
                }
                call = call.attribute_payload(payload.build());
            }
            let out = call
                .send()
                .await
                .map_err(|e| call_error(Api::CreateThing, e))?;
            Ok(out.thing_arn().unwrap_or_default().to_string())
        })
    }

    fn describe_thing<'a>(&'a self, name: &'a str) -> Call<'a, Option<ThingInfo>> {
        Box::pin(async move {
            match self.client.describe_thing().thing_name(name).send().await {
                Ok(out) => Ok(Some(ThingInfo {
                    arn: out.thing_arn().unwrap_or_default().to_string(),
                    thing_type: out.thing_type_name().map(str::to_string),
                    attributes: out
                        .attributes()
                        .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                        .unwrap_or_default(),
                })),
                Err(e) => not_found(Api::DescribeThing, e),
            }
        })
    }

    fn add_thing_to_thing_group<'a>(&'a self, thing: &'a str, group: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            self.client
                .add_thing_to_thing_group()
                .thing_name(thing)
                .thing_group_name(group)
                .send()
                .await
                .map_err(|e| call_error(Api::AddThingToThingGroup, e))?;
            Ok(())
        })
    }

    fn attach_thing_principal<'a>(
        &'a self,
        thing: &'a str,
        principal: &'a str,
        exclusive: bool,
    ) -> Call<'a, ()> {
        Box::pin(async move {
            self.client
                .attach_thing_principal()
                .thing_name(thing)
                .principal(principal)
                .thing_principal_type(if exclusive {
                    ThingPrincipalType::ExclusiveThing
                } else {
                    ThingPrincipalType::NonExclusiveThing
                })
                .send()
                .await
                .map_err(|e| call_error(Api::AttachThingPrincipal, e))?;
            Ok(())
        })
    }

    fn list_thing_principals<'a>(&'a self, thing: &'a str) -> Call<'a, Vec<String>> {
        Box::pin(async move {
            let mut principals = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let out = self
                    .client
                    .list_thing_principals()
                    .thing_name(thing)
                    .set_next_token(token.take())
                    .send()
                    .await
                    .map_err(|e| call_error(Api::ListThingPrincipals, e))?;
                principals.extend(out.principals().iter().cloned());
                match out.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_string()),
                    _ => return Ok(principals),
                }
            }
        })
    }

    fn register_thing<'a>(
        &'a self,
        template_body: &'a str,
        parameters: &'a BTreeMap<String, String>,
    ) -> Call<'a, RegisteredThing> {
        Box::pin(async move {
            let mut call = self.client.register_thing().template_body(template_body);
            for (k, v) in parameters {
                call = call.parameters(k, v);
            }
            let out = call
                .send()
                .await
                .map_err(|e| call_error(Api::RegisterThing, e))?;
            Ok(RegisteredThing {
                certificate_pem: out.certificate_pem().map(str::to_string),
                resource_arns: out
                    .resource_arns()
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default(),
            })
        })
    }
}
