//! The ledger's operations on one connection, inside the caller's transaction.
//!
//! Planning a device, the resume queries, and recovery on opening. Each
//! write (here and in `lifecycle`) checks what the lifecycle allows,
//! changes the rows and appends one event per change. The schema's constraints (unique serials
//! and ids, one live certificate and one intent per device) back up every
//! check made here.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::error::LedgerError;
use super::types::{
    AbandonedIntent, CaId, DeviceState, DeviceStatus, JobId, PlanOutcome, PlannedDevice,
    REASON_CRASH, REASON_REISSUE,
};

/// What every operation needs: the file (for errors), the CA, the time.
pub(crate) struct Ctx<'a> {
    pub path: &'a Path,
    pub ca: CaKey,
    pub now: String,
}

/// A CA's number in the ledger's `cas` table: rows name their CA by it
/// rather than by its 64-digit id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CaKey(i64);

impl rusqlite::ToSql for CaKey {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        self.0.to_sql()
    }
}

/// The number of `ca`, given to it now if the ledger had none.
pub(crate) fn register_ca(conn: &Connection, ca: &CaId) -> rusqlite::Result<CaKey> {
    conn.execute(
        "INSERT INTO cas (ca) VALUES (?1) ON CONFLICT (ca) DO NOTHING",
        [ca.as_str()],
    )?;
    conn.query_row("SELECT id FROM cas WHERE ca = ?1", [ca.as_str()], |r| {
        r.get(0).map(CaKey)
    })
}

/// The number of `ca`, if the ledger holds anything of it.
pub(crate) fn find_ca(conn: &Connection, ca: &CaId) -> rusqlite::Result<Option<CaKey>> {
    conn.prepare_cached("SELECT id FROM cas WHERE ca = ?1")?
        .query_row([ca.as_str()], |r| r.get(0).map(CaKey))
        .optional()
}

impl Ctx<'_> {
    pub(crate) fn sqlite(&self, op: String, source: rusqlite::Error) -> LedgerError {
        LedgerError::Sqlite {
            path: self.path.to_path_buf(),
            op,
            source,
        }
    }

    pub(crate) fn event(
        &self,
        conn: &Connection,
        serial: &str,
        event: &str,
        detail: &str,
    ) -> rusqlite::Result<()> {
        conn.prepare_cached("INSERT INTO events (time, ca, device_serial, event, detail) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![self.now, self.ca, serial, event, detail])?;
        Ok(())
    }

    pub(crate) fn set_state(
        &self,
        conn: &Connection,
        serial: &str,
        state: DeviceState,
        error: Option<&str>,
    ) -> rusqlite::Result<()> {
        conn.prepare_cached(
            "UPDATE devices SET state = ?3, error = ?4, updated = ?5 WHERE ca = ?1 AND serial = ?2",
        )?
        .execute(params![self.ca, serial, state.as_str(), error, self.now])?;
        Ok(())
    }

    /// Marks `cert_serial` superseded for `reason`, with its event.
    pub(crate) fn supersede(
        &self,
        conn: &Connection,
        device: &str,
        cert_serial: &str,
        reason: &str,
    ) -> rusqlite::Result<()> {
        conn.prepare_cached("UPDATE certificates SET state = 'superseded', reason = ?2, updated = ?3 WHERE cert_serial = ?1")?
            .execute(params![cert_serial, reason, self.now])?;
        self.event(
            conn,
            device,
            "superseded",
            &format!("{cert_serial}: {reason}"),
        )
    }
}

/// A device for a job.
#[derive(Debug)]
pub(crate) struct PlanOp {
    pub job: JobId,
    pub device: PlannedDevice,
    pub reissue: bool,
}

impl PlanOp {
    /// What the operation is, for error messages.
    pub(crate) fn describe(&self) -> String {
        format!("planning device {}", self.device.serial)
    }
}

const STATUS_SQL: &str = "SELECT d.serial, d.thing_name, d.job_file, d.job_label, d.line, d.state, d.error, \
     (SELECT c.cert_serial FROM certificates c WHERE c.ca = d.ca AND c.device_serial = d.serial AND c.state = 'live'), \
     (SELECT c.certificate_id FROM certificates c WHERE c.ca = d.ca AND c.device_serial = d.serial AND c.state = 'live'), \
     (SELECT c.cert_serial FROM certificates c WHERE c.ca = d.ca AND c.device_serial = d.serial AND c.state = 'intent'), \
     d.created, d.updated FROM devices d";

fn status_from_row(row: &Row<'_>) -> rusqlite::Result<DeviceStatus> {
    let state: String = row.get(5)?;
    let line: i64 = row.get(4)?;
    Ok(DeviceStatus {
        serial: row.get(0)?,
        thing_name: row.get(1)?,
        job: JobId {
            file: row.get(2)?,
            label: row.get(3)?,
        },
        line: u64::try_from(line).unwrap_or(0),
        state: state.parse().map_err(|e: String| {
            rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, e.into())
        })?,
        error: row.get(6)?,
        live_cert_serial: row.get(7)?,
        live_certificate_id: row.get(8)?,
        pending_intent: row.get(9)?,
        created: row.get(10)?,
        updated: row.get(11)?,
    })
}

/// A device's record, if it is in the ledger under `ca`.
pub(crate) fn device_status(
    conn: &Connection,
    ca: CaKey,
    serial: &str,
) -> rusqlite::Result<Option<DeviceStatus>> {
    conn.prepare_cached(&format!("{STATUS_SQL} WHERE d.ca = ?1 AND d.serial = ?2"))?
        .query_row(params![ca, serial], status_from_row)
        .optional()
}

/// Every device of `job` under `ca`, in job order.
pub(crate) fn job_devices(
    conn: &Connection,
    ca: CaKey,
    job: &JobId,
) -> rusqlite::Result<Vec<DeviceStatus>> {
    let mut stmt = conn.prepare_cached(&format!(
        "{STATUS_SQL} WHERE d.job_file = ?1 AND d.job_label = ?2 AND d.ca = ?3 ORDER BY d.line, d.serial"
    ))?;
    let rows = stmt.query_map(params![job.file, job.label, ca], status_from_row)?;
    rows.collect()
}

/// The device (and its job line) that already has `thing_name` under `ca`.
fn thing_name_holder(
    conn: &Connection,
    ca: CaKey,
    thing_name: &str,
) -> rusqlite::Result<Option<(String, i64)>> {
    conn.prepare_cached("SELECT serial, line FROM devices WHERE ca = ?1 AND thing_name = ?2")?
        .query_row(params![ca, thing_name], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()
}

fn line_sql(line: u64) -> i64 {
    i64::try_from(line).unwrap_or(i64::MAX)
}

/// Puts a device of a job in the ledger, or says where it stands.
pub(crate) fn plan(
    conn: &Connection,
    ctx: &Ctx<'_>,
    op: &PlanOp,
) -> Result<PlanOutcome, LedgerError> {
    let dev = &op.device;
    let sql = |e| ctx.sqlite(op.describe(), e);
    // Most devices are new: insert first. A serial or a thing name already
    // taken inserts nothing, and the device is looked at below.
    let inserted = conn
        .prepare_cached(
            "INSERT INTO devices (ca, serial, thing_name, job_file, job_label, line, state, created, updated) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'planned', ?7, ?7) ON CONFLICT DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute(params![
                ctx.ca,
                dev.serial,
                dev.thing_name,
                op.job.file,
                op.job.label,
                line_sql(dev.line),
                ctx.now
            ])
        })
        .map_err(sql)?;
    if inserted == 1 {
        ctx.event(
            conn,
            &dev.serial,
            "planned",
            &format!("{} line {}", op.job, dev.line),
        )
        .map_err(sql)?;
        return Ok(PlanOutcome::New);
    }
    let Some(existing) = device_status(conn, ctx.ca, &dev.serial).map_err(sql)? else {
        if let Some((holder, line)) =
            thing_name_holder(conn, ctx.ca, &dev.thing_name).map_err(sql)?
        {
            return Err(LedgerError::Invalid {
                path: ctx.path.to_path_buf(),
                op: op.describe(),
                problem: format!(
                    "thing name {} already belongs to device {holder} (line {line})",
                    dev.thing_name
                ),
            });
        }
        // Neither the serial nor the thing name is taken, yet the insert
        // was refused: a conflict this code does not know of.
        return Err(LedgerError::Invalid {
            path: ctx.path.to_path_buf(),
            op: op.describe(),
            problem: "the device could not be inserted and is not in the ledger".into(),
        });
    };
    if existing.job == op.job {
        if existing.state != DeviceState::Failed {
            return Ok(PlanOutcome::Resume(existing));
        }
        let state = if existing.live_cert_serial.is_some() {
            DeviceState::Issued
        } else {
            DeviceState::Planned
        };
        let previous_error = existing.error.unwrap_or_default();
        ctx.set_state(conn, &dev.serial, state, None).map_err(sql)?;
        ctx.event(
            conn,
            &dev.serial,
            "retry",
            &format!("back to {state} after: {previous_error}"),
        )
        .map_err(sql)?;
        return Ok(PlanOutcome::Retry {
            state,
            previous_error,
        });
    }
    if !op.reissue {
        return Err(LedgerError::OtherJob {
            path: ctx.path.to_path_buf(),
            serial: dev.serial.clone(),
            other_job: existing.job,
            other_line: existing.line,
        });
    }
    for cert in existing
        .live_cert_serial
        .iter()
        .chain(&existing.pending_intent)
    {
        ctx.supersede(conn, &dev.serial, cert, REASON_REISSUE)
            .map_err(sql)?;
    }
    conn.prepare_cached(
        "UPDATE devices SET thing_name = ?3, job_file = ?4, job_label = ?5, line = ?6, state = 'planned', \
         error = NULL, updated = ?7 WHERE ca = ?1 AND serial = ?2",
    )
    .and_then(|mut s| {
        s.execute(params![
            ctx.ca,
            dev.serial,
            dev.thing_name,
            op.job.file,
            op.job.label,
            line_sql(dev.line),
            ctx.now
        ])
    })
    .map_err(sql)?;
    ctx.event(
        conn,
        &dev.serial,
        "reissue",
        &format!("from {} to {} line {}", existing.job, op.job, dev.line),
    )
    .map_err(sql)?;
    Ok(PlanOutcome::Reissue {
        previous_job: existing.job,
        superseded: existing.live_cert_serial,
    })
}

/// Supersedes every intent left without a certificate (all CAs): the
/// signature may exist but was never recorded nor delivered.
pub(crate) fn recover(
    conn: &Connection,
    path: &Path,
    now: &str,
) -> Result<Vec<AbandonedIntent>, LedgerError> {
    let sql = |e| LedgerError::Sqlite {
        path: path.to_path_buf(),
        op: "superseding intents left by a crash".into(),
        source: e,
    };
    let intents: Vec<(CaKey, AbandonedIntent)> = conn
        .prepare(
            "SELECT c.ca, cas.ca, c.device_serial, c.cert_serial, c.created FROM certificates c \
             JOIN cas ON cas.id = c.ca WHERE c.state = 'intent' ORDER BY c.id",
        )
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok((
                    CaKey(r.get(0)?),
                    AbandonedIntent {
                        ca: CaId::from_stored(r.get(1)?),
                        device_serial: r.get(2)?,
                        cert_serial: r.get(3)?,
                        since: r.get(4)?,
                    },
                ))
            })?
            .collect()
        })
        .map_err(sql)?;
    for (ca, intent) in &intents {
        let ctx = Ctx {
            path,
            ca: *ca,
            now: now.to_string(),
        };
        ctx.supersede(
            conn,
            &intent.device_serial,
            &intent.cert_serial,
            REASON_CRASH,
        )
        .map_err(sql)?;
    }
    Ok(intents.into_iter().map(|(_, intent)| intent).collect())
}
