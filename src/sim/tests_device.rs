//! Unit tests of the device state machine against the protocol page.
