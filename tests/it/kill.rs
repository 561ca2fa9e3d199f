//! The acceptance test of the ledger: a 20,000-row job, killed with SIGKILL
//! at random moments, then run to the end. Every row is answered once,
//! every device holds one certificate that verifies under the CA and
//! matches its key, nothing was issued twice, and nothing half-written ever
//! stood under a final name.
//!
//! The kill delays come from a seed printed at the start (taken from the
//! clock, or from `PROVLINE_KILL_SEED` to replay a failure).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::util::py::py_json;
use crate::util::*;

const ROWS: usize = 20_000;
/// Kills at random moments after the first (measuring) one.
const RANDOM_KILLS: usize = 5;
/// One row in this many is bad in the variant with bad rows.
const BAD_EVERY: usize = 50;

/// One data row of the generated job, and what the station must make of it.
#[derive(Debug, Clone)]
struct JobRow {
    line: usize,
    serial: String,
    thing_name: String,
    bad: bool,
}

/// Writes the job. With `with_bad`, every 50th row is bad: alternately a
/// thing name AWS refuses and a repeat of an earlier row's serial.
fn make_job(path: &Path, with_bad: bool) -> Vec<JobRow> {
    let mut rows = Vec::with_capacity(ROWS);
    let mut lines = Vec::with_capacity(ROWS);
    for i in 1..=ROWS {
        let line = i + 1;
        let (serial, name_column, thing_name, bad) = if with_bad && i % BAD_EVERY == 0 {
            if (i / BAD_EVERY) % 2 == 1 {
                let name = format!("bad name {i}");
                (format!("SN-BADNAME-{i:06}"), name.clone(), name, true)
            } else {
                let serial = format!("SN-{:06}", i - 7);
                (
                    serial.clone(),
                    String::new(),
                    format!("sensor_{serial}"),
                    true,
                )
            }
        } else {
            let serial = format!("SN-{i:06}");
            (
                serial.clone(),
                String::new(),
                format!("sensor_{serial}"),
                false,
            )
        };
        lines.push(if with_bad {
            format!("{serial},{name_column}")
        } else {
            serial.clone()
        });
        rows.push(JobRow {
            line,
            serial,
            thing_name,
            bad,
        });
    }
    write_job(
        path,
        if with_bad {
            "serial,thing_name"
        } else {
            "serial"
        },
        &lines,
    );
    rows
}

/// xorshift64*, enough to spread kill moments.
struct Rng(u64);

impl Rng {
    fn from_seed(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn seed() -> u64 {
    if let Some(s) = std::env::var("PROVLINE_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s;
    }
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

/// Checks the output and the ledger as a kill left them, and that no
/// folder seen after an earlier kill has changed or gone.
#[track_caller]
fn check_after_kill(
    tmp: &Path,
    out: &Path,
    ledger: &Path,
    ca_pem: &[u8],
    seen: &mut BTreeMap<String, String>,
    what: &str,
) {
    let now = scan_output(out, ca_pem, true);
    for (thing, id) in seen.iter() {
        match now.get(thing) {
            Some(n) if n == id => {}
            Some(n) => panic!(
                "{what}: the certificate in {thing}/ changed from {id} to {n}: a device was issued twice"
            ),
            None => panic!("{what}: the device folder {thing}/ written earlier has gone"),
        }
    }
    if ledger.exists() {
        let rows = ledger_export(tmp, ledger);
        assert_ledger_consistent(&rows, false);
        let by_id: HashMap<&str, &ExportRow> = rows
            .iter()
            .filter(|r| !r.certificate_id.is_empty())
            .map(|r| (r.certificate_id.as_str(), r))
            .collect();
        for (thing, id) in &now {
            let row = by_id.get(id.as_str()).unwrap_or_else(|| {
                panic!("{what}: the certificate in {thing}/ ({id}) is not in the ledger")
            });
            assert!(
                row.state == "live" && row.thing_name == *thing,
                "{what}: the certificate in {thing}/ is in the ledger as {row:?}, not live for that thing"
            );
        }
    } else {
        assert!(
            now.is_empty(),
            "{what}: device folders exist but the ledger {} does not",
            ledger.display()
        );
    }
    seen.extend(now);
}

/// One Python process checks every issued device against the CA, its key
/// and its manifest row; it reports counts (and the first problems).
const VERIFY_ALL: &str = r#"
import csv, hashlib, json, sys
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import serialization
DER = serialization.Encoding.DER
def spki(k):
    return k.public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
ca = x509.load_pem_x509_certificate(open(sys.argv[1], 'rb').read())
ca_der = ca.public_bytes(DER)
out = sys.argv[2]
counts = {k: 0 for k in ['rows', 'signature', 'key_match', 'certificate_id',
                         'cert_serial', 'subject', 'chain']}
problems = []
serials, keys = set(), set()
def bad(row, what, detail=''):
    if len(problems) < 20:
        problems.append('%s: %s %s' % (row['serial'], what, detail))
with open(out + '/manifest.csv', newline='') as f:
    for row in csv.DictReader(f):
        if row['status'] != 'issued':
            continue
        counts['rows'] += 1
        d = out + '/' + row['thing_name']
        try:
            cert = x509.load_pem_x509_certificate(open(d + '/cert.pem', 'rb').read())
        except Exception as e:
            bad(row, 'cert.pem', repr(e))
            continue
        der = cert.public_bytes(DER)
        serials.add(cert.serial_number)
        keys.add(spki(cert.public_key()))
        try:
            cert.verify_directly_issued_by(ca)
            counts['signature'] += 1
        except Exception as e:
            bad(row, 'signature', repr(e))
        try:
            key = serialization.load_pem_private_key(open(d + '/private.key', 'rb').read(), None)
            if spki(key.public_key()) == spki(cert.public_key()):
                counts['key_match'] += 1
            else:
                bad(row, 'private.key does not match the certificate')
        except Exception as e:
            bad(row, 'private.key', repr(e))
        if hashlib.sha256(der).hexdigest() == row['certificate_id']:
            counts['certificate_id'] += 1
        else:
            bad(row, 'certificate_id', row['certificate_id'])
        try:
            same = int(row['cert_serial'], 16) == cert.serial_number
        except ValueError:
            same = False
        if same:
            counts['cert_serial'] += 1
        else:
            bad(row, 'cert_serial', '%s vs %x' % (row['cert_serial'], cert.serial_number))
        cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        sn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
        if cn == [row['thing_name']] and sn == [row['serial']]:
            counts['subject'] += 1
        else:
            bad(row, 'subject', repr((cn, sn)))
        chain = x509.load_pem_x509_certificates(open(d + '/chain.pem', 'rb').read())
        if [c.public_bytes(DER) for c in chain] == [der, ca_der]:
            counts['chain'] += 1
        else:
            bad(row, 'chain.pem')
counts['distinct_serials'] = len(serials)
counts['distinct_keys'] = len(keys)
print(json.dumps({'counts': counts, 'problems': problems}))
"#;

fn kill_then_finish(with_bad: bool) {
    let started = Instant::now();
    let seed = seed();
    eprintln!("kill test (bad rows: {with_bad}): seed {seed} (PROVLINE_KILL_SEED={seed} replays the delays)");
    let mut rng = Rng::from_seed(seed);

    let tmp = tempdir();
    let ca = copy_ca("ec-p256-pkcs8", tmp.path());
    let ca_pem = fs::read(ca.join("ca.pem")).expect("read ca.pem");
    let job = tmp.path().join("job.csv");
    let rows = make_job(&job, with_bad);
    let out = tmp.path().join("out");
    let ledger = tmp.path().join("out.ledger.sqlite");
    let args = batch_args(&job, &ca, &out, &["--threads", "2", "--json"]);
    let log = tmp.path().join("run");

    // A first run, killed once a few hundred devices are out, gives the rate.
    let mut seen = BTreeMap::new();
    let t0 = Instant::now();
    let mut child = spawn_provline(tmp.path(), &args, &log);
    wait_for_dirs(&mut child, &out, 300, Duration::from_secs(120));
    child.kill().expect("SIGKILL the measuring run");
    let status = child.wait().expect("wait");
    let elapsed = t0.elapsed().as_secs_f64();
    assert_eq!(
        status.signal(),
        Some(9),
        "the measuring run was not killed: {status}"
    );
    let done = count_device_dirs(&out);
    let mut rate = done as f64 / elapsed;
    eprintln!("measuring run: {done} devices in {elapsed:.2} s ({rate:.0}/s), SIGKILL");
    check_after_kill(tmp.path(), &out, &ledger, &ca_pem, &mut seen, "kill 1");
    let mut kills = 1;

    // Kills at random moments: each run first skips what is done (faster
    // than issuing), then issues; the delay is drawn up to a third of the
    // estimated rest, so that the job cannot finish before the last kill.
    for attempt in 0..RANDOM_KILLS * 2 {
        if kills > RANDOM_KILLS {
            break;
        }
        let done = count_device_dirs(&out);
        let remaining = ROWS.saturating_sub(done) as f64;
        let hi = (done as f64 / (3.0 * rate) + remaining / (3.0 * rate)).max(0.1);
        let delay = 0.05 + rng.next_f64() * (hi - 0.05);
        let mut child = spawn_provline(tmp.path(), &args, &log);
        std::thread::sleep(Duration::from_secs_f64(delay));
        let exited = child.try_wait().expect("poll");
        if exited.is_none() {
            child.kill().expect("SIGKILL");
        }
        let status = child.wait().expect("wait");
        let after = count_device_dirs(&out);
        // A lower bound of the rate (the delay includes the skipping): if
        // the machine got faster, the next delays shrink.
        rate = rate.max(after.saturating_sub(done) as f64 / delay);
        if status.signal() == Some(9) {
            kills += 1;
            eprintln!("kill {kills}: SIGKILL after {delay:.3} s; device folders {done} -> {after}");
        } else {
            let (stdout, stderr) = read_logs(&log);
            eprintln!(
                "attempt {attempt}: the run ended by itself ({status}) before the kill at {delay:.3} s\n{stdout}\n{stderr}"
            );
        }
        check_after_kill(
            tmp.path(),
            &out,
            &ledger,
            &ca_pem,
            &mut seen,
            &format!("kill {kills}"),
        );
    }
    assert!(
        kills >= 4,
        "only {kills} runs were killed mid-job (seed {seed}); the delays are too long for this machine"
    );

    // The run to the end.
    let last = provline(tmp.path(), &args);
    let good: Vec<&JobRow> = rows.iter().filter(|r| !r.bad).collect();
    let bad: Vec<&JobRow> = rows.iter().filter(|r| r.bad).collect();
    last.expect_code(if bad.is_empty() { 0 } else { 1 });
    let summary = summary_json(&last.stdout);
    assert_eq!(
        summary_count(&summary, "failed"),
        bad.len() as u64,
        "failed rows\n{last}"
    );
    assert_eq!(
        summary_count(&summary, "issued") + summary_count(&summary, "skipped"),
        good.len() as u64,
        "issued + skipped\n{last}"
    );
    assert_eq!(summary["interrupted"], Value::Bool(false), "{last}");

    // The manifest: every data row once, the good ones issued, the bad ones
    // failed naming their line.
    let manifest = read_manifest(&out);
    assert_eq!(
        manifest.len(),
        ROWS,
        "one manifest row per data row\n{last}"
    );
    let mut got: HashMap<(String, String), usize> = HashMap::new();
    for m in &manifest {
        *got.entry((m.serial.clone(), m.status.clone())).or_default() += 1;
    }
    let mut want: HashMap<(String, String), usize> = HashMap::new();
    for r in &rows {
        let status = if r.bad { "failed" } else { "issued" };
        *want
            .entry((r.serial.clone(), status.to_string()))
            .or_default() += 1;
    }
    if got != want {
        let mut diff: Vec<String> = want
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .map(|(k, v)| format!("{k:?}: want {v}, got {:?}", got.get(k)))
            .chain(
                got.iter()
                    .filter(|(k, _)| !want.contains_key(*k))
                    .map(|(k, v)| format!("{k:?}: unexpected, {v} times")),
            )
            .take(20)
            .collect();
        diff.sort();
        panic!("manifest rows differ from the job:\n{}", diff.join("\n"));
    }
    let bad_line: HashMap<&str, usize> = bad.iter().map(|r| (r.serial.as_str(), r.line)).collect();
    for m in manifest.iter().filter(|m| m.status == "failed") {
        let line = bad_line[m.serial.as_str()];
        assert!(
            mentions_line(&m.error, line),
            "failed row {} does not name its line {line}: {}",
            m.serial,
            m.error
        );
    }
    let issued: Vec<&ManifestRow> = manifest.iter().filter(|m| m.status == "issued").collect();
    for m in &issued {
        let want_name = &good
            .iter()
            .find(|r| r.serial == m.serial)
            .expect("issued row of the job")
            .thing_name;
        assert_eq!(&m.thing_name, want_name, "thing name of {}", m.serial);
    }

    // The folders: exactly the good devices, each whole, each holding the
    // certificate the manifest names, and the same one any kill had seen.
    let folders = scan_output(&out, &ca_pem, true);
    let want_things: HashSet<&str> = good.iter().map(|r| r.thing_name.as_str()).collect();
    let got_things: HashSet<&str> = folders.keys().map(String::as_str).collect();
    assert_eq!(
        got_things.len(),
        want_things.len(),
        "device folders: {} extra, {} missing",
        got_things.difference(&want_things).count(),
        want_things.difference(&got_things).count()
    );
    assert_eq!(got_things, want_things, "device folders");
    for m in &issued {
        assert_eq!(
            folders[&m.thing_name], m.certificate_id,
            "{}/cert.pem is not the certificate the manifest names",
            m.thing_name
        );
    }
    for (thing, id) in &seen {
        assert_eq!(
            &folders[thing], id,
            "{thing}/ changed after a kill: issued twice"
        );
    }
    let leftovers: Vec<String> = fs::read_dir(&out)
        .expect("read out")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "half-written device folders left after the job finished: {leftovers:?}"
    );

    // The ledger: one live certificate per issued device, the one in its
    // folder; what the kills left signed but undelivered is superseded.
    let export = ledger_export(tmp.path(), &ledger);
    assert_ledger_consistent(&export, true);
    let live: HashMap<&str, &ExportRow> = export
        .iter()
        .filter(|r| r.state == "live")
        .map(|r| (r.device_serial.as_str(), r))
        .collect();
    assert_eq!(
        live.len(),
        issued.len(),
        "live certificates in the ledger vs issued rows"
    );
    for m in &issued {
        let l = live
            .get(m.serial.as_str())
            .unwrap_or_else(|| panic!("no live certificate in the ledger for {}", m.serial));
        assert_eq!(
            (&l.cert_serial, &l.certificate_id, &l.thing_name),
            (&m.cert_serial, &m.certificate_id, &m.thing_name),
            "ledger's live certificate of {} vs the manifest",
            m.serial
        );
    }
    let delivered: HashSet<&str> = folders.values().map(String::as_str).collect();
    let superseded: Vec<&ExportRow> = export.iter().filter(|r| r.state == "superseded").collect();
    for s in &superseded {
        assert!(
            !delivered.contains(s.certificate_id.as_str()),
            "superseded certificate {} of {} is in a device folder",
            s.cert_serial,
            s.device_serial
        );
    }
    let bad_only: HashSet<&str> = bad
        .iter()
        .map(|r| r.serial.as_str())
        .filter(|s| !good.iter().any(|g| g.serial == *s))
        .collect();
    assert!(
        export
            .iter()
            .all(|r| !bad_only.contains(r.device_serial.as_str())),
        "a certificate was signed for a bad row"
    );
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &superseded {
        *reasons.entry(s.reason.as_str()).or_default() += 1;
    }
    eprintln!(
        "ledger: {} live, {} superseded {reasons:?}",
        live.len(),
        superseded.len()
    );

    // Every certificate, key and manifest field, checked by Python.
    let report = py_json(
        VERIFY_ALL,
        &[ca.join("ca.pem").as_os_str(), out.as_os_str()],
    );
    let problems = &report["problems"];
    for check in [
        "rows",
        "signature",
        "key_match",
        "certificate_id",
        "cert_serial",
        "subject",
        "chain",
        "distinct_serials",
        "distinct_keys",
    ] {
        assert_eq!(
            report["counts"][check].as_u64(),
            Some(issued.len() as u64),
            "cryptography: `{check}` holds for fewer than the {} issued devices; first problems: {problems}",
            issued.len()
        );
    }
    eprintln!(
        "kill test (bad rows: {with_bad}): {kills} kills, final run {:.1} s, whole test {:.1} s",
        summary["seconds"].as_f64().unwrap_or(f64::NAN),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn killed_at_random_moments_then_run_to_the_end_issues_every_device_once() {
    kill_then_finish(false);
}

#[test]
fn killed_at_random_moments_with_bad_rows_fails_only_the_bad_rows() {
    kill_then_finish(true);
}
