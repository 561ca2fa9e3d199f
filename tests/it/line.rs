//! The line end to end: the real `provline flash` binary (and, where the
//! port itself is checked, the library's flash run) against simulated
//! devices on real pseudo-terminals, judged by what the devices stored, by
//! the ledger export and by `openssl verify`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde_json::Value;

use provline::device::Item;
use provline::line::flash::{self, FlashArgs};
use provline::line::session::key_of_certificate;
use provline::line::{KeyMode, Quiet, SerialTransport};
use provline::sim::{Faults, SimConfig, SimDevice, SimKeyMode};

use crate::util::*;

/// A CA in `dir/ca`.
fn make_ca(dir: &Path) -> PathBuf {
    let ca = dir.join("ca");
    provline(dir, &["ca", "init", "--dir", "ca"]).expect_code(0);
    ca
}

fn sim(serial: &str, mode: SimKeyMode, faults: Faults) -> SimDevice {
    let mut config = SimConfig::new(serial, mode);
    config.baud = 0;
    config.faults = faults;
    SimDevice::spawn(config).expect("spawn a simulated device")
}

/// Runs `provline --json flash` on the devices' ports; returns the run and its report.
fn flash_cmd(dir: &Path, devices: &[&SimDevice], mode: &str, extra: &[&str]) -> (Run, Value) {
    let mut args: Vec<String> = vec![
        "--json".into(),
        "flash".into(),
        "--ca".into(),
        "ca".into(),
        "--ledger".into(),
        "line.sqlite".into(),
        "--key-mode".into(),
        mode.into(),
        "--endpoint".into(),
        "example-ats.iot.eu-west-1.amazonaws.com".into(),
    ];
    for d in devices {
        args.push("--port".into());
        args.push(d.port_path().to_string_lossy().into_owned());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let run = provline(dir, &args);
    let report: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("report is not JSON ({e})\n{run}"));
    (run, report)
}

/// Writes the device's stored certificate as PEM and checks it with openssl.
fn assert_cert_verifies(dir: &Path, ca: &Path, device: &SimDevice) -> Vec<u8> {
    let stored = device.stored();
    let der = stored
        .item(Item::Certificate)
        .expect("the device holds a certificate")
        .to_vec();
    let path = dir.join(format!("{}.pem", device.serial()));
    std::fs::write(&path, provline::pem_encode("CERTIFICATE", &der)).expect("write cert");
    assert_openssl_verifies(&ca.join("ca.pem"), &path);
    der
}

/// The ledger export, one JSON object per certificate.
fn export(dir: &Path) -> Vec<Value> {
    let run = provline(
        dir,
        &[
            "ledger",
            "export",
            "--ledger",
            "line.sqlite",
            "--format",
            "jsonl",
        ],
    );
    run.expect_code(0);
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSONL"))
        .collect()
}

fn live_certs(dir: &Path, serial: &str) -> usize {
    export(dir)
        .iter()
        .filter(|r| r["device_serial"] == serial && r["state"] == "live")
        .count()
}

fn ledger_state(report: &Value, serial: &str) -> String {
    report["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["serial"] == serial)
        .map(|d| d["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// An uncompressed EC point inside a SubjectPublicKeyInfo (its last 65 bytes for P-256).
fn spki_point(spki: &[u8]) -> &[u8] {
    &spki[spki.len() - 65..]
}

#[test]
fn device_key_mode_certifies_the_key_that_never_left_the_device() {
    let tmp = tempdir();
    let ca = make_ca(tmp.path());
    let dev = sim("SN-DEV-1", SimKeyMode::Device, Faults::default());
    let (run, report) = flash_cmd(tmp.path(), &[&dev], "device", &[]);
    run.expect_code(0);
    assert_eq!(report["passed"].as_array().map(Vec::len), Some(1), "{run}");
    let der = assert_cert_verifies(tmp.path(), &ca, &dev);
    let stored = dev.stored();
    assert!(
        stored.item(Item::PrivateKey).is_none(),
        "no key was written"
    );
    let spki = stored
        .device_key_spki
        .clone()
        .expect("the device made its key");
    let cert_key = key_of_certificate(&der).expect("certificate key");
    assert_eq!(cert_key.raw(), spki_point(&spki));
    assert_eq!(stored.item(Item::ThingName), Some(&b"sensor_SN-DEV-1"[..]));
    assert_eq!(ledger_state(&report, "SN-DEV-1"), "verified");
    assert_eq!(live_certs(tmp.path(), "SN-DEV-1"), 1);
    // Nothing on disk holds a private key of the device.
    for entry in walk(tmp.path()) {
        let name = entry.file_name().unwrap_or_default().to_string_lossy();
        assert!(
            !name.ends_with(".key.pem"),
            "unexpected key file {}",
            entry.display()
        );
    }
}

#[test]
fn station_key_mode_writes_the_key_and_keeps_it_only_when_asked() {
    let tmp = tempdir();
    let ca = make_ca(tmp.path());
    let dev = sim("SN-STA-1", SimKeyMode::Station, Faults::default());
    let (run, _) = flash_cmd(tmp.path(), &[&dev], "station", &[]);
    run.expect_code(0);
    let der = assert_cert_verifies(tmp.path(), &ca, &dev);
    let stored = dev.stored();
    let pkcs8 = stored
        .item(Item::PrivateKey)
        .expect("the device holds the key");
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8,
        &ring::rand::SystemRandom::new(),
    )
    .expect("PKCS#8 P-256");
    use ring::signature::KeyPair;
    assert_eq!(
        key_of_certificate(&der).expect("certificate key").raw(),
        pair.public_key().as_ref()
    );
    let on_disk: Vec<_> = walk(tmp.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".key.pem"))
        .collect();
    assert!(on_disk.is_empty(), "keys on disk: {on_disk:?}");

    // With --keep-keys the key is kept, mode 0600, and it is the device's.
    let dev2 = sim("SN-STA-2", SimKeyMode::Station, Faults::default());
    std::fs::create_dir(tmp.path().join("keys")).expect("keys dir");
    let (run, _) = flash_cmd(tmp.path(), &[&dev2], "station", &["--keep-keys", "keys"]);
    run.expect_code(0);
    let kept = tmp.path().join("keys/sensor_SN-STA-2.key.pem");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kept)
        .expect("kept key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = std::fs::read(&kept).expect("read key");
    let block = pem::parse(pem).expect("PEM");
    assert_eq!(Some(block.contents()), dev2.stored().item(Item::PrivateKey));
}

#[test]
fn corrupted_bytes_and_dropped_frames_still_pass() {
    let tmp = tempdir();
    let ca = make_ca(tmp.path());
    let devices: Vec<SimDevice> = (0..4)
        .map(|i| {
            sim(
                &format!("SN-NOISY-{i}"),
                if i % 2 == 0 {
                    SimKeyMode::Station
                } else {
                    SimKeyMode::Device
                },
                Faults {
                    corrupt_rate: 0.01,
                    drop_rate: 0.01,
                    seed: 7 + i,
                    ..Faults::default()
                },
            )
        })
        .collect();
    let station: Vec<&SimDevice> = devices.iter().step_by(2).collect();
    let device: Vec<&SimDevice> = devices.iter().skip(1).step_by(2).collect();
    // The simulator is unpaced and answers at once: a short timeout keeps
    // the many retries of a noisy line quick.
    let quick = ["--timeout-ms", "80"];
    let (run, report) = flash_cmd(tmp.path(), &station, "station", &quick);
    run.expect_code(0);
    assert_eq!(report["failed"].as_array().map(Vec::len), Some(0), "{run}");
    let (run, _) = flash_cmd(tmp.path(), &device, "device", &quick);
    run.expect_code(0);
    let mut injected = 0;
    for d in &devices {
        assert_cert_verifies(tmp.path(), &ca, d);
        let faults = d.stored().faults;
        injected +=
            faults.corrupted_in + faults.corrupted_out + faults.dropped_in + faults.dropped_out;
    }
    assert!(injected > 0, "no fault was injected");
}

#[test]
fn a_reset_in_the_key_write_passes_on_the_retry_with_one_live_certificate() {
    let tmp = tempdir();
    let ca = make_ca(tmp.path());
    let dev = sim(
        "SN-RESET-1",
        SimKeyMode::Station,
        Faults {
            reset_during: Some(Item::PrivateKey),
            ..Faults::default()
        },
    );
    let (run, report) = flash_cmd(tmp.path(), &[&dev], "station", &[]);
    run.expect_code(0);
    assert_eq!(dev.stored().resets, 1, "the device did reset");
    assert!(report["passed"][0]["restarts"].as_u64() >= Some(1), "{run}");
    assert_cert_verifies(tmp.path(), &ca, &dev);
    assert_eq!(live_certs(tmp.path(), "SN-RESET-1"), 1);
    assert_eq!(ledger_state(&report, "SN-RESET-1"), "verified");
}

/// A station-key device with BUNDLE turned on or off.
fn sim_bundle(serial: &str, bundle: bool, resumable: bool, faults: Faults) -> SimDevice {
    let mut config = SimConfig::new(serial, SimKeyMode::Station);
    config.baud = 0;
    config.bundle = bundle;
    config.resumable = resumable;
    config.faults = faults;
    SimDevice::spawn(config).expect("spawn a simulated device")
}

#[test]
fn a_device_without_bundle_gets_the_same_items_item_by_item() {
    let tmp = tempdir();
    let ca = make_ca(tmp.path());
    let bundled = sim_bundle("SN-BUNDLE-ON", true, false, Faults::default());
    let per_item = sim_bundle("SN-BUNDLE-OFF", false, false, Faults::default());
    let (run, report) = flash_cmd(tmp.path(), &[&bundled, &per_item], "station", &[]);
    run.expect_code(0);
    let items = [
        Item::Certificate,
        Item::Chain,
        Item::PrivateKey,
        Item::ThingName,
        Item::Endpoint,
    ];
    for (dev, serial) in [(&bundled, "SN-BUNDLE-ON"), (&per_item, "SN-BUNDLE-OFF")] {
        assert_cert_verifies(tmp.path(), &ca, dev);
        let stored = dev.stored();
        let mut held: Vec<Item> = stored.items.keys().copied().collect();
        held.sort_by_key(|i| u8::from(*i));
        assert_eq!(held, items, "{serial}");
        assert_eq!(
            stored.item(Item::ThingName),
            Some(format!("sensor_{serial}").as_bytes())
        );
        assert_eq!(
            stored.item(Item::Endpoint),
            Some(&b"example-ats.iot.eu-west-1.amazonaws.com"[..])
        );
        assert_eq!(ledger_state(&report, serial), "verified");
        assert_eq!(live_certs(tmp.path(), serial), 1);
    }
    // One Bundle write and one set digest against three requests and a
    // digest per item: the paths are told apart by what crossed the line.
    let (on, off) = (bundled.stored(), per_item.stored());
    assert!(
        on.frames_in + 10 <= off.frames_in,
        "bundle {} frames, item by item {}",
        on.frames_in,
        off.frames_in
    );
    assert!(on.bytes_in < off.bytes_in && on.bytes_out < off.bytes_out);
}

#[test]
fn a_bundle_write_reset_midway_resumes_with_one_live_certificate() {
    let tmp = tempdir();
    let ca = make_ca(tmp.path());
    let faults = Faults {
        reset_during: Some(Item::Bundle),
        ..Faults::default()
    };
    let resumable = sim_bundle("SN-BRESET-R", true, true, faults.clone());
    let fresh = sim_bundle("SN-BRESET-F", true, false, faults);
    let (run, report) = flash_cmd(tmp.path(), &[&resumable, &fresh], "station", &[]);
    run.expect_code(0);
    for (dev, serial) in [(&resumable, "SN-BRESET-R"), (&fresh, "SN-BRESET-F")] {
        assert_eq!(dev.stored().resets, 1, "{serial} did reset");
        assert_cert_verifies(tmp.path(), &ca, dev);
        assert_eq!(live_certs(tmp.path(), serial), 1, "{serial}");
        assert_eq!(ledger_state(&report, serial), "verified");
    }
    for passed in report["passed"].as_array().expect("passed") {
        assert!(passed["restarts"].as_u64() >= Some(1), "{run}");
    }
    // The resumable device took the rest of the bundle from where it
    // stood; the other one had to take it all again.
    assert!(
        resumable.stored().bytes_in < fresh.stored().bytes_in,
        "resumed {} bytes, from scratch {}",
        resumable.stored().bytes_in,
        fresh.stored().bytes_in
    );
}

#[test]
fn a_silent_device_times_out_and_frees_its_port() {
    let tmp = tempdir();
    make_ca(tmp.path());
    let dev = sim(
        "SN-SILENT",
        SimKeyMode::Device,
        Faults {
            silent: true,
            ..Faults::default()
        },
    );
    let port = dev.port_path().to_string_lossy().into_owned();
    let args = FlashArgs {
        ca: tmp.path().join("ca"),
        ports: vec![port.clone()],
        key_mode: KeyMode::Device,
        key_type: provline::keygen::KeyType::P256,
        ledger: tmp.path().join("line.sqlite"),
        job: "flash".into(),
        thing_name_pattern: "sensor_{serial}".into(),
        endpoint: String::new(),
        root_ca: None,
        watch: false,
        vid: None,
        pid: None,
        baud: 115_200,
        timeout_ms: Some(50),
        retries: 2,
        max_restarts: 5,
        keep_keys: None,
        days: 365,
    };
    let stop = AtomicBool::new(false);
    let report =
        flash::run(&args, &provline::clock::SystemClock, &Quiet, &stop).expect("the run starts");
    assert!(report.passed.is_empty());
    assert_eq!(report.failed.len(), 1);
    let failed = &report.failed[0];
    assert_eq!(failed.port, port);
    assert!(
        failed.reason.contains("no response to Hello after 3 tries")
            && failed.reason.contains(&port),
        "{failed:?}"
    );
    // The port was closed: it opens again (exclusively).
    let reopened = SerialTransport::open(&port, 115_200);
    assert!(reopened.is_ok(), "port not freed: {:?}", reopened.err());
}

#[test]
fn a_device_that_stalls_or_answers_garbage_fails_with_its_port() {
    let tmp = tempdir();
    make_ca(tmp.path());
    let garbage = sim(
        "SN-GARBAGE",
        SimKeyMode::Device,
        Faults {
            garbage: true,
            ..Faults::default()
        },
    );
    let stall = sim(
        "SN-STALL",
        SimKeyMode::Device,
        Faults {
            stall_after_bytes: Some(200),
            ..Faults::default()
        },
    );
    let (run, report) = flash_cmd(
        tmp.path(),
        &[&garbage, &stall],
        "device",
        &["--timeout-ms", "50", "--retries", "2"],
    );
    run.expect_code(1);
    let failed = report["failed"].as_array().expect("failed");
    assert_eq!(failed.len(), 2, "{run}");
    for f in failed {
        let reason = f["reason"].as_str().unwrap_or_default();
        let port = f["port"].as_str().unwrap_or_default();
        assert!(
            reason.contains("no response") && reason.contains(port),
            "{f}"
        );
    }
    assert_eq!(ledger_state(&report, "SN-STALL"), "failed");
}

#[test]
fn a_device_lying_about_its_digest_fails() {
    let tmp = tempdir();
    make_ca(tmp.path());
    let dev = sim(
        "SN-LIAR",
        SimKeyMode::Station,
        Faults {
            lie_digest: true,
            ..Faults::default()
        },
    );
    let (run, report) = flash_cmd(tmp.path(), &[&dev], "station", &[]);
    run.expect_code(1);
    assert_eq!(report["passed"].as_array().map(Vec::len), Some(0), "{run}");
    let reason = report["failed"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("read-back") && reason.contains("SN-LIAR"),
        "{reason}"
    );
    assert_eq!(ledger_state(&report, "SN-LIAR"), "failed");
}

#[test]
fn two_ports_with_the_same_serial_the_second_is_refused() {
    let tmp = tempdir();
    let ca = make_ca(tmp.path());
    let a = sim("SN-TWIN", SimKeyMode::Station, Faults::default());
    let b = sim("SN-TWIN", SimKeyMode::Station, Faults::default());
    let (run, report) = flash_cmd(tmp.path(), &[&a, &b], "station", &[]);
    run.expect_code(1);
    assert_eq!(report["passed"].as_array().map(Vec::len), Some(1), "{run}");
    assert_eq!(report["failed"].as_array().map(Vec::len), Some(1), "{run}");
    let reason = report["failed"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("already on port"), "{reason}");
    let (winner, loser) = if a.stored().item(Item::Certificate).is_some() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_cert_verifies(tmp.path(), &ca, winner);
    assert!(
        loser.stored().items.is_empty(),
        "the refused device got items"
    );
    assert_eq!(live_certs(tmp.path(), "SN-TWIN"), 1);
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn watch_serves_the_ports_until_ctrl_c() {
    use std::process::{Command, Stdio};
    let tmp = tempdir();
    let ca = make_ca(tmp.path());
    let dev = sim("SN-WATCH-1", SimKeyMode::Device, Faults::default());
    let child = Command::new(env!("CARGO_BIN_EXE_provline"))
        .current_dir(tmp.path())
        .args([
            "--json",
            "flash",
            "--watch",
            "--ca",
            "ca",
            "--ledger",
            "line.sqlite",
        ])
        .arg("--port")
        .arg(dev.port_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start provline flash --watch");
    // Wait for the device to be verified in the ledger, as another reader would.
    let ca_der = pem::parse(std::fs::read(ca.join("ca.pem")).expect("ca.pem"))
        .expect("PEM")
        .into_contents();
    let ca_id = provline::ledger::CaId::of_certificate(&ca_der);
    let ledger = tmp.path().join("line.sqlite");
    let mut verified = false;
    for _ in 0..600 {
        if let Ok(reader) = provline::ledger::LedgerReader::open(&ledger) {
            if let Ok(Some(d)) = reader.device(&ca_id, "SN-WATCH-1") {
                if d.state == provline::ledger::DeviceState::Verified {
                    verified = true;
                    break;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(interrupted.success());
    let out = child.wait_with_output().expect("wait for provline");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        verified,
        "the device never reached verified\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let report: Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(
        report["passed"].as_array().map(Vec::len),
        Some(1),
        "{stdout}"
    );
    assert_eq!(report["interrupted"], true);
    assert_cert_verifies(tmp.path(), &ca, &dev);
}

#[test]
fn flash_without_a_port_is_bad_usage() {
    let tmp = tempdir();
    make_ca(tmp.path());
    let run = provline(tmp.path(), &["flash", "--ca", "ca"]);
    run.expect_code(2);
    assert!(run.stderr.contains("no --port given"), "{run}");
    let run = provline(
        tmp.path(),
        &["flash", "--ca", "no-such-ca", "--port", "/dev/null"],
    );
    run.expect_code(2);
    assert!(run.stderr.contains("no-such-ca"), "{run}");
}
