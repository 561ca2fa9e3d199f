//! Setup shared by the integration tests: running the `provline` binary in a
//! temporary folder, and driving the independent verifiers (OpenSSL, pkilint,
//! Python `cryptography`, a mosquitto broker) that judge what it wrote.
//!
//! A verifier that is not installed makes the test fail with a message that
//! says what to install; `bash .ci/run` installs all of them.

#![allow(dead_code)]

pub mod broker;
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
