//! What AWS IoT Core needs from the station: one-time account setup,
//! per-device registration, verification, all paced per API.
//!
//! ```text
//! cli ──> config (station TOML) ──> setup (plan, then look-then-create)
//!    └──> register (steps per mode, each a ledger record) ──┐
//!    └──> verify (ledger vs DescribeThing / ListThingPrincipals)
//!                                                           ▼
//!          Cloud = Registry + limits (one limiter per API, AIMD) + retry
//!                     │
//!                     └── aws (aws-sdk-iot, SDK retries off)
//! ```
//!
//! - [`registry`]: the [`registry::Registry`] trait (every call, typed),
//!   [`registry::Cloud`] (a registry behind the limiters and the retry
//!   policy) and [`registry::CloudError`] (API, device, what);
//! - [`aws`]: the registry over aws-sdk-iot and aws-config's default chain;
//! - [`config`]: the station configuration file;
//! - [`setup`]: `cloud setup`;
//! - [`register`]: per-device registration steps, resumable from the ledger;
//! - [`verify`]: `cloud verify`;
//! - [`limits`], [`retry`]: pacing and retries;
//! - [`template`]: JITP template checks against the certificate profile;
//! - [`cli`]: clap arguments and the functions the binary calls.

pub mod aws;
pub mod cli;
pub mod config;
pub mod limits;
pub mod register;
pub mod registry;
pub mod retry;
pub mod setup;
pub mod template;
pub mod verify;
