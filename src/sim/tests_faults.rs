//! Fault injection over real pseudo-terminals: what the device does to the
//! bytes and frames, and that a station that retries and resumes still
//! provisions it.

use std::time::{Duration, Instant};

use ring::rand::SystemRandom;

use super::link::byte_time;
use super::tests_pty::{commit_and_check, credentials, test_ca, Station};
use super::{Faults, SimConfig, SimDevice, SimKeyMode};
use crate::device::{Chunker, ErrorCode, Item, Message};
use crate::keygen;

/// What a write attempt ran into.
#[derive(Debug, PartialEq, Eq)]
enum Interrupted {
    /// The device was reset (it asks for a Hello, or lost the sequence).
    Reset,
}

fn is_reset(reply: &Message) -> bool {
    matches!(
        reply,
        Message::Nak {
            code: ErrorCode::NotAllowedInState | ErrorCode::BadSequence
        }
    )
}

/// Writes an item from wherever the device stands; returns the offset the
/// device resumed at.
fn try_write(station: &mut Station, item: Item, data: &[u8]) -> Result<u32, Interrupted> {
    let mut chunker = Chunker::new(item, data, station.device_max_frame).unwrap();
    let reply = station.request(chunker.begin());
    let Message::WriteReady { offset, .. } = reply else {
        assert!(is_reset(&reply), "WriteBegin {item:?}: {reply:?}");
        return Err(Interrupted::Reset);
    };
    chunker.resume_at(offset).unwrap();
    for chunk in chunker.by_ref() {
        let reply = station.request(chunk);
        if reply != Message::Ack {
            assert!(is_reset(&reply), "chunk of {item:?}: {reply:?}");
            return Err(Interrupted::Reset);
        }
    }
    let reply = station.request(chunker.end());
    if reply != Message::Ack {
        assert!(is_reset(&reply), "WriteEnd {item:?}: {reply:?}");
        return Err(Interrupted::Reset);
    }
    Ok(offset)
}

/// Writes every item, starting over with a Hello each time the device
/// resets; returns the WriteBegin offsets of every attempt, in order.
fn write_through_resets(station: &mut Station, items: &[(Item, Vec<u8>)]) -> Vec<(Item, u32)> {
    let mut offsets = Vec::new();
    'session: for _ in 0..10 {
        station.hello();
        for (item, data) in items {
            match try_write(station, *item, data) {
                Ok(offset) => offsets.push((*item, offset)),
                Err(Interrupted::Reset) => continue 'session,
            }
        }
        return offsets;
    }
    panic!("the device kept resetting");
}

fn station_key_items(serial: &str) -> Vec<(Item, Vec<u8>)> {
    let key = keygen::generate(keygen::KeyType::P256, &SystemRandom::new()).unwrap();
    credentials(test_ca(), serial, key.public_key(), Some(key.pkcs8_der())).items
}

fn spawn(serial: &str, max_frame: u16, resumable: bool, faults: Faults) -> SimDevice {
    SimDevice::spawn(SimConfig {
        max_frame,
        resumable,
        faults,
        ..SimConfig::new(serial, SimKeyMode::Station)
    })
    .unwrap()
}

#[test]
fn one_percent_corruption_and_drops_are_survived_by_retries() {
    let sim = spawn(
        "SN-NOISY",
        64,
        false,
        Faults {
            corrupt_rate: 0.01,
            drop_rate: 0.01,
            seed: 42,
            ..Faults::default()
        },
    );
    let mut station = Station::open(sim.port_path());
    station.timeout = Duration::from_millis(60);
    station.tries = 40;
    let items = station_key_items("SN-NOISY");
    write_through_resets(&mut station, &items);
    commit_and_check(&mut station, &items);

    let stored = sim.stored();
    for (item, data) in &items {
        assert_eq!(stored.item(*item), Some(data.as_slice()), "{item:?}");
    }
    let f = stored.faults;
    assert!(f.corrupted_in > 0 && f.corrupted_out > 0, "{f:?}");
    assert!(f.dropped_in + f.dropped_out > 0, "{f:?}");
    assert!(stored.bad_frames > 0, "damaged requests were dropped");
    assert!(
        station.bad_frames > 0,
        "damaged answers reached the station"
    );
    assert!(station.retries > 0);
    assert_eq!(stored.resets, 0);
}

#[test]
fn reset_in_the_middle_of_the_key_write() {
    for resumable in [false, true] {
        let serial = if resumable { "SN-RESUME" } else { "SN-RESTART" };
        let sim = spawn(
            serial,
            64,
            resumable,
            Faults {
                reset_during: Some(Item::PrivateKey),
                ..Faults::default()
            },
        );
        let mut station = Station::open(sim.port_path());
        station.timeout = Duration::from_millis(100);
        let items = station_key_items(serial);
        let key_len = u32::try_from(items[0].1.len()).unwrap();
        let offsets = write_through_resets(&mut station, &items);
        // The first attempt at the key was cut off; the retry began at 0
        // on a plain device and where the transfer stood on a resumable one.
        let (item, offset) = offsets[0];
        assert_eq!(item, Item::PrivateKey);
        if resumable {
            assert!(offset > 0 && offset * 2 >= key_len, "resumed at {offset}");
        } else {
            assert_eq!(offset, 0);
        }
        commit_and_check(&mut station, &items);
        let stored = sim.stored();
        assert_eq!(stored.resets, 1);
        assert_eq!(stored.faults.resets, 1);
        assert_eq!(stored.item(Item::PrivateKey), Some(items[0].1.as_slice()));
        assert_eq!(stored.items.len(), items.len());
    }
}

#[test]
fn reset_after_n_bytes_then_provisioning_completes() {
    let sim = spawn(
        "SN-BROWNOUT",
        256,
        false,
        Faults {
            reset_after_bytes: Some(700),
            ..Faults::default()
        },
    );
    let mut station = Station::open(sim.port_path());
    station.timeout = Duration::from_millis(100);
    let items = station_key_items("SN-BROWNOUT");
    write_through_resets(&mut station, &items);
    commit_and_check(&mut station, &items);
    let stored = sim.stored();
    assert_eq!(stored.resets, 1, "one reset, once");
    assert!(stored.bytes_in > 700);
    assert_eq!(stored.items.len(), items.len());
}

#[test]
fn a_stalled_device_stops_answering_for_good() {
    let sim = spawn(
        "SN-STALL",
        256,
        false,
        Faults {
            stall_after_bytes: Some(120),
            ..Faults::default()
        },
    );
    let mut station = Station::open(sim.port_path());
    // Long enough that a device thread starved by a loaded machine still
    // answers the requests before the stall in time: a retry would be
    // answered again and counted in frames_out.
    station.timeout = Duration::from_millis(400);
    station.tries = 2;
    station.hello();
    let items = station_key_items("SN-STALL");
    let mut chunker = Chunker::new(Item::PrivateKey, &items[0].1, 256).unwrap();
    assert!(matches!(
        station.try_request(chunker.begin()),
        Some(Message::WriteReady { offset: 0, .. })
    ));
    // The chunk crosses 120 bytes: never answered, nor anything after it.
    assert_eq!(station.try_request(chunker.next().unwrap()), None);
    assert_eq!(station.try_hello(), None);
    let stored = sim.stored();
    assert!(stored.faults.stalled);
    assert_eq!(stored.frames_out, 2, "HelloReply and WriteReady only");
    assert!(stored.bytes_in > 120);
    assert!(stored.items.is_empty());
}

#[test]
fn a_silent_device_receives_but_never_answers() {
    let sim = spawn(
        "SN-SILENT",
        256,
        false,
        Faults {
            silent: true,
            ..Faults::default()
        },
    );
    let mut station = Station::open(sim.port_path());
    station.timeout = Duration::from_millis(50);
    station.tries = 3;
    assert_eq!(station.try_hello(), None);
    let stored = sim.stored();
    assert_eq!(stored.frames_in, 3, "every try arrived");
    assert_eq!(stored.frames_out, 0);
    assert_eq!(stored.faults.unanswered, 3);
}

#[test]
fn a_garbage_device_answers_noise() {
    let sim = spawn(
        "SN-GARBAGE",
        256,
        false,
        Faults {
            garbage: true,
            seed: 3,
            ..Faults::default()
        },
    );
    let mut station = Station::open(sim.port_path());
    station.timeout = Duration::from_millis(50);
    station.tries = 3;
    assert_eq!(station.try_hello(), None, "no frame came back");
    let stored = sim.stored();
    assert_eq!(stored.faults.garbage, 3);
    assert_eq!(stored.frames_out, 3);
    assert!(stored.bytes_out > 0);
}

#[test]
fn the_device_never_goes_faster_than_its_baud_rate() {
    // A floor, not a measurement: every byte each way costs 10 bits at
    // 9600 baud, and stop-and-wait never overlaps the two directions, so
    // the session cannot take less than the wire time of its bytes.
    let sim = SimDevice::spawn(SimConfig {
        baud: 9600,
        ..SimConfig::new("SN-SLOW", SimKeyMode::Station)
    })
    .unwrap();
    let mut station = Station::open(sim.port_path());
    let data = vec![0x42; 1500];
    let started = Instant::now();
    station.hello();
    try_write(&mut station, Item::Chain, &data).unwrap();
    let elapsed = started.elapsed();
    let stored = sim.stored();
    let wire = byte_time(9600) * u32::try_from(stored.bytes_in + stored.bytes_out).unwrap();
    assert!(stored.bytes_in > 1500);
    assert!(
        elapsed >= wire,
        "{elapsed:?} for {} bytes that need {wire:?} on the wire",
        stored.bytes_in + stored.bytes_out
    );
}
