//! A mosquitto broker on 127.0.0.1 that demands a client certificate issued
//! by the station CA, with its own server certificate from a throwaway CA.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{openssl, run_tool, which, Run};

/// A running broker; killed on drop.
pub struct Broker {
    child: Child,
    pub port: u16,
    /// The CA that issued the broker's server certificate: clients trust it.
    pub server_ca: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

const INSTALL: &str = "install Debian's `mosquitto` and `mosquitto-clients` packages \
                       (apt-get install mosquitto mosquitto-clients; bash .ci/run does)";

impl Broker {
    /// Starts a TLS listener whose client CA file is `client_ca`.
    pub fn start(client_ca: &Path) -> Broker {
        let Some(bin) = which("mosquitto".as_ref()).or_else(|| {
            let p = PathBuf::from("/usr/sbin/mosquitto");
            p.is_file().then_some(p)
        }) else {
            panic!("verifier `mosquitto` is not installed: {INSTALL}");
        };
        let dir = super::tempdir();
        let d = dir.path();
        make_server_cert(d);
        fs::copy(client_ca, d.join("client-ca.pem")).expect("copy client CA");
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let conf = d.join("mosquitto.conf");
            fs::write(
                &conf,
                format!(
                    "user root\n\
                     persistence false\n\
                     log_dest stderr\n\
                     log_type all\n\
                     per_listener_settings false\n\
                     allow_anonymous true\n\
                     listener {port} 127.0.0.1\n\
                     cafile {ca}\n\
                     certfile {cert}\n\
                     keyfile {key}\n\
                     require_certificate true\n\
                     use_identity_as_username true\n",
                    ca = d.join("client-ca.pem").display(),
                    cert = d.join("server.pem").display(),
                    key = d.join("server.key").display(),
                ),
            )
            .expect("write mosquitto.conf");
            let log = d.join(format!("mosquitto-{port}.log"));
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).expect("log file"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            if wait_ready(&mut child, port, Duration::from_secs(10)) {
                return Broker {
                    child,
                    port,
                    server_ca: d.join("server-ca.pem"),
                    log,
                    _dir: dir,
                };
            }
            // The port was taken meanwhile, or the broker stopped: log and retry.
            let _ = child.kill();
            let _ = child.wait();
            last_err = fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("mosquitto did not start:\n{last_err}");
    }

    /// What the broker logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects with `mosquitto_pub` over TLS using a client certificate and
    /// key, and publishes one message. Exit code 0 means the broker accepted
    /// the client certificate.
    pub fn publish(&self, cert: &Path, key: &Path) -> Run {
        let port = self.port.to_string();
        run_tool(
            "mosquitto_pub",
            &[
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                port.as_ref(),
                "--cafile".as_ref(),
                self.server_ca.as_os_str(),
                "--cert".as_ref(),
                cert.as_os_str(),
                "--key".as_ref(),
                key.as_os_str(),
                "-i".as_ref(),
                "provline-test".as_ref(),
                "-t".as_ref(),
                "provline/test".as_ref(),
                "-m".as_ref(),
                "hello".as_ref(),
                "-q".as_ref(),
                "1".as_ref(),
            ],
            Path::new("/"),
            INSTALL,
        )
    }
}

fn wait_ready(child: &mut Child, port: u16, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A throwaway CA and a server certificate for 127.0.0.1, made by openssl.
fn make_server_cert(d: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca_args = vec!["req", "-x509"];
    ca_args.extend(ec);
    ca_args.extend([
        "-keyout",
        "server-ca.key",
        "-out",
        "server-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Broker Test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(d, &ca_args).expect_code(0);
    let mut req = vec!["req"];
    req.extend(ec);
    req.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(d, &req).expect_code(0);
    fs::write(
        d.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write server.ext");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "server-ca.pem",
            "-CAkey",
            "server-ca.key",
            "-set_serial",
            "0x5eed01",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    )
    .expect_code(0);
}
