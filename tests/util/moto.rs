//! moto's server as the local AWS IoT control-plane API, and the station run
//! against it.
//!
//! Each test starts its own server (about a second) on 127.0.0.1 on a free
//! port, from a few lines of Python in the venv that turn on moto's
//! valid-certificate mode first (`iot.use_valid_cert`: certificate id =
//! SHA-256 of the DER, as AWS; without it moto hashes the PEM text) and make
//! GetRegistrationCode answer 64 hex digits as AWS does (moto answers a
//! UUID), and keep and describe a CA's auto-registration status and
//! certificate mode (moto drops them). The server is killed on drop.
//!
//! The query helpers talk to moto directly: moto does not check SigV4
//! signatures but routes by the service named in the `Authorization`
//! header's credential scope, so a fixed header with a dummy signature is
//! enough. They are for assertions only; the station itself goes through
//! the real aws-sdk-iot client.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::proxy::{http_call, Response};
use super::{python, Run};

/// An `Authorization` header that routes a request to moto's IoT backend.
pub const FAKE_AUTH: &str = "AWS4-HMAC-SHA256 \
    Credential=testing/20260101/us-east-1/iot/aws4_request, \
    SignedHeaders=host, Signature=0000000000000000";

/// Starts moto's server with the IoT valid-certificate mode on.
const START: &str = r#"
import sys
from moto.core.config import default_user_config
default_user_config["iot"]["use_valid_cert"] = True
from moto import settings
assert settings.iot_use_valid_cert(), "moto's iot.use_valid_cert did not take"
# AWS's registration codes are 64 hex digits; moto answers a UUID.
import hashlib, os
import moto.iot.models as iot_models
iot_models.IoTBackend.get_registration_code = (
    lambda self: hashlib.sha256(os.urandom(32)).hexdigest())
# moto drops RegisterCACertificate's allowAutoRegistration, certificateMode
# and verificationCertificate: keep them and describe them as AWS does.
from moto.iot.responses import IoTResponse
_register_ca = IoTResponse.register_ca_certificate
def register_ca(self):
    result = _register_ca(self)
    pem = self._get_param("caCertificate")
    for ca in self.iot_backend.ca_certificates.values():
        if ca.certificate_pem == pem:
            auto = self._get_bool_param("allowAutoRegistration")
            ca.auto_registration_status = "ENABLE" if auto else "DISABLE"
            ca.certificate_mode = self._get_param("certificateMode") or "DEFAULT"
            ca.verification_pem = self._get_param("verificationCertificate")
    return result
IoTResponse.register_ca_certificate = register_ca
_update_ca = IoTResponse.update_ca_certificate
def update_ca(self):
    result = _update_ca(self)
    auto = self._get_param("newAutoRegistrationStatus")
    if auto:
        ca = self.iot_backend.describe_ca_certificate(self.path.split("/")[-1].split("?")[0])
        ca.auto_registration_status = auto
    return result
IoTResponse.update_ca_certificate = update_ca
_describe = iot_models.FakeCertificate.to_description_dict
def describe_ca(self):
    d = _describe(self)
    d["autoRegistrationStatus"] = getattr(self, "auto_registration_status", "DISABLE")
    d["certificateMode"] = getattr(self, "certificate_mode", "DEFAULT")
    return d
iot_models.FakeCaCertificate.to_description_dict = describe_ca
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"#;

const INSTALL: &str = "install moto's server into the venv: \
    `.venv/bin/pip install 'moto[server]==5.2.5'` (bash .ci/run does), \
    or point PROVLINE_PYTHON at a Python that has it";

/// A running moto server; killed on drop.
pub struct Moto {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn check_moto_installed(py: &Path) {
    static OK: OnceLock<Result<(), String>> = OnceLock::new();
    OK.get_or_init(|| {
        let out = Command::new(py)
            .args(["-c", "import moto.server, moto.iot, flask"])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", py.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "moto's server is not importable with {} ({}): {INSTALL}",
                py.display(),
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ))
        }
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"));
}

impl Moto {
    /// Starts a server, waits until it answers, and warms the IoT backend
    /// (its first call loads it, about half a second).
    pub fn start() -> Moto {
        let py = python();
        check_moto_installed(&py);
        let dir = super::tempdir();
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let log = dir.path().join(format!("moto-{port}.log"));
            let mut child = Command::new(&py)
                .arg("-c")
                .arg(START)
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(fs::File::create(&log).expect("moto log"))
                .stderr(
                    fs::File::create(dir.path().join(format!("moto-{port}.err")))
                        .expect("moto log"),
                )
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start moto with {}: {e}", py.display()));
            if wait_ready(&mut child, port, Duration::from_secs(30)) {
                let moto = Moto {
                    child,
                    port,
                    log: dir.path().join(format!("moto-{port}.err")),
                    _dir: dir,
                };
                // Warm the IoT backend.
                moto.ok("GET", "/things", None);
                return moto;
            }
            let _ = child.kill();
            let _ = child.wait();
            last =
                fs::read_to_string(dir.path().join(format!("moto-{port}.err"))).unwrap_or_default();
        }
        panic!("moto's server did not start:\n{last}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What moto logged (one line per request).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One IoT API call straight to moto (not through the station).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let bytes = body
            .map(|b| serde_json::to_vec(b).expect("JSON"))
            .unwrap_or_default();
        http_call(
            self.port,
            method,
            path,
            &[
                ("Authorization", FAKE_AUTH),
                ("Content-Type", "application/json"),
            ],
            &bytes,
        )
        .unwrap_or_else(|e| panic!("moto {method} {path}: {e}"))
    }

    /// [`Self::call`] that must succeed; returns the JSON answer.
    #[track_caller]
    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let r = self.call(method, path, body);
        assert!(
            (200..300).contains(&r.status),
            "moto {method} {path}: HTTP {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if r.body.is_empty() {
            Value::Null
        } else {
            r.json()
        }
    }

    /// [`Self::ok`], or `None` when moto answers 404.
    #[track_caller]
    pub fn get_opt(&self, path: &str) -> Option<Value> {
        let r = self.call("GET", path, None);
        match r.status {
            404 => None,
            200..=299 => Some(r.json()),
            s => panic!(
                "moto GET {path}: HTTP {s} {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }

    /// Every thing (ListThings, all pages): name, arn, attributes, type, version.
    pub fn things(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = "/things?maxResults=250".to_string();
            if let Some(t) = &token {
                path.push_str(&format!("&nextToken={}", enc(t)));
            }
            let page = self.ok("GET", &path, None);
            out.extend(page["things"].as_array().cloned().unwrap_or_default());
            match page["nextToken"].as_str() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return out,
            }
        }
    }

    /// The names of every thing.
    pub fn thing_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .things()
            .iter()
            .filter_map(|t| t["thingName"].as_str().map(str::to_string))
            .collect();
        v.sort();
        v
    }

    /// DescribeThing, or `None`.
    pub fn thing(&self, name: &str) -> Option<Value> {
        self.get_opt(&format!("/things/{}", enc(name)))
    }

    /// The principals (certificate ARNs) attached to a thing.
    pub fn thing_principals(&self, name: &str) -> Vec<String> {
        let v = self.ok("GET", &format!("/things/{}/principals", enc(name)), None);
        strings(&v["principals"])
    }

    /// The groups a thing is in.
    pub fn thing_groups_of(&self, name: &str) -> Vec<String> {
        let v = self.ok("GET", &format!("/things/{}/thing-groups", enc(name)), None);
        let mut g: Vec<String> = v["thingGroups"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g["groupName"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        g.sort();
        g
    }

    /// The principals of every thing, asked with a few connections at once.
    pub fn principals_of_all_things(&self) -> BTreeMap<String, Vec<String>> {
        let names = self.thing_names();
        let chunks: Vec<Vec<String>> = names
            .chunks(names.len().div_ceil(4).max(1))
            .map(<[String]>::to_vec)
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .into_iter()
                            .map(|n| {
                                let p = self.thing_principals(&n);
                                (n, p)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("query thread"))
                .collect()
        })
    }

    /// The policies attached to a target (a certificate ARN).
    pub fn attached_policies(&self, target: &str) -> Vec<String> {
        let v = self.ok(
            "POST",
            &format!("/attached-policies/{}", enc(target)),
            Some(&json!({})),
        );
        let mut p: Vec<String> = v["policies"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["policyName"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        p.sort();
        p
    }

    /// Every certificate (ListCertificates): certificateId, certificateArn, status.
    pub fn certificates(&self) -> Vec<Value> {
        let v = self.ok("GET", "/certificates", None);
        v["certificates"].as_array().cloned().unwrap_or_default()
    }

    /// DescribeCertificate's `certificateDescription`, or `None`.
    pub fn certificate(&self, id: &str) -> Option<Value> {
        self.get_opt(&format!("/certificates/{}", enc(id)))
            .map(|v| v["certificateDescription"].clone())
    }

    /// DescribeCACertificate (the whole answer), or `None`.
    pub fn ca_certificate(&self, id: &str) -> Option<Value> {
        self.get_opt(&format!("/cacertificate/{}", enc(id)))
    }

    /// Every policy name.
    pub fn policy_names(&self) -> Vec<String> {
        let v = self.ok("GET", "/policies", None);
        let mut p: Vec<String> = v["policies"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["policyName"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        p.sort();
        p
    }

    /// GetPolicy, or `None`.
    pub fn policy(&self, name: &str) -> Option<Value> {
        self.get_opt(&format!("/policies/{}", enc(name)))
    }

    /// Every thing type.
    pub fn thing_types(&self) -> Vec<Value> {
        let v = self.ok("GET", "/thing-types", None);
        v["thingTypes"].as_array().cloned().unwrap_or_default()
    }

    /// Every thing group name.
    pub fn thing_group_names(&self) -> Vec<String> {
        let v = self.ok("GET", "/thing-groups", None);
        let mut g: Vec<String> = v["thingGroups"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g["groupName"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        g.sort();
        g
    }

    /// DetachThingPrincipal, done behind the station's back.
    pub fn detach_thing_principal(&self, thing: &str, principal: &str) {
        let r = http_call(
            self.port,
            "DELETE",
            &format!("/things/{}/principals", enc(thing)),
            &[
                ("Authorization", FAKE_AUTH),
                ("x-amzn-principal", principal),
            ],
            b"",
        )
        .expect("DetachThingPrincipal");
        assert!(
            (200..300).contains(&r.status),
            "DetachThingPrincipal {thing} {principal}: HTTP {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }

    /// Everything moto holds that `cloud setup` makes, as one JSON value
    /// with lists sorted: policies (document and version), thing types,
    /// thing groups, things, certificates (id, status, CA, policies), and
    /// the CA certificates named in `ca_ids` (status, auto-registration,
    /// registration config).
    pub fn snapshot(&self, ca_ids: &[String]) -> Value {
        let policies: BTreeMap<String, Value> = self
            .policy_names()
            .into_iter()
            .map(|n| {
                let p = self.policy(&n).unwrap_or(Value::Null);
                (
                    n,
                    json!({
                        "document": p["policyDocument"],
                        "defaultVersionId": p["defaultVersionId"],
                    }),
                )
            })
            .collect();
        let mut types: Vec<Value> = self
            .thing_types()
            .into_iter()
            .map(|t| json!({"name": t["thingTypeName"], "properties": t["thingTypeProperties"]}))
            .collect();
        types.sort_by_key(|v| v.to_string());
        let mut things: Vec<Value> = self
            .things()
            .into_iter()
            .map(|t| {
                let name = t["thingName"].as_str().unwrap_or("").to_string();
                json!({
                    "name": name,
                    "attributes": t["attributes"],
                    "type": t["thingTypeName"],
                    "version": t["version"],
                    "principals": self.thing_principals(&name),
                })
            })
            .collect();
        things.sort_by_key(|v| v.to_string());
        let mut certs: Vec<Value> = self
            .certificates()
            .into_iter()
            .map(|c| {
                let arn = c["certificateArn"].as_str().unwrap_or("").to_string();
                json!({
                    "id": c["certificateId"],
                    "status": c["status"],
                    "policies": self.attached_policies(&arn),
                })
            })
            .collect();
        certs.sort_by_key(|v| v.to_string());
        let cas: BTreeMap<String, Value> = ca_ids
            .iter()
            .map(|id| {
                let d = self.ca_certificate(id).unwrap_or(Value::Null);
                let desc = &d["certificateDescription"];
                (
                    id.clone(),
                    json!({
                        "status": desc["status"],
                        "autoRegistrationStatus": desc["autoRegistrationStatus"],
                        "certificateMode": desc["certificateMode"],
                        "registrationConfig": d["registrationConfig"],
                    }),
                )
            })
            .collect();
        json!({
            "policies": policies,
            "thing_types": types,
            "thing_groups": self.thing_group_names(),
            "things": things,
            "certificates": certs,
            "ca_certificates": cas,
        })
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strings(v: &Value) -> Vec<String> {
    let mut s: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    s.sort();
    s
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn wait_ready(child: &mut Child, port: u16, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(r) = http_call(port, "GET", "/moto-api/", &[], b"") {
            if r.status == 200 {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The environment that points the station at `endpoint` with dummy
/// credentials and region, and keeps every other source of AWS settings
/// (profiles, files, the instance metadata service) out of reach.
pub fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        (
            "AWS_CONFIG_FILE",
            "/nonexistent/provline-test/config".into(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/provline-test/credentials".into(),
        ),
        ("PROVLINE_RETRY_BASE_MS", "5".into()),
        ("PROVLINE_AWS_TIMEOUT_MS", "10000".into()),
    ]
}

/// AWS variables of the test's own environment that must not leak into the
/// station.
const AWS_REMOVE: &[&str] = &[
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_IOT",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "RUST_LOG",
];

fn station_command<S: AsRef<std::ffi::OsStr>>(
    cwd: &Path,
    args: &[S],
    env: &[(&str, String)],
) -> (Command, String) {
    let bin = env!("CARGO_BIN_EXE_provline");
    let mut cmd = Command::new(bin);
    cmd.args(args).current_dir(cwd).stdin(Stdio::null());
    for k in AWS_REMOVE {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut line = String::from("provline");
    for a in args {
        line.push(' ');
        line.push_str(&a.as_ref().to_string_lossy());
    }
    (cmd, line)
}

/// Runs `provline ARGS` against `endpoint` (see [`aws_env`]) plus `extra`
/// variables, and waits for it (at most ten minutes).
pub fn provline_aws<S: AsRef<std::ffi::OsStr>>(
    cwd: &Path,
    args: &[S],
    endpoint: &str,
    extra: &[(&str, String)],
) -> Run {
    let mut env = aws_env(endpoint);
    env.extend(extra.iter().cloned());
    let (mut cmd, cmdline) = station_command(cwd, args, &env);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{cmdline}`: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let limit = Duration::from_secs(600);
    match rx.recv_timeout(limit) {
        Ok(out) => {
            let out = out.expect("wait for provline");
            Run {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                cmdline,
            }
        }
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("`{cmdline}` did not finish within {limit:?}");
        }
    }
}

/// Starts `provline ARGS` against `endpoint` without waiting; output goes
/// to `LOG.stdout` and `LOG.stderr`.
pub fn spawn_provline_aws<S: AsRef<std::ffi::OsStr>>(
    cwd: &Path,
    args: &[S],
    endpoint: &str,
    extra: &[(&str, String)],
    log: &Path,
) -> Child {
    let mut env = aws_env(endpoint);
    env.extend(extra.iter().cloned());
    let (mut cmd, cmdline) = station_command(cwd, args, &env);
    let out = log.with_extension("stdout");
    let err = log.with_extension("stderr");
    cmd.stdout(fs::File::create(out).expect("create stdout log"))
        .stderr(fs::File::create(err).expect("create stderr log"));
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start `{cmdline}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::proxy::{Faults, Proxy};

    #[test]
    fn moto_starts_with_aws_certificate_ids_and_answers_the_query_helpers() {
        let moto = Moto::start();
        // A certificate registered without a CA gets the id AWS would give
        // it: SHA-256 of its DER, not of the PEM text.
        let pem = fs::read_to_string(crate::util::fixture("cas/ec-p256-pkcs8/ca.pem"))
            .expect("read a certificate");
        let der = pem::parse(&pem).expect("PEM").into_contents();
        let want_id = crate::util::sha256_hex(&der);
        let r = moto.ok(
            "POST",
            "/certificate/register-no-ca",
            Some(&json!({"certificatePem": pem, "status": "ACTIVE"})),
        );
        assert_eq!(r["certificateId"], json!(want_id), "{r}");
        let arn = r["certificateArn"].as_str().expect("arn").to_string();

        moto.ok("POST", "/things/sensor_SN-1", Some(&json!({})));
        // AttachThingPrincipal takes the principal in a header.
        let r = http_call(
            moto.port,
            "PUT",
            "/things/sensor_SN-1/principals",
            &[("Authorization", FAKE_AUTH), ("x-amzn-principal", &arn)],
            b"",
        )
        .expect("attach");
        assert_eq!(r.status, 200);
        moto.ok(
            "POST",
            "/policies/SensorPolicy",
            Some(&json!({"policyDocument": "{\"Version\":\"2012-10-17\",\"Statement\":[]}"})),
        );
        moto.ok(
            "PUT",
            "/target-policies/SensorPolicy",
            Some(&json!({"target": arn})),
        );

        assert_eq!(moto.thing_names(), vec!["sensor_SN-1".to_string()]);
        assert_eq!(moto.thing_principals("sensor_SN-1"), vec![arn.clone()]);
        assert_eq!(
            moto.attached_policies(&arn),
            vec!["SensorPolicy".to_string()]
        );
        assert_eq!(
            moto.certificate(&want_id).expect("described")["status"],
            json!("ACTIVE")
        );
        assert!(moto.thing("no-such-thing").is_none());
        let before = moto.snapshot(&[]);
        assert_eq!(before, moto.snapshot(&[]), "a snapshot is stable");

        moto.detach_thing_principal("sensor_SN-1", &arn);
        assert!(moto.thing_principals("sensor_SN-1").is_empty());
        assert_ne!(before, moto.snapshot(&[]), "the snapshot sees a detach");
    }

    #[test]
    fn the_proxy_forwards_to_moto_and_moto_pages_many_things() {
        let moto = Moto::start();
        let proxy = Proxy::start(moto.port, Faults::none());
        for i in 0..260 {
            let r = http_call(
                proxy.port,
                "POST",
                &format!("/things/t{i:03}"),
                &[("Authorization", FAKE_AUTH)],
                b"{}",
            )
            .expect("through the proxy");
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        }
        assert_eq!(proxy.forwarded_times("CreateThing").len(), 260);
        assert_eq!(moto.thing_names().len(), 260, "ListThings over pages");
        let principals = moto.principals_of_all_things();
        assert_eq!(principals.len(), 260);
        assert!(principals.values().all(Vec::is_empty));
    }
}
