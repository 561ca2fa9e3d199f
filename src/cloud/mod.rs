//! What AWS IoT Core needs from the station. Today: checking a JITP
//! provisioning template against the certificate profile before any
//! device is issued.

pub mod limits;
pub mod retry;
pub mod template;
