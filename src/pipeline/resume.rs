//! Planning each row in the ledger, and deciding what a re-run still owes
//! a device: nothing (done before), the rest of its steps, or a new
//! certificate in place of one that never reached it.

use std::iter::Peekable;
use std::sync::atomic::Ordering;

use crossbeam_channel::Sender;

use super::device::{self, delivered_serial, failed_row, issued_row, not_after_of, row_error};
use super::{from_csr, is_fatal, reject, send, BatchError, Done, Shared};
use crate::job::{DeviceRequest, JobReader};
use crate::ledger::{DeviceState, DeviceStatus, JobId, PlanOutcome, PlannedDevice};
use crate::output::{ManifestRow, CERT_FILE};
use crate::progress::Outcome;

/// What a worker still has to do for a planned device.
#[derive(Debug)]
pub(crate) enum Action {
    /// Everything from the key on.
    Issue,
    /// Supersede the device's certificate for this reason, then issue anew.
    Supersede(String),
    /// The folder holds the live certificate already: record the delivery.
    Adopt(LiveCert),
    /// A CSR device whose certificate was recorded but not written: write it.
    Redeliver(LiveCert),
    /// A device taken over from another job (`--reissue`): its old bundle,
    /// if this output holds one, is moved aside, then it is issued anew.
    Reissue,
}

impl Action {
    /// The live certificate (serial, DER) of a device whose bundle is, or
    /// is about to be, delivered as it is: what registration registers.
    pub(crate) fn live(&self) -> Option<(&str, &[u8])> {
        match self {
            Action::Adopt(live) | Action::Redeliver(live) => {
                Some((live.serial.as_str(), live.der.as_slice()))
            }
            _ => None,
        }
    }
}

/// A live certificate as the ledger holds it.
#[derive(Debug)]
pub(crate) struct LiveCert {
    serial: String,
    certificate_id: String,
    der: Vec<u8>,
}

/// The reader thread: rows in chunks, planned in the ledger together,
/// then sent to the workers or answered at once.
pub(crate) fn read_and_plan(
    shared: &Shared<'_>,
    mut rows: Peekable<JobReader>,
    job: &JobId,
    reissue: bool,
    chunk_size: usize,
    work: &Sender<Vec<(DeviceRequest, Action)>>,
    done: &Done,
) {
    while !shared.stop.load(Ordering::SeqCst) && rows.peek().is_some() {
        let mut planned = Vec::with_capacity(chunk_size);
        for row in rows.by_ref().take(chunk_size) {
            let req = match row {
                Ok(req) => req,
                Err(err) => {
                    reject(done, &err);
                    continue;
                }
            };
            let device = PlannedDevice {
                serial: req.serial.clone(),
                thing_name: req.thing_name.clone(),
                line: req.line,
            };
            match shared.ledger.submit_plan(job, &device, reissue) {
                Ok(pending) => planned.push((req, pending)),
                Err(e) => {
                    shared.abort(BatchError::Ledger(e));
                    return;
                }
            }
        }
        let mut chunk = Vec::with_capacity(planned.len());
        for (req, pending) in planned {
            match pending.wait() {
                Ok(outcome) => match classify(shared, &req, outcome) {
                    Next::Work(action) => chunk.push((req, action)),
                    Next::Answer(row, outcome) => send(done, row, outcome),
                },
                Err(e) => {
                    let problem = e.to_string();
                    if is_fatal(&e) {
                        shared.abort(BatchError::Ledger(e));
                    }
                    reject(done, &row_error(&req, problem));
                }
            }
        }
        if !chunk.is_empty() && work.send(chunk).is_err() {
            return;
        }
    }
}

/// After planning: work for a worker, or the device's answer already.
enum Next {
    Work(Action),
    Answer(ManifestRow, Outcome),
}

/// What the ledger's answer means for this run.
fn classify(shared: &Shared<'_>, req: &DeviceRequest, outcome: PlanOutcome) -> Next {
    let failed =
        |problem: String| Next::Answer(failed_row(&row_error(req, problem)), Outcome::Failed);
    let status = match outcome {
        PlanOutcome::Resume(status) => status,
        // Failed after its certificate was recorded: the bundle may stand.
        PlanOutcome::Retry { state, .. } if state >= DeviceState::Issued => {
            match shared.ledger.device(&req.serial) {
                Ok(Some(status)) => status,
                Ok(None) => return Next::Work(Action::Issue),
                Err(e) => return failed(e.to_string()),
            }
        }
        PlanOutcome::Reissue { .. } => return Next::Work(Action::Reissue),
        _ => return Next::Work(Action::Issue),
    };
    if status.line != req.line {
        return failed(format!(
            "duplicate serial {} (first on line {})",
            req.serial, status.line
        ));
    }
    if status.thing_name != req.thing_name {
        return failed(format!(
            "the ledger has this device as thing {}; the job now says {} (re-run with --reissue to change it)",
            status.thing_name, req.thing_name
        ));
    }
    let live = match live_cert(shared, &status) {
        Ok(live) => live,
        Err(problem) => return failed(problem),
    };
    match (status.state, live) {
        (state, Some(live)) if state >= DeviceState::Delivered => {
            shared.bulk_done(req);
            let (row, outcome) = skipped(req, &live);
            Next::Answer(row, outcome)
        }
        (DeviceState::Issued | DeviceState::Registered, Some(live)) => {
            let dir = shared.writer.device_dir(&req.thing_name);
            if delivered_serial(&dir).as_deref() == Some(live.serial.as_str()) {
                Next::Work(Action::Adopt(live))
            } else if from_csr(req) {
                Next::Work(Action::Redeliver(live))
            } else {
                Next::Work(Action::Supersede(
                    "issued but never delivered; the station-made key is gone".into(),
                ))
            }
        }
        _ => Next::Work(Action::Issue),
    }
}

fn live_cert(shared: &Shared<'_>, status: &DeviceStatus) -> Result<Option<LiveCert>, String> {
    let (Some(serial), Some(certificate_id)) =
        (&status.live_cert_serial, &status.live_certificate_id)
    else {
        return Ok(None);
    };
    let der = shared
        .ledger
        .reader()
        .certificate_der(serial)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!("the ledger lists certificate {serial} as live but holds no DER for it")
        })?;
    Ok(Some(LiveCert {
        serial: serial.clone(),
        certificate_id: certificate_id.clone(),
        der,
    }))
}

fn skipped(req: &DeviceRequest, live: &LiveCert) -> (ManifestRow, Outcome) {
    let not_after = not_after_of(&live.der).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    (
        issued_row(req, &live.serial, &live.certificate_id, not_after),
        Outcome::Skipped,
    )
}

/// Before the key: what the action needs done first. `Ok(None)`: go on and
/// issue; `Ok(Some(row))`: the device is finished.
pub(crate) fn prepare(
    shared: &Shared<'_>,
    req: &DeviceRequest,
    action: Action,
) -> Result<Option<(ManifestRow, Outcome)>, String> {
    let deliver = |live: &LiveCert| -> Result<Option<(ManifestRow, Outcome)>, String> {
        if let Some(cloud) = shared.cloud {
            if let Err(problem) =
                super::register::register_one(shared, cloud, req, &live.serial, &live.der)
            {
                return Ok(Some(super::register::failure(shared, req, problem)));
            }
        }
        shared
            .ledger
            .advance(&req.serial, DeviceState::Delivered, &live.certificate_id)
            .map_err(|e| e.to_string())?;
        let not_after = not_after_of(&live.der).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        Ok(Some((
            issued_row(req, &live.serial, &live.certificate_id, not_after),
            Outcome::Done,
        )))
    };
    match action {
        Action::Adopt(live) => {
            let done = deliver(&live)?;
            shared.bulk_done(req);
            Ok(done)
        }
        Action::Redeliver(live) => {
            let cert_pem = crate::pem_encode("CERTIFICATE", &live.der);
            shared
                .writer
                .write(&device::bundle(req, &cert_pem, shared.ca.cert_pem(), None))
                .map_err(|e| e.to_string())?;
            let done = deliver(&live)?;
            shared.bulk_done(req);
            Ok(done)
        }
        Action::Reissue => {
            let dir = shared.writer.device_dir(&req.thing_name);
            if dir.exists() {
                let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
                let aside = shared
                    .writer
                    .out()
                    .join(format!(".{}.superseded-{stamp}", req.thing_name));
                std::fs::rename(&dir, &aside).map_err(|e| {
                    format!("moving the superseded bundle {} aside: {e}", dir.display())
                })?;
            }
            Ok(None)
        }
        Action::Supersede(reason) => {
            ensure_no_stray_cert(shared, req)?;
            shared
                .ledger
                .supersede(&req.serial, &reason)
                .map_err(|e| e.to_string())?;
            Ok(None)
        }
        Action::Issue => {
            ensure_no_stray_cert(shared, req)?;
            Ok(None)
        }
    }
}

/// A certificate in the device's folder that the ledger does not know as
/// delivered is not the station's to overwrite.
fn ensure_no_stray_cert(shared: &Shared<'_>, req: &DeviceRequest) -> Result<(), String> {
    if !shared.writer.may_hold_earlier_devices() {
        return Ok(());
    }
    let path = shared.writer.device_dir(&req.thing_name).join(CERT_FILE);
    if path.exists() {
        return Err(format!(
            "{} already holds a certificate the ledger has not delivered; move it away to issue this device",
            path.display()
        ));
    }
    Ok(())
}
