//! The simulated device's protocol state machine (section 7 of
//! `docs/device-protocol.md`), without I/O: a request frame in, at most one
//! response frame out.
//!
//! ```text
//!  IDLE ──Hello──> READY ──WriteBegin──> WRITING(item) ──WriteEnd──> READY
//!                    │  ──ReadBegin──> READING(item) ──any other──> READY
//!                    │  ──GenerateKey──> GENERATING (all: Busy) ──finish_generation──> READING(Csr)
//!  Reset (message): everything erased, back to IDLE.   reset() (power cycle): IDLE,
//!  staged items, partial writes and an uncommitted key kept only on a RESUMABLE device.
//! ```
//!
//! Besides its state the device keeps committed items, staged items (ended
//! writes waiting for `Commit`), partial write transfers (one, or one per
//! item on a RESUMABLE device), its committed key and a key generated in
//! this session. Duplicates are answered by [`DuplicateFilter`].

use std::collections::HashMap;

use crate::device::bundle;
use crate::device::{
    chunk_capacity, read_slice, sha256, Capabilities, DecodeError, DuplicateFilter, ErrorCode,
    Frame, Item, ItemSet, KeyType, Message, Reassembler, Verdict, MIN_MAX_FRAME, PROTOCOL_VERSION,
};

use super::key::SimKey;
use super::SimKeyMode;

/// The most bytes the device stores for one item.
pub const ITEM_LIMIT: u32 = 8 * 1024;
/// The most bytes of one `Bundle` write.
pub const BUNDLE_LIMIT: u32 = 32 * 1024;

/// What the device is and how it behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Serial number, sent in `HelloReply`.
    pub serial: String,
    /// Firmware version, sent in `HelloReply`.
    pub firmware: String,
    /// Whether it generates its key or accepts one from the station.
    pub key_mode: SimKeyMode,
    /// Its receive limit, announced in `HelloReply`.
    pub max_frame: u16,
    /// Staged items and partial writes survive a reset.
    pub resumable: bool,
    /// `ReadDigest` answers a wrong SHA-256 (a device with a broken storage path).
    pub lie_digest: bool,
    /// Takes `Bundle` writes and answers `ReadDigestSet` (capability `BUNDLE`).
    pub bundle: bool,
}

impl Profile {
    /// The capability bits this device announces.
    pub fn capabilities(&self) -> Capabilities {
        let mode = match self.key_mode {
            SimKeyMode::Device => Capabilities::CAN_GENERATE_KEY
                .union(Capabilities::HAS_SECURE_STORAGE)
                .union(Capabilities::KEY_P256)
                .union(Capabilities::KEY_P384),
            SimKeyMode::Station => Capabilities::ACCEPTS_PRIVATE_KEY,
        };
        let mut caps = mode;
        if self.resumable {
            caps = caps.union(Capabilities::RESUMABLE);
        }
        if self.bundle {
            caps = caps.union(Capabilities::BUNDLE);
        }
        caps
    }
}

/// The session state (section 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// After power-up or `Reset`: only `Hello` is allowed.
    Idle,
    /// A session is open.
    Ready,
    /// A write transfer of this item is open.
    Writing(Item),
    /// A key is being generated for the `GenerateKey` with this seq; every
    /// request is answered `Nak{Busy}` until [`Device::finish_generation`].
    Generating {
        /// The seq of the `GenerateKey` being carried out.
        seq: u16,
        /// The key type asked for.
        key_type: KeyType,
    },
    /// A read of this item is open; `data` is the item as it was at `ReadBegin`.
    Reading {
        /// The item.
        item: Item,
        /// Its bytes.
        data: Vec<u8>,
    },
}

/// A simulated device: the protocol state machine with its storage.
#[derive(Debug)]
pub struct Device {
    profile: Profile,
    state: State,
    dup: DuplicateFilter,
    station_max_frame: u16,
    committed: HashMap<Item, Vec<u8>>,
    staged: HashMap<Item, Vec<u8>>,
    partials: HashMap<Item, Partial>,
    active: Option<Item>,
    key: Option<SimKey>,
    new_key: Option<SimKey>,
    generation: u64,
    lied_digests: u64,
}

/// A write transfer in progress.
#[derive(Debug)]
struct Partial {
    data: Reassembler,
    total_len: u32,
}

fn nak(code: ErrorCode) -> Message {
    Message::Nak { code }
}

impl Device {
    /// A device fresh from the factory: no items, no key, state IDLE.
    pub fn new(profile: Profile) -> Device {
        Device {
            profile,
            state: State::Idle,
            dup: DuplicateFilter::new(),
            station_max_frame: MIN_MAX_FRAME,
            committed: HashMap::new(),
            staged: HashMap::new(),
            partials: HashMap::new(),
            active: None,
            key: None,
            new_key: None,
            generation: 0,
            lied_digests: 0,
        }
    }

    /// The device's profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The session state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Committed items.
    pub fn committed(&self) -> &HashMap<Item, Vec<u8>> {
        &self.committed
    }

    /// Staged items (ended writes not yet committed).
    pub fn staged(&self) -> &HashMap<Item, Vec<u8>> {
        &self.staged
    }

    /// Changes each time the committed items change (commit or erase).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many `Digest` answers carried a wrong SHA-256.
    pub fn lied_digests(&self) -> u64 {
        self.lied_digests
    }

    /// The open write transfer: item, bytes received, total length.
    pub fn writing(&self) -> Option<(Item, u32, u32)> {
        let item = self.active?;
        let p = self.partials.get(&item)?;
        Some((item, p.data.received(), p.total_len))
    }

    /// The bytes the open write transfer has received so far.
    pub fn writing_bytes(&self) -> Option<&[u8]> {
        let item = self.active?;
        Some(self.partials.get(&item)?.data.received_bytes())
    }

    /// The public key (SubjectPublicKeyInfo, DER) of the key the device
    /// generated, committed or not; `None` if it never made one.
    pub fn device_key_spki(&self) -> Option<Vec<u8>> {
        if self.profile.key_mode != SimKeyMode::Device {
            return None;
        }
        self.new_key
            .as_ref()
            .or(self.key.as_ref())
            .map(SimKey::spki)
    }

    /// Power cycle: back to IDLE with nothing remembered; a device that is
    /// not RESUMABLE also loses staged items, partial writes and a key it
    /// has not committed.
    pub fn reset(&mut self) {
        self.state = State::Idle;
        self.dup.clear();
        if !self.profile.resumable {
            self.staged.clear();
            self.partials.clear();
            self.active = None;
            self.new_key = None;
        }
    }

    /// Answers a frame that did not decode: `Nak` when the header could be
    /// trusted (unknown type, bad payload), nothing otherwise. Not remembered.
    pub fn on_bad_frame(&self, error: &DecodeError) -> Option<Frame> {
        error
            .nak()
            .map(|(seq, code)| Frame::new(seq, Message::Nak { code }))
    }

    /// Answers a request frame; response frames are ignored (`None`).
    ///
    /// A `GenerateKey` that starts a key generation is not answered here:
    /// the device is then GENERATING (every request, duplicates included,
    /// gets `Nak{Busy}`, not remembered) until [`Device::finish_generation`]
    /// makes the key and gives the answer.
    pub fn on_frame(&mut self, frame: &Frame) -> Option<Frame> {
        if !frame.message.is_request() {
            return None;
        }
        if let State::Generating { .. } = self.state {
            return Some(Frame::new(frame.seq, nak(ErrorCode::Busy)));
        }
        match self.dup.check(frame) {
            Verdict::Fresh => {}
            Verdict::Duplicate(response) => return Some(response.clone()),
            Verdict::NeedHello => {
                return Some(Frame::new(frame.seq, nak(ErrorCode::NotAllowedInState)))
            }
            Verdict::OutOfSequence { .. } => return Some(DuplicateFilter::bad_sequence(frame.seq)),
        }
        let response = self.carry_out(frame.seq, &frame.message)?;
        if response == nak(ErrorCode::Busy) {
            return Some(Frame::new(frame.seq, response));
        }
        let erased = matches!(frame.message, Message::Reset) && response == Message::Ack;
        let reply = self.dup.record(frame.seq, response).clone();
        if erased {
            self.dup.clear();
            self.state = State::Idle;
        }
        Some(reply)
    }

    /// Whether a key is being generated (state GENERATING).
    pub fn generating(&self) -> bool {
        matches!(self.state, State::Generating { .. })
    }

    /// Ends a key generation: makes the key and its CSR and returns the
    /// answer to the `GenerateKey` (`ReadInfo{Csr}`, then state READING(Csr),
    /// or `Nak{KeyGenerationFailed}`), remembered for its duplicates.
    /// `None` when no key is being generated.
    pub fn finish_generation(&mut self) -> Option<Frame> {
        let State::Generating { seq, key_type } = self.state else {
            return None;
        };
        let response = match SimKey::generate(key_type, &self.profile.serial) {
            Some(key) => {
                let csr = key.csr().unwrap_or_default().to_vec();
                self.new_key = Some(key);
                let info = read_info(Item::Csr, &csr);
                self.state = State::Reading {
                    item: Item::Csr,
                    data: csr,
                };
                info
            }
            None => {
                self.state = State::Ready;
                nak(ErrorCode::KeyGenerationFailed)
            }
        };
        Some(self.dup.record(seq, response).clone())
    }

    /// Carries out a fresh request; `None` when the answer comes later
    /// (a key generation started).
    fn carry_out(&mut self, seq: u16, request: &Message) -> Option<Message> {
        match *request {
            Message::GenerateKey { key_type }
                if matches!(self.state, State::Ready | State::Reading { .. }) =>
            {
                self.start_generation(seq, key_type)
            }
            _ => Some(self.answer(request)),
        }
    }

    fn answer(&mut self, request: &Message) -> Message {
        if let Message::Hello {
            protocol_version,
            max_frame,
            ..
        } = *request
        {
            return self.hello(protocol_version, max_frame);
        }
        if self.state == State::Idle {
            return nak(ErrorCode::NotAllowedInState);
        }
        let writing = matches!(self.state, State::Writing(_));
        match request {
            Message::WriteBegin {
                item,
                total_len,
                sha256,
            } => self.write_begin(*item, *total_len, sha256),
            Message::WriteChunk { item, offset, data } => self.write_chunk(*item, *offset, data),
            Message::WriteEnd { item } => self.write_end(*item),
            Message::ReadBegin { item } if !writing => self.read_begin(*item),
            Message::ReadChunk {
                item,
                offset,
                max_len,
            } if !writing => self.read_chunk(*item, *offset, *max_len),
            Message::ReadDigest { item } => self.end_read_then(|d| d.read_digest(*item)),
            Message::ReadDigestSet { items } => self.end_read_then(|d| d.read_digest_set(*items)),
            Message::Prove { nonce } => self.end_read_then(|d| d.prove(nonce)),
            Message::Commit if !writing => self.commit(),
            Message::Abort => self.abort(),
            Message::Reset => self.erase(),
            Message::GenerateKey { .. }
            | Message::ReadBegin { .. }
            | Message::ReadChunk { .. }
            | Message::Commit => nak(ErrorCode::NotAllowedInState),
            // Responses never get here; Hello was handled above.
            _ => nak(ErrorCode::UnknownMessage),
        }
    }

    fn end_read_then(&mut self, f: impl FnOnce(&mut Device) -> Message) -> Message {
        if matches!(self.state, State::Reading { .. }) {
            self.state = State::Ready;
        }
        f(self)
    }

    fn hello(&mut self, protocol_version: u8, station_max_frame: u16) -> Message {
        if protocol_version < 1 {
            return nak(ErrorCode::VersionUnsupported);
        }
        self.station_max_frame = station_max_frame.max(MIN_MAX_FRAME);
        // A Hello ends a read; staged items and partial writes stay.
        self.state = State::Ready;
        let mut holds = ItemSet::default();
        for item in self.committed.keys() {
            holds.insert(*item);
        }
        Message::HelloReply {
            protocol_version: protocol_version.min(PROTOCOL_VERSION),
            max_frame: self.profile.max_frame,
            capabilities: self.profile.capabilities(),
            holds,
            device_serial: self.profile.serial.clone(),
            firmware_version: self.profile.firmware.clone(),
        }
    }

    fn start_generation(&mut self, seq: u16, key_type: KeyType) -> Option<Message> {
        let caps = self.profile.capabilities();
        let supported = caps.contains(Capabilities::CAN_GENERATE_KEY)
            && Capabilities::for_key(key_type).is_some_and(|bit| caps.contains(bit));
        if !supported {
            return Some(nak(ErrorCode::UnsupportedKeyType));
        }
        self.state = State::Generating { seq, key_type };
        None
    }

    fn write_begin(&mut self, item: Item, total_len: u32, digest: &[u8; 32]) -> Message {
        match item {
            Item::Bundle if !self.profile.bundle => return nak(ErrorCode::UnknownItem),
            _ => {
                if let Some(code) = self.refuses_item(item) {
                    return nak(code);
                }
            }
        }
        let limit = if item == Item::Bundle {
            BUNDLE_LIMIT
        } else {
            ITEM_LIMIT
        };
        if total_len > limit {
            return nak(ErrorCode::ItemTooLarge);
        }
        // Another transfer is replaced; only a RESUMABLE device keeps its data.
        if let Some(other) = self.active.filter(|&other| other != item) {
            if !self.profile.resumable {
                self.partials.remove(&other);
            }
        }
        let same = self
            .partials
            .get(&item)
            .is_some_and(|p| p.data.same_transfer(item, total_len, digest));
        if !same {
            self.partials.remove(&item);
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let mut r = match Reassembler::new(item, total_len, *digest, limit) {
                Ok(r) => r,
                Err(e) => return nak(e.code()),
            };
            // A complete staged copy of the same bytes: nothing left to send.
            if let Some(data) = self.staged.remove(&item) {
                let same =
                    u32::try_from(data.len()).ok() == Some(total_len) && &sha256(&data) == digest;
                if same && r.accept(item, 0, &data).is_err() {
                    return nak(ErrorCode::Internal);
                }
            }
            self.partials.insert(item, Partial { data: r, total_len });
        }
        let offset = self.partials.get(&item).map_or(0, |p| p.data.received());
        self.active = Some(item);
        self.state = State::Writing(item);
        Message::WriteReady { item, offset }
    }

    fn write_chunk(&mut self, item: Item, offset: u32, data: &[u8]) -> Message {
        if self.active != Some(item) {
            return nak(ErrorCode::NoTransfer);
        }
        let Some(p) = self.partials.get_mut(&item) else {
            return nak(ErrorCode::NoTransfer);
        };
        match p.data.accept(item, offset, data) {
            Ok(()) => {
                self.state = State::Writing(item);
                Message::Ack
            }
            Err(e) => nak(e.code()),
        }
    }

    fn write_end(&mut self, item: Item) -> Message {
        if self.active != Some(item) {
            return nak(ErrorCode::NoTransfer);
        }
        self.active = None;
        self.state = State::Ready;
        let Some(p) = self.partials.remove(&item) else {
            return nak(ErrorCode::NoTransfer);
        };
        let data = match p.data.finish() {
            Ok(data) => data,
            Err(e) => return nak(e.code()),
        };
        if item == Item::Bundle {
            return self.stage_bundle(&data);
        }
        // The device checks a certificate against its key when it has one.
        if item == Item::Certificate
            && self.with_key(|key| key.matches_certificate(&data)) == Some(false)
        {
            return nak(ErrorCode::KeyMismatch);
        }
        self.staged.insert(item, data);
        Message::Ack
    }

    /// Why the device refuses to store `item` (written alone or in a
    /// bundle), if it does.
    fn refuses_item(&self, item: Item) -> Option<ErrorCode> {
        match item {
            Item::Unknown(_) => Some(ErrorCode::UnknownItem),
            Item::Csr => Some(ErrorCode::AccessDenied),
            Item::PrivateKey
                if !self
                    .profile
                    .capabilities()
                    .contains(Capabilities::ACCEPTS_PRIVATE_KEY) =>
            {
                Some(ErrorCode::AccessDenied)
            }
            _ => None,
        }
    }

    /// A complete `Bundle`: stages every item in it as if each had been
    /// written alone, or none of them (malformed TLV: `BadPayload`; an
    /// item the device does not store: `UnknownItem`; a certificate that
    /// does not match the key: `KeyMismatch`).
    fn stage_bundle(&mut self, data: &[u8]) -> Message {
        let entries = match bundle::parse(data) {
            Ok(entries) => entries,
            Err(e) => return nak(e.code()),
        };
        for (item, content) in &entries {
            if let Some(code) = self.refuses_item(*item) {
                return nak(code);
            }
            if u32::try_from(content.len()).map_or(true, |len| len > ITEM_LIMIT) {
                return nak(ErrorCode::ItemTooLarge);
            }
        }
        let before = self.staged.clone();
        for (item, content) in &entries {
            self.partials.remove(item);
            self.staged.insert(*item, content.to_vec());
        }
        // Checked once every item is staged: the bundle's private key
        // (item 3) comes after its certificate (item 1).
        let has_cert = entries.iter().any(|(i, _)| *i == Item::Certificate);
        if let Some(cert) = self.staged.get(&Item::Certificate).filter(|_| has_cert) {
            if self.with_key(|key| key.matches_certificate(cert)) == Some(false) {
                self.staged = before;
                return nak(ErrorCode::KeyMismatch);
            }
        }
        Message::Ack
    }

    /// The bytes of `item` a read or digest sees: staged, else committed.
    fn current(&self, item: Item) -> Option<Vec<u8>> {
        if item == Item::Csr {
            return self
                .new_key
                .as_ref()
                .or(self.key.as_ref())
                .and_then(SimKey::csr)
                .map(<[u8]>::to_vec);
        }
        self.staged
            .get(&item)
            .or_else(|| self.committed.get(&item))
            .cloned()
    }

    fn read_begin(&mut self, item: Item) -> Message {
        self.state = State::Ready;
        match item {
            Item::Unknown(_) => return nak(ErrorCode::UnknownItem),
            Item::PrivateKey => return nak(ErrorCode::AccessDenied),
            _ => {}
        }
        let Some(data) = self.current(item) else {
            return nak(if item == Item::Csr {
                ErrorCode::NoKey
            } else {
                ErrorCode::NoTransfer
            });
        };
        let info = read_info(item, &data);
        self.state = State::Reading { item, data };
        info
    }

    fn read_chunk(&mut self, item: Item, offset: u32, max_len: u16) -> Message {
        let State::Reading {
            item: reading,
            data,
        } = &self.state
        else {
            return nak(ErrorCode::NoTransfer);
        };
        if *reading != item {
            return nak(ErrorCode::NoTransfer);
        }
        // Never more than the station's frames carry.
        let fits = chunk_capacity(self.station_max_frame)
            .and_then(|n| u16::try_from(n).ok())
            .unwrap_or(u16::MAX);
        match read_slice(data, offset, max_len.min(fits)) {
            Ok(slice) => Message::ReadData {
                item,
                offset,
                data: slice.to_vec(),
            },
            Err(e) => nak(e.code()),
        }
    }

    fn read_digest(&mut self, item: Item) -> Message {
        if let Item::Unknown(_) = item {
            return nak(ErrorCode::UnknownItem);
        }
        // Computed from the stored bytes, as the protocol asks.
        let Some(data) = self.current(item) else {
            return nak(ErrorCode::NoTransfer);
        };
        let mut digest = sha256(&data);
        if self.profile.lie_digest {
            digest[0] ^= 0x01;
            self.lied_digests += 1;
        }
        Message::Digest {
            item,
            total_len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            sha256: digest,
        }
    }

    /// One digest over committed items (protocol 3.3, ReadDigestSet).
    fn read_digest_set(&mut self, items: ItemSet) -> Message {
        if !self.profile.bundle {
            return nak(ErrorCode::UnknownMessage);
        }
        let mut parts = Vec::new();
        for item in items.iter() {
            if let Item::Unknown(_) = item {
                return nak(ErrorCode::UnknownItem);
            }
            match self.committed.get(&item) {
                Some(data) => parts.push(data.as_slice()),
                None => return nak(ErrorCode::NoTransfer),
            }
        }
        let total: usize = parts.iter().map(|d| d.len()).sum();
        let mut digest = bundle::set_digest(parts);
        if self.profile.lie_digest {
            digest[0] ^= 0x01;
            self.lied_digests += 1;
        }
        Message::Digest {
            item: Item::Bundle,
            total_len: u32::try_from(total).unwrap_or(u32::MAX),
            sha256: digest,
        }
    }

    /// Runs `f` with the key `Prove` uses and a certificate must match: in
    /// device-key mode the newest generated key; in station-key mode the
    /// staged private key, else the committed one. `None` without a key.
    fn with_key<T>(&self, f: impl FnOnce(&SimKey) -> T) -> Option<T> {
        match self.profile.key_mode {
            SimKeyMode::Device => self.new_key.as_ref().or(self.key.as_ref()).map(f),
            SimKeyMode::Station => self
                .staged
                .get(&Item::PrivateKey)
                .or_else(|| self.committed.get(&Item::PrivateKey))
                .and_then(|der| SimKey::from_pkcs8(der))
                .as_ref()
                .map(f),
        }
    }

    fn prove(&mut self, nonce: &[u8]) -> Message {
        match self.with_key(|key| key.prove(nonce)) {
            None => nak(ErrorCode::NoKey),
            Some(None) => nak(ErrorCode::Internal),
            Some(Some(signature)) => Message::Proof { signature },
        }
    }

    fn commit(&mut self) -> Message {
        if self.active.is_some() {
            return nak(ErrorCode::NotAllowedInState);
        }
        if let Some(cert) = self.staged.get(&Item::Certificate) {
            if self.with_key(|key| key.matches_certificate(cert)) == Some(false) {
                return nak(ErrorCode::KeyMismatch);
            }
        }
        if self.staged.is_empty() && self.new_key.is_none() {
            return Message::Ack;
        }
        self.committed.extend(self.staged.drain());
        if let Some(key) = self.new_key.take() {
            self.key = Some(key);
        }
        self.partials.clear();
        self.generation += 1;
        self.state = State::Ready;
        Message::Ack
    }

    fn abort(&mut self) -> Message {
        self.staged.clear();
        self.partials.clear();
        self.active = None;
        self.new_key = None;
        self.state = State::Ready;
        Message::Ack
    }

    fn erase(&mut self) -> Message {
        self.abort();
        if !self.committed.is_empty() || self.key.is_some() {
            self.generation += 1;
        }
        self.committed.clear();
        self.key = None;
        Message::Ack
    }
}

fn read_info(item: Item, data: &[u8]) -> Message {
    Message::ReadInfo {
        item,
        total_len: u32::try_from(data.len()).unwrap_or(u32::MAX),
        sha256: sha256(data),
    }
}
