//! A fault-injecting HTTP/1.1 proxy between the station and moto.
//!
//! It listens on 127.0.0.1, reads each request far enough to know the AWS IoT
//! operation (method and path, matched against the REST routes of the IoT
//! API), and then, by a seeded random draw, either forwards it to moto or
//! answers it itself the way AWS fails:
//!
//! - a throttled answer: HTTP 400, `x-amzn-ErrorType: ThrottlingException`,
//!   `{"message":"Rate exceeded"}` (the shape AWS IoT sends);
//! - an internal failure: HTTP 500, `x-amzn-ErrorType: InternalFailureException`;
//! - a dropped connection before the call reaches moto (nothing happened);
//! - a dropped connection after moto answered (the call happened, the answer
//!   was lost: the station must not do it twice).
//!
//! Every call is recorded with the time since the proxy started; the calls
//! forwarded to moto give the rate moto saw. The operations moto does not
//! serve (provisioning templates, RegisterThing) get canned answers shaped
//! as the AWS IoT API reference documents, and their request bodies are
//! recorded like every other for the tests to check.
//!
//! Written over `std::net`, one thread per client connection: the station
//! keeps a few pooled connections and moto serves one call at a time, so
//! threads cost nothing here and no dev-dependency is needed.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The account id the canned answers use in ARNs (moto's default account).
pub const ACCOUNT: &str = "123456789012";
/// The region the canned answers use in ARNs.
pub const REGION: &str = "us-east-1";

/// The REST routes of the AWS IoT operations the station may call (from the
/// IoT API's service model): method, path pattern (`{x}` is one segment),
/// operation name.
const ROUTES: &[(&str, &str, &str)] = &[
    ("POST", "/things", "RegisterThing"),
    ("GET", "/things", "ListThings"),
    ("POST", "/things/{thingName}", "CreateThing"),
    ("GET", "/things/{thingName}", "DescribeThing"),
    ("PATCH", "/things/{thingName}", "UpdateThing"),
    ("DELETE", "/things/{thingName}", "DeleteThing"),
    (
        "PUT",
        "/things/{thingName}/principals",
        "AttachThingPrincipal",
    ),
    (
        "DELETE",
        "/things/{thingName}/principals",
        "DetachThingPrincipal",
    ),
    (
        "GET",
        "/things/{thingName}/principals",
        "ListThingPrincipals",
    ),
    (
        "GET",
        "/things/{thingName}/thing-groups",
        "ListThingGroupsForThing",
    ),
    (
        "PUT",
        "/thing-groups/addThingToThingGroup",
        "AddThingToThingGroup",
    ),
    ("GET", "/thing-groups", "ListThingGroups"),
    ("POST", "/thing-groups/{thingGroupName}", "CreateThingGroup"),
    (
        "GET",
        "/thing-groups/{thingGroupName}",
        "DescribeThingGroup",
    ),
    ("GET", "/thing-types", "ListThingTypes"),
    ("POST", "/thing-types/{thingTypeName}", "CreateThingType"),
    ("GET", "/thing-types/{thingTypeName}", "DescribeThingType"),
    ("PUT", "/target-policies/{policyName}", "AttachPolicy"),
    ("POST", "/target-policies/{policyName}", "DetachPolicy"),
    ("GET", "/policies", "ListPolicies"),
    ("POST", "/policies/{policyName}", "CreatePolicy"),
    ("GET", "/policies/{policyName}", "GetPolicy"),
    (
        "POST",
        "/policies/{policyName}/version",
        "CreatePolicyVersion",
    ),
    (
        "GET",
        "/policies/{policyName}/version",
        "ListPolicyVersions",
    ),
    (
        "GET",
        "/policies/{policyName}/version/{policyVersionId}",
        "GetPolicyVersion",
    ),
    (
        "POST",
        "/attached-policies/{target}",
        "ListAttachedPolicies",
    ),
    (
        "POST",
        "/policy-targets/{policyName}",
        "ListTargetsForPolicy",
    ),
    ("POST", "/certificate/register", "RegisterCertificate"),
    (
        "POST",
        "/certificate/register-no-ca",
        "RegisterCertificateWithoutCA",
    ),
    ("POST", "/certificates", "CreateCertificateFromCsr"),
    ("GET", "/certificates", "ListCertificates"),
    ("POST", "/keys-and-certificate", "CreateKeysAndCertificate"),
    (
        "GET",
        "/certificates/{certificateId}",
        "DescribeCertificate",
    ),
    ("PUT", "/certificates/{certificateId}", "UpdateCertificate"),
    (
        "DELETE",
        "/certificates/{certificateId}",
        "DeleteCertificate",
    ),
    ("POST", "/cacertificate", "RegisterCACertificate"),
    ("GET", "/cacertificates", "ListCACertificates"),
    (
        "GET",
        "/cacertificate/{caCertificateId}",
        "DescribeCACertificate",
    ),
    (
        "PUT",
        "/cacertificate/{caCertificateId}",
        "UpdateCACertificate",
    ),
    ("GET", "/registrationcode", "GetRegistrationCode"),
    ("GET", "/endpoint", "DescribeEndpoint"),
    (
        "POST",
        "/provisioning-templates",
        "CreateProvisioningTemplate",
    ),
    (
        "GET",
        "/provisioning-templates",
        "ListProvisioningTemplates",
    ),
    (
        "GET",
        "/provisioning-templates/{templateName}",
        "DescribeProvisioningTemplate",
    ),
    (
        "PATCH",
        "/provisioning-templates/{templateName}",
        "UpdateProvisioningTemplate",
    ),
];

/// The operations moto does not serve, answered by the proxy itself.
pub const CANNED: &[&str] = &[
    "CreateProvisioningTemplate",
    "DescribeProvisioningTemplate",
    "UpdateProvisioningTemplate",
    "ListProvisioningTemplates",
    "RegisterThing",
];

/// The AWS IoT operation of a request: the route with the most literal
/// segments that matches; `Unknown METHOD PATH` when none does.
pub fn operation(method: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut best: Option<(usize, &str)> = None;
    for (m, pattern, name) in ROUTES {
        if !m.eq_ignore_ascii_case(method) {
            continue;
        }
        let pat: Vec<&str> = pattern.split('/').collect();
        if pat.len() != segs.len() {
            continue;
        }
        let mut literal = 0;
        let ok = pat.iter().zip(&segs).all(|(p, s)| {
            if p.starts_with('{') {
                !s.is_empty()
            } else {
                literal += 1;
                p == s
            }
        });
        if ok && best.is_none_or(|(l, _)| literal > l) {
            best = Some((literal, name));
        }
    }
    match best {
        Some((_, name)) => name.to_string(),
        None => format!("Unknown {method} {path}"),
    }
}

/// What the proxy does to a share of the calls. Shares are fractions of
/// the calls subject to faults, drawn in the order the calls arrive from a
/// generator seeded with `seed`.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Answered 400 ThrottlingException.
    pub throttle: f64,
    /// Answered 500 InternalFailureException.
    pub server_error: f64,
    /// Connection closed before the call reaches moto.
    pub drop_before: f64,
    /// Forwarded to moto, then the connection closed without the answer.
    pub drop_after: f64,
    /// Seed of the draws.
    pub seed: u64,
    /// When set, only these operations get faults.
    pub only: Option<Vec<String>>,
}

impl Faults {
    /// No faults: every call is forwarded (or answered by the canned
    /// handler).
    pub fn none() -> Faults {
        Faults {
            throttle: 0.0,
            server_error: 0.0,
            drop_before: 0.0,
            drop_after: 0.0,
            seed: 1,
            only: None,
        }
    }

    fn applies_to(&self, op: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|ops| ops.iter().any(|o| o == op))
    }
}

/// What happened to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to moto, whose status came back to the station.
    Forwarded(u16),
    /// Answered 400 ThrottlingException by the proxy.
    Throttled,
    /// Answered 500 InternalFailureException by the proxy.
    ServerError,
    /// Closed before reaching moto.
    DroppedBefore,
    /// Forwarded (moto answered with this status), then closed unanswered.
    DroppedAfter(u16),
    /// Answered by the canned handler with this status.
    Canned(u16),
    /// moto could not be reached: answered 502.
    UpstreamFailed(String),
}

impl Outcome {
    /// True when moto executed the call.
    pub fn reached_moto(&self) -> bool {
        matches!(self, Outcome::Forwarded(_) | Outcome::DroppedAfter(_))
    }

    /// True when the proxy injected a fault into this call.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            Outcome::Throttled
                | Outcome::ServerError
                | Outcome::DroppedBefore
                | Outcome::DroppedAfter(_)
        )
    }
}

/// One call as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The operation name (`CreateThing`, ...).
    pub op: String,
    /// HTTP method.
    pub method: String,
    /// Path with query, as sent.
    pub path: String,
    /// Time since the proxy started, when the call was forwarded to moto
    /// (or answered by the proxy).
    pub at: Duration,
    /// What happened.
    pub outcome: Outcome,
    /// The request headers, lowercased names.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Vec<u8>,
    /// The answer's body, for calls moto or the canned handler answered.
    pub response: Vec<u8>,
}

impl Call {
    /// The request body as JSON (`Null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The answer's body as JSON (`Null` when empty or not JSON).
    pub fn response_json(&self) -> Value {
        serde_json::from_slice(&self.response).unwrap_or(Value::Null)
    }

    /// A request header.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    faults: Faults,
    rng: Rng,
    calls: Vec<Call>,
    templates: BTreeMap<String, Value>,
    request_seq: u64,
}

struct Shared {
    state: Mutex<State>,
    started: Instant,
    upstream: u16,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running proxy; stops accepting on drop.
pub struct Proxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts a proxy in front of `127.0.0.1:upstream`.
    pub fn start(upstream: u16, faults: Faults) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rng: Rng::from_seed(faults.seed),
                faults,
                calls: Vec::new(),
                templates: BTreeMap::new(),
                request_seq: 0,
            }),
            started: Instant::now(),
            upstream,
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(listener, s))
            .expect("spawn the proxy");
        Proxy { port, shared }
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replaces the fault shares (and reseeds the draws).
    pub fn set_faults(&self, faults: Faults) {
        let mut st = self.shared.lock();
        st.rng = Rng::from_seed(faults.seed);
        st.faults = faults;
    }

    /// Every call so far, in the order they were recorded.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// Forgets the calls recorded so far.
    pub fn clear_calls(&self) {
        self.shared.lock().calls.clear();
    }

    /// The calls of one operation.
    pub fn calls_of(&self, op: &str) -> Vec<Call> {
        self.shared
            .lock()
            .calls
            .iter()
            .filter(|c| c.op == op)
            .cloned()
            .collect()
    }

    /// When moto received each call of `op` (time since the proxy started).
    pub fn forwarded_times(&self, op: &str) -> Vec<Duration> {
        self.shared
            .lock()
            .calls
            .iter()
            .filter(|c| c.op == op && c.outcome.reached_moto())
            .map(|c| c.at)
            .collect()
    }

    /// Number of calls per operation and outcome kind.
    pub fn tally(&self) -> BTreeMap<String, BTreeMap<&'static str, usize>> {
        let mut t: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
        for c in self.shared.lock().calls.iter() {
            let kind = match c.outcome {
                Outcome::Forwarded(s) if s < 300 => "ok",
                Outcome::Forwarded(_) => "moto-error",
                Outcome::Throttled => "throttled",
                Outcome::ServerError => "500",
                Outcome::DroppedBefore => "dropped-before",
                Outcome::DroppedAfter(_) => "dropped-after",
                Outcome::Canned(s) if s < 300 => "canned-ok",
                Outcome::Canned(_) => "canned-error",
                Outcome::UpstreamFailed(_) => "upstream-failed",
            };
            *t.entry(c.op.clone()).or_default().entry(kind).or_default() += 1;
        }
        t
    }

    /// The provisioning templates created through the canned handler.
    pub fn templates(&self) -> BTreeMap<String, Value> {
        self.shared.lock().templates.clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let s = Arc::clone(&shared);
        let _ = std::thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || serve_connection(conn, s));
    }
}

/// One parsed HTTP/1.1 request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// Body (chunked bodies decoded).
    pub body: Vec<u8>,
}

impl Request {
    /// A header value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// One parsed HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A header value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as JSON; panics with the body when it is not JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
}

fn read_headers(r: &mut impl BufRead) -> std::io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?.ok_or_else(|| eof("inside the headers"))?;
        if line.is_empty() {
            return Ok(headers);
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(&format!("header line without a colon: {line:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
}

fn eof(where_: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("connection closed {where_}"),
    )
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// Reads a body framed by Content-Length or chunked; `to_eof` when neither.
fn read_body(
    r: &mut impl BufRead,
    headers: &[(String, String)],
    to_eof: bool,
) -> std::io::Result<Vec<u8>> {
    if find_header(headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line = read_line(r)?.ok_or_else(|| eof("inside a chunk size"))?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad(&format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers up to the empty line.
                while read_line(r)?.is_some_and(|l| !l.is_empty()) {}
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            read_line(r)?;
        }
    }
    if let Some(len) = find_header(headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(&format!("bad Content-Length {len:?}")))?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    let mut body = Vec::new();
    if to_eof {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

/// Reads one request; `None` when the client closed between requests.
pub fn read_request(r: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let line = loop {
        match read_line(r)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(bad(&format!("bad request line {line:?}")));
    };
    let headers = read_headers(r)?;
    let body = read_body(r, &headers, false)?;
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        headers,
        body,
    }))
}

/// Reads one response (the body up to EOF when it has no framing).
pub fn read_response(r: &mut impl BufRead) -> std::io::Result<Response> {
    let line = read_line(r)?.ok_or_else(|| eof("before the status line"))?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let headers = read_headers(r)?;
    let body = read_body(r, &headers, true)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// One HTTP/1.1 call to `127.0.0.1:port` on a fresh connection
/// (`Connection: close`).
pub fn http_call(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes)?;
    read_response(&mut BufReader::new(s))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        _ => "Status",
    }
}

fn write_response(
    w: &mut impl Write,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        let lk = k.to_ascii_lowercase();
        if [
            "connection",
            "content-length",
            "transfer-encoding",
            "keep-alive",
        ]
        .contains(&lk.as_str())
        {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    w.write_all(&bytes)?;
    w.flush()
}

/// An AWS-shaped error answer: the `x-amzn-ErrorType` header and a JSON
/// body with `message`, as the AWS IoT REST API sends them.
fn aws_error(kind: &str, message: &str, request_id: &str) -> (Vec<(String, String)>, Vec<u8>) {
    (
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("x-amzn-ErrorType".into(), kind.into()),
            ("x-amzn-RequestId".into(), request_id.into()),
        ],
        serde_json::to_vec(&json!({ "message": message })).expect("JSON"),
    )
}

enum Decision {
    Forward { drop_after: bool },
    Throttle,
    ServerError,
    DropBefore,
    Canned,
}

fn serve_connection(conn: TcpStream, shared: Arc<Shared>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(300)));
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut w = write_half;
    let mut r = BufReader::new(conn);
    loop {
        let req = match read_request(&mut r) {
            Ok(Some(req)) => req,
            Ok(None) | Err(_) => return,
        };
        let op = operation(&req.method, &req.path);
        let (decision, request_id) = {
            let mut st = shared.lock();
            st.request_seq += 1;
            let id = format!("proxy-{:08}", st.request_seq);
            let canned = CANNED.contains(&op.as_str());
            let d = if st.faults.applies_to(&op) {
                let u = st.rng.next_f64();
                let f = &st.faults;
                let mut edge = f.throttle;
                if u < edge {
                    Decision::Throttle
                } else if u < {
                    edge += f.server_error;
                    edge
                } {
                    Decision::ServerError
                } else if u < {
                    edge += f.drop_before;
                    edge
                } {
                    Decision::DropBefore
                } else if canned {
                    Decision::Canned
                } else {
                    Decision::Forward {
                        drop_after: u < edge + f.drop_after,
                    }
                }
            } else if canned {
                Decision::Canned
            } else {
                Decision::Forward { drop_after: false }
            };
            (d, id)
        };
        let close_after = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let record = |outcome: Outcome, response: &[u8]| {
            let at = shared.started.elapsed();
            let call = Call {
                op: op.clone(),
                method: req.method.clone(),
                path: req.path.clone(),
                at,
                outcome,
                headers: req
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect(),
                body: req.body.clone(),
                response: response.to_vec(),
            };
            shared.lock().calls.push(call);
        };
        let sent = match decision {
            Decision::DropBefore => {
                record(Outcome::DroppedBefore, b"");
                let _ = w.shutdown(Shutdown::Both);
                return;
            }
            Decision::Throttle => {
                record(Outcome::Throttled, b"");
                let (h, b) = aws_error("ThrottlingException", "Rate exceeded", &request_id);
                write_response(&mut w, 400, &h, &b)
            }
            Decision::ServerError => {
                record(Outcome::ServerError, b"");
                let (h, b) = aws_error(
                    "InternalFailureException",
                    "An unexpected error has occurred",
                    &request_id,
                );
                write_response(&mut w, 500, &h, &b)
            }
            Decision::Canned => {
                let (status, h, b) = canned(&shared, &op, &req, &request_id);
                record(Outcome::Canned(status), &b);
                write_response(&mut w, status, &h, &b)
            }
            Decision::Forward { drop_after } => {
                let at = shared.started.elapsed();
                match forward(shared.upstream, &req) {
                    Ok(resp) => {
                        let outcome = if drop_after {
                            Outcome::DroppedAfter(resp.status)
                        } else {
                            Outcome::Forwarded(resp.status)
                        };
                        record_at(&shared, &op, &req, at, outcome, &resp.body);
                        if drop_after {
                            let _ = w.shutdown(Shutdown::Both);
                            return;
                        }
                        write_response(&mut w, resp.status, &resp.headers, &resp.body)
                    }
                    Err(e) => {
                        record(Outcome::UpstreamFailed(e.to_string()), b"");
                        let (h, b) = aws_error(
                            "InternalFailureException",
                            &format!("proxy: moto unreachable: {e}"),
                            &request_id,
                        );
                        write_response(&mut w, 502, &h, &b)
                    }
                }
            }
        };
        if sent.is_err() || close_after {
            let _ = w.shutdown(Shutdown::Both);
            return;
        }
    }
}

fn record_at(
    shared: &Shared,
    op: &str,
    req: &Request,
    at: Duration,
    outcome: Outcome,
    response: &[u8],
) {
    let call = Call {
        op: op.to_string(),
        method: req.method.clone(),
        path: req.path.clone(),
        at,
        outcome,
        headers: req
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        body: req.body.clone(),
        response: response.to_vec(),
    };
    shared.lock().calls.push(call);
}

/// Sends `req` to moto on a fresh connection and reads the whole answer
/// (moto closes every connection after its answer).
fn forward(upstream: u16, req: &Request) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", upstream))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
    for (k, v) in &req.headers {
        let lk = k.to_ascii_lowercase();
        if [
            "connection",
            "content-length",
            "transfer-encoding",
            "keep-alive",
            "expect",
        ]
        .contains(&lk.as_str())
        {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        req.body.len()
    ));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&req.body);
    s.write_all(&bytes)?;
    read_response(&mut BufReader::new(s))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn last_segment(path: &str) -> String {
    let p = path.split('?').next().unwrap_or("");
    percent_decode(p.rsplit('/').next().unwrap_or(""))
}

/// Answers of the operations moto does not serve, shaped as the AWS IoT
/// API reference documents them.
fn canned(
    shared: &Shared,
    op: &str,
    req: &Request,
    request_id: &str,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let ok = |v: Value| {
        (
            200,
            vec![
                ("Content-Type".to_string(), "application/json".to_string()),
                ("x-amzn-RequestId".to_string(), request_id.to_string()),
            ],
            serde_json::to_vec(&v).expect("JSON"),
        )
    };
    let err = |status: u16, kind: &str, message: &str| {
        let (h, b) = aws_error(kind, message, request_id);
        (status, h, b)
    };
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let arn = |name: &str| format!("arn:aws:iot:{REGION}:{ACCOUNT}:provisioningtemplate/{name}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    match op {
        "CreateProvisioningTemplate" => {
            let Some(name) = body["templateName"].as_str().map(str::to_string) else {
                return err(400, "InvalidRequestException", "templateName is required");
            };
            for field in ["templateBody", "provisioningRoleArn"] {
                if !body[field].is_string() {
                    return err(
                        400,
                        "InvalidRequestException",
                        &format!("{field} is required"),
                    );
                }
            }
            let mut st = shared.lock();
            if st.templates.contains_key(&name) {
                return err(
                    409,
                    "ResourceAlreadyExistsException",
                    &format!("Template {name} already exists"),
                );
            }
            let mut stored = json!({
                "templateArn": arn(&name),
                "templateName": name,
                "description": body.get("description").cloned().unwrap_or(Value::Null),
                "creationDate": now,
                "lastModifiedDate": now,
                "defaultVersionId": 1,
                "templateBody": body["templateBody"],
                "enabled": body.get("enabled").and_then(Value::as_bool).unwrap_or(false),
                "provisioningRoleArn": body["provisioningRoleArn"],
                "type": body.get("type").cloned().unwrap_or(json!("FLEET_PROVISIONING")),
            });
            if let Some(hook) = body.get("preProvisioningHook") {
                stored["preProvisioningHook"] = hook.clone();
            }
            if stored["description"].is_null() {
                stored
                    .as_object_mut()
                    .expect("object")
                    .remove("description");
            }
            st.templates.insert(name.clone(), stored);
            drop(st);
            ok(json!({
                "templateArn": arn(&name),
                "templateName": name,
                "defaultVersionId": 1,
            }))
        }
        "DescribeProvisioningTemplate" => {
            let name = last_segment(&req.path);
            match shared.lock().templates.get(&name) {
                Some(t) => ok(t.clone()),
                None => err(
                    404,
                    "ResourceNotFoundException",
                    &format!("The provisioning template {name} does not exist"),
                ),
            }
        }
        "UpdateProvisioningTemplate" => {
            let name = last_segment(&req.path);
            let mut st = shared.lock();
            let Some(t) = st.templates.get_mut(&name) else {
                return err(
                    404,
                    "ResourceNotFoundException",
                    &format!("The provisioning template {name} does not exist"),
                );
            };
            for field in [
                "description",
                "enabled",
                "provisioningRoleArn",
                "preProvisioningHook",
            ] {
                if let Some(v) = body.get(field) {
                    t[field] = v.clone();
                }
            }
            t["lastModifiedDate"] = json!(now);
            drop(st);
            ok(json!({}))
        }
        "ListProvisioningTemplates" => {
            let st = shared.lock();
            let templates: Vec<Value> = st
                .templates
                .values()
                .map(|t| {
                    json!({
                        "templateArn": t["templateArn"],
                        "templateName": t["templateName"],
                        "creationDate": t["creationDate"],
                        "lastModifiedDate": t["lastModifiedDate"],
                        "enabled": t["enabled"],
                        "type": t["type"],
                    })
                })
                .collect();
            ok(json!({ "templates": templates }))
        }
        "RegisterThing" => {
            if !body["templateBody"].is_string() {
                return err(400, "InvalidRequestException", "templateBody is required");
            }
            let params = &body["parameters"];
            let thing = params["ThingName"].as_str().unwrap_or("thing");
            let mut arns = serde_json::Map::new();
            arns.insert(
                "thing".into(),
                json!(format!("arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing}")),
            );
            // The certificate the call names: the PEM it carries, else
            // the one moto holds under the id.
            let mut pem = params["CertificatePem"].as_str().unwrap_or("").to_string();
            if let Some(id) = params["CertificateId"].as_str() {
                arns.insert(
                    "certificate".into(),
                    json!(format!("arn:aws:iot:{REGION}:{ACCOUNT}:cert/{id}")),
                );
                if pem.is_empty() {
                    if let Ok(r) = http_call(
                        shared.upstream,
                        "GET",
                        &format!("/certificates/{id}"),
                        &[("Authorization", super::moto::FAKE_AUTH)],
                        b"",
                    ) {
                        if r.status == 200 {
                            if let Ok(v) = serde_json::from_slice::<Value>(&r.body) {
                                pem = v["certificateDescription"]["certificatePem"]
                                    .as_str()
                                    .unwrap_or("")
                                    .to_string();
                            }
                        }
                    }
                }
            }
            ok(json!({ "certificatePem": pem, "resourceArns": arns }))
        }
        other => err(
            400,
            "InvalidRequestException",
            &format!("no canned answer for {other}"),
        ),
    }
}

/// xorshift64*: enough to spread faults, and the same for the same seed.
pub struct Rng(u64);

impl Rng {
    /// A generator; any seed works.
    pub fn from_seed(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The largest number of times in any window of `window` (a sliding
/// window: every window that starts at a call), and the mean rate between
/// the first and the last call.
pub fn window_stats(times: &[Duration], window: Duration) -> (usize, f64) {
    let mut t: Vec<Duration> = times.to_vec();
    t.sort();
    let mut max = 0;
    let mut j = 0;
    for i in 0..t.len() {
        while j < t.len() && t[j] < t[i] + window {
            j += 1;
        }
        max = max.max(j - i);
    }
    let mean = if t.len() >= 2 {
        (t.len() - 1) as f64 / (t[t.len() - 1] - t[0]).as_secs_f64()
    } else {
        0.0
    };
    (max, mean)
}

/// Calls per operation, for messages.
pub fn count_by_op(calls: &[Call]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for c in calls {
        *m.entry(c.op.clone()).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal upstream that answers every request 200 with a JSON body
    /// naming the path, closing each connection as moto does.
    fn echo_upstream() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().expect("clone");
                    let mut r = BufReader::new(conn);
                    if let Ok(Some(req)) = read_request(&mut r) {
                        let body = serde_json::to_vec(&json!({
                            "path": req.path, "len": req.body.len()
                        }))
                        .expect("JSON");
                        let _ = write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = w.write_all(&body);
                    }
                });
            }
        });
        port
    }

    /// Sends `n` calls over one keep-alive connection (reconnecting after a
    /// drop) and returns how many answers came back, by status.
    fn send_many(port: u16, n: usize) -> (BTreeMap<u16, usize>, usize) {
        let mut statuses = BTreeMap::new();
        let mut drops = 0;
        let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
        for i in 0..n {
            let (w, r) = conn.get_or_insert_with(|| {
                let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                let r = BufReader::new(s.try_clone().expect("clone"));
                (s, r)
            });
            let body = format!("{{\"n\":{i}}}");
            let req = format!(
                "POST /things/t{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            w.write_all(req.as_bytes()).expect("write");
            match read_response(r) {
                Ok(resp) => *statuses.entry(resp.status).or_default() += 1,
                Err(_) => {
                    drops += 1;
                    conn = None;
                }
            }
        }
        (statuses, drops)
    }

    #[test]
    fn routes_name_the_operations_the_station_calls() {
        for (m, p, want) in [
            ("POST", "/things/sensor-1", "CreateThing"),
            ("POST", "/things", "RegisterThing"),
            ("GET", "/things?maxResults=10", "ListThings"),
            ("PUT", "/things/sensor-1/principals", "AttachThingPrincipal"),
            ("GET", "/things/sensor-1/principals", "ListThingPrincipals"),
            (
                "PUT",
                "/thing-groups/addThingToThingGroup",
                "AddThingToThingGroup",
            ),
            ("POST", "/thing-groups/line-1", "CreateThingGroup"),
            ("PUT", "/target-policies/SensorPolicy", "AttachPolicy"),
            (
                "POST",
                "/attached-policies/arn%3Aaws%3Aiot%3Aus-east-1%3A1%3Acert%2Fab",
                "ListAttachedPolicies",
            ),
            (
                "POST",
                "/certificate/register-no-ca",
                "RegisterCertificateWithoutCA",
            ),
            ("POST", "/certificate/register", "RegisterCertificate"),
            ("POST", "/certificates", "CreateCertificateFromCsr"),
            ("POST", "/cacertificate", "RegisterCACertificate"),
            (
                "GET",
                "/provisioning-templates/Fleet",
                "DescribeProvisioningTemplate",
            ),
        ] {
            assert_eq!(operation(m, p), want, "{m} {p}");
        }
        assert!(operation("GET", "/nothing/here").starts_with("Unknown"));
    }

    #[test]
    fn a_throttled_answer_has_the_aws_header_and_body() {
        let up = echo_upstream();
        let proxy = Proxy::start(
            up,
            Faults {
                throttle: 1.0,
                ..Faults::none()
            },
        );
        let r = http_call(proxy.port, "POST", "/things/t1", &[], b"{}").expect("call");
        assert_eq!(r.status, 400);
        assert_eq!(r.header("x-amzn-errortype"), Some("ThrottlingException"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json(), json!({"message": "Rate exceeded"}));
        let calls = proxy.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].op, "CreateThing");
        assert_eq!(calls[0].outcome, Outcome::Throttled);
        assert!(proxy.forwarded_times("CreateThing").is_empty());
    }

    #[test]
    fn a_server_error_is_a_500_with_the_aws_error_type() {
        let up = echo_upstream();
        let proxy = Proxy::start(
            up,
            Faults {
                server_error: 1.0,
                ..Faults::none()
            },
        );
        let r = http_call(proxy.port, "GET", "/things/t1", &[], b"").expect("call");
        assert_eq!(r.status, 500);
        assert_eq!(
            r.header("x-amzn-errortype"),
            Some("InternalFailureException")
        );
        assert!(r.json()["message"].is_string());
    }

    #[test]
    fn forwarded_calls_reach_upstream_with_their_body_and_are_timestamped() {
        let up = echo_upstream();
        let proxy = Proxy::start(up, Faults::none());
        let (statuses, drops) = send_many(proxy.port, 20);
        assert_eq!((statuses.get(&200).copied(), drops), (Some(20), 0));
        let times = proxy.forwarded_times("CreateThing");
        assert_eq!(times.len(), 20);
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        let calls = proxy.calls();
        assert_eq!(calls[3].json(), json!({"n": 3}));
        let r = http_call(proxy.port, "POST", "/things/x?y=1", &[], b"abc").expect("call");
        assert_eq!(r.json(), json!({"path": "/things/x?y=1", "len": 3}));
    }

    #[test]
    fn a_dropped_call_gets_no_answer_and_drop_after_still_reaches_upstream() {
        let up = echo_upstream();
        let proxy = Proxy::start(
            up,
            Faults {
                drop_before: 1.0,
                ..Faults::none()
            },
        );
        assert!(http_call(proxy.port, "POST", "/things/a", &[], b"{}").is_err());
        assert_eq!(proxy.calls()[0].outcome, Outcome::DroppedBefore);
        proxy.set_faults(Faults {
            drop_after: 1.0,
            ..Faults::none()
        });
        assert!(http_call(proxy.port, "POST", "/things/b", &[], b"{}").is_err());
        assert_eq!(proxy.calls()[1].outcome, Outcome::DroppedAfter(200));
        assert_eq!(proxy.forwarded_times("CreateThing").len(), 1);
    }

    #[test]
    fn fault_shares_are_honoured_over_many_calls_with_a_fixed_seed() {
        const N: usize = 4000;
        let up = echo_upstream();
        let faults = Faults {
            throttle: 0.30,
            server_error: 0.05,
            drop_before: 0.03,
            drop_after: 0.02,
            seed: 42,
            only: None,
        };
        let proxy = Proxy::start(up, faults.clone());
        let (statuses, drops) = send_many(proxy.port, N);
        let share = |k: usize| k as f64 / N as f64;
        // Binomial standard deviation at N = 4000 is under 0.008; allow 3.
        let tol = 0.025;
        let throttled = statuses.get(&400).copied().unwrap_or(0);
        let errors = statuses.get(&500).copied().unwrap_or(0);
        assert!(
            (share(throttled) - 0.30).abs() < tol,
            "throttled {throttled}/{N}"
        );
        assert!((share(errors) - 0.05).abs() < tol, "500s {errors}/{N}");
        assert!((share(drops) - 0.05).abs() < tol, "drops {drops}/{N}");
        let ok = statuses.get(&200).copied().unwrap_or(0);
        assert_eq!(ok + throttled + errors + drops, N);
        let tally = proxy.tally();
        let t = &tally["CreateThing"];
        assert_eq!(t.get("throttled"), Some(&throttled));
        assert_eq!(
            t.get("dropped-before").unwrap_or(&0) + t.get("dropped-after").unwrap_or(&0),
            drops
        );

        // The same seed draws the same faults in the same order.
        let again = Proxy::start(up, faults);
        let (statuses2, drops2) = send_many(again.port, N);
        assert_eq!((statuses2, drops2), (statuses, drops));
    }

    #[test]
    fn faults_limited_to_some_operations_leave_the_others_alone() {
        let up = echo_upstream();
        let proxy = Proxy::start(
            up,
            Faults {
                throttle: 1.0,
                only: Some(vec!["AttachPolicy".into()]),
                ..Faults::none()
            },
        );
        let a = http_call(proxy.port, "POST", "/things/a", &[], b"{}").expect("call");
        let b = http_call(
            proxy.port,
            "PUT",
            "/target-policies/SensorPolicy",
            &[],
            b"{}",
        )
        .expect("call");
        assert_eq!((a.status, b.status), (200, 400));
    }

    #[test]
    fn canned_provisioning_templates_behave_as_the_api_reference_says() {
        let up = echo_upstream();
        let proxy = Proxy::start(up, Faults::none());
        let missing =
            http_call(proxy.port, "GET", "/provisioning-templates/Fleet", &[], b"").expect("call");
        assert_eq!(missing.status, 404);
        assert_eq!(
            missing.header("x-amzn-errortype"),
            Some("ResourceNotFoundException")
        );
        let body = json!({
            "templateName": "Fleet",
            "templateBody": "{\"Resources\":{}}",
            "provisioningRoleArn": "arn:aws:iam::123456789012:role/R",
            "enabled": true,
        });
        let created = http_call(
            proxy.port,
            "POST",
            "/provisioning-templates",
            &[("Content-Type", "application/json")],
            &serde_json::to_vec(&body).expect("JSON"),
        )
        .expect("call");
        assert_eq!(created.status, 200);
        assert_eq!(
            created.json()["templateArn"],
            json!("arn:aws:iot:us-east-1:123456789012:provisioningtemplate/Fleet")
        );
        let again = http_call(
            proxy.port,
            "POST",
            "/provisioning-templates",
            &[],
            &serde_json::to_vec(&body).expect("JSON"),
        )
        .expect("call");
        assert_eq!(again.status, 409);
        let d =
            http_call(proxy.port, "GET", "/provisioning-templates/Fleet", &[], b"").expect("call");
        assert_eq!(d.status, 200);
        let d = d.json();
        assert_eq!(d["templateBody"], body["templateBody"]);
        assert_eq!(d["provisioningRoleArn"], body["provisioningRoleArn"]);
        assert_eq!(d["enabled"], json!(true));
        assert_eq!(proxy.calls_of("CreateProvisioningTemplate").len(), 2);
        assert!(proxy
            .calls()
            .iter()
            .all(|c| matches!(c.outcome, Outcome::Canned(_))));
    }

    #[test]
    fn window_stats_count_the_busiest_second_and_the_mean() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        // 11 calls 100 ms apart: 10 in any one second, 10/s on average.
        let t = ms(&[0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]);
        assert_eq!(window_stats(&t, Duration::from_secs(1)), (10, 10.0));
        // A burst of 3 at the start.
        let t = ms(&[0, 1, 2, 500, 1500]);
        let (max, _) = window_stats(&t, Duration::from_secs(1));
        assert_eq!(max, 4);
    }
}
