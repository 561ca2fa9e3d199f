//! Unit tests of the ledger, on real SQLite files in a temporary folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::OptionalExtension;
use time::macros::datetime;

use super::*;
use crate::clock::FixedClock;

pub(super) fn test_ca() -> CaId {
    CaId::of_certificate(b"test CA certificate")
}

pub(super) fn job(label: &str) -> JobId {
    JobId::new("jobs/line1.csv", label)
}

pub(super) fn device(serial: &str, line: u64) -> PlannedDevice {
    PlannedDevice {
        serial: serial.into(),
        thing_name: format!("sensor_{serial}"),
        line,
    }
}

pub(super) fn options() -> LedgerOptions {
    LedgerOptions {
        clock: Arc::new(FixedClock(datetime!(2025-03-01 12:00 UTC))),
        ..LedgerOptions::default()
    }
}

pub(super) fn ledger_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("ledger.sqlite")
}

pub(super) fn open(path: &Path) -> Ledger {
    Ledger::open(path, test_ca(), options()).unwrap()
}

/// A certificate under `cert_serial` (hex), signed by one test key: the
/// ledger checks that the DER recorded for an intent carries its serial.
pub(crate) fn der_for(cert_serial: &str) -> Vec<u8> {
    static KEY: std::sync::OnceLock<rcgen::KeyPair> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| rcgen::KeyPair::generate().unwrap());
    let padded = format!("{}{cert_serial}", "0".repeat(cert_serial.len() % 2));
    let bytes: Vec<u8> = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).unwrap())
        .collect();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&bytes));
    params.self_signed(key).unwrap().der().to_vec()
}

/// Plans (if new), makes ready, records intent and issuance.
pub(super) fn issue(ledger: &Ledger, job: &JobId, serial: &str, cert_serial: &str, key: &[u8]) {
    ledger.plan(job, &device(serial, 2), false).unwrap();
    ledger
        .advance(serial, DeviceState::KeyReady, "station key")
        .unwrap();
    ledger.record_intent(serial, cert_serial, key).unwrap();
    ledger
        .record_issued(
            cert_serial,
            &der_for(cert_serial),
            datetime!(2035-03-01 12:00 UTC),
        )
        .unwrap();
}

pub(super) fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

pub(super) fn export(ledger: &Ledger) -> Vec<CertificateRow> {
    let mut rows = Vec::new();
    ledger
        .for_each_certificate(|row| {
            rows.push(row);
            Ok::<_, LedgerError>(())
        })
        .unwrap();
    rows
}

#[test]
fn states_and_events_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&ledger_path(&dir));
    let job = job("a");
    assert_eq!(
        ledger.plan(&job, &device("SN-1", 2), false).unwrap(),
        PlanOutcome::New
    );
    ledger
        .advance("SN-1", DeviceState::KeyReady, "station key")
        .unwrap();
    ledger.record_intent("SN-1", "4A01", b"key one").unwrap();
    let pending = ledger.device("SN-1").unwrap().unwrap();
    assert_eq!(pending.pending_intent.as_deref(), Some("4a01"));
    assert_eq!(pending.state, DeviceState::KeyReady);
    let der = der_for("4a01");
    let id = ledger
        .record_issued("4a01", &der, datetime!(2035-03-01 12:00 UTC))
        .unwrap();
    assert_eq!(id, types::sha256_hex(&der));
    for state in [
        DeviceState::Registered,
        DeviceState::Delivered,
        DeviceState::Verified,
    ] {
        ledger.advance("SN-1", state, "").unwrap();
    }
    let status = ledger.device("SN-1").unwrap().unwrap();
    assert_eq!(status.state, DeviceState::Verified);
    assert_eq!(status.live_cert_serial.as_deref(), Some("4a01"));
    assert_eq!(status.live_certificate_id.as_deref(), Some(id.as_str()));
    assert_eq!(status.thing_name, "sensor_SN-1");
    assert_eq!(status.created, "2025-03-01T12:00:00.000Z");
    assert!(status.is_finished(DeviceState::Delivered));
    assert_eq!(
        ledger.reader().certificate_der("4A01").unwrap().as_deref(),
        Some(der.as_slice())
    );

    let events: Vec<String> = ledger
        .events("SN-1")
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(
        events,
        [
            "planned",
            "key_ready",
            "intent",
            "issued",
            "registered",
            "delivered",
            "verified"
        ]
    );

    // Backwards, or to issued/failed by the wrong door: refused.
    let back = ledger
        .advance("SN-1", DeviceState::KeyReady, "")
        .unwrap_err();
    assert!(
        matches!(
            back,
            LedgerError::Transition {
                from: DeviceState::Verified,
                ..
            }
        ),
        "{back}"
    );
    ledger.plan(&job, &device("SN-2", 3), false).unwrap();
    let issued = ledger.advance("SN-2", DeviceState::Issued, "").unwrap_err();
    assert!(
        issued
            .to_string()
            .contains("only a recorded certificate issues"),
        "{issued}"
    );
    let delivered = ledger
        .advance("SN-2", DeviceState::Delivered, "")
        .unwrap_err();
    assert!(
        delivered.to_string().contains("no live certificate"),
        "{delivered}"
    );
    let unknown = ledger
        .advance("SN-9", DeviceState::KeyReady, "")
        .unwrap_err();
    assert!(
        matches!(unknown, LedgerError::UnknownDevice { .. }),
        "{unknown}"
    );

    // A failure, then a re-run of the same job retries it.
    ledger.record_intent("SN-2", "4a02", b"key two").unwrap();
    ledger.fail("SN-2", "signer offline").unwrap();
    let failed = ledger.device("SN-2").unwrap().unwrap();
    assert_eq!(failed.state, DeviceState::Failed);
    assert_eq!(failed.error.as_deref(), Some("signer offline"));
    assert_eq!(
        failed.pending_intent, None,
        "a failed device keeps no intent"
    );
    let retry = ledger.plan(&job, &device("SN-2", 3), false).unwrap();
    assert_eq!(
        retry,
        PlanOutcome::Retry {
            state: DeviceState::Planned,
            previous_error: "signer offline".into()
        }
    );
    // And a finished device is resumed, untouched.
    match ledger.plan(&job, &device("SN-1", 2), false).unwrap() {
        PlanOutcome::Resume(status) => assert_eq!(status.state, DeviceState::Verified),
        other => panic!("{other:?}"),
    }
    let for_job = ledger.devices_for_job(&job).unwrap();
    assert_eq!(
        for_job
            .iter()
            .map(|d| d.serial.as_str())
            .collect::<Vec<_>>(),
        ["SN-1", "SN-2"]
    );
}

#[test]
fn events_cannot_be_updated_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = ledger_path(&dir);
    let ledger = open(&path);
    issue(&ledger, &job("a"), "SN-1", "01", b"k1");
    let before = ledger.events("SN-1").unwrap();
    assert_eq!(before.len(), 4);

    let conn = raw(&path);
    let update = conn
        .execute("UPDATE events SET detail = 'forged'", [])
        .unwrap_err();
    assert!(update.to_string().contains("append-only"), "{update}");
    let delete = conn
        .execute("DELETE FROM events WHERE device_serial = 'SN-1'", [])
        .unwrap_err();
    assert!(delete.to_string().contains("append-only"), "{delete}");
    assert_eq!(ledger.events("SN-1").unwrap(), before);
}

#[test]
fn duplicate_serials_and_foreign_ders_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&ledger_path(&dir));
    let job = job("a");
    issue(&ledger, &job, "SN-1", "0abc", b"k1");
    ledger.plan(&job, &device("SN-2", 3), false).unwrap();
    let dup = ledger.record_intent("SN-2", "0ABC", b"k2").unwrap_err();
    match &dup {
        LedgerError::DuplicateCertSerial {
            used_by,
            cert_serial,
            ..
        } => {
            assert_eq!(used_by, "SN-1");
            assert_eq!(cert_serial, "0abc");
        }
        other => panic!("{other}"),
    }
    assert!(
        dup.to_string()
            .contains("ledger.sqlite: recording intent for device SN-2"),
        "{dup}"
    );

    ledger.record_intent("SN-2", "0abd", b"k2").unwrap();
    // SN-1's certificate (serial 0abc) is not the certificate of intent 0abd.
    let other = ledger
        .record_issued("0abd", &der_for("0abc"), datetime!(2035-03-01 0:00 UTC))
        .unwrap_err();
    match &other {
        LedgerError::CertificateMismatch {
            cert_serial, found, ..
        } => {
            assert_eq!(cert_serial, "0abd");
            assert_eq!(found.as_deref(), Some("abc"));
        }
        other => panic!("{other}"),
    }
    let garbage = ledger
        .record_issued("0abd", b"not a certificate", datetime!(2035-03-01 0:00 UTC))
        .unwrap_err();
    assert!(
        garbage
            .to_string()
            .contains("recording certificate 0abd: the DER is not an X.509 certificate"),
        "{garbage}"
    );
    let twice = ledger
        .record_issued("0abc", &der_for("abc"), datetime!(2035-03-01 0:00 UTC))
        .unwrap_err();
    assert!(
        matches!(
            twice,
            LedgerError::NoIntent {
                found: Some(CertState::Live),
                ..
            }
        ),
        "{twice}"
    );
    let bad = ledger.record_intent("SN-2", "xyz", b"k2").unwrap_err();
    assert!(matches!(bad, LedgerError::Invalid { .. }), "{bad}");
    // A second intent while one is pending is refused too.
    let pending = ledger.record_intent("SN-2", "0abe", b"k2").unwrap_err();
    assert!(
        matches!(
            pending,
            LedgerError::CertificateExists {
                state: CertState::Intent,
                ..
            }
        ),
        "{pending}"
    );
}

#[test]
fn reused_public_key_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&ledger_path(&dir));
    let job = job("a");
    issue(&ledger, &job, "SN-1", "01", b"the same key");
    ledger.plan(&job, &device("SN-2", 3), false).unwrap();
    let err = ledger
        .record_intent("SN-2", "02", b"the same key")
        .unwrap_err();
    match &err {
        LedgerError::ReusedPublicKey {
            used_by,
            used_cert_serial,
            public_key,
            ..
        } => {
            assert_eq!(used_by, "SN-1");
            assert_eq!(used_cert_serial, "01");
            assert_eq!(public_key, &types::sha256_hex(b"the same key"));
        }
        other => panic!("{other}"),
    }
    // The same device may be certified again over its own key.
    ledger
        .supersede("SN-1", "key kept, certificate renewed")
        .unwrap();
    assert_eq!(
        ledger.device("SN-1").unwrap().unwrap().state,
        DeviceState::Planned
    );
    ledger.record_intent("SN-1", "03", b"the same key").unwrap();
}

#[test]
fn the_reused_key_lookup_uses_the_prefix_index_and_compares_whole_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = ledger_path(&dir);
    let ledger = open(&path);
    let job = job("a");
    issue(&ledger, &job, "SN-1", "01", b"k1");
    ledger.close().unwrap();
    let conn = raw(&path);
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {}", lifecycle::REUSED_KEY_SQL))
        .unwrap()
        .query_map(["a", "b"], |r| r.get(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter()
            .any(|step| step.contains("certificates_by_key_prefix")),
        "{plan:?}"
    );
    // A key that shares the indexed prefix is not the same key.
    let held: String = conn
        .query_row("SELECT public_key FROM certificates", [], |r| r.get(0))
        .unwrap();
    let lookalike = format!("{}{}", &held[..12], "0".repeat(52));
    let find = |key: &str| -> Option<String> {
        conn.query_row(lifecycle::REUSED_KEY_SQL, [key, "SN-2"], |r| r.get(0))
            .optional()
            .unwrap()
    };
    assert_eq!(find(&lookalike), None);
    assert_eq!(find(&held).as_deref(), Some("SN-1"));
}

#[test]
fn an_intent_without_certificate_is_superseded_on_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = ledger_path(&dir);
    let job = job("a");
    {
        let ledger = open(&path);
        issue(&ledger, &job, "SN-1", "01", b"k1");
        ledger.plan(&job, &device("SN-2", 3), false).unwrap();
        ledger.advance("SN-2", DeviceState::KeyReady, "").unwrap();
        ledger.record_intent("SN-2", "02", b"k2").unwrap();
        // The station stops here: the CA may or may not have signed 02.
    }
    let ledger = open(&path);
    let recovered = ledger.recovered();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0].device_serial, "SN-2");
    assert_eq!(recovered[0].cert_serial, "02");
    let status = ledger.device("SN-2").unwrap().unwrap();
    assert_eq!(status.state, DeviceState::KeyReady);
    assert_eq!(status.pending_intent, None);
    assert_eq!(status.live_cert_serial, None);

    let rows = export(&ledger);
    let abandoned = rows.iter().find(|r| r.cert_serial == "02").unwrap();
    assert_eq!(abandoned.state, CertState::Superseded);
    assert_eq!(abandoned.reason.as_deref(), Some(REASON_CRASH));
    assert_eq!(abandoned.certificate_id, None);
    let late = ledger
        .record_issued("02", &der_for("02"), datetime!(2035-03-01 0:00 UTC))
        .unwrap_err();
    assert!(
        matches!(
            late,
            LedgerError::NoIntent {
                found: Some(CertState::Superseded),
                ..
            }
        ),
        "{late}"
    );
    let events: Vec<String> = ledger
        .events("SN-2")
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(events.last().map(String::as_str), Some("superseded"));

    // Issued anew (same CSR key, same device: allowed).
    ledger.record_intent("SN-2", "03", b"k2").unwrap();
    ledger
        .record_issued("03", &der_for("03"), datetime!(2035-03-01 0:00 UTC))
        .unwrap();
    drop(ledger);
    assert!(open(&path).recovered().is_empty());
}

#[test]
fn another_job_is_refused_unless_reissue_which_supersedes() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&ledger_path(&dir));
    let (first, second) = (job("first"), job("second"));
    issue(&ledger, &first, "SN-1", "01", b"k1");
    issue(&ledger, &first, "SN-2", "02", b"k2");
    let refused = ledger.plan(&second, &device("SN-1", 7), false).unwrap_err();
    match &refused {
        LedgerError::OtherJob {
            other_job,
            other_line,
            ..
        } => {
            assert_eq!(other_job, &first);
            assert_eq!(*other_line, 2);
        }
        other => panic!("{other}"),
    }
    let reissue = ledger.plan(&second, &device("SN-1", 7), true).unwrap();
    assert_eq!(
        reissue,
        PlanOutcome::Reissue {
            previous_job: first.clone(),
            superseded: Some("01".into())
        }
    );
    let status = ledger.device("SN-1").unwrap().unwrap();
    assert_eq!(
        (status.state, status.line, &status.job),
        (DeviceState::Planned, 7, &second)
    );
    ledger.record_intent("SN-1", "11", b"k1 renewed").unwrap();
    ledger
        .record_issued("11", &der_for("11"), datetime!(2036-01-01 0:00 UTC))
        .unwrap();

    let rows = export(&ledger);
    let summary: Vec<(&str, &str, CertState, Option<&str>)> = rows
        .iter()
        .map(|r| {
            (
                r.device_serial.as_str(),
                r.cert_serial.as_str(),
                r.state,
                r.reason.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("SN-1", "01", CertState::Superseded, Some(REASON_REISSUE)),
            ("SN-2", "02", CertState::Live, None),
            ("SN-1", "11", CertState::Live, None),
        ]
    );
    assert_eq!(rows[2].not_after.as_deref(), Some("2036-01-01T00:00:00Z"));
    assert_eq!(rows[0].thing_name, "sensor_SN-1");
    let json = serde_json::to_string(&rows[0]).unwrap();
    assert!(json.contains(r#""state":"superseded""#), "{json}");
    assert_eq!(ledger.devices_for_job(&first).unwrap().len(), 1);
}

#[test]
fn newer_or_foreign_files_are_refused_and_one_station_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = ledger_path(&dir);
    let ledger = open(&path);
    let second = Ledger::open(&path, test_ca(), options()).unwrap_err();
    assert!(matches!(second, LedgerError::InUse { .. }), "{second}");
    // Readers are welcome while the station writes.
    let reader = LedgerReader::open(&path).unwrap();
    assert_eq!(reader.integrity_check().unwrap(), ["ok"]);
    drop((ledger, reader));

    raw(&path)
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    let newer = Ledger::open(&path, test_ca(), options()).unwrap_err();
    assert!(
        matches!(newer, LedgerError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
        "{newer}"
    );
    assert!(
        newer.to_string().contains("newer than this station's"),
        "{newer}"
    );
    let newer = LedgerReader::open(&path).unwrap_err();
    assert!(matches!(newer, LedgerError::NewerSchema { .. }), "{newer}");

    let foreign = dir.path().join("other.sqlite");
    raw(&foreign).execute_batch("CREATE TABLE t (x)").unwrap();
    let err = Ledger::open(&foreign, test_ca(), options()).unwrap_err();
    assert!(matches!(err, LedgerError::NotALedger { .. }), "{err}");
}

#[test]
fn a_version_1_ledger_is_migrated_with_everything_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = ledger_path(&dir);
    let ca = test_ca();
    {
        let conn = raw(&path);
        conn.execute_batch(&format!(
            "BEGIN; {} PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1; COMMIT;",
            schema::MIGRATIONS[0]
        ))
        .unwrap();
        let t = "2025-01-01T00:00:00.000Z";
        conn.execute(
            "INSERT INTO devices VALUES (?1, 'SN-1', 'sensor_SN-1', 'jobs/line1.csv', 'a', 2, 'delivered', NULL, ?2, ?2)",
            rusqlite::params![ca.as_str(), t],
        )
        .unwrap();
        for (cert, id, state) in [
            ("0a", Some("id-0a"), "superseded"),
            ("0b", Some("id-0b"), "live"),
        ] {
            conn.execute(
                "INSERT INTO certificates (ca, device_serial, thing_name, cert_serial, certificate_id, public_key, der, state, created, updated) \
                 VALUES (?1, 'SN-1', 'sensor_SN-1', ?2, ?3, 'key', x'3082', ?4, ?5, ?5)",
                rusqlite::params![ca.as_str(), cert, id, state, t],
            )
            .unwrap();
        }
        for event in ["planned", "intent", "issued", "delivered"] {
            conn.execute(
                "INSERT INTO events (time, ca, device_serial, event) VALUES (?1, ?2, 'SN-1', ?3)",
                rusqlite::params![t, ca.as_str(), event],
            )
            .unwrap();
        }
    }
    let ledger = open(&path);
    let version: i64 = raw(&path)
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let dev = ledger.device("SN-1").unwrap().unwrap();
    assert_eq!(dev.state, DeviceState::Delivered);
    assert_eq!(dev.live_cert_serial.as_deref(), Some("0b"));
    let events: Vec<String> = ledger
        .events("SN-1")
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(events, ["planned", "intent", "issued", "delivered"]);
    let exported = export(&ledger);
    assert_eq!(exported.len(), 2);
    // Rows name their CA by number now, and still read back as its id.
    assert!(exported.iter().all(|row| row.ca == ca), "{exported:?}");
    let numbered: i64 = raw(&path)
        .query_row(
            "SELECT count(*) FROM devices WHERE typeof(ca) = 'integer'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(numbered, 1);
    // The rebuilt tables keep their rules.
    let conn = raw(&path);
    conn.pragma_update(None, "foreign_keys", true).unwrap();
    let bad_state = conn.execute(
        "UPDATE devices SET state = 'lost' WHERE serial = 'SN-1'",
        [],
    );
    assert!(
        bad_state.is_err(),
        "a state outside the lifecycle was stored"
    );
    let second_live = conn.execute(
        "UPDATE certificates SET state = 'live' WHERE cert_serial = '0a'",
        [],
    );
    assert!(second_live.is_err(), "a device got two live certificates");
    let orphan = conn.execute(
        "INSERT INTO certificates (ca, device_serial, thing_name, cert_serial, public_key, state, created, updated) \
         VALUES ('x', 'nobody', 'n', '0c', 'k', 'intent', 't', 't')",
        [],
    );
    assert!(orphan.is_err(), "a certificate without a device was stored");
    let rewrite = conn.execute("DELETE FROM events", []);
    assert!(rewrite.is_err(), "the event log was rewritten");
    // New devices go on from the migrated rows.
    issue(&ledger, &job("a"), "SN-2", "0d", b"key 2");
    assert_eq!(export(&ledger).len(), 3);
}

#[test]
fn planning_and_stepping_refuse_what_the_lifecycle_does_not_allow() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&ledger_path(&dir));
    let job = job("a");
    ledger.plan(&job, &device("SN-1", 2), false).unwrap();
    // Another device under the same thing name: refused, naming the holder.
    let mut twin = device("SN-2", 3);
    twin.thing_name = "sensor_SN-1".into();
    let taken = ledger.plan(&job, &twin, false).unwrap_err();
    assert!(
        taken
            .to_string()
            .contains("thing name sensor_SN-1 already belongs to device SN-1 (line 2)"),
        "{taken}"
    );
    assert!(ledger.device("SN-2").unwrap().is_none());

    // A step to where the device stands is a no-op: no second event.
    ledger.advance("SN-1", DeviceState::KeyReady, "").unwrap();
    ledger.advance("SN-1", DeviceState::KeyReady, "").unwrap();
    let events = ledger.events("SN-1").unwrap();
    assert_eq!(
        events.iter().filter(|e| e.event == "key_ready").count(),
        1,
        "{events:?}"
    );

    // A failed device does not move on until it is planned again.
    ledger.fail("SN-1", "no key").unwrap();
    let stuck = ledger
        .advance("SN-1", DeviceState::KeyReady, "")
        .unwrap_err();
    assert!(
        matches!(
            stuck,
            LedgerError::Transition {
                from: DeviceState::Failed,
                ..
            }
        ),
        "{stuck}"
    );
    assert_eq!(
        ledger.device("SN-1").unwrap().unwrap().state,
        DeviceState::Failed
    );
}

#[test]
fn the_serial_is_read_from_a_certificate_and_nothing_else() {
    let der = der_for("4a01");
    assert_eq!(types::der_serial(&der).as_deref(), Some("4a01"));
    assert_eq!(types::der_serial(&der_for("00ff")).as_deref(), Some("ff"));
    let mut trailing = der.clone();
    trailing.push(0);
    assert_eq!(types::der_serial(&trailing), None);
    assert_eq!(types::der_serial(&der[..der.len() - 1]), None);
    assert_eq!(types::der_serial(b""), None);
    // A SEQUENCE holding an INTEGER directly is not a certificate.
    assert_eq!(types::der_serial(&[0x30, 0x03, 0x02, 0x01, 0x05]), None);
}
