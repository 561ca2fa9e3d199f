//! The device's end of the wire: reads the pseudo-terminal's master side,
//! decodes frames with [`FrameDecoder`], paces itself to the baud rate,
//! injects faults, and hands requests to the [`Device`].
//!
//! ```text
//!  pty master ──read──> [reset/stall at N bytes] ──corrupt──> rx clock ──> FrameDecoder
//!     ──> [drop] ──> wait for the rx clock ──> Device::on_frame ──> [drop]
//!     ──> encode (or garbage) ──corrupt──> paced write ──> pty master
//! ```
//!
//! Pacing: a byte costs 10 bits / baud on the wire. Received bytes are
//! charged to a receive clock as they arrive and a frame is acted on only
//! when its last byte could have arrived; sent bytes go out in slices of
//! about 2 ms, each written when the wire would have carried it. Reads wait
//! in `poll` with a timeout, so an idle device costs no CPU.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serialport::{SerialPort, TTYPort};

use crate::device::{encode, DecodeError, Frame, FrameDecoder, Item, Message};
use crate::fsx;

use super::device::Device;
use super::faults::{FaultCounts, Faults, Rng};
use super::{item_file_name, SimConfig, SimError, Stored};

/// How long a read waits before the loop looks at the stop flag again.
pub const POLL: Duration = Duration::from_millis(50);
/// A partial frame is dropped after this long without a byte (section 6).
pub const PARTIAL_FRAME_TIMEOUT: Duration = Duration::from_secs(1);

/// Wire time of one byte at `baud` (10 bits: start, 8 data, stop); zero when unpaced.
pub fn byte_time(baud: u32) -> Duration {
    if baud == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs(10) / baud
    }
}

/// Wire time of `n` bytes.
fn wire_time(per_byte: Duration, n: usize) -> Duration {
    per_byte.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}

fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

/// The receive and send clocks of one side of a UART.
#[derive(Debug)]
pub struct Pacer {
    per_byte: Duration,
    slice: usize,
    rx_done: Instant,
    tx_done: Instant,
}

impl Pacer {
    /// A pacer for `baud` (0: no pacing).
    pub fn new(baud: u32) -> Pacer {
        let now = Instant::now();
        Pacer {
            per_byte: byte_time(baud),
            // About 2 ms of bytes per write.
            slice: usize::try_from(baud / 5000).unwrap_or(1).max(1),
            rx_done: now,
            tx_done: now,
        }
    }

    /// Charges `n` bytes that just arrived to the receive clock.
    pub fn received(&mut self, n: usize) {
        let start = self.rx_done.max(Instant::now());
        self.rx_done = start + wire_time(self.per_byte, n);
    }

    /// Waits until the last byte received so far could have arrived.
    pub fn wait_received(&self) {
        sleep_until(self.rx_done);
    }

    /// Writes `bytes` no faster than the wire carries them.
    pub fn send(&mut self, out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
        if self.per_byte.is_zero() {
            out.write_all(bytes)?;
            return out.flush();
        }
        let mut at = self.tx_done.max(Instant::now());
        for slice in bytes.chunks(self.slice) {
            at += wire_time(self.per_byte, slice.len());
            sleep_until(at);
            out.write_all(slice)?;
        }
        self.tx_done = at;
        out.flush()
    }
}

/// What the link shares with [`super::SimDevice`].
#[derive(Debug)]
pub struct Shared {
    /// The snapshot `stored()` returns.
    pub stored: Mutex<Stored>,
    /// Set to stop the loop.
    pub stop: AtomicBool,
}

/// One simulated device on its pseudo-terminal.
pub struct Link {
    master: TTYPort,
    port: PathBuf,
    device: Device,
    decoder: FrameDecoder,
    pacer: Pacer,
    faults: Faults,
    keygen_time: Duration,
    keygen_due: Option<Instant>,
    rng: Rng,
    counts: FaultCounts,
    bytes_in: u64,
    last_byte: Instant,
    bytes_out: u64,
    frames_in: u64,
    frames_out: u64,
    bad_frames: u64,
    resets: u64,
    reset_fired: bool,
    stored_generation: u64,
    published_generation: u64,
    store_dir: Option<PathBuf>,
    shared: Arc<Shared>,
}

impl Link {
    /// A link over `master` (the pty side the device holds, `port` the side
    /// the station opens) for the device `config` describes.
    pub fn new(master: TTYPort, port: PathBuf, config: &SimConfig, shared: Arc<Shared>) -> Link {
        Link {
            master,
            port,
            device: Device::new(config.profile()),
            decoder: FrameDecoder::new(usize::from(config.max_frame)),
            pacer: Pacer::new(config.baud),
            rng: Rng::new(config.faults.seed),
            faults: config.faults.clone(),
            keygen_time: config.keygen_time,
            keygen_due: None,
            counts: FaultCounts::default(),
            bytes_in: 0,
            last_byte: Instant::now(),
            bytes_out: 0,
            frames_in: 0,
            frames_out: 0,
            bad_frames: 0,
            resets: 0,
            reset_fired: false,
            stored_generation: 0,
            published_generation: 0,
            store_dir: config.store_dir.clone(),
            shared,
        }
    }

    fn serial(&self) -> &str {
        &self.device.profile().serial
    }

    fn io_error(&self, op: &'static str, source: io::Error) -> SimError {
        SimError::Io {
            serial: self.serial().to_string(),
            port: self.port.clone(),
            op,
            source,
        }
    }

    /// Runs until the stop flag is set or the port fails.
    pub fn run(mut self) -> Result<(), SimError> {
        let mut buf = [0u8; 1024];
        while !self.shared.stop.load(Ordering::Relaxed) {
            let mut wait = POLL;
            if let Some(due) = self.keygen_due {
                let now = Instant::now();
                if now >= due {
                    self.finish_generation()?;
                    continue;
                }
                wait = wait.min(due - now);
            }
            self.master
                .set_timeout(wait)
                .map_err(|e| self.io_error("setting the read timeout", e.into()))?;
            match self.master.read(&mut buf) {
                Ok(0) => std::thread::sleep(POLL),
                Ok(n) => self.receive(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => self.idle(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error("reading the pseudo-terminal", e)),
            }
        }
        Ok(())
    }

    /// Nothing arrived for a while: a partial frame older than a second is
    /// dropped, so that the next frame is not glued to a stale start.
    fn idle(&mut self) {
        if self.decoder.buffered() > 0 && self.last_byte.elapsed() >= PARTIAL_FRAME_TIMEOUT {
            self.decoder.clear();
        }
    }

    /// Bytes from the station: faults that count bytes first, then noise,
    /// then the decoder.
    fn receive(&mut self, bytes: &[u8]) -> Result<(), SimError> {
        self.last_byte = Instant::now();
        let before = self.bytes_in;
        self.bytes_in += u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let mut bytes = bytes.to_vec();
        let mut then_reset = false;
        let mut then_stall = false;
        if let Some(limit) = self.faults.reset_after_bytes.filter(|_| !self.reset_fired) {
            if self.bytes_in >= limit {
                bytes.truncate(usize::try_from(limit.saturating_sub(before)).unwrap_or(0));
                then_reset = true;
            }
        }
        if let Some(limit) = self
            .faults
            .stall_after_bytes
            .filter(|_| !self.counts.stalled)
        {
            if self.bytes_in >= limit {
                let keep = usize::try_from(limit.saturating_sub(before)).unwrap_or(0);
                bytes.truncate(keep.min(bytes.len()));
                then_stall = true;
            }
        }
        if self.counts.stalled {
            bytes.clear();
        }
        self.counts.corrupted_in += self.rng.corrupt(&mut bytes, self.faults.corrupt_rate);
        self.pacer.received(bytes.len());
        self.decoder.push(&bytes);
        while let Some(result) = self.decoder.next_frame() {
            self.on_decoded(result)?;
        }
        if then_reset {
            self.reset_fired = true;
            self.power_cycle();
        }
        if then_stall {
            self.counts.stalled = true;
        }
        self.publish();
        Ok(())
    }

    fn on_decoded(&mut self, result: Result<Frame, DecodeError>) -> Result<(), SimError> {
        let frame = match result {
            Ok(frame) => frame,
            Err(error) => {
                self.bad_frames += 1;
                return match self.device.on_bad_frame(&error) {
                    Some(reply) => self.send(&reply),
                    None => Ok(()),
                };
            }
        };
        if self.rng.chance(self.faults.drop_rate) {
            self.counts.dropped_in += 1;
            return Ok(());
        }
        self.frames_in += 1;
        self.pacer.wait_received();
        let lied = self.device.lied_digests();
        let reply = self.device.on_frame(&frame);
        self.counts.lied_digests += self.device.lied_digests() - lied;
        if self.reset_during(&frame) {
            // Power lost before the answer went out.
            self.reset_fired = true;
            self.power_cycle();
            return Ok(());
        }
        self.store_if_changed()?;
        if self.device.generating() {
            self.keygen_due = Some(Instant::now() + self.keygen_time);
            if self.keygen_time.is_zero() {
                return self.finish_generation();
            }
        }
        self.answer(reply)
    }

    /// The key generation is done: the deferred answer to `GenerateKey`.
    fn finish_generation(&mut self) -> Result<(), SimError> {
        self.keygen_due = None;
        let reply = self.device.finish_generation();
        self.publish();
        self.answer(reply)
    }

    /// Sends a response unless the faults drop it.
    fn answer(&mut self, reply: Option<Frame>) -> Result<(), SimError> {
        match reply {
            Some(_) if self.rng.chance(self.faults.drop_rate) => {
                self.counts.dropped_out += 1;
                Ok(())
            }
            Some(reply) => self.send(&reply),
            None => Ok(()),
        }
    }

    /// Whether this chunk brought the item named in the faults past half its
    /// length (or to its end) for the first time; written inside a Bundle,
    /// past half of its bytes there.
    fn reset_during(&self, frame: &Frame) -> bool {
        let (Some(target), false) = (self.faults.reset_during, self.reset_fired) else {
            return false;
        };
        let Message::WriteChunk { item, .. } = frame.message else {
            return false;
        };
        let past_half =
            |got: usize, start: usize, end: usize| got > start && (got - start) * 2 >= end - start;
        if item == target {
            return matches!(self.device.writing(), Some((i, got, total))
                if i == target && past_half(got as usize, 0, total as usize));
        }
        if item != Item::Bundle {
            return false;
        }
        let Some(got) = self.device.writing_bytes() else {
            return false;
        };
        bundle_entry_span(got, target).is_some_and(|(start, end)| past_half(got.len(), start, end))
    }

    fn power_cycle(&mut self) {
        self.device.reset();
        self.keygen_due = None;
        self.decoder.clear();
        self.resets += 1;
        self.counts.resets += 1;
        tracing::debug!(serial = %self.serial(), "simulated device reset");
    }

    fn send(&mut self, frame: &Frame) -> Result<(), SimError> {
        if self.faults.silent || self.counts.stalled {
            self.counts.unanswered += 1;
            return Ok(());
        }
        let mut bytes = match encode(frame) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(serial = %self.serial(), error = %e, "response does not encode");
                return Ok(());
            }
        };
        if self.faults.garbage {
            for b in &mut bytes {
                *b = self.rng.byte();
            }
            self.counts.garbage += 1;
        }
        self.counts.corrupted_out += self.rng.corrupt(&mut bytes, self.faults.corrupt_rate);
        match self.pacer.send(&mut self.master, &bytes) {
            Ok(()) => {}
            // Nobody reads the port: the bytes are lost, as on a real wire.
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(()),
            Err(e) => return Err(self.io_error("writing the pseudo-terminal", e)),
        }
        self.frames_out += 1;
        self.bytes_out += u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        Ok(())
    }

    /// Writes the committed items to the store folder when they changed.
    fn store_if_changed(&mut self) -> Result<(), SimError> {
        if self.device.generation() == self.stored_generation {
            return Ok(());
        }
        self.stored_generation = self.device.generation();
        let Some(dir) = &self.store_dir else {
            return Ok(());
        };
        let dir = dir.join(self.serial());
        let store_error = |path: PathBuf, source: io::Error| SimError::Store {
            serial: self.serial().to_string(),
            port: self.port.clone(),
            path,
            source,
        };
        std::fs::create_dir_all(&dir).map_err(|e| store_error(dir.clone(), e))?;
        for &item in Item::KNOWN {
            let path = dir.join(item_file_name(item));
            match self.device.committed().get(&item) {
                Some(bytes) => {
                    let mode = if item == Item::PrivateKey {
                        fsx::SECRET
                    } else {
                        fsx::PUBLIC
                    };
                    fsx::write_atomic(&path, bytes, mode, fsx::Durability::Rename)
                        .map_err(|e| store_error(path.clone(), e))?;
                }
                None => match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(store_error(path.clone(), e)),
                },
            }
        }
        Ok(())
    }

    /// Updates the snapshot [`super::SimDevice::stored`] returns.
    fn publish(&mut self) {
        let mut stored = self
            .shared
            .stored
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.device.generation() != self.published_generation {
            stored.items = self.device.committed().clone();
            self.published_generation = self.device.generation();
        }
        stored.device_key_spki = self.device.device_key_spki();
        stored.resets = self.resets;
        stored.bytes_in = self.bytes_in;
        stored.bytes_out = self.bytes_out;
        stored.frames_in = self.frames_in;
        stored.frames_out = self.frames_out;
        stored.bad_frames = self.bad_frames;
        stored.faults = self.counts;
    }
}

/// Where the content of `target` lies in a bundle of which `got` are the
/// first bytes, once its entry's header has arrived.
fn bundle_entry_span(got: &[u8], target: Item) -> Option<(usize, usize)> {
    let mut offset = 0;
    while let Some(&[id, lo, hi]) = got.get(offset..offset + 3) {
        let start = offset + 3;
        let end = start + usize::from(u16::from_le_bytes([lo, hi]));
        if Item::from(id) == target {
            return Some((start, end));
        }
        offset = end;
    }
    None
}
