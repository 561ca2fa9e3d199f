//! The writes after a device is planned: its steps, its failure, the
//! intent, the signed certificate, superseding a certificate.

use rusqlite::{params, Connection, OptionalExtension};

use super::error::LedgerError;
use super::store::{device_status, Ctx};
use super::types::{CertState, DeviceState, DeviceStatus};

/// A write the lifecycle allows, after its checks.
#[derive(Debug)]
pub(crate) enum WriteOp {
    Advance {
        serial: String,
        to: DeviceState,
        detail: String,
    },
    Fail {
        serial: String,
        reason: String,
    },
    Intent {
        serial: String,
        cert_serial: String,
        public_key: String,
    },
    Issued {
        cert_serial: String,
        der: Vec<u8>,
        certificate_id: String,
        not_after: String,
    },
    Supersede {
        serial: String,
        reason: String,
    },
    RegistrationStep {
        serial: String,
        cert_serial: String,
        record: super::registration::StepRecord,
    },
}

impl WriteOp {
    /// What the operation is, for error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            WriteOp::Advance { serial, to, .. } => format!("moving device {serial} to {to}"),
            WriteOp::Fail { serial, .. } => format!("recording the failure of device {serial}"),
            WriteOp::Intent { serial, .. } => format!("recording intent for device {serial}"),
            WriteOp::Issued { cert_serial, .. } => format!("recording certificate {cert_serial}"),
            WriteOp::Supersede { serial, .. } => {
                format!("superseding the certificate of device {serial}")
            }
            WriteOp::RegistrationStep { serial, record, .. } => {
                format!(
                    "recording registration step {} of device {serial}",
                    record.step
                )
            }
        }
    }
}

/// Applies one write.
pub(crate) fn write(conn: &Connection, ctx: &Ctx<'_>, op: &WriteOp) -> Result<(), LedgerError> {
    let sql = |e| ctx.sqlite(op.describe(), e);
    let path = || ctx.path.to_path_buf();
    let unknown = |serial: &str| LedgerError::UnknownDevice {
        path: path(),
        op: op.describe(),
        serial: serial.to_string(),
    };
    let status = |serial: &str| -> Result<DeviceStatus, LedgerError> {
        device_status(conn, ctx.ca, serial)
            .map_err(sql)?
            .ok_or_else(|| unknown(serial))
    };
    let refuse =
        |serial: &str, from: DeviceState, to: DeviceState, note: &str| LedgerError::Transition {
            path: path(),
            serial: serial.to_string(),
            from,
            to,
            note: note.to_string(),
        };
    match op {
        WriteOp::Advance { serial, to, detail } => {
            if advance_directly(conn, ctx, serial, *to).map_err(sql)? {
                return ctx.event(conn, serial, to.as_str(), detail).map_err(sql);
            }
            // Not a step forward the lifecycle allows as it is: a no-op, or
            // a refusal saying why.
            let dev = step_status(conn, ctx, serial)
                .map_err(sql)?
                .ok_or_else(|| unknown(serial))?;
            if dev.state == *to {
                return Ok(());
            }
            match to {
                DeviceState::Issued => {
                    return Err(refuse(
                        serial,
                        dev.state,
                        *to,
                        "only a recorded certificate issues",
                    ))
                }
                DeviceState::Failed => {
                    return Err(refuse(
                        serial,
                        dev.state,
                        *to,
                        "record a failure with its reason",
                    ))
                }
                _ => {}
            }
            if dev.state == DeviceState::Failed || *to < dev.state {
                return Err(refuse(serial, dev.state, *to, ""));
            }
            if to.has_certificate() && !dev.has_live {
                return Err(refuse(serial, dev.state, *to, "no live certificate"));
            }
            ctx.set_state(conn, serial, *to, None).map_err(sql)?;
            ctx.event(conn, serial, to.as_str(), detail).map_err(sql)
        }
        WriteOp::Fail { serial, reason } => {
            let dev = status(serial)?;
            if let Some(intent) = &dev.pending_intent {
                ctx.supersede(conn, serial, intent, &format!("failed: {reason}"))
                    .map_err(sql)?;
            }
            ctx.set_state(conn, serial, DeviceState::Failed, Some(reason))
                .map_err(sql)?;
            ctx.event(conn, serial, "failed", reason).map_err(sql)
        }
        WriteOp::Intent {
            serial,
            cert_serial,
            public_key,
        } => {
            let dev = intent_status(conn, ctx, serial)
                .map_err(sql)?
                .ok_or_else(|| unknown(serial))?;
            if dev.state == DeviceState::Failed {
                return Err(refuse(
                    serial,
                    dev.state,
                    DeviceState::Issued,
                    "the device failed; plan it again",
                ));
            }
            let held = [
                (&dev.live_cert_serial, CertState::Live),
                (&dev.pending_intent, CertState::Intent),
            ];
            if let Some((Some(cert), state)) = held.into_iter().find(|(c, _)| c.is_some()) {
                return Err(LedgerError::CertificateExists {
                    path: path(),
                    serial: serial.clone(),
                    cert_serial: cert.clone(),
                    state,
                });
            }
            let reused: Option<(String, String)> = conn
                .prepare_cached(REUSED_KEY_SQL)
                .and_then(|mut s| {
                    s.query_row([public_key, serial], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(sql)?;
            if let Some((used_by, used_cert_serial)) = reused {
                return Err(LedgerError::ReusedPublicKey {
                    path: path(),
                    serial: serial.clone(),
                    public_key: public_key.clone(),
                    used_by,
                    used_cert_serial,
                });
            }
            // The unique index on cert_serial refuses a serial used before;
            // who used it is looked up only then.
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO certificates (ca, device_serial, thing_name, cert_serial, public_key, state, created, updated) \
                     VALUES (?1, ?2, ?3, ?4, ?5, 'intent', ?6, ?6)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        ctx.ca,
                        serial,
                        dev.thing_name,
                        cert_serial,
                        public_key,
                        ctx.now
                    ])
                });
            if let Err(e) = inserted {
                if !is_unique_violation(&e, "cert_serial") {
                    return Err(sql(e));
                }
                let used_by: Option<String> = conn
                    .prepare_cached("SELECT device_serial FROM certificates WHERE cert_serial = ?1")
                    .and_then(|mut s| s.query_row([cert_serial], |r| r.get(0)).optional())
                    .map_err(sql)?;
                return match used_by {
                    Some(used_by) => Err(LedgerError::DuplicateCertSerial {
                        path: path(),
                        serial: serial.clone(),
                        cert_serial: cert_serial.clone(),
                        used_by,
                    }),
                    None => Err(sql(e)),
                };
            }
            ctx.event(conn, serial, "intent", cert_serial).map_err(sql)
        }
        WriteOp::Issued {
            cert_serial,
            der,
            certificate_id,
            not_after,
        } => {
            let found: Option<(String, String)> = conn
                .prepare_cached("SELECT device_serial, state FROM certificates WHERE cert_serial = ?1 AND ca = ?2")
                .and_then(|mut s| {
                    s.query_row(params![cert_serial, ctx.ca], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(sql)?;
            let no_intent = |found| LedgerError::NoIntent {
                path: path(),
                cert_serial: cert_serial.clone(),
                found,
            };
            let Some((serial, state)) = found else {
                return Err(no_intent(None));
            };
            if state != CertState::Intent.as_str() {
                return Err(no_intent(state.parse().ok()));
            }
            // The DER carries cert_serial (checked on submitting), which is
            // unique: no DER is recorded twice.
            conn.prepare_cached(
                "UPDATE certificates SET der = ?2, certificate_id = ?3, not_after = ?4, state = 'live', updated = ?5 \
                 WHERE cert_serial = ?1",
            )
            .and_then(|mut s| s.execute(params![cert_serial, der, certificate_id, not_after, ctx.now]))
            .map_err(sql)?;
            ctx.set_state(conn, &serial, DeviceState::Issued, None)
                .map_err(sql)?;
            ctx.event(
                conn,
                &serial,
                "issued",
                &format!("{cert_serial} {certificate_id}"),
            )
            .map_err(sql)
        }
        WriteOp::Supersede { serial, reason } => {
            let dev = status(serial)?;
            for cert in dev.live_cert_serial.iter().chain(&dev.pending_intent) {
                ctx.supersede(conn, serial, cert, reason).map_err(sql)?;
            }
            if dev.state.has_certificate() {
                ctx.set_state(conn, serial, DeviceState::Planned, None)
                    .map_err(sql)?;
                ctx.event(
                    conn,
                    serial,
                    "planned",
                    &format!("certificate superseded: {reason}"),
                )
                .map_err(sql)?;
            }
            Ok(())
        }
        WriteOp::RegistrationStep {
            serial,
            cert_serial,
            record,
        } => {
            super::registration::write_step(conn, ctx, serial, cert_serial, record, &op.describe())
        }
    }
}

/// Another device's certificate for the public key `?1`, found through
/// the index on the key's first 12 hex digits (schema v5).
pub(super) const REUSED_KEY_SQL: &str = "SELECT device_serial, cert_serial FROM certificates \
     WHERE substr(public_key, 1, 12) = substr(?1, 1, 12) AND public_key = ?1 \
     AND device_serial <> ?2 LIMIT 1";

/// What recording an intent needs to know about the device.
struct IntentStatus {
    state: DeviceState,
    thing_name: String,
    live_cert_serial: Option<String>,
    pending_intent: Option<String>,
}

fn intent_status(
    conn: &Connection,
    ctx: &Ctx<'_>,
    serial: &str,
) -> rusqlite::Result<Option<IntentStatus>> {
    conn.prepare_cached(
        "SELECT d.state, d.thing_name, \
             (SELECT c.cert_serial FROM certificates c \
              WHERE c.device_serial = d.serial AND c.ca = d.ca AND c.state = 'live'), \
             (SELECT c.cert_serial FROM certificates c \
              WHERE c.device_serial = d.serial AND c.ca = d.ca AND c.state = 'intent') \
         FROM devices d WHERE d.serial = ?1 AND d.ca = ?2",
    )?
    .query_row(params![serial, ctx.ca], |row| {
        Ok(IntentStatus {
            state: parse_state(row, 0)?,
            thing_name: row.get(1)?,
            live_cert_serial: row.get(2)?,
            pending_intent: row.get(3)?,
        })
    })
    .optional()
}

fn parse_state(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<DeviceState> {
    let state: String = row.get(column)?;
    state.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, e.into())
    })
}

/// What moving a device forward needs to know: less than a
/// [`DeviceStatus`], read with one index lookup per table.
struct StepStatus {
    state: DeviceState,
    has_live: bool,
}

fn step_status(
    conn: &Connection,
    ctx: &Ctx<'_>,
    serial: &str,
) -> rusqlite::Result<Option<StepStatus>> {
    conn.prepare_cached(
        "SELECT d.state, EXISTS (SELECT 1 FROM certificates c \
             WHERE c.device_serial = d.serial AND c.ca = d.ca AND c.state = 'live') \
         FROM devices d WHERE d.serial = ?1 AND d.ca = ?2",
    )?
    .query_row(params![serial, ctx.ca], |row| {
        Ok(StepStatus {
            state: parse_state(row, 0)?,
            has_live: row.get(1)?,
        })
    })
    .optional()
}

/// Moves the device to `to` in one statement when the step is allowed as
/// it is (from an earlier state, not failed, with a live certificate if
/// `to` needs one); false if nothing moved.
fn advance_directly(
    conn: &Connection,
    ctx: &Ctx<'_>,
    serial: &str,
    to: DeviceState,
) -> rusqlite::Result<bool> {
    if matches!(to, DeviceState::Issued | DeviceState::Failed) {
        return Ok(false);
    }
    let moved = conn.prepare_cached(advance_sql(to))?.execute(params![
        serial,
        ctx.ca,
        to.as_str(),
        ctx.now
    ])?;
    Ok(moved == 1)
}

/// The statement of [`advance_directly`] for target state `to`, built once
/// per state. The states it may not come from (itself, later ones, failed)
/// are an AND chain: an OR chain or an IN list on the state would have
/// SQLite build a temporary table on every execution.
fn advance_sql(to: DeviceState) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        DeviceState::ALL
            .into_iter()
            .map(|to| {
                let refused: Vec<String> = DeviceState::ALL
                    .into_iter()
                    .filter(|s| *s >= to)
                    .map(|s| format!("state <> '{}'", s.as_str()))
                    .collect();
                let live = if to.has_certificate() {
                    " AND EXISTS (SELECT 1 FROM certificates c \
                       WHERE c.device_serial = ?1 AND c.ca = ?2 AND c.state = 'live')"
                } else {
                    ""
                };
                format!(
                    "UPDATE devices SET state = ?3, error = NULL, updated = ?4 \
                     WHERE serial = ?1 AND ca = ?2 AND {}{live}",
                    refused.join(" AND ")
                )
            })
            .collect()
    });
    let index = DeviceState::ALL.iter().position(|s| *s == to).unwrap_or(0);
    &all[index]
}

/// Whether `e` is the unique index on `certificates.<column>` refusing a row.
fn is_unique_violation(e: &rusqlite::Error, column: &str) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, Some(message))
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                && message.ends_with(&format!("certificates.{column}"))
    )
}
