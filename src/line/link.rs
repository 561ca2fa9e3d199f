//! Stop-and-wait requests over a [`Transport`] (protocol section 6).
//!
//! One request outstanding at a time. A request that gets no answer within
//! its timeout is sent again with the same seq (the device answers a
//! duplicate from its cache); `Nak{Busy}` is retried after a growing pause
//! without counting as a try. Frames that do not decode, answers to another
//! seq and request-type frames are ignored. Framing is `provline::device`'s.

use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

use super::transport::Transport;
use crate::device::{
    encode, ErrorCode, Flags, Frame, FrameDecoder, Message, MIN_MAX_FRAME, PROTOCOL_VERSION,
};

/// The receive limit the station announces in its `Hello`.
pub const STATION_MAX_FRAME: u16 = 4096;
/// First pause after `Nak{Busy}`; it doubles up to [`BUSY_MAX`].
const BUSY_FIRST: Duration = Duration::from_millis(100);
/// Longest pause after `Nak{Busy}`.
const BUSY_MAX: Duration = Duration::from_secs(2);
/// How long a device may stay busy on one request before it counts as stuck.
const BUSY_LIMIT: Duration = Duration::from_secs(150);

/// On a link where damaged frames arrived, a request gets this many times
/// the tries: the device is alive and the line is noisy.
const NOISY_TRIES: u32 = 4;

/// What one wait for an answer brought.
enum Waited {
    /// The answer to the outstanding request.
    Answer(Message),
    /// Nothing that decoded, and no damaged frame either.
    Silent,
    /// Frames arrived but did not decode (noise): the device is there.
    Damaged,
}

/// How patient the station is with a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTiming {
    /// The line's baud rate (10 bits per byte); 0 for USB, where it is ignored.
    pub baud: u32,
    /// The fixed part of an ordinary request's timeout (250 ms serial, 500 ms USB).
    pub base: Duration,
    /// Tries per request (the first and the retries); four times as many
    /// once the link has seen damaged frames (a noisy line).
    pub tries: u32,
}

impl Default for LinkTiming {
    fn default() -> Self {
        LinkTiming {
            baud: 115_200,
            base: Duration::from_millis(250),
            tries: 10,
        }
    }
}

impl LinkTiming {
    /// Time `bytes` take on the wire at the line's baud rate.
    pub fn wire_time(&self, bytes: usize) -> Duration {
        if self.baud == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(bytes as f64 * 10.0 / f64::from(self.baud))
    }
}

/// What went wrong on the link, before any message meaning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Reading or writing the port failed.
    #[error("port {port}: {op}: {source}")]
    Io {
        /// The port.
        port: String,
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Every try of a request went unanswered.
    #[error("port {port}: no response to {request} after {tries} tries")]
    NoResponse {
        /// The port.
        port: String,
        /// The request's name.
        request: &'static str,
        /// Tries made.
        tries: u32,
    },
    /// The device answered `Busy` for longer than the station waits.
    #[error("port {port}: device busy for {waited:?} on {request}")]
    Busy {
        /// The port.
        port: String,
        /// The request's name.
        request: &'static str,
        /// How long it waited.
        waited: Duration,
    },
    /// A message could not be encoded (a bug: the station built it).
    #[error("port {port}: cannot encode {request}: {reason}")]
    Encode {
        /// The port.
        port: String,
        /// The request's name.
        request: &'static str,
        /// Why.
        reason: String,
    },
    /// The run was stopped (Ctrl-C).
    #[error("port {port}: stopped")]
    Stopped {
        /// The port.
        port: String,
    },
}

/// Counters of what the link saw, for the summary and the benches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Requests sent, retries included.
    pub sent: u64,
    /// Retries after a timeout.
    pub retries: u64,
    /// Frames dropped: bad CRC, bad COBS, too long, wrong seq.
    pub dropped: u64,
    /// Of those, frames that did not decode (noise on the line).
    pub damaged: u64,
    /// Bytes written to the port.
    pub bytes_out: u64,
    /// Bytes read from the port.
    pub bytes_in: u64,
}

/// The station's end of one link: the port, the decoder, the next seq.
pub struct Link<'a, T: Transport + ?Sized> {
    port: &'a mut T,
    decoder: FrameDecoder,
    seq: u16,
    peer_max_frame: u16,
    timing: LinkTiming,
    rng: SystemRandom,
    buf: Vec<u8>,
    stats: LinkStats,
    stop: &'a dyn Fn() -> bool,
}

impl<T: Transport + ?Sized> std::fmt::Debug for Link<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("port", &self.port.name())
            .field("seq", &self.seq)
            .field("peer_max_frame", &self.peer_max_frame)
            .finish_non_exhaustive()
    }
}

/// The name of a request, for errors.
pub fn request_name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::GenerateKey { .. } => "GenerateKey",
        Message::WriteBegin { .. } => "WriteBegin",
        Message::WriteChunk { .. } => "WriteChunk",
        Message::WriteEnd { .. } => "WriteEnd",
        Message::ReadBegin { .. } => "ReadBegin",
        Message::ReadChunk { .. } => "ReadChunk",
        Message::ReadDigest { .. } => "ReadDigest",
        Message::Prove { .. } => "Prove",
        Message::Commit => "Commit",
        Message::Abort => "Abort",
        Message::Reset => "Reset",
        Message::ReadDigestSet { .. } => "ReadDigestSet",
        _ => "response",
    }
}

impl<'a, T: Transport + ?Sized> Link<'a, T> {
    /// A link over `port`; `stop` is polled between tries.
    pub fn new(port: &'a mut T, timing: LinkTiming, stop: &'a dyn Fn() -> bool) -> Self {
        Link {
            port,
            decoder: FrameDecoder::new(usize::from(STATION_MAX_FRAME)),
            seq: 0,
            peer_max_frame: MIN_MAX_FRAME,
            timing,
            rng: SystemRandom::new(),
            buf: vec![0; 4096],
            stats: LinkStats::default(),
            stop,
        }
    }

    /// The port's name.
    pub fn port(&self) -> &str {
        self.port.name()
    }

    /// The device's receive limit (64 until a `HelloReply` said otherwise).
    pub fn peer_max_frame(&self) -> u16 {
        self.peer_max_frame
    }

    /// What the link has seen so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// The timing in use.
    pub fn timing(&self) -> LinkTiming {
        self.timing
    }

    /// Opens (or reopens) the session: flushes the device's receiver with a
    /// lone 0x00, sends `Hello` under a fresh random seq and returns the
    /// `HelloReply` (or whatever else the device answered).
    pub fn hello(&mut self, station_nonce: [u8; 16]) -> Result<Message, LinkError> {
        self.decoder.clear();
        let mut seq = [0u8; 2];
        let _ = self.rng.fill(&mut seq);
        self.seq = u16::from_le_bytes(seq);
        self.peer_max_frame = MIN_MAX_FRAME;
        self.write(&[0], "flushing the device's receiver")?;
        let hello = Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            max_frame: STATION_MAX_FRAME,
            station_nonce: Some(station_nonce),
        };
        let reply = self.exchange(hello, 128, None, None)?;
        if let Message::HelloReply { max_frame, .. } = &reply {
            self.peer_max_frame = (*max_frame).max(MIN_MAX_FRAME);
        }
        Ok(reply)
    }

    /// Sends `request` under the next seq and returns the device's answer.
    /// `response_bound` is the most wire bytes the answer may take (for the
    /// timeout); `timeout` overrides the ordinary timeout (key generation,
    /// commit).
    pub fn request(
        &mut self,
        request: Message,
        response_bound: usize,
        timeout: Option<Duration>,
    ) -> Result<Message, LinkError> {
        self.seq = self.seq.wrapping_add(1);
        self.exchange(request, response_bound, timeout, None)
    }

    /// [`Link::request`] giving up after at most `tries` tries, so that
    /// the caller can send something else instead (a shorter chunk: on a
    /// noisy line a long frame may never get through whole, and a retry
    /// must repeat the same bytes).
    pub fn request_tries(
        &mut self,
        request: Message,
        response_bound: usize,
        tries: u32,
    ) -> Result<Message, LinkError> {
        self.seq = self.seq.wrapping_add(1);
        self.exchange(request, response_bound, None, Some(tries))
    }

    fn exchange(
        &mut self,
        request: Message,
        response_bound: usize,
        timeout: Option<Duration>,
        cap: Option<u32>,
    ) -> Result<Message, LinkError> {
        let name = request_name(&request);
        let encode_err = |e: crate::device::EncodeError| LinkError::Encode {
            port: self.port.name().to_string(),
            request: name,
            reason: e.to_string(),
        };
        let mut frame = Frame::new(self.seq, request);
        let first = encode(&frame).map_err(encode_err)?;
        frame.flags = Flags::RETRANSMIT;
        let again = encode(&frame).map_err(encode_err)?;
        let timeout = timeout.unwrap_or_else(|| {
            self.timing.base + self.timing.wire_time(first.len() + response_bound)
        });
        let mut tries = 0;
        let limit = self.timing.tries.max(1);
        let mut busy_pause = BUSY_FIRST;
        let mut busy_since: Option<Instant> = None;
        loop {
            if (self.stop)() {
                return Err(LinkError::Stopped {
                    port: self.port.name().to_string(),
                });
            }
            // A line that has shown damaged frames is noisy, not dead: a
            // request then gets more tries before the device counts as gone.
            let budget = if self.stats.damaged > 0 {
                limit.saturating_mul(NOISY_TRIES)
            } else {
                limit
            };
            let budget = cap.map_or(budget, |cap| budget.min(cap.max(1)));
            if tries >= budget {
                return Err(LinkError::NoResponse {
                    port: self.port.name().to_string(),
                    request: name,
                    tries,
                });
            }
            let wire = if tries == 0 && busy_since.is_none() {
                &first
            } else {
                &again
            };
            self.write(wire, "writing a request")?;
            self.stats.sent += 1;
            match self.await_response(timeout)? {
                Waited::Answer(Message::Nak {
                    code: ErrorCode::Busy,
                }) => {
                    let since = *busy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > BUSY_LIMIT {
                        return Err(LinkError::Busy {
                            port: self.port.name().to_string(),
                            request: name,
                            waited: since.elapsed(),
                        });
                    }
                    std::thread::sleep(busy_pause);
                    busy_pause = (busy_pause * 2).min(BUSY_MAX);
                }
                Waited::Answer(answer) => return Ok(answer),
                Waited::Silent => {
                    tracing::debug!(port = %self.port.name(), request = name, seq = self.seq, tries, "no answer");
                    tries += 1;
                    self.stats.retries += 1;
                }
                Waited::Damaged => {
                    tracing::debug!(port = %self.port.name(), request = name, seq = self.seq, tries, "damaged answer");
                    tries += 1;
                    self.stats.retries += 1;
                }
            }
        }
    }

    /// Reads until the answer to the outstanding seq arrives or `timeout` passes.
    fn await_response(&mut self, timeout: Duration) -> Result<Waited, LinkError> {
        let mut deadline = Instant::now() + timeout;
        let mut damaged = false;
        loop {
            while let Some(next) = self.decoder.next_frame() {
                match next {
                    Ok(frame) if frame.seq == self.seq && !frame.message.is_request() => {
                        return Ok(Waited::Answer(frame.message));
                    }
                    Ok(_) => self.stats.dropped += 1,
                    Err(_) => {
                        self.stats.dropped += 1;
                        self.stats.damaged += 1;
                        damaged = true;
                        // The answer may be the frame just destroyed: a long
                        // timeout (key generation) need not run out before
                        // the retry, the device answers it from its cache.
                        deadline = deadline.min(Instant::now() + self.timing.base);
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(if damaged {
                    Waited::Damaged
                } else {
                    Waited::Silent
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            let n = self
                .port
                .read(&mut self.buf, wait)
                .map_err(|source| LinkError::Io {
                    port: self.port.name().to_string(),
                    op: "reading",
                    source,
                })?;
            if n > 0 {
                self.stats.bytes_in += n as u64;
                self.decoder.push(&self.buf[..n]);
            } else if (self.stop)() {
                return Err(LinkError::Stopped {
                    port: self.port.name().to_string(),
                });
            }
        }
    }

    fn write(&mut self, bytes: &[u8], op: &'static str) -> Result<(), LinkError> {
        self.stats.bytes_out += bytes.len() as u64;
        self.port.write_all(bytes).map_err(|source| LinkError::Io {
            port: self.port.name().to_string(),
            op,
            source,
        })
    }
}
