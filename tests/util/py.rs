//! Python `cryptography` as an independent reader of what the station wrote.
//!
//! The snippets only extract facts (as JSON); the assertions live in Rust.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The Python that has `cryptography` and `pkilint`: `PROVLINE_PYTHON`, else
/// `.venv/bin/python` in the crate root, else `python3` on PATH. Fails with
/// an install hint when it lacks `cryptography` (>= 44, for the verifier).
pub fn python() -> PathBuf {
    static PY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PY.get_or_init(find_python)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn find_python() -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("PROVLINE_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(super::root().join(".venv/bin/python"));
    candidates.push(PathBuf::from("python3"));
    let mut tried = Vec::new();
    for c in candidates {
        let out = std::process::Command::new(&c)
            .args([
                "-c",
                "import cryptography.x509.verification as v; v.ExtensionPolicy; print('ok')",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => return Ok(c),
            Ok(o) => tried.push(format!(
                "{}: {}",
                c.display(),
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            )),
            Err(e) => tried.push(format!("{}: {e}", c.display())),
        }
    }
    Err(format!(
        "no Python with `cryptography` >= 44 found (tried {}). Install it: \
         `python3 -m venv .venv && .venv/bin/pip install cryptography pkilint` \
         (bash .ci/run does this), or set PROVLINE_PYTHON",
        tried.join("; ")
    ))
}

/// Runs a Python snippet with arguments and parses its stdout as JSON.
#[track_caller]
pub fn py_json<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> serde_json::Value {
    let py = python();
    let mut full: Vec<std::ffi::OsString> = vec!["-c".into(), script.into()];
    full.extend(args.iter().map(|a| a.as_ref().to_owned()));
    let r = super::run_tool(&py, &full, Path::new("/"), "install Python 3");
    assert_eq!(r.code, 0, "Python snippet failed\n{}", r.stderr);
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("Python printed no JSON ({e})\n{}", r.stdout))
}

/// Shared helpers for the snippets below.
const PRELUDE: &str = r#"
import hashlib, json, sys, datetime
from cryptography import x509
from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

def spki(key):
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()

def key_kind(key):
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec-" + key.curve.name
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa-%d-e%d" % (key.key_size, key.public_numbers().e)
    return type(key).__name__

def names(name):
    out = {}
    for a in name:
        out.setdefault(a.oid.dotted_string, []).append(a.value)
    return out

def ext(cert, cls):
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None

def cert_facts(cert):
    bc = ext(cert, x509.BasicConstraints)
    ku = ext(cert, x509.KeyUsage)
    eku = ext(cert, x509.ExtendedKeyUsage)
    ski = ext(cert, x509.SubjectKeyIdentifier)
    aki = ext(cert, x509.AuthorityKeyIdentifier)
    ku_set = None
    if ku is not None:
        v = ku.value
        ku_set = [n for n in ["digital_signature", "content_commitment",
                              "key_encipherment", "data_encipherment", "key_agreement",
                              "key_cert_sign", "crl_sign"] if getattr(v, n)]
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "version": cert.version.name,
        "serial": str(cert.serial_number),
        "serial_bits": cert.serial_number.bit_length(),
        "subject": names(cert.subject),
        "issuer": names(cert.issuer),
        "sha256_der": hashlib.sha256(der).hexdigest(),
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": cert.not_valid_after_utc.timestamp(),
        "not_after_date": cert.not_valid_after_utc.strftime("%Y-%m-%d"),
        "sig_hash": cert.signature_hash_algorithm.name if cert.signature_hash_algorithm else None,
        "basic_constraints": None if bc is None else
            {"ca": bc.value.ca, "critical": bc.critical, "path_length": bc.value.path_length},
        "key_usage": None if ku is None else {"critical": ku.critical, "set": ku_set},
        "eku": None if eku is None else [o.dotted_string for o in eku.value],
        "ski": None if ski is None else ski.value.digest.hex(),
        "aki": None if aki is None or aki.value.key_identifier is None
            else aki.value.key_identifier.hex(),
        "has_san": ext(cert, x509.SubjectAlternativeName) is not None,
        "ext_oids": [e.oid.dotted_string for e in cert.extensions],
        "spki": spki(cert.public_key()),
        "key_kind": key_kind(cert.public_key()),
        "now": datetime.datetime.now(datetime.timezone.utc).timestamp(),
    }

def load_cert(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())
"#;

/// Facts about one certificate (PEM): see `cert_facts` in the prelude.
pub fn cert_facts(cert: &Path) -> serde_json::Value {
    let script = format!("{PRELUDE}\nprint(json.dumps(cert_facts(load_cert(sys.argv[1]))))\n");
    py_json(&script, &[cert])
}

/// Facts about a private key file: its kind, its public key hash, PKCS#8 or not.
pub fn key_facts(key: &Path) -> serde_json::Value {
    let script = format!(
        "{PRELUDE}
data = open(sys.argv[1], 'rb').read()
k = serialization.load_pem_private_key(data, password=None)
print(json.dumps({{'spki': spki(k.public_key()), 'key_kind': key_kind(k.public_key()),
                  'pkcs8': data.lstrip().startswith(b'-----BEGIN PRIVATE KEY-----')}}))
"
    );
    py_json(&script, &[key])
}

/// Facts about every device folder of a batch, checked against the CA:
/// the certificate, chain.pem, private.key (when present), signature,
/// and the `cryptography` client verifier with the SAN rule relaxed.
pub fn device_facts(ca_pem: &Path, dirs: &[PathBuf]) -> Vec<serde_json::Value> {
    let script = format!(
        "{PRELUDE}
from cryptography.x509 import verification as v
ca = load_cert(sys.argv[1])
ee = v.ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.SubjectAlternativeName, v.Criticality.AGNOSTIC, None)
verifier = (v.PolicyBuilder().store(v.Store([ca]))
            .extension_policies(ca_policy=v.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
            .build_client_verifier())
out = []
for d in sys.argv[2:]:
    cert = load_cert(d + '/cert.pem')
    f = cert_facts(cert)
    f['dir'] = d
    f['ca_ski'] = (ext(ca, x509.SubjectKeyIdentifier).value.digest.hex()
                   if ext(ca, x509.SubjectKeyIdentifier) else None)
    f['ca_spki'] = spki(ca.public_key())
    try:
        cert.verify_directly_issued_by(ca)
        f['signed_by_ca'] = 'ok'
    except Exception as e:
        f['signed_by_ca'] = repr(e)
    with open(d + '/chain.pem', 'rb') as fh:
        chain = x509.load_pem_x509_certificates(fh.read())
    f['chain'] = [hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest()
                  for c in chain]
    f['ca_sha256'] = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    try:
        res = verifier.verify(cert, chain[1:])
        f['client_verifier'] = 'ok' if len(res.chain) == 2 else 'chain %d' % len(res.chain)
    except Exception as e:
        f['client_verifier'] = repr(e)
    try:
        data = open(d + '/private.key', 'rb').read()
    except FileNotFoundError:
        data = None
    if data is not None:
        k = serialization.load_pem_private_key(data, password=None)
        f['private_key'] = {{'spki': spki(k.public_key()), 'key_kind': key_kind(k.public_key()),
                            'pkcs8': data.lstrip().startswith(b'-----BEGIN PRIVATE KEY-----')}}
    else:
        f['private_key'] = None
    out.append(f)
print(json.dumps(out))
"
    );
    let mut args: Vec<&std::ffi::OsStr> = vec![ca_pem.as_os_str()];
    args.extend(dirs.iter().map(|d| d.as_os_str()));
    match py_json(&script, &args) {
        serde_json::Value::Array(v) => v,
        other => panic!("expected a JSON array, got {other}"),
    }
}

/// Facts about a CSR file: the hash of its public key.
pub fn csr_spki(csr: &Path) -> String {
    let script = format!(
        "{PRELUDE}
req = x509.load_pem_x509_csr(open(sys.argv[1], 'rb').read())
print(json.dumps(spki(req.public_key())))
"
    );
    py_json(&script, &[csr])
        .as_str()
        .expect("spki string")
        .to_owned()
}

/// OIDs used in the facts.
pub mod oid {
    pub const CN: &str = "2.5.4.3";
    pub const SERIAL_NUMBER: &str = "2.5.4.5";
    pub const C: &str = "2.5.4.6";
    pub const ST: &str = "2.5.4.8";
    pub const O: &str = "2.5.4.10";
    pub const OU: &str = "2.5.4.11";
    pub const DNQ: &str = "2.5.4.46";
    pub const CLIENT_AUTH: &str = "1.3.6.1.5.5.7.3.2";
}
