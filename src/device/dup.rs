//! Duplicate detection on the device side.
//!
//! The station retries a request with the same seq when no answer came; the
//! answer may have been lost rather than the request. The device keeps the
//! seq of the last request it carried out and the response it sent: the
//! same seq again gets the same response, without carrying the request out a
//! second time. `Hello` is never a duplicate: it opens a new session and
//! replaces whatever was kept. Before the first `Hello` nothing else is
//! allowed.

use super::codec::Frame;
use super::message::Message;
use super::values::ErrorCode;

/// What to do with a request, by its seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// A new request: carry it out, then [`DuplicateFilter::record`] the response.
    Fresh,
    /// A retry of the last request: send this response again, do nothing else.
    Duplicate(&'a Frame),
    /// No session yet (power-up, `Reset`): answer `Nak{NotAllowedInState}`
    /// (not recorded); the station must send `Hello` first.
    NeedHello,
    /// Neither the last seq nor the next: answer `Nak{BadSequence}` (not recorded).
    OutOfSequence {
        /// The seq the device expected.
        expected: u16,
    },
}

/// The last request's seq and the response sent for it.
#[derive(Debug, Clone, Default)]
pub struct DuplicateFilter {
    last: Option<Frame>,
}

impl DuplicateFilter {
    /// An empty filter (after power-up): the next request must be `Hello`.
    pub fn new() -> DuplicateFilter {
        DuplicateFilter::default()
    }

    /// Judges a request by its seq.
    pub fn check(&self, request: &Frame) -> Verdict<'_> {
        if matches!(request.message, Message::Hello { .. }) {
            return Verdict::Fresh;
        }
        match &self.last {
            None => Verdict::NeedHello,
            Some(last) if last.seq == request.seq => Verdict::Duplicate(last),
            Some(last) if last.seq.wrapping_add(1) == request.seq => Verdict::Fresh,
            Some(last) => Verdict::OutOfSequence {
                expected: last.seq.wrapping_add(1),
            },
        }
    }

    /// Records the response to a fresh request and returns it, as a frame
    /// that echoes the request's seq.
    pub fn record(&mut self, request_seq: u16, response: Message) -> &Frame {
        self.last.insert(Frame::new(request_seq, response))
    }

    /// The response for a request that is out of sequence (not recorded).
    /// `Nak{Busy}` is not recorded either: the retry must be carried out.
    pub fn bad_sequence(request_seq: u16) -> Frame {
        Frame::new(
            request_seq,
            Message::Nak {
                code: ErrorCode::BadSequence,
            },
        )
    }

    /// The seq of the last request carried out, if any.
    pub fn last_seq(&self) -> Option<u16> {
        self.last.as_ref().map(|f| f.seq)
    }

    /// Forgets everything (power-up, `Reset`).
    pub fn clear(&mut self) {
        self.last = None;
    }
}
