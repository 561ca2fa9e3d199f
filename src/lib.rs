//! provline: a factory provisioning station for AWS IoT Core.
//!
//! A device passes through these stages, each a module:
//!
//! ```text
//!  job CSV rows ──> job ──> keygen (station key) ──┐
//!                     └───> csr (device's CSR) ────┴─> ca (sign) ──> output (bundle, manifest)
//!                                                        │
//!          ledger: planned -> intent -> issued -> [registered] -> delivered, committed before each next step
//!                                                  │
//!                         cloud: paced AWS IoT calls (setup, per-device registration, verify)
//!
//!  a device on a serial port ──> line: one session per port (hello, the device's CSR or a
//!                                station key, ca (sign), write, read back, prove), each step
//!                                in the ledger; device: the frames and messages on the wire
//! ```
//!
//! - [`job`]: the job CSV, row by row, each row checked and numbered;
//! - [`keygen`]: device key pairs made by the station;
//! - [`csr`]: CSRs made by devices, verified and checked against the allowlist;
//! - [`ca`]: the local CA, its signer, the certificate profile, issuance;
//! - [`device`]: the line's link protocol to devices: frames, messages, chunked transfers;
//! - [`mod@line`]: `provline flash`: a provisioning session per port, over a [`line::Transport`];
//! - [`sim`]: simulated devices on pseudo-terminals (`provline device-sim`);
//! - [`cloud`]: AWS IoT Core: account setup, per-device registration, verification, pacing;
//! - [`ledger`]: the durable record of every device and certificate (SQLite);
//! - [`output`]: device bundles, the manifest and bulk-registration JSONL, written atomically;
//! - [`pipeline`]: a batch job from rows to bundles on every core;
//! - [`progress`]: the live bar and the summary;
//! - [`mod@bench`]: throughput of each stage against the raw crypto it rests on.
//!
//! Edges are traits: the CA [`ca::signer::Signer`], the [`clock::Clock`],
//! AWS IoT [`cloud::registry::Registry`] and the serial port
//! [`line::Transport`].
#![forbid(unsafe_code, unused_must_use)]
#![warn(missing_docs)]

pub mod bench;
pub mod ca;
pub mod clock;
pub mod cloud;
pub mod csr;
pub mod device;
pub mod fsx;
pub mod job;
pub mod keygen;
pub mod ledger;
pub mod line;
pub mod output;
pub mod pipeline;
pub mod progress;
pub mod sim;

/// PEM with LF line endings and 64-column base64, as openssl writes it.
pub fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
