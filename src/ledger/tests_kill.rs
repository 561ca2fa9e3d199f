//! A station killed (SIGKILL) while it writes: the file it leaves is sound,
//! holds every acknowledged operation, and nothing half-written.
//!
//! The test binary runs itself as the writer (`child_writer`, selected with
//! `--exact` and an environment variable); the writer prints each
//! acknowledged operation; the parent reads them, kills it, and checks.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use time::macros::datetime;

use super::tests::{device, job, test_ca};
use super::*;

const CHILD_ENV: &str = "PROVLINE_LEDGER_KILL_CHILD";
const THREADS: usize = 4;
/// Acknowledged intents to wait for before the kill.
const INTENTS_BEFORE_KILL: usize = 3000;

/// The writer, when run as the child; a no-op otherwise.
#[test]
fn child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let ledger = Ledger::open(Path::new(&path), test_ca(), LedgerOptions::default()).unwrap();
    let job = job("kill");
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (ledger, job) = (&ledger, &job);
            s.spawn(move || {
                for i in 0..1_000_000u64 {
                    let serial = format!("SN-{t}-{i}");
                    let cert = format!("{t:02x}{i:08x}");
                    ledger.plan(job, &device(&serial, i), false).unwrap();
                    ledger.advance(&serial, DeviceState::KeyReady, "").unwrap();
                    ledger
                        .record_intent(&serial, &cert, serial.as_bytes())
                        .unwrap();
                    println!("INTENT {serial} {cert}");
                    let der = super::tests::der_for(&cert);
                    let id = ledger
                        .record_issued(&cert, &der, datetime!(2035-01-01 0:00 UTC))
                        .unwrap();
                    println!("ISSUED {serial} {cert} {id}");
                    ledger
                        .advance(&serial, DeviceState::Delivered, "bundle")
                        .unwrap();
                    println!("DELIVERED {serial}");
                }
            });
        }
    });
}

#[test]
fn killed_writer_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let name = format!(
        "{}::child_writer",
        module_path!().split_once("::").map_or("", |(_, rest)| rest)
    );
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut intents: HashMap<String, String> = HashMap::new();
    let mut issued: HashMap<String, String> = HashMap::new();
    let mut delivered: Vec<String> = Vec::new();
    let mut killed = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["INTENT", serial, cert] => {
                intents.insert(cert.to_string(), serial.to_string());
            }
            ["ISSUED", _, cert, id] => {
                issued.insert(cert.to_string(), id.to_string());
            }
            ["DELIVERED", serial] => delivered.push(serial.to_string()),
            _ => continue,
        }
        if !killed && intents.len() >= INTENTS_BEFORE_KILL {
            child.kill().unwrap(); // SIGKILL
            killed = true;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        killed,
        "the writer stopped by itself ({status}) after {} intents",
        intents.len()
    );

    // Sound, before any recovery runs.
    let reader = LedgerReader::open(&path).unwrap();
    assert_eq!(reader.integrity_check().unwrap(), ["ok"]);
    drop(reader);

    let ledger = Ledger::open(&path, test_ca(), LedgerOptions::default()).unwrap();
    let mut certs: HashMap<String, CertificateRow> = HashMap::new();
    ledger
        .for_each_certificate(|row| {
            certs.insert(row.cert_serial.clone(), row);
            Ok::<_, LedgerError>(())
        })
        .unwrap();
    for (cert, serial) in &intents {
        let row = certs
            .get(cert)
            .unwrap_or_else(|| panic!("acknowledged intent {cert} of {serial} lost"));
        assert_eq!(&row.device_serial, serial);
    }
    for (cert, id) in &issued {
        let row = &certs[cert];
        assert_eq!(row.state, CertState::Live, "{cert}");
        assert_eq!(row.certificate_id.as_deref(), Some(id.as_str()));
        assert!(ledger.reader().certificate_der(cert).unwrap().is_some());
    }
    for serial in &delivered {
        assert_eq!(
            ledger.device(serial).unwrap().unwrap().state,
            DeviceState::Delivered
        );
    }
    // Nothing half-written: no intent left, every live certificate whole,
    // every device past `issued` backed by a live certificate.
    for row in certs.values() {
        match row.state {
            CertState::Intent => panic!("intent {} left after reopening", row.cert_serial),
            CertState::Live => assert!(row.certificate_id.is_some() && row.not_after.is_some()),
            CertState::Superseded => {
                assert_eq!(row.reason.as_deref(), Some(REASON_CRASH));
                assert!(!issued.contains_key(&row.cert_serial));
            }
        }
    }
    let abandoned = certs
        .values()
        .filter(|r| r.state == CertState::Superseded)
        .count();
    assert_eq!(abandoned, ledger.recovered().len());
    let devices = ledger.devices_for_job(&job("kill")).unwrap();
    for dev in &devices {
        assert_eq!(
            dev.state.has_certificate(),
            dev.live_cert_serial.is_some(),
            "{dev:?}"
        );
    }
    let events: Vec<String> = ledger
        .events(&delivered[0])
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(
        events,
        ["planned", "key_ready", "intent", "issued", "delivered"]
    );
    eprintln!(
        "killed after {} acknowledged intents, {} issued, {} delivered; {} devices on file, {} intents superseded",
        intents.len(),
        issued.len(),
        delivered.len(),
        devices.len(),
        abandoned
    );
}
