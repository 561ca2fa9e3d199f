//! Cloud registration steps: one row per device, certificate and step, with
//! what AWS returned (an ARN or an id), written before the next step starts.
//!
//! A re-run reads a device's rows and starts at the first step without
//! one; `cloud verify` reads them to know which certificate and thing each
//! registered device should have.

use rusqlite::{params, Connection};
use serde::Serialize;

use super::error::LedgerError;
use super::store::{device_status, CaKey, Ctx};
use super::types::DeviceState;

/// One registration step as the ledger records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    /// The step (`create_thing`, `register_certificate`, ...).
    pub step: String,
    /// The registration mode (`thing`, `certificate`, ...).
    pub mode: String,
    /// The thing the step concerns.
    pub thing_name: String,
    /// The id of the AWS IoT certificate the device uses (SHA-256 hex of its DER).
    pub certificate_id: String,
    /// What AWS returned: an ARN, or empty.
    pub resource: String,
    /// More of AWS's answer when the station needs it later (the PEM of a
    /// certificate Amazon's CA signed), else empty.
    pub detail: String,
}

/// A device the ledger holds as registered, with its steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegisteredDevice {
    /// The device serial.
    pub serial: String,
    /// Its thing name.
    pub thing_name: String,
    /// Where it stands.
    pub state: DeviceState,
    /// Its live certificate (local serial).
    pub cert_serial: String,
    /// The steps recorded for that certificate, in the order they were done.
    pub steps: Vec<StepRecord>,
}

/// Records `record` for device `serial`'s live certificate `cert_serial`;
/// recording a step twice keeps the first record.
pub(crate) fn write_step(
    conn: &Connection,
    ctx: &Ctx<'_>,
    serial: &str,
    cert_serial: &str,
    record: &StepRecord,
    describe: &str,
) -> Result<(), LedgerError> {
    let sql = |e| ctx.sqlite(describe.to_string(), e);
    let dev = device_status(conn, ctx.ca, serial)
        .map_err(sql)?
        .ok_or_else(|| LedgerError::UnknownDevice {
            path: ctx.path.to_path_buf(),
            op: describe.to_string(),
            serial: serial.to_string(),
        })?;
    if dev.live_cert_serial.as_deref() != Some(cert_serial) {
        return Err(LedgerError::Invalid {
            path: ctx.path.to_path_buf(),
            op: describe.to_string(),
            problem: format!(
                "certificate {cert_serial} is not the live certificate of device {serial} ({})",
                dev.live_cert_serial.as_deref().unwrap_or("none")
            ),
        });
    }
    let added = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO registration_steps \
             (ca, device_serial, cert_serial, step, mode, thing_name, certificate_id, resource, detail, done) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .and_then(|mut s| {
            s.execute(params![
                ctx.ca,
                serial,
                cert_serial,
                record.step,
                record.mode,
                record.thing_name,
                record.certificate_id,
                record.resource,
                record.detail,
                ctx.now
            ])
        })
        .map_err(sql)?;
    if added > 0 {
        ctx.event(
            conn,
            serial,
            "registration",
            &format!("{} {}", record.step, record.resource),
        )
        .map_err(sql)?;
    }
    Ok(())
}

/// The steps recorded for one certificate of a device, oldest first.
pub(crate) fn steps(
    conn: &Connection,
    ca: CaKey,
    serial: &str,
    cert_serial: &str,
) -> rusqlite::Result<Vec<StepRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT step, mode, thing_name, certificate_id, resource, detail FROM registration_steps \
         WHERE ca = ?1 AND device_serial = ?2 AND cert_serial = ?3 ORDER BY rowid",
    )?;
    let rows = stmt.query_map(params![ca, serial, cert_serial], |r| {
        Ok(StepRecord {
            step: r.get(0)?,
            mode: r.get(1)?,
            thing_name: r.get(2)?,
            certificate_id: r.get(3)?,
            resource: r.get(4)?,
            detail: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// Every device of `ca` past `registered` whose live certificate has
/// registration steps, in serial order.
pub(crate) fn registered(conn: &Connection, ca: CaKey) -> rusqlite::Result<Vec<RegisteredDevice>> {
    let mut stmt = conn.prepare(
        "SELECT d.serial, d.thing_name, d.state, c.cert_serial FROM devices d \
         JOIN certificates c ON c.ca = d.ca AND c.device_serial = d.serial AND c.state = 'live' \
         WHERE d.ca = ?1 AND d.state IN ('registered', 'delivered', 'verified') \
         AND EXISTS (SELECT 1 FROM registration_steps r WHERE r.ca = d.ca \
                     AND r.device_serial = d.serial AND r.cert_serial = c.cert_serial) \
         ORDER BY d.serial",
    )?;
    let found: Vec<(String, String, String, String)> = stmt
        .query_map([ca], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut devices = Vec::with_capacity(found.len());
    for (serial, thing_name, state, cert_serial) in found {
        let steps = steps(conn, ca, &serial, &cert_serial)?;
        devices.push(RegisteredDevice {
            state: state.parse().unwrap_or(DeviceState::Registered),
            serial,
            thing_name,
            cert_serial,
            steps,
        });
    }
    Ok(devices)
}
