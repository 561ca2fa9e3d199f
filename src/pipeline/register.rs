//! The registration stage (`--register`): a chunk's devices, bundles
//! written, registered with AWS IoT together (paced, at most
//! [`MAX_IN_FLIGHT`](crate::cloud::register::MAX_IN_FLIGHT) at once) before
//! they are `delivered`. A device whose registration fails is `failed` in
//! the ledger and the manifest with `<Api>: <error>`; its bundle stays, so
//! the next run picks it up at the step it stopped on. After Ctrl-C,
//! devices whose registration has not started are left `issued` for the
//! next run; those in flight finish.

use super::resume::Action;
use super::{device, send, Done, Shared, Staged};
use crate::ca::IssuedCert;
use crate::cloud::cli::BatchCloud;
use crate::cloud::register::{Device, Mode, Registered};
use crate::fsx;
use crate::job::{DeviceRequest, KeySource};
use crate::output::{bulk, ManifestRow};
use crate::progress::Outcome;

/// In `aws-signed` mode: the certificate Amazon's CA signed, beside the
/// bundle's own (the device uses this one with AWS IoT).
pub const AWS_CERT_FILE: &str = "aws-certificate.pem";

/// A device with its bundle written: (staged, certificate, certificate id).
pub(crate) type Written = (Staged, IssuedCert, String);

/// Registers the chunk; returns the devices registered, in order.
pub(crate) fn register_chunk(
    shared: &Shared<'_>,
    cloud: &BatchCloud,
    written: Vec<Written>,
    done: &Done,
) -> Vec<Written> {
    let mut devices = Vec::with_capacity(written.len());
    let mut ready = Vec::with_capacity(written.len());
    for w in written {
        let csr = || match (&w.0.key.csr, &w.0.key.private) {
            (Some(csr), _) => csr_pem(csr),
            (None, Some(key)) => bulk::csr_for(key, &w.0.req.thing_name),
            (None, None) => Err("no CSR for CreateCertificateFromCsr".into()),
        };
        match cloud_device(cloud, &w.0.req, &w.1.serial_hex(), &w.1.der, csr) {
            Ok(d) => {
                devices.push(d);
                ready.push(w);
            }
            Err(problem) => failed(shared, &w.0.req, problem, done),
        }
    }
    let results = cloud.register(shared.ledger, &devices, shared.stop);
    let mut registered = Vec::with_capacity(ready.len());
    for (w, result) in ready.into_iter().zip(results) {
        // Stopped before it started: issued, bundle written; the next run
        // registers it.
        let Some(result) = result else { continue };
        match result.map_err(|e| e.manifest_text()).and_then(|r| {
            write_aws_cert(shared, &w.0.req, &r)?;
            Ok(r)
        }) {
            Ok(_) => registered.push(w),
            Err(problem) => failed(shared, &w.0.req, problem, done),
        }
    }
    registered
}

/// Registers, together, the devices of a chunk that an earlier run issued
/// (adopted or re-delivered); returns the chunk without those that failed
/// (answered here) or were left for the next run. The rest of their way
/// (`resume::prepare`) then finds their steps recorded and calls nothing.
pub(crate) fn register_resumed(
    shared: &Shared<'_>,
    cloud: &BatchCloud,
    chunk: Vec<(DeviceRequest, Action)>,
    done: &Done,
) -> Vec<(DeviceRequest, Action)> {
    let mut devices = Vec::new();
    let mut slots = Vec::with_capacity(chunk.len());
    for (req, action) in &chunk {
        slots.push(match action.live() {
            Some((serial, der)) => match resumed_device(shared, cloud, req, serial, der) {
                Ok(dev) => {
                    devices.push(dev);
                    Some(Ok(devices.len() - 1))
                }
                Err(problem) => Some(Err(problem)),
            },
            None => None,
        });
    }
    if devices.is_empty() && slots.iter().all(Option::is_none) {
        return chunk;
    }
    let mut results: Vec<_> = cloud
        .register(shared.ledger, &devices, shared.stop)
        .into_iter()
        .map(Some)
        .collect();
    let mut kept = Vec::with_capacity(chunk.len());
    for ((req, action), slot) in chunk.into_iter().zip(slots) {
        let outcome = match slot {
            None => {
                kept.push((req, action));
                continue;
            }
            Some(Err(problem)) => Err(problem),
            Some(Ok(i)) => match results[i].take().flatten() {
                None => continue,
                Some(result) => result.map_err(|e| e.manifest_text()),
            },
        };
        match outcome {
            Ok(_) => kept.push((req, action)),
            Err(problem) => failed(shared, &req, problem, done),
        }
    }
    kept
}

/// Registers one device resumed from an earlier run (its bundle is on
/// disk); `Err` is the manifest's `<Api>: <error>`.
pub(crate) fn register_one(
    shared: &Shared<'_>,
    cloud: &BatchCloud,
    req: &DeviceRequest,
    cert_serial: &str,
    der: &[u8],
) -> Result<(), String> {
    let dev = resumed_device(shared, cloud, req, cert_serial, der)?;
    let go_on = std::sync::atomic::AtomicBool::new(false);
    let mut results = cloud.register(shared.ledger, std::slice::from_ref(&dev), &go_on);
    let registered = results
        .pop()
        .flatten()
        .ok_or_else(|| "registration gave no answer".to_string())?
        .map_err(|e| e.manifest_text())?;
    write_aws_cert(shared, req, &registered)
}

/// The registration of a device an earlier run issued: its CSR, when the
/// mode needs one, from the job's CSR file or the key in its folder.
fn resumed_device(
    shared: &Shared<'_>,
    cloud: &BatchCloud,
    req: &DeviceRequest,
    cert_serial: &str,
    der: &[u8],
) -> Result<Device, String> {
    let csr = || match &req.key {
        KeySource::Csr(path) => std::fs::read(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|b| csr_pem(&b)),
        KeySource::Station(_) => {
            let key = shared
                .writer
                .device_dir(&req.thing_name)
                .join(crate::output::KEY_FILE);
            std::fs::read_to_string(&key)
                .map_err(|e| format!("{}: {e}", key.display()))
                .and_then(|pem| bulk::csr_for_pem(&pem, &req.thing_name))
        }
    };
    cloud_device(cloud, req, cert_serial, der, csr)
}

fn cloud_device(
    cloud: &BatchCloud,
    req: &DeviceRequest,
    cert_serial: &str,
    der: &[u8],
    csr: impl FnOnce() -> Result<String, String>,
) -> Result<Device, String> {
    let registrar = cloud.registrar();
    let config = registrar.config();
    Ok(Device {
        serial: req.serial.clone(),
        thing_name: req.thing_name.clone(),
        thing_type: config.thing_type_for(req.thing_type.as_deref()),
        groups: config.groups_for(&req.groups),
        attributes: req.attributes.clone(),
        cert_serial: cert_serial.to_string(),
        cert_der: der.to_vec(),
        csr_pem: if registrar.mode() == Mode::AwsSigned {
            Some(csr()?)
        } else {
            None
        },
    })
}

fn csr_pem(bytes: &[u8]) -> Result<String, String> {
    if bytes.first() == Some(&0x30) {
        Ok(crate::pem_encode("CERTIFICATE REQUEST", bytes))
    } else {
        String::from_utf8(bytes.to_vec()).map_err(|_| "the CSR is neither DER nor PEM".into())
    }
}

fn write_aws_cert(
    shared: &Shared<'_>,
    req: &DeviceRequest,
    registered: &Registered,
) -> Result<(), String> {
    let Some(pem) = &registered.aws_certificate_pem else {
        return Ok(());
    };
    let path = shared
        .writer
        .device_dir(&req.thing_name)
        .join(AWS_CERT_FILE);
    fsx::write_atomic(&path, pem.as_bytes(), fsx::PUBLIC, fsx::Durability::Sync)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn failed(shared: &Shared<'_>, req: &DeviceRequest, problem: String, done: &Done) {
    let (row, outcome) = failure(shared, req, problem);
    send(done, row, outcome);
}

/// Records a registration failure in the ledger; the manifest row, whose
/// error is `problem` as it is (`<Api>: <error>`).
pub(crate) fn failure(
    shared: &Shared<'_>,
    req: &DeviceRequest,
    problem: String,
) -> (ManifestRow, Outcome) {
    if let Ok(pending) = shared.ledger.submit_fail(&req.serial, &problem) {
        let _ = pending.wait();
    }
    let mut row = device::failed_row(&device::row_error(req, problem.clone()));
    row.error = problem;
    (row, Outcome::Failed)
}
