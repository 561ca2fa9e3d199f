//! Setup shared by the integration tests: running the `provline` binary in a
//! temporary folder, and driving the independent verifiers (OpenSSL, pkilint,
//! Python `cryptography`, a mosquitto broker) that judge what it wrote.
//!
//! A verifier that is not installed makes the test fail with a message that
//! says what to install; `bash .ci/run` installs all of them.

#![allow(dead_code)]

pub mod broker;
pub mod moto;
pub mod proxy;
pub mod py;

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use py::python;

/// What one run of a program left behind.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub cmdline: String,
}

impl Run {
    fn from_output(cmdline: String, out: Output) -> Run {
        Run {
            // A signal death shows as -1: never equal to an expected code.
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            cmdline,
        }
    }

    /// Both streams, for messages and for "the output names the reason" checks.
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Panics with the whole run when the exit code is not `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "unexpected exit code\n{self}");
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "$ {}\nexit code: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }
}

/// The crate root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A committed fixture; fails clearly when it is missing.
#[track_caller]
pub fn fixture(rel: &str) -> PathBuf {
    let p = root().join("fixtures").join(rel);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

/// A fresh temporary folder, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("provline-it-")
        .tempdir()
        .expect("create a temporary folder")
}

/// Runs `provline ARGS` in `cwd`.
pub fn provline<S: AsRef<std::ffi::OsStr>>(cwd: &Path, args: &[S]) -> Run {
    let bin = env!("CARGO_BIN_EXE_provline");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir(cwd)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    let cmdline = describe(&cmd);
    run_with_timeout(cmd, cmdline, Duration::from_secs(600))
}

/// Runs any program, failing with `install_hint` when it cannot be started.
pub fn run_tool<S: AsRef<std::ffi::OsStr>>(
    program: impl AsRef<std::ffi::OsStr>,
    args: &[S],
    cwd: &Path,
    install_hint: &str,
) -> Run {
    let program = program.as_ref();
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd).stdin(Stdio::null());
    let cmdline = describe(&cmd);
    if which(program).is_none() && !Path::new(program).is_file() {
        panic!(
            "verifier `{}` is not installed: {install_hint}",
            program.to_string_lossy()
        );
    }
    run_with_timeout(cmd, cmdline, Duration::from_secs(300))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn run_with_timeout(mut cmd: Command, cmdline: String, limit: Duration) -> Run {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{cmdline}`: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Run::from_output(cmdline, out.expect("wait for child")),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("`{cmdline}` did not finish within {limit:?}");
        }
    }
}

/// Looks a program up on PATH (a path with a slash is returned as is).
pub fn which(program: &std::ffi::OsStr) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|c| c.is_file())
}

/// Runs `openssl ARGS` in `cwd`.
pub fn openssl<S: AsRef<std::ffi::OsStr>>(cwd: &Path, args: &[S]) -> Run {
    run_tool(
        "openssl",
        args,
        cwd,
        "install Debian's `openssl` package (apt-get install openssl)",
    )
}

/// `openssl verify -x509_strict -purpose sslclient -CAfile CA CERT`.
pub fn openssl_verify_client(ca: &Path, cert: &Path) -> Run {
    let dir = cert.parent().unwrap_or(Path::new("."));
    openssl(
        dir,
        &[
            "verify".as_ref(),
            "-x509_strict".as_ref(),
            "-purpose".as_ref(),
            "sslclient".as_ref(),
            "-CAfile".as_ref(),
            ca.as_os_str(),
            cert.as_os_str(),
        ],
    )
}

/// Asserts that openssl accepts `cert` as a TLS client certificate under `ca`.
#[track_caller]
pub fn assert_openssl_verifies(ca: &Path, cert: &Path) {
    let r = openssl_verify_client(ca, cert);
    assert!(
        r.code == 0 && r.stdout.contains(": OK"),
        "openssl does not verify {}\n{r}",
        cert.display()
    );
}

/// A pkilint command: on PATH, else beside the Python that has the packages.
pub fn pkilint_tool(name: &str) -> PathBuf {
    if let Some(p) = which(name.as_ref()) {
        return p;
    }
    let py = python();
    if let Some(dir) = py.parent() {
        let cand = dir.join(name);
        if cand.is_file() {
            return cand;
        }
    }
    panic!(
        "verifier `{name}` is not installed: `pip install pkilint` into the venv at .venv \
         (bash .ci/run does) or put it on PATH"
    );
}

/// Asserts that `lint_pkix_cert` reports nothing at WARNING level or above.
#[track_caller]
pub fn assert_pkilint_cert_clean(cert: &Path) {
    let tool = pkilint_tool("lint_pkix_cert");
    let r = run_tool(
        &tool,
        &[
            "lint".as_ref(),
            "-s".as_ref(),
            "WARNING".as_ref(),
            cert.as_os_str(),
        ],
        Path::new("/"),
        "pip install pkilint",
    );
    assert!(
        r.code == 0 && r.stdout.trim().is_empty(),
        "pkilint RFC 5280 findings for {}\n{r}",
        cert.display()
    );
}

/// Asserts that `lint_pkix_signer_signee_cert_chain` finds nothing at WARNING.
#[track_caller]
pub fn assert_pkilint_chain_clean(issuer: &Path, subject: &Path) {
    let tool = pkilint_tool("lint_pkix_signer_signee_cert_chain");
    let r = run_tool(
        &tool,
        &[
            "lint".as_ref(),
            "-s".as_ref(),
            "WARNING".as_ref(),
            issuer.as_os_str(),
            subject.as_os_str(),
        ],
        Path::new("/"),
        "pip install pkilint",
    );
    assert!(
        r.code == 0 && r.stdout.trim().is_empty(),
        "pkilint issuer/subject findings for {} under {}\n{r}",
        subject.display(),
        issuer.display()
    );
}

/// Unix permission bits of a file.
pub fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Copies a fixture CA folder into a neutrally named folder under `dest`
/// (so that no message can echo the fixture's name back as a "reason") and
/// gives the key mode 0600 (git does not keep file modes).
pub fn copy_ca(fixture_ca: &str, dest: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let src = fixture(&format!("cas/{fixture_ca}"));
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = dest.join(format!("ca-copy-{n}"));
    fs::create_dir_all(&dir).expect("mkdir");
    for f in ["ca.pem", "ca.key"] {
        fs::copy(src.join(f), dir.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    fs::set_permissions(dir.join("ca.key"), fs::Permissions::from_mode(0o600)).expect("chmod");
    dir
}

/// Makes a station CA with `provline ca init`.
#[track_caller]
pub fn init_ca(tmp: &Path, name: &str, key: &str) -> PathBuf {
    let dir = tmp.join(name);
    provline(
        tmp,
        &[
            "ca".as_ref(),
            "init".as_ref(),
            "--dir".as_ref(),
            dir.as_os_str(),
            "--key".as_ref(),
            key.as_ref(),
        ],
    )
    .expect_code(0);
    dir
}

/// Writes a job CSV from a header and rows.
pub fn write_job(path: &Path, header: &str, rows: &[String]) {
    let mut s = String::from(header);
    s.push('\n');
    for r in rows {
        s.push_str(r);
        s.push('\n');
    }
    fs::write(path, s).expect("write job");
}

/// A random-ish tag so that names differ between runs.
pub fn random_hex(bytes: usize) -> String {
    let mut out = String::new();
    while out.len() < bytes * 2 {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(Instant::now().elapsed().as_nanos());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(bytes * 2);
    out
}

/// One row of OUT/manifest.csv.
#[derive(Debug, Clone)]
pub struct ManifestRow {
    pub serial: String,
    pub thing_name: String,
    pub certificate_id: String,
    pub cert_serial: String,
    pub not_after: String,
    pub status: String,
    pub error: String,
}

pub const MANIFEST_HEADER: [&str; 7] = [
    "serial",
    "thing_name",
    "certificate_id",
    "cert_serial",
    "not_after",
    "status",
    "error",
];

/// Reads OUT/manifest.csv, checking its header against the contract.
#[track_caller]
pub fn read_manifest(out: &Path) -> Vec<ManifestRow> {
    let path = out.join("manifest.csv");
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let header: Vec<String> = rdr
        .headers()
        .expect("manifest header")
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(header, MANIFEST_HEADER, "manifest.csv header");
    rdr.records()
        .map(|r| {
            let r = r.expect("manifest record");
            let f = |i: usize| r.get(i).unwrap_or("").to_owned();
            ManifestRow {
                serial: f(0),
                thing_name: f(1),
                certificate_id: f(2),
                cert_serial: f(3),
                not_after: f(4),
                status: f(5),
                error: f(6),
            }
        })
        .collect()
}

/// Runs a batch over `job` with the given CA and extra arguments.
pub fn batch(cwd: &Path, job: &Path, ca: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<std::ffi::OsString> = vec![
        "batch".into(),
        job.into(),
        "--ca".into(),
        ca.into(),
        "--out".into(),
        out.into(),
    ];
    args.extend(extra.iter().map(Into::into));
    provline(cwd, &args)
}

/// The device folders (OUT/<thing_name>) under a batch output.
pub fn device_dirs(out: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(out) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// Asserts that no certificate was written anywhere under `out`.
#[track_caller]
pub fn assert_nothing_issued(out: &Path, run: &Run) {
    for d in device_dirs(out) {
        assert!(
            !d.join("cert.pem").exists(),
            "a certificate was written although the run was refused: {}\n{run}",
            d.display()
        );
    }
    if out.join("manifest.csv").exists() {
        let rows = read_manifest(out);
        assert!(
            rows.iter().all(|r| r.status != "issued"),
            "manifest reports issued devices although the run was refused: {rows:?}\n{run}"
        );
    }
}

/// True when `text` says "line N" (and not "line N0").
pub fn mentions_line(text: &str, n: usize) -> bool {
    let needle = format!("line {n}");
    let lower = text.to_lowercase();
    lower.match_indices(&needle).any(|(i, _)| {
        !lower[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// `text` lowercased without the words that hold a path or a file name, so
/// that a reason is not found in the name of the input that had it.
pub fn reason_words(text: &str) -> String {
    text.split_whitespace()
        .filter(|w| {
            !(w.contains('/')
                || [".csr", ".json", ".pem", ".key", ".csv"]
                    .iter()
                    .any(|ext| w.contains(ext)))
        })
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Writes a job CSV of `n` rows, serials `SN-000001`.., one `serial` column.
pub fn write_serial_job(path: &Path, n: usize) {
    let rows: Vec<String> = (1..=n).map(|i| format!("SN-{i:06}")).collect();
    write_job(path, "serial", &rows);
}

/// Starts `provline ARGS` in `cwd` without waiting; stdout and stderr go to
/// `LOG.stdout` and `LOG.stderr` (files, so that a long run never blocks on
/// a full pipe).
pub fn spawn_provline<S: AsRef<std::ffi::OsStr>>(
    cwd: &Path,
    args: &[S],
    log: &Path,
) -> std::process::Child {
    let bin = env!("CARGO_BIN_EXE_provline");
    let (out, err) = log_paths(log);
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir(cwd)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).expect("create stdout log"))
        .stderr(fs::File::create(&err).expect("create stderr log"));
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)))
}

/// The stdout and stderr files of [`spawn_provline`].
pub fn log_paths(log: &Path) -> (PathBuf, PathBuf) {
    let name = log.file_name().unwrap_or_default().to_string_lossy();
    (
        log.with_file_name(format!("{name}.stdout")),
        log.with_file_name(format!("{name}.stderr")),
    )
}

/// What a spawned run wrote, for messages and for parsing.
pub fn read_logs(log: &Path) -> (String, String) {
    let (out, err) = log_paths(log);
    (
        fs::read_to_string(out).unwrap_or_default(),
        fs::read_to_string(err).unwrap_or_default(),
    )
}

/// Waits for a spawned child, killing it (SIGKILL) after `limit`.
pub fn wait_child(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {} did not finish within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Number of device folders (`OUT/<thing>/`, not hidden) under `out`.
pub fn count_device_dirs(out: &Path) -> usize {
    let Ok(rd) = fs::read_dir(out) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count()
}

/// Polls until `out` holds at least `n` device folders; panics if the child
/// exits first or `limit` passes.
pub fn wait_for_dirs(child: &mut std::process::Child, out: &Path, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while count_device_dirs(out) < n {
        if let Some(status) = child.try_wait().expect("poll child") {
            panic!(
                "the batch ended ({status}) before {n} device folders appeared in {}",
                out.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} device folders in {} after {limit:?}",
            out.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a signal by name (`INT`, `TERM`, ...) with the `kill` command.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// The `--json` summary of a batch: the last line of stdout that parses.
#[track_caller]
pub fn summary_json(stdout: &str) -> serde_json::Value {
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .unwrap_or_else(|| panic!("no JSON summary on stdout:\n{stdout}"))
}

/// A count field of the `--json` summary.
#[track_caller]
pub fn summary_count(summary: &serde_json::Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("summary field {field} is not a count: {summary}"))
}

/// The columns of `provline ledger export --format csv`.
pub const EXPORT_HEADER: [&str; 11] = [
    "ca",
    "device_serial",
    "thing_name",
    "cert_serial",
    "certificate_id",
    "public_key",
    "state",
    "reason",
    "not_after",
    "created",
    "updated",
];

/// One certificate of `provline ledger export`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRow {
    pub ca: String,
    pub device_serial: String,
    pub thing_name: String,
    pub cert_serial: String,
    pub certificate_id: String,
    pub public_key: String,
    pub state: String,
    pub reason: String,
    pub not_after: String,
    pub created: String,
    pub updated: String,
}

/// Runs `provline ledger export --format csv` and parses it, checking the header.
#[track_caller]
pub fn ledger_export(cwd: &Path, ledger: &Path) -> Vec<ExportRow> {
    let r = provline(
        cwd,
        &[
            "ledger".as_ref(),
            "export".as_ref(),
            "--ledger".as_ref(),
            ledger.as_os_str(),
            "--format".as_ref(),
            "csv".as_ref(),
        ],
    );
    r.expect_code(0);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(r.stdout.as_bytes());
    let header: Vec<String> = rdr
        .headers()
        .expect("export header")
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(header, EXPORT_HEADER, "ledger export header\n{r}");
    rdr.records()
        .map(|rec| {
            let rec = rec.unwrap_or_else(|e| panic!("export record: {e}\n{r}"));
            let f = |i: usize| rec.get(i).unwrap_or("").to_owned();
            ExportRow {
                ca: f(0),
                device_serial: f(1),
                thing_name: f(2),
                cert_serial: f(3),
                certificate_id: f(4),
                public_key: f(5),
                state: f(6),
                reason: f(7),
                not_after: f(8),
                created: f(9),
                updated: f(10),
            }
        })
        .collect()
}

/// Checks what holds for a ledger at any moment, even right after a kill:
/// known states only, no certificate serial or id twice, at most one live
/// certificate and one intent per device. `settled` (after a run that
/// ended by itself) also requires that no intent is left.
#[track_caller]
pub fn assert_ledger_consistent(rows: &[ExportRow], settled: bool) {
    use std::collections::{HashMap, HashSet};
    let mut serials = HashSet::new();
    let mut ids = HashSet::new();
    let mut live: HashMap<(&str, &str), &ExportRow> = HashMap::new();
    let mut intent: HashMap<(&str, &str), &ExportRow> = HashMap::new();
    for r in rows {
        let allowed: &[&str] = if settled {
            &["live", "superseded"]
        } else {
            &["intent", "live", "superseded"]
        };
        assert!(
            allowed.contains(&r.state.as_str()),
            "certificate {} of device {} is `{}` (allowed: {allowed:?})",
            r.cert_serial,
            r.device_serial,
            r.state
        );
        assert!(
            serials.insert(r.cert_serial.as_str()),
            "certificate serial {} appears twice in the ledger",
            r.cert_serial
        );
        if !r.certificate_id.is_empty() {
            assert!(
                ids.insert(r.certificate_id.as_str()),
                "certificate id {} appears twice in the ledger",
                r.certificate_id
            );
        }
        let key = (r.ca.as_str(), r.device_serial.as_str());
        let slot = match r.state.as_str() {
            "live" => &mut live,
            "intent" => &mut intent,
            _ => continue,
        };
        if let Some(other) = slot.insert(key, r) {
            panic!(
                "device {} holds two `{}` certificates: {} and {}",
                r.device_serial, r.state, other.cert_serial, r.cert_serial
            );
        }
    }
    for r in rows.iter().filter(|r| r.state == "live") {
        assert!(
            !r.certificate_id.is_empty() && !r.not_after.is_empty(),
            "live certificate {} of device {} has no certificate id or notAfter",
            r.cert_serial,
            r.device_serial
        );
    }
    for r in rows.iter().filter(|r| r.state == "superseded") {
        assert!(
            !r.reason.is_empty(),
            "superseded certificate {} of device {} has no reason",
            r.cert_serial,
            r.device_serial
        );
    }
}

/// The names a device folder may hold.
pub const BUNDLE_FILES: [&str; 4] = ["cert.pem", "chain.pem", "private.key", "AmazonRootCA1.pem"];

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Scans a batch output folder, at any moment (even right after a kill),
/// for anything half-written under a final name:
/// - every `OUT/<thing>/` folder holds cert.pem, chain.pem, AmazonRootCA1.pem
///   and (when `with_key`) private.key (mode 0600), and nothing else;
/// - cert.pem is one certificate that parses, for CN = the folder name;
///   chain.pem is it followed by the CA; the root is Amazon's; the key is
///   one whole PKCS#8 PEM block;
/// - manifest.csv, when there, parses with its header; every other file
///   that is not hidden (a temporary name) is unexpected, and so is a temporary
///   name inside a device folder.
///
/// Returns thing name -> certificate id (SHA-256 of the DER) of every folder.
#[track_caller]
pub fn scan_output(
    out: &Path,
    ca_pem: &[u8],
    with_key: bool,
) -> std::collections::BTreeMap<String, String> {
    let root = fs::read(fixture("AmazonRootCA1.pem")).expect("read the Amazon root fixture");
    let mut found = std::collections::BTreeMap::new();
    let Ok(rd) = fs::read_dir(out) else {
        return found;
    };
    for entry in rd {
        let entry = entry.expect("read_dir entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let ty = entry.file_type().expect("file type");
        if name.starts_with('.') {
            continue;
        }
        if name == "manifest.csv" {
            assert!(ty.is_file(), "{} is not a file", path.display());
            read_manifest(out);
            continue;
        }
        assert!(
            ty.is_dir(),
            "unexpected file under a final name in the output: {}",
            path.display()
        );
        let mut names: Vec<String> = fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want: Vec<String> = BUNDLE_FILES
            .iter()
            .filter(|f| with_key || **f != "private.key")
            .map(|f| f.to_string())
            .collect();
        want.sort();
        assert_eq!(
            names,
            want,
            "device folder {} does not hold exactly the bundle",
            path.display()
        );
        let cert_pem = fs::read(path.join("cert.pem")).expect("read cert.pem");
        let blocks = pem::parse_many(&cert_pem)
            .unwrap_or_else(|e| panic!("{}/cert.pem is not PEM: {e}", path.display()));
        assert!(
            blocks.len() == 1 && blocks[0].tag() == "CERTIFICATE",
            "{}/cert.pem does not hold exactly one certificate",
            path.display()
        );
        let der = blocks[0].contents();
        let (rest, cert) = x509_parser::parse_x509_certificate(der)
            .unwrap_or_else(|e| panic!("{}/cert.pem does not parse: {e}", path.display()));
        assert!(
            rest.is_empty(),
            "{}/cert.pem has trailing bytes",
            path.display()
        );
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("");
        assert_eq!(cn, name, "CN of {}/cert.pem", path.display());
        let chain = fs::read(path.join("chain.pem")).expect("read chain.pem");
        let mut want_chain = cert_pem.clone();
        want_chain.extend_from_slice(ca_pem);
        assert!(
            chain == want_chain,
            "{}/chain.pem is not cert.pem followed by the CA",
            path.display()
        );
        assert!(
            fs::read(path.join("AmazonRootCA1.pem")).expect("read root") == root,
            "{}/AmazonRootCA1.pem is not Amazon Root CA 1",
            path.display()
        );
        if with_key {
            let key_path = path.join("private.key");
            let key = fs::read_to_string(&key_path).expect("read private.key");
            let block = pem::parse(&key)
                .unwrap_or_else(|e| panic!("{} is not PEM: {e}", key_path.display()));
            assert!(
                block.tag() == "PRIVATE KEY"
                    && key.trim_end().ends_with("-----END PRIVATE KEY-----"),
                "{} is not one whole PKCS#8 PEM block",
                key_path.display()
            );
            assert_eq!(mode(&key_path), 0o600, "mode of {}", key_path.display());
        }
        found.insert(name, sha256_hex(der));
    }
    found
}

/// The arguments of `provline batch JOB --ca CA --out OUT EXTRA...`, for
/// a station started with [`spawn_provline`].
pub fn batch_args(job: &Path, ca: &Path, out: &Path, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "batch".into(),
        job.into(),
        "--ca".into(),
        ca.into(),
        "--out".into(),
        out.into(),
    ];
    args.extend(extra.iter().map(Into::into));
    args
}
