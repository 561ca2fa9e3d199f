//! A batch against what goes wrong around it: an output folder it cannot
//! make, a ledger file that is no ledger, a second station on the same
//! ledger, Ctrl-C in the middle of a big job, and a full disk.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn an_output_folder_that_cannot_be_made_stops_the_batch_naming_the_path() {
    // Permission bits do not stop root: a path under a regular file fails for anyone.
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let job = tmp.path().join("job.csv");
    write_serial_job(&job, 5);
    let blocker = tmp.path().join("blocker");
    fs::write(&blocker, b"a regular file\n").expect("write blocker");
    let out = blocker.join("out");

    // Default ledger (beside OUT, so under the file too).
    let r = batch(tmp.path(), &job, &ca, &out, &[]);
    r.expect_code(2);
    assert!(
        r.stderr.contains(path_str(&out)),
        "the error does not name the output folder {}\n{r}",
        out.display()
    );
    assert_eq!(
        fs::read(&blocker).expect("read blocker"),
        b"a regular file\n",
        "the file in the way was changed"
    );

    // A ledger elsewhere: if the station made it, it must hold nothing signed.
    let ledger = tmp.path().join("elsewhere.ledger.sqlite");
    let r = batch(
        tmp.path(),
        &job,
        &ca,
        &out,
        &["--ledger", path_str(&ledger)],
    );
    r.expect_code(2);
    assert!(
        r.stderr.contains(path_str(&out)),
        "the error does not name the output folder {}\n{r}",
        out.display()
    );
    if ledger.exists() {
        let rows = ledger_export(tmp.path(), &ledger);
        assert!(
            rows.is_empty(),
            "the ledger records certificates of a run that could not write them: {rows:#?}"
        );
    }
}

#[test]
fn a_ledger_file_that_is_not_a_ledger_is_refused_naming_it_and_left_alone() {
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let job = tmp.path().join("job.csv");
    write_serial_job(&job, 5);
    let mut binary: Vec<u8> = random_hex(2048).into_bytes();
    for (i, b) in binary.iter_mut().enumerate() {
        *b = b.wrapping_mul(31).wrapping_add(i as u8);
    }
    let garbage: [(&str, Vec<u8>); 2] = [
        ("binary.sqlite", binary),
        (
            "notes.sqlite",
            b"these are shift notes, not a ledger\nline two\n".to_vec(),
        ),
    ];
    for (name, bytes) in garbage {
        let ledger = tmp.path().join(name);
        fs::write(&ledger, &bytes).expect("write garbage");
        let out = tmp.path().join(format!("out-{name}"));
        let r = batch(
            tmp.path(),
            &job,
            &ca,
            &out,
            &["--ledger", path_str(&ledger)],
        );
        r.expect_code(2);
        assert!(
            r.stderr.contains(path_str(&ledger)),
            "the error does not name the ledger file\n{r}"
        );
        assert_nothing_issued(&out, &r);
        assert!(
            fs::read(&ledger).expect("read") == bytes,
            "{name}: the file that is not a ledger was changed\n{r}"
        );
    }
}

#[test]
fn a_sqlite_database_of_another_program_is_refused_and_left_as_it_was() {
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let job = tmp.path().join("job.csv");
    write_serial_job(&job, 3);
    let db = tmp.path().join("inventory.sqlite");
    let conn = rusqlite::Connection::open(&db).expect("create a database");
    conn.execute_batch("CREATE TABLE inventory (part TEXT); INSERT INTO inventory VALUES ('x');")
        .expect("fill it");
    drop(conn);
    let before = fs::read(&db).expect("read");
    let out = tmp.path().join("out");
    let r = batch(tmp.path(), &job, &ca, &out, &["--ledger", path_str(&db)]);
    r.expect_code(2);
    assert!(
        r.stderr.contains(path_str(&db)),
        "the error does not name the database\n{r}"
    );
    assert_nothing_issued(&out, &r);
    let after = fs::read(&db).expect("read");
    assert!(
        after == before,
        "the other program's database was modified although it was refused \
         (header bytes 18-19, the journal mode: {:?} -> {:?})\n{r}",
        before.get(18..20),
        after.get(18..20)
    );
}

#[test]
fn a_second_station_on_a_ledger_in_use_is_refused_and_can_start_once_the_first_is_gone() {
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let big = tmp.path().join("big.csv");
    write_serial_job(&big, 20_000);
    let small = tmp.path().join("small.csv");
    write_job(
        &small,
        "serial",
        &(1..=5).map(|i| format!("SN-OTHER-{i}")).collect::<Vec<_>>(),
    );
    let ledger = tmp.path().join("line.ledger.sqlite");
    let out1 = tmp.path().join("out1");
    let out2 = tmp.path().join("out2");

    let args = batch_args(
        &big,
        &ca,
        &out1,
        &["--ledger", path_str(&ledger), "--threads", "2"],
    );
    let mut first = spawn_provline(tmp.path(), &args, &tmp.path().join("first"));
    wait_for_dirs(&mut first, &out1, 100, Duration::from_secs(120));

    let r = batch(
        tmp.path(),
        &small,
        &ca,
        &out2,
        &["--ledger", path_str(&ledger)],
    );
    let first_running = first.try_wait().expect("poll").is_none();
    r.expect_code(2);
    let text = r.text().to_lowercase();
    assert!(
        text.contains("in use") || text.contains("locked") || text.contains("another station"),
        "the refusal does not say the ledger is in use\n{r}"
    );
    assert_nothing_issued(&out2, &r);
    assert!(
        first_running,
        "the first station ended before the second tried: the test proved nothing"
    );

    // The first station dies (SIGKILL): its lock goes with it.
    first.kill().expect("SIGKILL the first station");
    first.wait().expect("wait");
    let r = batch(
        tmp.path(),
        &small,
        &ca,
        &out2,
        &["--ledger", path_str(&ledger), "--json"],
    );
    r.expect_code(0);
    assert_eq!(summary_count(&summary_json(&r.stdout), "issued"), 5, "{r}");
    let export = ledger_export(tmp.path(), &ledger);
    assert_ledger_consistent(&export, true);
}

#[test]
fn ctrl_c_in_a_big_job_reports_only_completed_rows_and_a_rerun_finishes() {
    const ROWS: usize = 20_000;
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let ca_pem = fs::read(ca.join("ca.pem")).expect("read ca.pem");
    let job = tmp.path().join("job.csv");
    write_serial_job(&job, ROWS);
    let out = tmp.path().join("out");
    let ledger = tmp.path().join("out.ledger.sqlite");
    let args = batch_args(&job, &ca, &out, &["--threads", "2", "--json"]);
    let log = tmp.path().join("interrupted");
    let mut child = spawn_provline(tmp.path(), &args, &log);
    wait_for_dirs(&mut child, &out, 500, Duration::from_secs(120));
    send_signal(child.id(), "INT");
    let status = wait_child(&mut child, Duration::from_secs(120));
    let (stdout, stderr) = read_logs(&log);
    assert_eq!(
        status.code(),
        Some(1),
        "exit status after Ctrl-C: {status}\n{stdout}\n{stderr}"
    );
    let s = summary_json(&stdout);
    assert_eq!(s["interrupted"], Value::Bool(true), "{s}");
    let issued = summary_count(&s, "issued");
    assert_eq!(summary_count(&s, "failed"), 0, "{s}\n{stderr}");
    assert!(
        issued > 0 && (issued as usize) < ROWS,
        "the run was not cut short: {s}"
    );

    // The manifest: the completed rows, each once, each with its folder.
    let manifest = read_manifest(&out);
    assert_eq!(
        manifest.len() as u64,
        issued,
        "manifest rows vs the summary\n{stderr}"
    );
    let mut serials = HashSet::new();
    for m in &manifest {
        assert!(serials.insert(m.serial.as_str()), "{} twice", m.serial);
        assert_eq!(m.status, "issued", "{m:?}");
    }
    let folders = scan_output(&out, &ca_pem, true);
    let listed: BTreeMap<String, String> = manifest
        .iter()
        .map(|m| (m.thing_name.clone(), m.certificate_id.clone()))
        .collect();
    assert_eq!(
        folders.len(),
        listed.len(),
        "device folders vs manifest rows after Ctrl-C"
    );
    assert!(
        folders == listed,
        "the device folders are not the rows the manifest lists"
    );
    // Nothing signed beyond what is reported, nothing left half-way.
    let export = ledger_export(tmp.path(), &ledger);
    assert_ledger_consistent(&export, true);
    assert_eq!(
        export.iter().filter(|r| r.state == "live").count() as u64,
        issued,
        "live certificates in the ledger vs issued rows after Ctrl-C"
    );

    // The same command again finishes the job.
    let rerun = provline(tmp.path(), &args);
    rerun.expect_code(0);
    let s2 = summary_json(&rerun.stdout);
    assert_eq!(summary_count(&s2, "skipped"), issued, "{rerun}");
    assert_eq!(
        summary_count(&s2, "issued"),
        ROWS as u64 - issued,
        "{rerun}"
    );
    let manifest = read_manifest(&out);
    assert_eq!(manifest.len(), ROWS);
    let mut serials = HashSet::new();
    for m in &manifest {
        assert!(serials.insert(m.serial.clone()), "{} twice", m.serial);
        assert_eq!(m.status, "issued", "{m:?}");
        if let Some(id) = listed.get(&m.thing_name) {
            assert_eq!(
                id, &m.certificate_id,
                "{} was issued again after Ctrl-C",
                m.serial
            );
        }
    }
    assert_eq!(scan_output(&out, &ca_pem, true).len(), ROWS);
    let export = ledger_export(tmp.path(), &ledger);
    assert_ledger_consistent(&export, true);
    assert_eq!(
        export.iter().filter(|r| r.state == "live").count(),
        ROWS,
        "live certificates after the re-run"
    );
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts it, or says why not (`Err(true)`: not permitted here).
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, (bool, String)> {
        fs::create_dir_all(dir).expect("mkdir mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| (false, format!("cannot run mount: {e}")))?;
        if out.status.success() {
            return Ok(Tmpfs {
                dir: dir.to_path_buf(),
            });
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let lower = err.to_lowercase();
        let not_permitted = [
            "permission denied",
            "operation not permitted",
            "must be superuser",
            "only root",
        ]
        .iter()
        .any(|w| lower.contains(w));
        Err((not_permitted, err))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Fills the file system of `path` with it, then gives `room` bytes back.
fn fill_leaving(path: &Path, room: u64) {
    let mut f = fs::File::create(path).expect("create filler");
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written: u64 = 0;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
    f.set_len(written.saturating_sub(room))
        .expect("shrink the filler");
}

#[test]
fn a_full_disk_stops_the_batch_saying_so_and_a_rerun_with_room_finishes() {
    const ROWS: usize = 400;
    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let ca_pem = fs::read(ca.join("ca.pem")).expect("read ca.pem");
    let job = tmp.path().join("job.csv");
    write_serial_job(&job, ROWS);
    let small = tmp.path().join("small");
    let mount = match Tmpfs::mount(&small, "16m") {
        Ok(m) => m,
        // The station's tests run as root (CI does): a full disk is made,
        // not assumed.
        Err((_, why)) => panic!("mount -t tmpfs failed (run the tests as root): {why}"),
    };
    let filler = mount.dir.join("filler");
    fill_leaving(&filler, 1536 * 1024);
    let out = mount.dir.join("out");
    let ledger = mount.dir.join("out.ledger.sqlite");

    let full = batch(tmp.path(), &job, &ca, &out, &["--threads", "2"]);
    assert!(
        full.code == 2 || full.code == 1,
        "a batch on a full disk should exit 2 (or 1)\n{full}"
    );
    let text = full.text().to_lowercase();
    assert!(
        text.contains("no space left") || text.contains("full") || text.contains("enospc"),
        "the error does not say the disk is full\n{full}"
    );
    // Whatever the full disk left is whole, and known to the ledger.
    let written = scan_output(&out, &ca_pem, true);
    if ledger.exists() {
        let export = ledger_export(tmp.path(), &ledger);
        assert_ledger_consistent(&export, false);
        let live: HashSet<&str> = export
            .iter()
            .filter(|r| r.state == "live")
            .map(|r| r.certificate_id.as_str())
            .collect();
        for (thing, id) in &written {
            assert!(
                live.contains(id.as_str()),
                "{thing}/ holds a certificate the ledger does not have live"
            );
        }
    }
    if out.join("manifest.csv").exists() {
        let rows = read_manifest(&out);
        let mut seen = HashSet::new();
        for m in &rows {
            assert!(seen.insert(m.serial.clone()), "{} twice", m.serial);
        }
    }
    eprintln!(
        "full disk: exit {}, {} device folders written before it stopped",
        full.code,
        written.len()
    );

    // Room again: the same command finishes the job.
    fs::remove_file(&filler).expect("remove the filler");
    let rerun = batch(tmp.path(), &job, &ca, &out, &["--threads", "2", "--json"]);
    rerun.expect_code(0);
    let manifest = read_manifest(&out);
    assert_eq!(manifest.len(), ROWS, "{rerun}");
    let mut serials = HashSet::new();
    for m in &manifest {
        assert!(serials.insert(m.serial.clone()), "{} twice", m.serial);
        assert_eq!(m.status, "issued", "{m:?}");
    }
    let folders = scan_output(&out, &ca_pem, true);
    assert_eq!(folders.len(), ROWS);
    for m in &manifest {
        assert_eq!(folders[&m.thing_name], m.certificate_id, "{}", m.thing_name);
    }
    for (thing, id) in &written {
        assert_eq!(&folders[thing], id, "{thing}/ changed on the re-run");
    }
    let export = ledger_export(tmp.path(), &ledger);
    assert_ledger_consistent(&export, true);
    assert_eq!(
        export.iter().filter(|r| r.state == "live").count(),
        ROWS,
        "live certificates after the re-run"
    );
    drop(mount);
}
