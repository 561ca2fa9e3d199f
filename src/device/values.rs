//! The values carried in messages: items, key types, error codes,
//! capability bits and item sets. Each is one byte or a 16-bit mask on the
//! wire; values this version does not assign survive a round trip as
//! `Unknown`.

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A value this version of the protocol does not assign. Decoding
            /// never produces `Unknown` for an assigned value.
            Unknown(u8),
        }

        impl From<u8> for $name {
            fn from(value: u8) -> Self {
                match value {
                    $($value => $name::$variant,)*
                    other => $name::Unknown(other),
                }
            }
        }

        impl From<$name> for u8 {
            fn from(value: $name) -> u8 {
                match value {
                    $($name::$variant => $value,)*
                    $name::Unknown(other) => other,
                }
            }
        }

        impl $name {
            /// Every value this version assigns.
            pub const KNOWN: &'static [$name] = &[$($name::$variant),*];
        }
    };
}

wire_enum! {
    /// An item a device stores (or, for the CSR, produces).
    Item {
        /// The device certificate, DER.
        Certificate = 1,
        /// The device certificate followed by the CA certificate, PEM.
        Chain = 2,
        /// The private key, PKCS#8 DER; station-key mode only, never readable.
        PrivateKey = 3,
        /// The AWS IoT thing name, UTF-8.
        ThingName = 4,
        /// The AWS IoT data endpoint host name, UTF-8.
        Endpoint = 5,
        /// Amazon Root CA 1, DER.
        RootCa = 6,
        /// The CSR the device made after `GenerateKey`, DER; read-only.
        Csr = 7,
        /// Several other items in one write: a TLV list (see [`super::bundle`]),
        /// staged item by item when its `WriteEnd` checks out; never stored
        /// as itself. Devices with [`Capabilities::BUNDLE`] only.
        Bundle = 8,
    }
}

wire_enum! {
    /// A key type a device may be asked to generate.
    KeyType {
        /// ECDSA on P-256.
        P256 = 1,
        /// ECDSA on P-384.
        P384 = 2,
        /// RSA 2048 bits, e = 65537.
        Rsa2048 = 3,
        /// RSA 3072 bits, e = 65537.
        Rsa3072 = 4,
    }
}

wire_enum! {
    /// Why a device refused a request (the code of a `Nak`).
    ErrorCode {
        /// The message type is not known to the device.
        UnknownMessage = 0x01,
        /// The payload does not parse as its message type says.
        BadPayload = 0x02,
        /// The sequence number is neither the last one nor the next.
        BadSequence = 0x03,
        /// The request is not allowed in the session's current state.
        NotAllowedInState = 0x04,
        /// No protocol version in common.
        VersionUnsupported = 0x05,
        /// The device is busy (e.g. still generating a key); retry later.
        Busy = 0x06,
        /// The item id is not known to the device.
        UnknownItem = 0x10,
        /// The item is larger than the device can store.
        ItemTooLarge = 0x11,
        /// No room left in the device's storage.
        StorageFull = 0x12,
        /// A chunk's offset is not where the transfer stands.
        BadOffset = 0x13,
        /// The received item's length or SHA-256 does not match `WriteBegin`.
        DigestMismatch = 0x14,
        /// A chunk or end without a transfer begun for that item.
        NoTransfer = 0x15,
        /// The item may not be written (CSR) or read (private key).
        AccessDenied = 0x16,
        /// The device holds no key (for `Prove`, or reading the CSR).
        NoKey = 0x20,
        /// Key generation failed.
        KeyGenerationFailed = 0x21,
        /// The device cannot generate this key type.
        UnsupportedKeyType = 0x22,
        /// The certificate's public key is not the device's key.
        KeyMismatch = 0x23,
        /// Writing to storage failed.
        StorageError = 0x30,
        /// Any other failure inside the device.
        Internal = 0xFF,
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?} ({:#04x})", u8::from(*self))
    }
}

/// What a device can do, as reported in its `HelloReply` (a 16-bit set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u16);

impl Capabilities {
    /// The device can generate its key and a CSR (`GenerateKey`).
    pub const CAN_GENERATE_KEY: Capabilities = Capabilities(1 << 0);
    /// Keys and items are kept in secure storage (secure element, TrustZone).
    pub const HAS_SECURE_STORAGE: Capabilities = Capabilities(1 << 1);
    /// The device accepts a private key written by the station.
    pub const ACCEPTS_PRIVATE_KEY: Capabilities = Capabilities(1 << 2);
    /// The device keeps a partial transfer across a reset (resumable writes).
    pub const RESUMABLE: Capabilities = Capabilities(1 << 3);
    /// The device can generate P-256 keys.
    pub const KEY_P256: Capabilities = Capabilities(1 << 4);
    /// The device can generate P-384 keys.
    pub const KEY_P384: Capabilities = Capabilities(1 << 5);
    /// The device can generate RSA-2048 keys.
    pub const KEY_RSA2048: Capabilities = Capabilities(1 << 6);
    /// The device can generate RSA-3072 keys.
    pub const KEY_RSA3072: Capabilities = Capabilities(1 << 7);
    /// The device takes [`Item::Bundle`] writes and answers `ReadDigestSet`.
    pub const BUNDLE: Capabilities = Capabilities(1 << 8);

    /// Whether every bit of `other` is set here.
    pub const fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of both sets.
    #[must_use]
    pub const fn union(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 | other.0)
    }

    /// The capability bit that says the device generates `key`, if any.
    pub fn for_key(key: KeyType) -> Option<Capabilities> {
        match key {
            KeyType::P256 => Some(Self::KEY_P256),
            KeyType::P384 => Some(Self::KEY_P384),
            KeyType::Rsa2048 => Some(Self::KEY_RSA2048),
            KeyType::Rsa3072 => Some(Self::KEY_RSA3072),
            KeyType::Unknown(_) => None,
        }
    }
}

/// A set of items, bit `n` standing for the item with id `n` (ids 1 to 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ItemSet(pub u16);

impl ItemSet {
    /// Whether `item` is in the set.
    pub fn contains(self, item: Item) -> bool {
        Self::bit(item).is_some_and(|bit| self.0 & bit != 0)
    }

    /// Adds `item`; returns false when its id has no bit (0 or above 15).
    pub fn insert(&mut self, item: Item) -> bool {
        match Self::bit(item) {
            Some(bit) => {
                self.0 |= bit;
                true
            }
            None => false,
        }
    }

    /// The items in the set, in id order.
    pub fn iter(self) -> impl Iterator<Item = Item> {
        (1u8..16)
            .filter(move |id| self.0 & (1u16 << id) != 0)
            .map(Item::from)
    }

    fn bit(item: Item) -> Option<u16> {
        match u8::from(item) {
            id @ 1..=15 => Some(1u16 << id),
            _ => None,
        }
    }
}
