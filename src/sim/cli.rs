//! `provline device-sim`: simulated devices on pseudo-terminals until Ctrl-C.

use std::io::Write;
use std::path::PathBuf;

use crate::device::Item;

use super::{Faults, SimConfig, SimDevice, SimError, SimKeyMode, DEFAULT_BAUD, DEFAULT_MAX_FRAME};

/// Arguments of `provline device-sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// How many devices (one pseudo-terminal each).
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Serial numbers are this prefix and a 4-digit number from 0001.
    #[arg(long, default_value = "SN-")]
    pub serial_prefix: String,
    /// Where device keys come from: the device makes it, or the station writes it.
    #[arg(long, value_enum, default_value = "device")]
    pub key_mode: SimKeyMode,
    /// Baud rate each device paces itself to (0: no pacing).
    #[arg(long, default_value_t = DEFAULT_BAUD)]
    pub baud: u32,
    /// Each device's receive limit in bytes (at least 64).
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME)]
    pub max_frame: u16,
    /// Staged items and partial writes survive a device reset.
    #[arg(long)]
    pub resumable: bool,
    /// Devices do not announce BUNDLE (the station writes item by item).
    #[arg(long)]
    pub no_bundle: bool,
    /// Milliseconds a device takes to generate its key (it answers Busy meanwhile).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub keygen_ms: u64,
    /// Share of bytes corrupted, both directions (0.01 = 1%).
    #[arg(long, default_value_t = 0.0)]
    pub corrupt_rate: f64,
    /// Share of frames dropped, both directions.
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Each device resets once after receiving this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub reset_after: Option<u64>,
    /// Each device resets once in the middle of writing this item
    /// (certificate, chain, private-key, thing-name, endpoint, root-ca;
    /// inside a bundle, in the middle of its bytes there), or of a bundle.
    #[arg(long, value_name = "ITEM", value_parser = parse_item)]
    pub reset_during: Option<Item>,
    /// Each device stops answering for good after receiving this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub stall_after: Option<u64>,
    /// Devices never answer.
    #[arg(long)]
    pub silent: bool,
    /// Devices answer with random bytes.
    #[arg(long)]
    pub garbage: bool,
    /// Devices report a wrong SHA-256 when asked for an item's digest.
    #[arg(long)]
    pub lie_digest: bool,
    /// Seed of the fault generator (device n uses seed + n).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep committed items as files in `DIR/<serial>/<item>`.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
}

/// Parses an item name as the command line spells it.
pub fn parse_item(s: &str) -> Result<Item, String> {
    match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
        "certificate" | "cert" => Ok(Item::Certificate),
        "chain" => Ok(Item::Chain),
        "private-key" | "key" => Ok(Item::PrivateKey),
        "thing-name" => Ok(Item::ThingName),
        "endpoint" => Ok(Item::Endpoint),
        "root-ca" => Ok(Item::RootCa),
        "bundle" => Ok(Item::Bundle),
        other => Err(format!(
            "{other:?}: expected certificate, chain, private-key, thing-name, endpoint, root-ca or bundle"
        )),
    }
}

impl Args {
    /// The configuration of the `index`-th device (from 0).
    pub fn config(&self, index: usize) -> SimConfig {
        let n = u64::try_from(index).unwrap_or(u64::MAX);
        SimConfig {
            baud: self.baud,
            max_frame: self.max_frame,
            resumable: self.resumable,
            bundle: !self.no_bundle,
            keygen_time: std::time::Duration::from_millis(self.keygen_ms),
            faults: Faults {
                corrupt_rate: self.corrupt_rate,
                drop_rate: self.drop_rate,
                reset_after_bytes: self.reset_after,
                reset_during: self.reset_during,
                stall_after_bytes: self.stall_after,
                silent: self.silent,
                garbage: self.garbage,
                lie_digest: self.lie_digest,
                seed: self.seed.wrapping_add(n),
            },
            store_dir: self.store.clone(),
            ..SimConfig::new(
                format!("{}{:04}", self.serial_prefix, index + 1),
                self.key_mode,
            )
        }
    }
}

/// Starts the devices, prints one line per device (`<port> <serial>`, or a
/// JSON object), and runs until Ctrl-C; then prints what each device holds
/// on stderr.
pub fn run(args: &Args, json: bool) -> Result<(), SimError> {
    let mut devices = Vec::with_capacity(args.count);
    for index in 0..args.count {
        devices.push(SimDevice::spawn(args.config(index))?);
    }
    let mut out = std::io::stdout().lock();
    for device in &devices {
        let line = if json {
            serde_json::json!({
                "port": device.port_path(),
                "serial": device.serial(),
                "key_mode": args.key_mode,
                "baud": args.baud,
                "max_frame": args.max_frame,
            })
            .to_string()
        } else {
            format!("{} {}", device.port_path().display(), device.serial())
        };
        // A closed stdout must not stop the devices.
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
    drop(out);
    wait_for_ctrl_c().map_err(|source| SimError::Signal { source })?;
    for device in devices {
        let stored = device.stored();
        let mut held: Vec<String> = stored
            .items
            .keys()
            .map(|&item| super::item_file_name(item))
            .collect();
        held.sort();
        eprintln!(
            "{} {}: holds [{}], {} frames in, {} out, {} bad, {} resets",
            device.port_path().display(),
            device.serial(),
            held.join(", "),
            stored.frames_in,
            stored.frames_out,
            stored.bad_frames,
            stored.resets
        );
        device.stop();
    }
    Ok(())
}

fn wait_for_ctrl_c() -> std::io::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?
        .block_on(tokio::signal::ctrl_c())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Command::try_parse_from(std::iter::once("device-sim").chain(argv.iter().copied()))
            .map(|c| c.args)
    }

    #[test]
    fn flags_become_one_config_per_device() {
        let args = parse(&[
            "--count",
            "3",
            "--serial-prefix",
            "LINE-",
            "--key-mode",
            "station",
            "--baud",
            "0",
            "--max-frame",
            "64",
            "--resumable",
            "--keygen-ms",
            "250",
            "--corrupt-rate",
            "0.01",
            "--drop-rate",
            "0.02",
            "--reset-after",
            "500",
            "--reset-during",
            "private-key",
            "--stall-after",
            "900",
            "--garbage",
            "--lie-digest",
            "--seed",
            "9",
            "--store",
            "/tmp/store",
        ])
        .unwrap();
        assert_eq!(args.count, 3);
        let third = args.config(2);
        assert_eq!(third.serial, "LINE-0003");
        assert_eq!(third.key_mode, SimKeyMode::Station);
        assert_eq!(
            (third.baud, third.max_frame, third.resumable),
            (0, 64, true)
        );
        assert_eq!(third.keygen_time, std::time::Duration::from_millis(250));
        assert_eq!(third.store_dir, Some(PathBuf::from("/tmp/store")));
        assert_eq!(
            third.faults,
            Faults {
                corrupt_rate: 0.01,
                drop_rate: 0.02,
                reset_after_bytes: Some(500),
                reset_during: Some(Item::PrivateKey),
                stall_after_bytes: Some(900),
                silent: false,
                garbage: true,
                lie_digest: true,
                seed: 11,
            }
        );
        assert!(third.check().is_ok());
    }

    #[test]
    fn defaults_and_refusals() {
        let args = parse(&[]).unwrap();
        let first = args.config(0);
        assert_eq!(first.serial, "SN-0001");
        assert_eq!(first.key_mode, SimKeyMode::Device);
        assert_eq!((first.baud, first.max_frame), (115_200, 256));
        assert!(!first.faults.any());
        assert!(parse(&["--reset-during", "csr"]).is_err());
        assert!(parse(&["--key-mode", "both"]).is_err());
        let tiny = parse(&["--max-frame", "32"]).unwrap().config(0);
        assert!(tiny
            .check()
            .unwrap_err()
            .to_string()
            .contains("max_frame 32"));
        let noisy = parse(&["--corrupt-rate", "2"]).unwrap().config(0);
        assert!(noisy
            .check()
            .unwrap_err()
            .to_string()
            .contains("corrupt_rate"));
    }
}
