//! Per-device registration: each mode is a list of explicit steps, each
//! step a ledger record written before the next step starts.
//!
//! | mode | steps |
//! |---|---|
//! | `none` | nothing: JITP registers the device on its first connect |
//! | `certificate` | RegisterCertificate (RegisterCertificateWithoutCA when the CA is not registered) |
//! | `thing` | CreateThing, AddThingToThingGroup (each group), RegisterCertificate, AttachThingPrincipal, AttachPolicy |
//! | `register-thing` | RegisterThing with the configured template |
//! | `aws-signed` | CreateCertificateFromCsr, CreateThing, AddThingToThingGroup, AttachThingPrincipal, AttachPolicy |
//!
//! A re-run reads the device's recorded steps and starts at the first one
//! missing, with the ARNs the earlier steps recorded. An answer saying the
//! resource exists (`ResourceAlreadyExistsException` for the same
//! certificate, a thing of the same type) counts as the step done.
//!
//! The station checks what AWS does not always check (and moto never):
//! the CA is registered and active before RegisterCertificate, the
//! certificate id AWS answers is the SHA-256 of the DER the station holds,
//! the certificate CreateCertificateFromCsr returns carries the CSR's key.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::future::join_all;
use tokio::sync::{OnceCell, Semaphore};

use super::config::{Attach, StationConfig};
use super::limits::Api;
use super::registry::{Answer, Cloud, CloudError, NewThing};
use crate::ledger::registration::StepRecord;
use crate::ledger::{DeviceState, Ledger};

/// How a batch registers its devices with AWS IoT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// JITP: no per-device call.
    #[default]
    None,
    /// RegisterCertificate only.
    Certificate,
    /// The single-thing flow: thing, groups, certificate, principal, policy.
    Thing,
    /// One RegisterThing call with a template.
    RegisterThing,
    /// Amazon's CA signs the CSR (CreateCertificateFromCsr), then the thing flow.
    AwsSigned,
}

impl Mode {
    /// The name on the command line and in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Certificate => "certificate",
            Mode::Thing => "thing",
            Mode::RegisterThing => "register-thing",
            Mode::AwsSigned => "aws-signed",
        }
    }

    /// Whether the mode makes a thing with the certificate attached.
    pub fn makes_thing(self) -> bool {
        matches!(self, Mode::Thing | Mode::RegisterThing | Mode::AwsSigned)
    }

    /// The steps of a device joining `groups`.
    pub fn steps(self, groups: &[String]) -> Vec<Step> {
        let thing = || {
            std::iter::once(Step::CreateThing)
                .chain(groups.iter().cloned().map(Step::AddToGroup))
                .collect::<Vec<_>>()
        };
        match self {
            Mode::None => vec![],
            Mode::Certificate => vec![Step::RegisterCertificate],
            Mode::Thing => {
                let mut steps = thing();
                steps.extend([
                    Step::RegisterCertificate,
                    Step::AttachThingPrincipal,
                    Step::AttachPolicy,
                ]);
                steps
            }
            Mode::RegisterThing => vec![Step::RegisterThing],
            Mode::AwsSigned => {
                let mut steps = vec![Step::CreateCertificateFromCsr];
                steps.extend(thing());
                steps.extend([Step::AttachThingPrincipal, Step::AttachPolicy]);
                steps
            }
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One registration step of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// RegisterCertificate, or RegisterCertificateWithoutCA.
    RegisterCertificate,
    /// CreateCertificateFromCsr.
    CreateCertificateFromCsr,
    /// CreateThing.
    CreateThing,
    /// AddThingToThingGroup for one group.
    AddToGroup(String),
    /// AttachThingPrincipal.
    AttachThingPrincipal,
    /// AttachPolicy.
    AttachPolicy,
    /// RegisterThing.
    RegisterThing,
}

impl Step {
    /// The name the ledger records.
    pub fn name(&self) -> String {
        match self {
            Step::RegisterCertificate => "register_certificate".into(),
            Step::CreateCertificateFromCsr => "create_certificate_from_csr".into(),
            Step::CreateThing => "create_thing".into(),
            Step::AddToGroup(g) => format!("add_thing_to_thing_group:{g}"),
            Step::AttachThingPrincipal => "attach_thing_principal".into(),
            Step::AttachPolicy => "attach_policy".into(),
            Step::RegisterThing => "register_thing".into(),
        }
    }

    /// The API it calls (RegisterCertificate may become
    /// RegisterCertificateWithoutCA).
    pub fn api(&self) -> Api {
        match self {
            Step::RegisterCertificate => Api::RegisterCertificate,
            Step::CreateCertificateFromCsr => Api::CreateCertificateFromCsr,
            Step::CreateThing => Api::CreateThing,
            Step::AddToGroup(_) => Api::AddThingToThingGroup,
            Step::AttachThingPrincipal => Api::AttachThingPrincipal,
            Step::AttachPolicy => Api::AttachPolicy,
            Step::RegisterThing => Api::RegisterThing,
        }
    }
}

/// A device to register: its identity and its certificate.
#[derive(Debug, Clone)]
pub struct Device {
    /// The device serial.
    pub serial: String,
    /// The thing name.
    pub thing_name: String,
    /// Its thing type (the row's or the configuration's).
    pub thing_type: Option<String>,
    /// Its groups (the row's and the configuration's).
    pub groups: Vec<String>,
    /// Thing attributes.
    pub attributes: BTreeMap<String, String>,
    /// Serial (hex) of the live certificate the local CA signed.
    pub cert_serial: String,
    /// That certificate, DER.
    pub cert_der: Vec<u8>,
    /// The device's CSR, PEM (for `aws-signed`).
    pub csr_pem: Option<String>,
}

/// A device registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The id of the certificate AWS IoT holds for it.
    pub certificate_id: String,
    /// The certificate Amazon's CA signed (`aws-signed`), PEM: the one the
    /// device must use.
    pub aws_certificate_pem: Option<String>,
}

/// Registers devices, paced and resumable.
pub struct Registrar {
    cloud: Cloud,
    mode: Mode,
    config: Arc<StationConfig>,
    ca_pem: String,
    ca_id: String,
    ca_active: OnceCell<Option<bool>>,
    register_thing_body: Option<String>,
    in_flight: Semaphore,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Devices registering at once, at most.
pub const MAX_IN_FLIGHT: usize = 64;

/// Lower-case hex SHA-256 (a certificate's id, as AWS shows it).
pub use crate::ledger::types::sha256_hex;

impl Registrar {
    /// A registrar for `mode`, certificates signed by the CA `ca_pem`/`ca_der`.
    /// Refuses a configuration the mode cannot work with.
    pub fn new(
        cloud: Cloud,
        mode: Mode,
        config: Arc<StationConfig>,
        ca_pem: &str,
        ca_der: &[u8],
    ) -> Result<Self, String> {
        let path = config.path.display().to_string();
        if matches!(mode, Mode::Thing | Mode::AwsSigned) && config.device.policy.is_none() {
            return Err(format!(
                "{path}: device.policy: --register {mode} attaches a policy to every certificate; name one"
            ));
        }
        let register_thing_body = match (&config.register_thing, mode) {
            (Some(r), _) => {
                Some(super::setup::read_template_body(&r.template).map_err(|e| e.to_string())?)
            }
            (None, Mode::RegisterThing) => {
                return Err(format!(
                    "{path}: register_thing.template: --register register-thing needs a template"
                ))
            }
            (None, _) => None,
        };
        Ok(Registrar {
            cloud,
            mode,
            config,
            ca_pem: ca_pem.to_string(),
            ca_id: sha256_hex(ca_der),
            ca_active: OnceCell::new(),
            register_thing_body,
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The configuration.
    pub fn config(&self) -> &StationConfig {
        &self.config
    }

    /// Registers many devices at once (at most [`MAX_IN_FLIGHT`] in
    /// flight); each answer in the order given. Once `stop` is set, devices
    /// not started yet are left as they are (`None`): the ledger holds them
    /// `issued`, and the next run registers them.
    pub async fn register_all(
        &self,
        ledger: &Ledger,
        devices: &[Device],
        stop: &AtomicBool,
    ) -> Vec<Option<Result<Registered, CloudError>>> {
        join_all(devices.iter().map(|d| async move {
            let _permit = self.in_flight.acquire().await;
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            Some(self.register(ledger, d).await)
        }))
        .await
    }

    /// Registers one device, from the first step the ledger does not hold;
    /// the device is `registered` in the ledger when this returns `Ok`.
    pub async fn register(&self, ledger: &Ledger, dev: &Device) -> Result<Registered, CloudError> {
        let serial = Some(dev.serial.as_str());
        let ledger_err =
            |api: Api, e: crate::ledger::LedgerError| CloudError::check(api, serial, e.to_string());
        let done = ledger
            .registration_steps(&dev.serial, &dev.cert_serial)
            .map_err(|e| ledger_err(Api::RegisterCertificate, e))?;
        let mut st = State {
            certificate_id: sha256_hex(&dev.cert_der),
            cert_arn: None,
            aws_pem: None,
        };
        for step in self.mode.steps(&dev.groups) {
            let name = step.name();
            if let Some(rec) = done.iter().find(|r| r.step == name) {
                st.restore(&step, rec);
                continue;
            }
            let (resource, detail) = self.run_step(&step, dev, &mut st).await?;
            let record = StepRecord {
                step: name,
                mode: self.mode.as_str().into(),
                thing_name: dev.thing_name.clone(),
                certificate_id: st.certificate_id.clone(),
                resource,
                detail,
            };
            ledger
                .record_step(&dev.serial, &dev.cert_serial, &record)
                .map_err(|e| ledger_err(step.api(), e))?;
        }
        ledger
            .advance(&dev.serial, DeviceState::Registered, self.mode.as_str())
            .map_err(|e| ledger_err(Api::RegisterCertificate, e))?;
        Ok(Registered {
            certificate_id: st.certificate_id,
            aws_certificate_pem: st.aws_pem,
        })
    }

    /// Whether the CA is registered and active: `Some(true)`, registered
    /// but not active: `Some(false)`, unknown to AWS: `None`. Asked once.
    async fn ca_state(&self, serial: Option<&str>) -> Result<Option<bool>, CloudError> {
        self.ca_active
            .get_or_try_init(|| async {
                let info = self
                    .cloud
                    .call_value(Api::DescribeCACertificate, serial, |r| {
                        r.describe_ca_certificate(&self.ca_id)
                    })
                    .await?;
                Ok(info.map(|i| i.is_active()))
            })
            .await
            .copied()
    }

    /// One step: what to record (resource, detail).
    async fn run_step(
        &self,
        step: &Step,
        dev: &Device,
        st: &mut State,
    ) -> Result<(String, String), CloudError> {
        let serial = Some(dev.serial.as_str());
        let cloud = &self.cloud;
        match step {
            Step::RegisterCertificate => {
                let pem = crate::pem_encode("CERTIFICATE", &dev.cert_der);
                let (api, answer) = match self.ca_state(serial).await? {
                    Some(true) => (
                        Api::RegisterCertificate,
                        cloud
                            .call(Api::RegisterCertificate, serial, |r| {
                                r.register_certificate(&pem, &self.ca_pem)
                            })
                            .await?,
                    ),
                    Some(false) => {
                        return Err(CloudError::check(
                            Api::RegisterCertificate,
                            serial,
                            format!(
                                "the CA {} is registered but not ACTIVE: activate it (provline cloud setup) before registering certificates under it",
                                self.ca_id
                            ),
                        ))
                    }
                    None => (
                        Api::RegisterCertificateWithoutCA,
                        cloud
                            .call(Api::RegisterCertificateWithoutCA, serial, |r| {
                                r.register_certificate_without_ca(&pem)
                            })
                            .await?,
                    ),
                };
                let arn = match answer {
                    Answer::Done(cert) => {
                        if cert.id != st.certificate_id {
                            return Err(CloudError::check(
                                api,
                                serial,
                                format!(
                                    "AWS answered certificate id {}, but the SHA-256 of the certificate's DER is {}",
                                    cert.id, st.certificate_id
                                ),
                            ));
                        }
                        cert.arn
                    }
                    Answer::AlreadyDone => self.held_arn(serial, &st.certificate_id).await?,
                };
                st.cert_arn = Some(arn.clone());
                Ok((arn, String::new()))
            }
            Step::CreateCertificateFromCsr => {
                let api = Api::CreateCertificateFromCsr;
                let csr = dev
                    .csr_pem
                    .as_deref()
                    .ok_or_else(|| CloudError::check(api, serial, "no CSR for this device"))?;
                let made = cloud
                    .call_value(api, serial, |r| r.create_certificate_from_csr(csr))
                    .await?;
                let der = check_aws_cert(&made.pem, &made.cert.id, csr)
                    .map_err(|p| CloudError::check(api, serial, p))?;
                let _ = der;
                st.certificate_id = made.cert.id.clone();
                st.cert_arn = Some(made.cert.arn.clone());
                st.aws_pem = Some(made.pem.clone());
                Ok((made.cert.arn, made.pem))
            }
            Step::CreateThing => {
                let thing = NewThing {
                    name: dev.thing_name.clone(),
                    thing_type: dev.thing_type.clone(),
                    attributes: dev.attributes.clone(),
                };
                match cloud
                    .call(Api::CreateThing, serial, |r| r.create_thing(&thing))
                    .await?
                {
                    Answer::Done(arn) => Ok((arn, String::new())),
                    Answer::AlreadyDone => {
                        let found = cloud
                            .call_value(Api::DescribeThing, serial, |r| {
                                r.describe_thing(&dev.thing_name)
                            })
                            .await?;
                        match found {
                            Some(info)
                                if info.thing_type == thing.thing_type
                                    && info.attributes == thing.attributes =>
                            {
                                Ok((info.arn, String::new()))
                            }
                            Some(info) => Err(CloudError::check(
                                Api::CreateThing,
                                serial,
                                format!(
                                    "thing {} exists with another configuration (thing type {:?}, attributes {:?}; this device: {:?}, {:?})",
                                    dev.thing_name,
                                    info.thing_type,
                                    info.attributes,
                                    thing.thing_type,
                                    thing.attributes
                                ),
                            )),
                            None => Err(CloudError::check(
                                Api::CreateThing,
                                serial,
                                format!("thing {} exists, yet DescribeThing does not find it", dev.thing_name),
                            )),
                        }
                    }
                }
            }
            Step::AddToGroup(group) => {
                cloud
                    .call(Api::AddThingToThingGroup, serial, |r| {
                        r.add_thing_to_thing_group(&dev.thing_name, group)
                    })
                    .await?;
                Ok((group.clone(), String::new()))
            }
            Step::AttachThingPrincipal => {
                let arn = self.cert_arn(serial, st).await?;
                let exclusive = self.config.device.attach == Attach::Exclusive;
                cloud
                    .call(Api::AttachThingPrincipal, serial, |r| {
                        r.attach_thing_principal(&dev.thing_name, &arn, exclusive)
                    })
                    .await?;
                Ok((arn, String::new()))
            }
            Step::AttachPolicy => {
                let arn = self.cert_arn(serial, st).await?;
                let policy = self.config.device.policy.clone().unwrap_or_default();
                cloud
                    .call(Api::AttachPolicy, serial, |r| {
                        r.attach_policy(&policy, &arn)
                    })
                    .await?;
                Ok((policy, String::new()))
            }
            Step::RegisterThing => {
                let api = Api::RegisterThing;
                let body = self.register_thing_body.as_deref().unwrap_or_default();
                let pem = crate::pem_encode("CERTIFICATE", &dev.cert_der);
                let params =
                    register_thing_parameters(body, dev, &pem, &st.certificate_id, &self.ca_pem);
                let out = cloud
                    .call_value(api, serial, |r| r.register_thing(body, &params))
                    .await?;
                let thing_arn = out
                    .resource_arns
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("thing"))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                Ok((thing_arn, String::new()))
            }
        }
    }

    /// The ARN of a certificate AWS holds already (it answered
    /// `ResourceAlreadyExistsException`).
    async fn held_arn(&self, serial: Option<&str>, id: &str) -> Result<String, CloudError> {
        let held = self
            .cloud
            .call_value(Api::DescribeCertificate, serial, |r| {
                r.describe_certificate(id)
            })
            .await?;
        held.map(|(arn, _)| arn).ok_or_else(|| {
            CloudError::check(
                Api::DescribeCertificate,
                serial,
                format!("AWS says certificate {id} exists, yet does not describe it"),
            )
        })
    }

    async fn cert_arn(&self, serial: Option<&str>, st: &mut State) -> Result<String, CloudError> {
        if let Some(arn) = &st.cert_arn {
            return Ok(arn.clone());
        }
        let arn = self.held_arn(serial, &st.certificate_id).await?;
        st.cert_arn = Some(arn.clone());
        Ok(arn)
    }
}

/// What the steps so far established.
struct State {
    certificate_id: String,
    cert_arn: Option<String>,
    aws_pem: Option<String>,
}

impl State {
    /// Takes back what a recorded step established.
    fn restore(&mut self, step: &Step, rec: &StepRecord) {
        match step {
            Step::RegisterCertificate => self.cert_arn = Some(rec.resource.clone()),
            Step::CreateCertificateFromCsr => {
                self.certificate_id = rec.certificate_id.clone();
                self.cert_arn = Some(rec.resource.clone());
                self.aws_pem = Some(rec.detail.clone());
            }
            _ => {}
        }
    }
}

/// RegisterThing's parameters: those the template declares, among the
/// thing name, serial, certificate (PEM and id), CA and the row's attributes.
pub fn register_thing_parameters(
    body: &str,
    dev: &Device,
    cert_pem: &str,
    certificate_id: &str,
    ca_pem: &str,
) -> BTreeMap<String, String> {
    let declared: Vec<String> = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("Parameters")
                .and_then(|p| p.as_object())
                .map(|p| p.keys().cloned().collect())
        })
        .unwrap_or_default();
    let mut known: BTreeMap<String, String> = dev.attributes.clone();
    known.insert("ThingName".into(), dev.thing_name.clone());
    known.insert("SerialNumber".into(), dev.serial.clone());
    known.insert("CertificatePem".into(), cert_pem.to_string());
    known.insert("CertificateId".into(), certificate_id.to_string());
    known.insert("CaCertificatePem".into(), ca_pem.to_string());
    if let Some(t) = &dev.thing_type {
        known.insert("ThingTypeName".into(), t.clone());
    }
    known
        .into_iter()
        .filter(|(k, _)| declared.contains(k))
        .collect()
}

/// Checks the certificate Amazon's CA returned for a CSR: its id is the
/// SHA-256 of its DER, and it certifies the CSR's public key. Returns the DER.
pub fn check_aws_cert(
    cert_pem: &str,
    certificate_id: &str,
    csr_pem: &str,
) -> Result<Vec<u8>, String> {
    let der = pem::parse(cert_pem)
        .map_err(|e| format!("the certificate AWS returned is not PEM: {e}"))?
        .into_contents();
    let id = sha256_hex(&der);
    if id != certificate_id {
        return Err(format!(
            "AWS answered certificate id {certificate_id}, but the SHA-256 of the certificate's DER is {id}"
        ));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("the certificate AWS returned does not parse: {e}"))?;
    let csr = crate::csr::check(csr_pem.as_bytes()).map_err(|e| format!("the CSR: {e}"))?;
    if cert.public_key().subject_public_key.data.as_ref() != csr.public_key.raw() {
        return Err(
            "the certificate AWS returned does not carry the CSR's public key; the device is not registered"
                .into(),
        );
    }
    Ok(der)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::cloud::config::StationConfig;
    use crate::cloud::limits::{ApiLimiters, Limits};
    use crate::cloud::registry::{
        CaInfo, Call, CertRef, NewCert, NewTemplate, RegisterCa, RegisteredThing, Registry,
        ThingInfo,
    };
    use crate::cloud::retry::{CallError, FailureKind, Jitter, RetryPolicy};
    use crate::ledger::{CaId, JobId, LedgerOptions, PlannedDevice};

    /// AWS IoT as a map, with scripted failures per API.
    #[derive(Default)]
    struct Fake {
        log: Mutex<Vec<Api>>,
        script: Mutex<HashMap<Api, VecDeque<CallError>>>,
        ca: Option<CaInfo>,
        wrong_id: bool,
        things: Mutex<HashMap<String, Option<String>>>,
        principals: Mutex<HashMap<String, Vec<String>>>,
        policies: Mutex<HashMap<String, Vec<String>>>,
        csr_answer: Option<NewCert>,
    }

    impl Fake {
        fn fail(&self, api: Api, code: &str, status: u16, times: usize) {
            let mut script = self.script.lock().unwrap();
            for _ in 0..times {
                script
                    .entry(api)
                    .or_default()
                    .push_back(CallError::service(api, code, status).with_message("scripted"));
            }
        }

        fn enter(&self, api: Api) -> Result<(), CallError> {
            self.log.lock().unwrap().push(api);
            match self
                .script
                .lock()
                .unwrap()
                .get_mut(&api)
                .and_then(VecDeque::pop_front)
            {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }

        fn calls(&self) -> Vec<Api> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }

        fn cert(&self, pem: &str) -> CertRef {
            let der = pem::parse(pem).unwrap().into_contents();
            let id = if self.wrong_id {
                "0".repeat(64)
            } else {
                sha256_hex(&der)
            };
            CertRef {
                arn: format!("arn:aws:iot:us-east-1:123456789012:cert/{id}"),
                id,
            }
        }
    }

    fn absent<'a, T: Send + 'a>(api: Api) -> Call<'a, T> {
        Box::pin(async move {
            Err(CallError::bare(api, FailureKind::Request, None).with_message("not in this double"))
        })
    }

    impl Registry for Fake {
        fn get_policy<'a>(&'a self, _: &'a str) -> Call<'a, Option<String>> {
            absent(Api::GetPolicy)
        }
        fn create_policy<'a>(&'a self, _: &'a str, _: &'a str) -> Call<'a, String> {
            absent(Api::CreatePolicy)
        }
        fn describe_thing_type<'a>(&'a self, _: &'a str) -> Call<'a, bool> {
            absent(Api::DescribeThingType)
        }
        fn create_thing_type<'a>(&'a self, _: &'a str, _: &'a [String]) -> Call<'a, ()> {
            absent(Api::CreateThingType)
        }
        fn describe_thing_group<'a>(&'a self, _: &'a str) -> Call<'a, bool> {
            absent(Api::DescribeThingGroup)
        }
        fn create_thing_group<'a>(&'a self, _: &'a str) -> Call<'a, ()> {
            absent(Api::CreateThingGroup)
        }
        fn get_registration_code(&self) -> Call<'_, String> {
            absent(Api::GetRegistrationCode)
        }
        fn describe_ca_certificate<'a>(&'a self, _: &'a str) -> Call<'a, Option<CaInfo>> {
            Box::pin(async move {
                self.enter(Api::DescribeCACertificate)?;
                Ok(self.ca.clone())
            })
        }
        fn register_ca_certificate<'a>(&'a self, _: &'a RegisterCa) -> Call<'a, CertRef> {
            absent(Api::RegisterCACertificate)
        }
        fn activate_ca_certificate<'a>(&'a self, _: &'a str) -> Call<'a, ()> {
            absent(Api::UpdateCACertificate)
        }
        fn describe_provisioning_template<'a>(&'a self, _: &'a str) -> Call<'a, Option<String>> {
            absent(Api::DescribeProvisioningTemplate)
        }
        fn create_provisioning_template<'a>(&'a self, _: &'a NewTemplate) -> Call<'a, String> {
            absent(Api::CreateProvisioningTemplate)
        }
        fn create_keys_and_certificate(&self) -> Call<'_, NewCert> {
            absent(Api::CreateKeysAndCertificate)
        }
        fn describe_certificate<'a>(&'a self, id: &'a str) -> Call<'a, Option<(String, String)>> {
            Box::pin(async move {
                self.enter(Api::DescribeCertificate)?;
                Ok(Some((
                    format!("arn:aws:iot:us-east-1:123456789012:cert/{id}"),
                    "ACTIVE".into(),
                )))
            })
        }
        fn attach_policy<'a>(&'a self, policy: &'a str, target: &'a str) -> Call<'a, ()> {
            Box::pin(async move {
                self.enter(Api::AttachPolicy)?;
                let mut p = self.policies.lock().unwrap();
                p.entry(target.into()).or_default().push(policy.into());
                Ok(())
            })
        }
        fn list_attached_policies<'a>(&'a self, target: &'a str) -> Call<'a, Vec<String>> {
            Box::pin(async move {
                self.enter(Api::ListAttachedPolicies)?;
                Ok(self
                    .policies
                    .lock()
                    .unwrap()
                    .get(target)
                    .cloned()
                    .unwrap_or_default())
            })
        }
        fn register_certificate<'a>(&'a self, pem: &'a str, _: &'a str) -> Call<'a, CertRef> {
            Box::pin(async move {
                self.enter(Api::RegisterCertificate)?;
                Ok(self.cert(pem))
            })
        }
        fn register_certificate_without_ca<'a>(&'a self, pem: &'a str) -> Call<'a, CertRef> {
            Box::pin(async move {
                self.enter(Api::RegisterCertificateWithoutCA)?;
                Ok(self.cert(pem))
            })
        }
        fn create_certificate_from_csr<'a>(&'a self, _: &'a str) -> Call<'a, NewCert> {
            Box::pin(async move {
                self.enter(Api::CreateCertificateFromCsr)?;
                Ok(self.csr_answer.clone().expect("a scripted answer"))
            })
        }
        fn create_thing<'a>(&'a self, thing: &'a NewThing) -> Call<'a, String> {
            Box::pin(async move {
                self.enter(Api::CreateThing)?;
                let mut things = self.things.lock().unwrap();
                match things.get(&thing.name) {
                    Some(t) if *t != thing.thing_type => Err(CallError::service(
                        Api::CreateThing,
                        "ResourceAlreadyExistsException",
                        409,
                    )),
                    _ => {
                        things.insert(thing.name.clone(), thing.thing_type.clone());
                        Ok(format!("arn:thing/{}", thing.name))
                    }
                }
            })
        }
        fn describe_thing<'a>(&'a self, name: &'a str) -> Call<'a, Option<ThingInfo>> {
            Box::pin(async move {
                self.enter(Api::DescribeThing)?;
                Ok(self.things.lock().unwrap().get(name).map(|t| ThingInfo {
                    arn: format!("arn:thing/{name}"),
                    thing_type: t.clone(),
                    attributes: BTreeMap::new(),
                }))
            })
        }
        fn add_thing_to_thing_group<'a>(&'a self, _: &'a str, _: &'a str) -> Call<'a, ()> {
            Box::pin(async move { self.enter(Api::AddThingToThingGroup) })
        }
        fn attach_thing_principal<'a>(
            &'a self,
            thing: &'a str,
            principal: &'a str,
            _: bool,
        ) -> Call<'a, ()> {
            Box::pin(async move {
                self.enter(Api::AttachThingPrincipal)?;
                let mut p = self.principals.lock().unwrap();
                p.entry(thing.into()).or_default().push(principal.into());
                Ok(())
            })
        }
        fn list_thing_principals<'a>(&'a self, thing: &'a str) -> Call<'a, Vec<String>> {
            Box::pin(async move {
                self.enter(Api::ListThingPrincipals)?;
                Ok(self
                    .principals
                    .lock()
                    .unwrap()
                    .get(thing)
                    .cloned()
                    .unwrap_or_default())
            })
        }
        fn register_thing<'a>(
            &'a self,
            _: &'a str,
            _: &'a BTreeMap<String, String>,
        ) -> Call<'a, RegisteredThing> {
            absent(Api::RegisterThing)
        }
    }

    const CONFIG: &str = r#"
[[policy]]
name = "SensorPolicy"
document = "p.json"
[device]
policy = "SensorPolicy"
thing_type = "Sensor"
groups = ["line-1"]
"#;

    struct Bench {
        _dir: tempfile::TempDir,
        ledger: Ledger,
        fake: Arc<Fake>,
        registrar: Registrar,
        device: Device,
    }

    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";

    fn bench(fake: Fake, mode: Mode, attempts: u32) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(
            &dir.path().join("l.sqlite"),
            CaId::of_certificate(b"ca"),
            LedgerOptions::default(),
        )
        .unwrap();
        let serial = "SN1";
        ledger
            .plan(
                &JobId::new("job.csv", ""),
                &PlannedDevice {
                    serial: serial.into(),
                    thing_name: "sensor_SN1".into(),
                    line: 2,
                },
                false,
            )
            .unwrap();
        ledger
            .advance(serial, DeviceState::KeyReady, "key")
            .unwrap();
        ledger.record_intent(serial, "0a", b"public key").unwrap();
        let der = crate::ledger::tests::der_for("0a");
        ledger
            .record_issued("0a", &der, time::macros::datetime!(2035-01-01 0:00 UTC))
            .unwrap();
        let fake = Arc::new(fake);
        let config = StationConfig::parse(Path::new("s.toml"), CONFIG).unwrap();
        let cloud = Cloud {
            registry: fake.clone(),
            limits: Arc::new(ApiLimiters::new(&Limits::default())),
            policy: RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(2), attempts)
                .unwrap()
                .with_jitter(Jitter::seeded(3)),
        };
        let device = Device {
            serial: serial.into(),
            thing_name: "sensor_SN1".into(),
            thing_type: config.thing_type_for(None),
            groups: config.groups_for(&[]),
            attributes: BTreeMap::new(),
            cert_serial: "0a".into(),
            cert_der: der,
            csr_pem: None,
        };
        let registrar = Registrar::new(cloud, mode, Arc::new(config), CA_PEM, b"ca").unwrap();
        Bench {
            _dir: dir,
            ledger,
            fake,
            registrar,
            device,
        }
    }

    use std::path::Path;

    fn active_ca() -> Option<CaInfo> {
        Some(CaInfo {
            arn: "arn:ca".into(),
            status: "ACTIVE".into(),
            auto_registration: Some(true),
            mode: "DEFAULT".into(),
        })
    }

    fn steps(b: &Bench) -> Vec<String> {
        b.ledger
            .registration_steps("SN1", "0a")
            .unwrap()
            .into_iter()
            .map(|s| s.step)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_step_fails_the_device_and_the_next_run_resumes_there() {
        let b = bench(
            Fake {
                ca: active_ca(),
                ..Fake::default()
            },
            Mode::Thing,
            2,
        );
        b.fake
            .fail(Api::AttachThingPrincipal, "ThrottlingException", 400, 2);
        let err = b
            .registrar
            .register(&b.ledger, &b.device)
            .await
            .unwrap_err();
        assert_eq!(err.api, Api::AttachThingPrincipal);
        assert!(
            err.manifest_text()
                .starts_with("AttachThingPrincipal: ThrottlingException"),
            "{}",
            err.manifest_text()
        );
        assert_eq!(
            steps(&b),
            [
                "create_thing",
                "add_thing_to_thing_group:line-1",
                "register_certificate"
            ]
        );
        assert_eq!(
            b.ledger.device("SN1").unwrap().unwrap().state,
            DeviceState::Issued
        );
        b.fake.calls();
        let done = b.registrar.register(&b.ledger, &b.device).await.unwrap();
        assert_eq!(done.certificate_id, sha256_hex(&b.device.cert_der));
        // Nothing before the failed step is called again.
        assert_eq!(
            b.fake.calls(),
            [Api::AttachThingPrincipal, Api::AttachPolicy]
        );
        assert_eq!(steps(&b).len(), 5);
        assert_eq!(
            b.ledger.device("SN1").unwrap().unwrap().state,
            DeviceState::Registered
        );
        // A third run has nothing left to call.
        b.registrar.register(&b.ledger, &b.device).await.unwrap();
        assert!(b.fake.calls().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn already_registered_certificate_and_same_thing_count_as_done() {
        let b = bench(
            Fake {
                ca: active_ca(),
                ..Fake::default()
            },
            Mode::Thing,
            3,
        );
        b.fake
            .things
            .lock()
            .unwrap()
            .insert("sensor_SN1".into(), Some("Sensor".into()));
        b.fake.fail(
            Api::RegisterCertificate,
            "ResourceAlreadyExistsException",
            409,
            1,
        );
        b.registrar.register(&b.ledger, &b.device).await.unwrap();
        let calls = b.fake.calls();
        assert!(calls.contains(&Api::DescribeCertificate), "{calls:?}");
        let recorded = b.ledger.registration_steps("SN1", "0a").unwrap();
        let cert = recorded
            .iter()
            .find(|s| s.step == "register_certificate")
            .unwrap();
        assert!(cert.resource.ends_with(&sha256_hex(&b.device.cert_der)));
        // The thing's principal is the certificate: one of it, not two.
        let principals = b.fake.principals.lock().unwrap().clone();
        assert_eq!(principals["sensor_SN1"], vec![cert.resource.clone()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_thing_of_another_type_is_not_taken_over() {
        let b = bench(Fake::default(), Mode::Thing, 3);
        b.fake
            .things
            .lock()
            .unwrap()
            .insert("sensor_SN1".into(), Some("Camera".into()));
        let err = b
            .registrar
            .register(&b.ledger, &b.device)
            .await
            .unwrap_err();
        assert_eq!(err.api, Api::CreateThing);
        assert!(err.to_string().contains("another configuration"), "{err}");
        assert!(steps(&b).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_ca_decides_which_register_call() {
        let b = bench(Fake::default(), Mode::Certificate, 3);
        b.registrar.register(&b.ledger, &b.device).await.unwrap();
        assert_eq!(
            b.fake.calls(),
            [
                Api::DescribeCACertificate,
                Api::RegisterCertificateWithoutCA
            ]
        );

        let inactive = Fake {
            ca: Some(CaInfo {
                status: "INACTIVE".into(),
                ..active_ca().unwrap()
            }),
            ..Fake::default()
        };
        let b = bench(inactive, Mode::Certificate, 3);
        let err = b
            .registrar
            .register(&b.ledger, &b.device)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not ACTIVE"), "{err}");
        assert!(!b.fake.calls().contains(&Api::RegisterCertificate));
    }

    #[tokio::test(start_paused = true)]
    async fn a_certificate_id_that_is_not_the_der_hash_is_refused() {
        let b = bench(
            Fake {
                ca: active_ca(),
                wrong_id: true,
                ..Fake::default()
            },
            Mode::Certificate,
            3,
        );
        let err = b
            .registrar
            .register(&b.ledger, &b.device)
            .await
            .unwrap_err();
        assert_eq!(err.api, Api::RegisterCertificate);
        assert!(err.to_string().contains("SHA-256"), "{err}");
        assert!(steps(&b).is_empty());
        assert_eq!(
            b.ledger.device("SN1").unwrap().unwrap().state,
            DeviceState::Issued
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_stop_no_registration_starts() {
        let b = bench(
            Fake {
                ca: active_ca(),
                ..Fake::default()
            },
            Mode::Thing,
            3,
        );
        let stop = AtomicBool::new(true);
        let devices = [b.device.clone()];
        let answers = b.registrar.register_all(&b.ledger, &devices, &stop).await;
        assert!(matches!(answers.as_slice(), [None]));
        assert!(b.fake.calls().is_empty());
        stop.store(false, Ordering::SeqCst);
        let answers = b.registrar.register_all(&b.ledger, &devices, &stop).await;
        assert!(matches!(answers.as_slice(), [Some(Ok(_))]));
        assert_eq!(steps(&b).len(), 5);
    }

    fn csr_and_key() -> (String, crate::keygen::PublicKey) {
        let rng = ring::rand::SystemRandom::new();
        let key = crate::keygen::generate(crate::keygen::KeyType::P256, &rng).unwrap();
        let csr = crate::output::bulk::csr_for(&key, "sensor_SN1").unwrap();
        (csr, key.public_key().clone())
    }

    #[test]
    fn a_certificate_over_another_key_is_refused() {
        let (csr, public) = csr_and_key();
        let now = time::OffsetDateTime::now_utc();
        let ca = crate::ca::LocalCa::ephemeral(
            &crate::ca::CaInit::new(crate::keygen::KeyType::P256, "Test CA"),
            now,
        )
        .unwrap();
        let profile = crate::ca::DeviceProfile::default();
        let good = ca
            .issue_device(&profile, "sensor_SN1", "SN1", &public, now)
            .unwrap();
        check_aws_cert(&good.pem(), &good.certificate_id(), &csr).unwrap();
        let err = check_aws_cert(&good.pem(), &"1".repeat(64), &csr).unwrap_err();
        assert!(err.contains("SHA-256"), "{err}");
        let (_, other) = csr_and_key();
        let wrong = ca
            .issue_device(&profile, "sensor_SN1", "SN1", &other, now)
            .unwrap();
        let err = check_aws_cert(&wrong.pem(), &wrong.certificate_id(), &csr).unwrap_err();
        assert!(err.contains("does not carry the CSR's public key"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn verify_lists_what_differs() {
        let b = bench(
            Fake {
                ca: active_ca(),
                ..Fake::default()
            },
            Mode::Thing,
            3,
        );
        b.registrar.register(&b.ledger, &b.device).await.unwrap();
        let reg = b
            .ledger
            .reader()
            .registered_devices(&CaId::of_certificate(b"ca"))
            .unwrap();
        assert_eq!(reg.len(), 1);
        let cloud = &b.registrar.cloud;
        let diffs = crate::cloud::verify::verify_device(cloud, &reg[0], Some("SensorPolicy"))
            .await
            .unwrap();
        assert!(diffs.is_empty(), "{diffs:?}");
        // A second principal and a missing policy both show.
        b.fake
            .principals
            .lock()
            .unwrap()
            .get_mut("sensor_SN1")
            .unwrap()
            .push("arn:aws:iot:us-east-1:123456789012:cert/other".into());
        b.fake.policies.lock().unwrap().clear();
        let diffs = crate::cloud::verify::verify_device(cloud, &reg[0], Some("SensorPolicy"))
            .await
            .unwrap();
        let text: Vec<String> = diffs.iter().map(ToString::to_string).collect();
        assert_eq!(diffs.len(), 2, "{text:?}");
        assert!(
            text[0].starts_with("SN1 sensor_SN1: 2 principals"),
            "{text:?}"
        );
        assert!(
            text[1].contains("policy SensorPolicy is not attached"),
            "{text:?}"
        );
    }
}
