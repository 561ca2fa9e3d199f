//! The ledger under load: many threads on one writer, a full disk, and
//! a measurement of group commit against a transaction per operation.

use std::time::{Duration, Instant};

use time::macros::datetime;

use super::tests::{device, export, issue, job, ledger_path, open, options, raw, test_ca};
use super::*;

#[test]
fn a_full_disk_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = ledger_path(&dir);
    drop(open(&path));
    let pages: u32 = raw(&path)
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    let ledger = Ledger::open(
        &path,
        test_ca(),
        LedgerOptions {
            max_pages: Some(pages + 4),
            ..options()
        },
    )
    .unwrap();
    let job = job("a");
    let full = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let (ledger, job) = (&ledger, &job);
                s.spawn(move || {
                    (0..2000).find_map(|i| {
                        let serial = format!("SN-{t}-{i}-{}", "x".repeat(200));
                        ledger.plan(job, &device(&serial, i), false).err()
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    for err in full {
        let err = err.expect("the disk fills up");
        assert!(err.is_disk_full(), "{err}");
        assert!(err.to_string().contains("planning device SN-"), "{err}");
    }
    assert_eq!(ledger.reader().integrity_check().unwrap(), ["ok"]);
    ledger.close().unwrap();
}

#[test]
fn many_threads_share_one_writer_and_a_refusal_stays_alone() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&ledger_path(&dir));
    let job = job("a");
    std::thread::scope(|s| {
        for t in 0..8 {
            let (ledger, job) = (&ledger, &job);
            s.spawn(move || {
                for i in 0..100 {
                    let serial = format!("SN-{t}-{i}");
                    let cert = format!("{t:02x}{i:04x}");
                    issue(ledger, job, &serial, &cert, serial.as_bytes());
                    // A second device reusing that certificate serial is
                    // refused, inside a batch that commits the others.
                    let other = format!("{serial}-b");
                    ledger.plan(job, &device(&other, i), false).unwrap();
                    let reused = ledger.record_intent(&other, &cert, b"another key");
                    assert!(
                        matches!(reused, Err(LedgerError::DuplicateCertSerial { .. })),
                        "{reused:?}"
                    );
                    issue(
                        ledger,
                        job,
                        &other,
                        &format!("{t:02x}{i:04x}ff"),
                        other.as_bytes(),
                    );
                }
            });
        }
    });
    let rows = export(&ledger);
    assert_eq!(rows.len(), 1600);
    assert!(rows.iter().all(|r| r.state == CertState::Live));
    assert_eq!(ledger.devices_for_job(&job).unwrap().len(), 1600);
}

/// Intent+issued pairs per second, group commit against a transaction per
/// operation. `cargo test --release --lib ledger::tests_load::throughput -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn throughput() {
    const DEVICES: usize = 20_000;
    const THREADS: usize = 16;
    for durability in [Durability::Normal, Durability::Full] {
        for max_batch in [1024, 1] {
            let dir = tempfile::tempdir().unwrap();
            let opts = LedgerOptions {
                durability,
                max_batch,
                ..LedgerOptions::default()
            };
            let ledger = Ledger::open(&ledger_path(&dir), test_ca(), opts).unwrap();
            let job = job("bench");
            let n = if max_batch == 1 && durability == Durability::Full {
                DEVICES / 10
            } else {
                DEVICES
            };
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let (ledger, job) = (&ledger, &job);
                    s.spawn(move || {
                        for i in (t..n).step_by(THREADS) {
                            ledger
                                .plan(job, &device(&format!("SN-{i}"), 0), false)
                                .unwrap();
                        }
                    });
                }
            });
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let (ledger, _) = (&ledger, &job);
                    s.spawn(move || {
                        for i in (t..n).step_by(THREADS) {
                            let serial = format!("SN-{i}");
                            let cert = format!("{i:032x}");
                            ledger
                                .record_intent(&serial, &cert, serial.as_bytes())
                                .unwrap();
                            let der = super::tests::der_for(&cert);
                            ledger
                                .record_issued(&cert, &der, datetime!(2035-01-01 0:00 UTC))
                                .unwrap();
                        }
                    });
                }
            });
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{durability:?} max_batch={max_batch:>3} threads={THREADS}: {n} intent+issued pairs in {secs:.2} s = {:.0} pairs/s",
                n as f64 / secs
            );
            ledger.close().unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs `devices` devices through plan, intent, issued and delivered on
/// `threads` threads, each submitting chunks of 256 as the pipeline does.
fn run_lifecycles(ledger: &Ledger, devices: usize, threads: usize) {
    const CHUNK: usize = 256;
    let job = job("load");
    std::thread::scope(|s| {
        for t in 0..threads {
            let job = &job;
            s.spawn(move || {
                let mine: Vec<usize> = (t..devices).step_by(threads).collect();
                for chunk in mine.chunks(CHUNK) {
                    let serials: Vec<String> = chunk.iter().map(|i| format!("SN-{i:09}")).collect();
                    let plans: Vec<_> = serials
                        .iter()
                        .zip(chunk)
                        .map(|(s, i)| {
                            ledger
                                .submit_plan(job, &device(s, *i as u64), false)
                                .unwrap()
                        })
                        .collect();
                    for p in plans {
                        p.wait().unwrap();
                    }
                    let intents: Vec<_> = serials
                        .iter()
                        .zip(chunk)
                        .map(|(s, i)| {
                            ledger
                                .submit_intent(s, &format!("{i:032x}"), s.as_bytes())
                                .unwrap()
                        })
                        .collect();
                    intents.into_iter().for_each(|p| p.wait().unwrap());
                    let issued: Vec<_> = chunk
                        .iter()
                        .map(|i| {
                            let cert = format!("{i:032x}");
                            let der = super::tests::der_for(&cert);
                            let id = types::sha256_hex(&der);
                            ledger
                                .submit_issued(&cert, &der, &id, datetime!(2035-01-01 0:00 UTC))
                                .unwrap()
                        })
                        .collect();
                    issued.into_iter().for_each(|p| p.wait().unwrap());
                    let delivered: Vec<_> = serials
                        .iter()
                        .map(|s| {
                            ledger
                                .submit_advance(s, DeviceState::Delivered, "id")
                                .unwrap()
                        })
                        .collect();
                    delivered.into_iter().for_each(|p| p.wait().unwrap());
                }
            });
        }
    });
}

/// A long job does not grow the WAL without bound: checkpoints keep up
/// with a writer that commits without pause.
#[test]
fn the_wal_stays_small_under_continuous_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = ledger_path(&dir);
    let ledger = Ledger::open(&path, test_ca(), LedgerOptions::default()).unwrap();
    run_lifecycles(&ledger, 8_000, 4);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal_bytes = std::fs::metadata(&wal).unwrap().len();
    let db_bytes = std::fs::metadata(&path).unwrap().len();
    assert!(
        wal_bytes < 16 << 20,
        "WAL of {wal_bytes} bytes beside a database of {db_bytes}"
    );
    ledger.close().unwrap();
}

/// CPU time of the writer thread per device over a batch's whole
/// lifecycle (plan, intent, issued, delivered), submitted in chunks as the
/// pipeline does. CPU time, not wall time: it is what caps a batch, and it
/// moves less than wall time on a shared machine.
/// `cargo test --release --lib ledger::tests_load::writer_cpu -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn writer_cpu_per_device() {
    const THREADS: usize = 4;
    let devices: usize = std::env::var("PROVLINE_LOAD_DEVICES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(40_000);
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&ledger_path(&dir), test_ca(), LedgerOptions::default()).unwrap();
    let before = writer_cpu();
    let start = Instant::now();
    run_lifecycles(&ledger, devices, THREADS);
    let secs = start.elapsed().as_secs_f64();
    let cpu = writer_cpu() - before;
    println!(
        "{devices} devices, {THREADS} threads: {:.0} devices/s wall; writer CPU {:.1} us/device",
        devices as f64 / secs,
        cpu * 1e6 / devices as f64
    );
    ledger.close().unwrap();
}

/// Seconds of CPU the `ledger-writer` thread of this process has used.
fn writer_cpu() -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "ledger-writer" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        // utime and stime are fields 14 and 15 of stat; `after` starts at field 3.
        total += fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    }
    total / tick
}
