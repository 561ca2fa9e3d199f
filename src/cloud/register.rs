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

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::ca::serial::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

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
    /// flight); each answer in the order given.
    pub async fn register_all(
        &self,
        ledger: &Ledger,
        devices: &[Device],
    ) -> Vec<Result<Registered, CloudError>> {
        join_all(devices.iter().map(|d| async move {
            let _permit = self.in_flight.acquire().await;
            self.register(ledger, d).await
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
                            Some(info) if info.thing_type == thing.thing_type => {
                                Ok((info.arn, String::new()))
                            }
                            Some(info) => Err(CloudError::check(
                                Api::CreateThing,
                                serial,
                                format!(
                                    "thing {} exists with another configuration (thing type {:?}, not {:?})",
                                    dev.thing_name, info.thing_type, thing.thing_type
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
