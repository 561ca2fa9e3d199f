//! The line against its targets, over real pseudo-terminals and simulated
//! devices:
//!
//! - criterion: one station-key P-256 provisioning with the simulator
//!   unpaced (the station's and the link's CPU cost);
//! - then, paced at 115200 baud, printed as ratios measured in this run:
//!   (a) one provisioning against the wire time of its payload (certificate,
//!   chain, key, thing name, endpoint) at 10 bits per byte, target <= 1.3;
//!   (b) 16 devices on 16 ports at once against one device alone, target <= 1.5.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use time::OffsetDateTime;

use provline::ca::{CaInit, DeviceProfile, LocalCa};
use provline::clock::SystemClock;
use provline::device::Item;
use provline::keygen::KeyType;
use provline::ledger::{CaId, JobId, Ledger, LedgerOptions};
use provline::line::{Claims, KeyMode, LinkTiming, Quiet, SerialTransport, SessionConfig, Station};
use provline::sim::{SimConfig, SimDevice, SimKeyMode};

const ENDPOINT: &str = "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com";
const BAUD: u32 = 115_200;

static NEXT: AtomicU64 = AtomicU64::new(0);

struct Rig {
    _dir: tempfile::TempDir,
    ca: LocalCa,
    ledger: Ledger,
    claims: Claims,
    profile: DeviceProfile,
    config: SessionConfig,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = LocalCa::ephemeral(
            &CaInit::new(KeyType::P256, "Line Bench CA"),
            OffsetDateTime::now_utc(),
        )
        .expect("CA");
        let ledger = Ledger::open(
            &dir.path().join("line.sqlite"),
            CaId::of_certificate(ca.cert_der()),
            LedgerOptions::default(),
        )
        .expect("ledger");
        Rig {
            _dir: dir,
            ca,
            ledger,
            claims: Claims::new(),
            profile: DeviceProfile::default(),
            config: SessionConfig {
                key_mode: KeyMode::Station,
                key_type: KeyType::P256,
                thing_name_pattern: "sensor_{serial}".into(),
                endpoint: ENDPOINT.into(),
                root_ca: None,
                job: JobId::new("line", "bench"),
                timing: LinkTiming::default(),
                keep_keys: None,
                max_restarts: 5,
            },
        }
    }

    fn station(&self) -> Station<'_> {
        Station {
            ca: &self.ca,
            profile: &self.profile,
            ledger: &self.ledger,
            clock: &SystemClock,
            claims: &self.claims,
            config: &self.config,
        }
    }

    /// New simulated devices (fresh serials), paced at `baud` (0: unpaced),
    /// with a frame limit of `max_frame`.
    fn devices(n: usize, baud: u32, max_frame: u16) -> Vec<SimDevice> {
        (0..n)
            .map(|_| {
                let id = NEXT.fetch_add(1, Ordering::Relaxed);
                let mut config = SimConfig::new(format!("SN-B{id:06}"), SimKeyMode::Station);
                config.baud = baud;
                config.max_frame = max_frame;
                SimDevice::spawn(config).expect("simulated device")
            })
            .collect()
    }

    /// Provisions every device at once, one thread each; the wall time.
    fn provision(&self, devices: &[SimDevice]) -> Duration {
        let station = self.station();
        let mut ports: Vec<SerialTransport> = devices
            .iter()
            .map(|d| SerialTransport::open(&d.port_path().to_string_lossy(), BAUD).expect("open"))
            .collect();
        let start = Instant::now();
        std::thread::scope(|s| {
            for port in &mut ports {
                s.spawn(move || {
                    station
                        .provision(port, &Quiet, &|| false)
                        .map_err(|f| f.error.to_string())
                        .expect("device passes")
                });
            }
        });
        start.elapsed()
    }
}

fn payload_bytes(device: &SimDevice) -> usize {
    let stored = device.stored();
    [
        Item::Certificate,
        Item::Chain,
        Item::PrivateKey,
        Item::ThingName,
        Item::Endpoint,
    ]
    .iter()
    .map(|i| stored.item(*i).map_or(0, <[u8]>::len))
    .sum()
}

fn cpu_cost(c: &mut Criterion) {
    let rig = Rig::new();
    let mut group = c.benchmark_group("line");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("station_key_p256_unpaced", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let devices = Rig::devices(1, 0, 256);
                total += rig.provision(&devices);
            }
            total
        })
    });
    group.finish();
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// The paced targets, printed as ratios.
fn targets() {
    let rig = Rig::new();
    let rounds = 5;
    for max_frame in [256u16, 1024] {
        let mut times = Vec::new();
        let mut payload = 0;
        let (mut crossed, mut requests) = (0, 0);
        for _ in 0..rounds {
            let devices = Rig::devices(1, BAUD, max_frame);
            times.push(rig.provision(&devices));
            payload = payload_bytes(&devices[0]);
            let stored = devices[0].stored();
            crossed = stored.bytes_in + stored.bytes_out;
            requests = stored.frames_in;
        }
        let t = median(times);
        let on_wire = |bytes: f64| Duration::from_secs_f64(bytes * 10.0 / f64::from(BAUD));
        let wire = on_wire(payload as f64);
        println!(
            "line/efficiency max_frame={max_frame}: provisioning {:.1} ms, payload {payload} B = {:.1} ms on the wire at {BAUD} baud, ratio {:.2} (target <= 1.3)",
            t.as_secs_f64() * 1e3,
            wire.as_secs_f64() * 1e3,
            t.as_secs_f64() / wire.as_secs_f64()
        );
        // Where the time beyond the payload goes: the protocol's bytes, and
        // what is left per request (turnaround, station CPU, ledger writes).
        let all = on_wire(crossed as f64);
        let rest = t.saturating_sub(all);
        println!(
            "line/efficiency max_frame={max_frame}: {crossed} B crossed the wire ({:.2} x payload) in {requests} requests; the other {:.1} ms are {:.2} ms a request",
            crossed as f64 / payload as f64,
            rest.as_secs_f64() * 1e3,
            rest.as_secs_f64() * 1e3 / requests.max(1) as f64
        );
    }
    let mut one = Vec::new();
    let mut sixteen = Vec::new();
    for _ in 0..3 {
        one.push(rig.provision(&Rig::devices(1, BAUD, 256)));
        sixteen.push(rig.provision(&Rig::devices(16, BAUD, 256)));
    }
    let (one, sixteen) = (median(one), median(sixteen));
    println!(
        "line/scaling: 1 device {:.1} ms, 16 devices on 16 ports {:.1} ms, ratio {:.2} (target <= 1.5)",
        one.as_secs_f64() * 1e3,
        sixteen.as_secs_f64() * 1e3,
        sixteen.as_secs_f64() / one.as_secs_f64()
    );
}

criterion_group!(benches, cpu_cost);

fn main() {
    benches();
    if !std::env::args().any(|a| a == "--list" || a == "--test") {
        targets();
    }
    Criterion::default().configure_from_args().final_summary();
}
