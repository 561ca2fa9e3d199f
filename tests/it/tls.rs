//! A real TLS client-auth handshake: mosquitto, trusting only the station CA,
//! accepts the issued credentials and turns away a certificate from another CA.

use std::path::{Path, PathBuf};

use crate::util::broker::Broker;
use crate::util::*;

/// Issues one device with a station-made key of `key` under a fresh CA.
fn issue(tmp: &Path, name: &str, ca_key: &str, key: &str) -> (PathBuf, PathBuf) {
    let ca = init_ca(tmp, &format!("ca-{name}"), ca_key);
    let job = tmp.join(format!("job-{name}.csv"));
    write_job(&job, "serial", &[format!("SN-TLS-{name}")]);
    let out = tmp.join(format!("out-{name}"));
    let opts = ["--key", key, "--thing-name-pattern", "tls_{serial}"];
    batch(tmp, &job, &ca, &out, &opts).expect_code(0);
    (ca, out.join(format!("tls_SN-TLS-{name}")))
}

#[test]
fn mosquitto_requiring_client_certs_accepts_issued_credentials() {
    let tmp = tempdir();
    for (ca_key, key) in [("p256", "p256"), ("rsa2048", "p384"), ("p384", "rsa2048")] {
        let name = format!("{ca_key}-{key}");
        let (ca, dev) = issue(tmp.path(), &name, ca_key, key);
        let broker = Broker::start(&ca.join("ca.pem"));
        let r = broker.publish(&dev.join("cert.pem"), &dev.join("private.key"));
        assert_eq!(
            r.code,
            0,
            "{name}: broker refused a station-issued client certificate\n{r}\n--- broker log ---\n{}",
            broker.log_text()
        );
        // The chain file works as the client certificate too.
        let r = broker.publish(&dev.join("chain.pem"), &dev.join("private.key"));
        assert_eq!(
            r.code,
            0,
            "{name}: chain.pem as client cert\n{r}\n{}",
            broker.log_text()
        );
    }
}

#[test]
fn mosquitto_rejects_a_client_cert_from_another_ca() {
    let tmp = tempdir();
    let (ca, good) = issue(tmp.path(), "trusted", "p256", "p256");
    let (_other_ca, stranger) = issue(tmp.path(), "other", "p256", "p256");
    let broker = Broker::start(&ca.join("ca.pem"));
    let r = broker.publish(&stranger.join("cert.pem"), &stranger.join("private.key"));
    assert_ne!(
        r.code,
        0,
        "broker accepted a certificate from a CA it does not trust\n{r}\n{}",
        broker.log_text()
    );
    // The same broker still accepts the trusted device: the refusal was about the CA.
    let r = broker.publish(&good.join("cert.pem"), &good.join("private.key"));
    assert_eq!(
        r.code,
        0,
        "trusted device refused\n{r}\n{}",
        broker.log_text()
    );
}
