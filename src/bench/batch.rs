//! `batch` mode: the whole pipeline (job, keys, certificates, ledger,
//! files, manifest) against what the crypto and the file system allow
//! together, `1 / (1/C + 1/F)`: C the `station-key` rate of the same run,
//! F the rate of bare file writes for the same output (a folder, four
//! files written to a temporary name and renamed, nothing else), on the
//! same threads.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::{median, BenchConfig, BenchError, BenchResult};
use crate::ca::{DeviceProfile, LocalCa};
use crate::clock::SystemClock;
use crate::job::JobConfig;
use crate::ledger::Durability;
use crate::pipeline::{self, BatchConfig};

/// Sizes of the files of a P-256 bundle: private.key, chain.pem, cert.pem, AmazonRootCA1.pem.
const BUNDLE: [(&str, usize); 4] = [
    ("private.key", 241),
    ("chain.pem", 1_330),
    ("cert.pem", 660),
    ("AmazonRootCA1.pem", 1_188),
];

/// Measures `batch` against the ceiling; `crypto_rate` is C.
pub fn run(
    config: &BenchConfig,
    ca: &LocalCa,
    crypto_rate: f64,
    dir: &Path,
) -> Result<BenchResult, BenchError> {
    let err = |e: &dyn std::fmt::Display| BenchError(e.to_string());
    let job = dir.join("job.csv");
    let mut csv = std::io::BufWriter::new(fs::File::create(&job).map_err(|e| err(&e))?);
    writeln!(csv, "serial").map_err(|e| err(&e))?;
    for i in 0..config.count {
        writeln!(csv, "SN-{i:09}").map_err(|e| err(&e))?;
    }
    csv.flush().map_err(|e| err(&e))?;
    drop(csv);
    let mut files = Vec::new();
    let mut batch = Vec::new();
    for round in 0..config.rounds.max(1) {
        let bare = dir.join(format!("files-{round}"));
        files.push(files_rate(config, &bare).map_err(|e| err(&e))?);
        let _ = fs::remove_dir_all(&bare);
        let out = dir.join(format!("batch-{round}"));
        batch.push(batch_rate(config, ca, &job, &out)?);
        let _ = fs::remove_dir_all(&out);
        let _ = fs::remove_file(dir.join(format!("batch-{round}.ledger.sqlite")));
    }
    let files_per_sec = median(&mut files);
    let certs_per_sec = median(&mut batch);
    let ceiling = 1.0 / (1.0 / crypto_rate + 1.0 / files_per_sec);
    Ok(BenchResult {
        mode: "batch",
        key: config.key.to_string(),
        ca_key: config.ca_key.to_string(),
        threads: config.threads,
        count: config.count,
        certs_per_sec,
        raw_ceiling_per_sec: ceiling,
        efficiency: certs_per_sec / ceiling,
        files_per_sec: Some(files_per_sec),
    })
}

fn batch_rate(
    config: &BenchConfig,
    ca: &LocalCa,
    job: &Path,
    out: &Path,
) -> Result<f64, BenchError> {
    let batch = BatchConfig {
        job: job.to_path_buf(),
        out: out.to_path_buf(),
        threads: config.threads,
        job_config: JobConfig {
            default_key: config.key,
            ..JobConfig::default()
        },
        profile: DeviceProfile::default(),
        ledger: pipeline::default_ledger(out),
        durability: Durability::Normal,
        reissue: false,
        bulk_jsonl: None,
    };
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let summary = pipeline::run(ca, &batch, &SystemClock, &stop, &mut |_, _| {})
        .map_err(|e| BenchError(e.to_string()))?;
    if summary.issued != config.count as u64 {
        return Err(BenchError(format!(
            "batch issued {} of {}",
            summary.issued, config.count
        )));
    }
    Ok(config.count as f64 / started.elapsed().as_secs_f64())
}

/// F: bare file writes for the same output on the same threads.
fn files_rate(config: &BenchConfig, dir: &Path) -> std::io::Result<f64> {
    fs::create_dir_all(dir)?;
    let threads = config.threads.max(1);
    let payload = vec![b'x'; 2048];
    let started = Instant::now();
    std::thread::scope(|scope| -> std::io::Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let payload = &payload;
                scope.spawn(move || -> std::io::Result<()> {
                    for i in (t..config.count).step_by(threads) {
                        let device = dir.join(format!("sensor_SN-{i:09}"));
                        fs::create_dir(&device)?;
                        for (name, size) in BUNDLE {
                            let tmp = device.join(format!(".{name}.tmp"));
                            fs::File::create(&tmp)?.write_all(&payload[..size])?;
                            fs::rename(&tmp, device.join(name))?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| std::io::Error::other("file writer panicked"))??;
        }
        Ok(())
    })?;
    Ok(config.count as f64 / started.elapsed().as_secs_f64())
}
