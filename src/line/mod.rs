//! The line: the station's side of provisioning devices on serial and USB
//! ports, over the link protocol of [`crate::device`].
//!
//! ```text
//!  flash: one thread per port ──> Station::provision (session states)
//!                                    │ stop-and-wait requests (link)
//!                                    ▼
//!                              Transport (serial port, pty) <──> device
//! ```
//!
//! - [`transport`]: the [`Transport`] trait at the edge and the serial port behind it;
//! - [`link`]: one request outstanding, retries under the same seq, `Busy` pauses;
//! - [`session`]: the provisioning session as explicit states, every step in the ledger;
//! - [`flash`]: `provline flash`: ports, claims, `--watch`, the report;
//! - [`view`]: the live view, one line per port.

pub mod flash;
pub mod link;
pub mod session;
pub mod transport;
pub mod view;

#[cfg(test)]
mod tests;

pub use flash::{FlashArgs, FlashError, FlashReport};
pub use link::{Link, LinkError, LinkStats, LinkTiming};
pub use session::{
    Claims, Failure, KeyMode, Observer, Passed, Quiet, SessionConfig, SessionError, Station, Step,
};
pub use transport::{SerialTransport, Transport};
