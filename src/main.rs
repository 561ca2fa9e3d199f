//! The `provline` command: parses arguments, calls the library, maps
//! outcomes to exit codes (0 all done, 1 some devices failed, 2 nothing
//! could be done).
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use provline::bench::{self, BenchConfig};
use provline::ca::{dn, CaInit, DeviceProfile, LocalCa};
use provline::clock::{Clock, SystemClock};
use provline::cloud::template::JitpTemplate;
use provline::fsx;
use provline::job::{JobConfig, DEFAULT_PATTERN};
use provline::keygen::KeyType;
use provline::ledger::{self, CertificateRow, LedgerReader};
use provline::output::ManifestRow;
use provline::pipeline::{self, BatchConfig};
use provline::progress::{self, Outcome, Progress};
use std::io::Write;
use std::sync::atomic::AtomicBool;

/// The development CA a batch makes on first use when no --ca is given.
const DEV_CA_DIR: &str = "provline-dev-ca";
const DEV_CA_SUBJECT: &str = "/CN=provline DEVELOPMENT CA - not for production";

#[derive(Parser, Debug)]
#[command(
    name = "provline",
    version,
    about = "Factory provisioning station for AWS IoT Core"
)]
struct Cli {
    /// Print nothing but errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Machine-readable output where a command reports.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The local CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue credentials for every device of a job CSV.
    Batch(Box<BatchArgs>),
    /// Measure certificate throughput against the raw crypto.
    Bench(BenchArgs),
    /// The ledger of issued certificates.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// AWS IoT Core: account setup, verification of registered devices.
    Cloud(provline::cloud::cli::CloudArgs),
    /// Provision devices on serial/USB ports, every port at once.
    Flash(Box<provline::line::FlashArgs>),
    /// Simulated devices on pseudo-terminals: prints "<port> <serial>" per device, runs until Ctrl-C.
    DeviceSim(Box<provline::sim::cli::Args>),
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create DIR/ca.pem and DIR/ca.key (mode 0600); refuses to overwrite.
    Init {
        /// Folder for the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Key type.
        #[arg(long, default_value = "p256")]
        key: KeyType,
        /// Subject, "/CN=My IoT CA/O=Acme" or "CN=My IoT CA,O=Acme".
        #[arg(long, default_value = "/CN=provline CA")]
        subject: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// The JITP verification certificate: CN = the account's registration code.
    VerificationCert {
        /// Folder of the CA.
        #[arg(long)]
        ca: PathBuf,
        /// From `aws iot get-registration-code`.
        #[arg(long)]
        registration_code: String,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
struct BatchArgs {
    /// The job CSV.
    job: PathBuf,
    /// Folder of the CA [default: ./provline-dev-ca, a development CA made on first use].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Output folder [default: ./provline-out/<job name>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Key type for rows that name none.
    #[arg(long, default_value = "p256")]
    key: KeyType,
    /// Cores for the crypto and the files, two workers each [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Thing name for rows without one; {column} is replaced by the row's value.
    #[arg(long, default_value = DEFAULT_PATTERN)]
    thing_name_pattern: String,
    /// Device certificate validity in days (never past the CA's own).
    #[arg(long, default_value_t = 3650)]
    days: u32,
    /// Subject O of every device certificate.
    #[arg(long)]
    subject_o: Option<String>,
    /// Subject OU.
    #[arg(long)]
    subject_ou: Option<String>,
    /// Subject C (two letters).
    #[arg(long)]
    subject_c: Option<String>,
    /// Subject ST.
    #[arg(long)]
    subject_st: Option<String>,
    /// Subject dnQualifier.
    #[arg(long)]
    subject_dnq: Option<String>,
    /// A JITP provisioning template: refuse to start unless the profile fills every field it references.
    #[arg(long)]
    jitp_template: Option<PathBuf>,
    /// The ledger (SQLite) [default: OUT.ledger.sqlite beside the output folder].
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// What a ledger commit survives: `normal` a killed process, `full` a power cut too.
    #[arg(long, default_value = "normal", value_parser = parse_durability)]
    ledger_sync: ledger::Durability,
    /// Re-issue devices the ledger holds from another job (their old certificate is superseded).
    #[arg(long)]
    reissue: bool,
    /// Also write the newline-delimited JSON of AWS IoT bulk registration here.
    #[arg(long)]
    bulk_jsonl: Option<PathBuf>,
    #[command(flatten)]
    cloud: provline::cloud::cli::RegisterArgs,
}

fn parse_durability(s: &str) -> Result<ledger::Durability, String> {
    match s {
        "normal" => Ok(ledger::Durability::Normal),
        "full" => Ok(ledger::Durability::Full),
        other => Err(format!("{other:?}: expected normal or full")),
    }
}

#[derive(Subcommand, Debug)]
enum LedgerCommand {
    /// Every certificate signed through the ledger.
    Export {
        /// The ledger file.
        #[arg(long)]
        ledger: PathBuf,
        /// Output format.
        #[arg(long, default_value = "csv", value_parser = ["csv", "jsonl"])]
        format: String,
    },
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Certificates per measurement [default: 2000, or 20 for RSA].
    #[arg(long)]
    count: Option<usize>,
    /// Device key type.
    #[arg(long, default_value = "p256")]
    key: KeyType,
    /// CA key type.
    #[arg(long, default_value = "p256")]
    ca_key: KeyType,
    /// Threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Measurements per mode; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also measure whole batches (ledger and files included) in a scratch folder here,
    /// against the crypto and bare file writes measured in the same run.
    #[arg(long)]
    batch_dir: Option<PathBuf>,
}

/// An error that means nothing was done (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROVLINE_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if cli.quiet { "error" } else { "warn" })
            }),
        )
        .init();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("provline: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> Result<ExitCode> {
    let clock = SystemClock;
    match &cli.command {
        Command::Ca(CaCommand::Init {
            dir,
            key,
            subject,
            days,
        }) => {
            let subject = dn::parse_subject(subject).context("--subject")?;
            let ca = LocalCa::init(
                dir,
                &CaInit {
                    key: *key,
                    subject,
                    days: *days,
                },
                clock.now(),
            )?;
            if !cli.quiet {
                println!(
                    "CA created: {} (key {}, valid until {})",
                    dir.display(),
                    key,
                    ca.not_after()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::VerificationCert {
            ca,
            registration_code,
            out,
        }) => {
            let ca = LocalCa::load(ca, clock.now())?;
            let cert = ca.verification_cert(registration_code, clock.now())?;
            fsx::write_atomic(
                out,
                cert.pem().as_bytes(),
                fsx::PUBLIC,
                fsx::Durability::Sync,
            )
            .with_context(|| format!("{}", out.display()))?;
            if !cli.quiet {
                println!("verification certificate written: {}", out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Batch(args) => batch(cli, args, &clock),
        Command::Cloud(args) => Ok(ExitCode::from(provline::cloud::cli::run(
            args, cli.json, cli.quiet,
        )?)),
        Command::Ledger(LedgerCommand::Export { ledger, format }) => export(ledger, format),
        Command::Flash(args) => match provline::line::flash::command(args, cli.json, cli.quiet) {
            Ok(code) => Ok(ExitCode::from(code)),
            Err(provline::line::FlashError::Usage(e)) => Err(Usage(e).into()),
            Err(e) => Err(e.into()),
        },
        Command::DeviceSim(args) => {
            provline::sim::cli::run(args, cli.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            let config = BenchConfig {
                count: args.count.unwrap_or(
                    if matches!(args.key, KeyType::Rsa2048 | KeyType::Rsa3072) {
                        20
                    } else {
                        2000
                    },
                ),
                key: args.key,
                ca_key: args.ca_key,
                threads: args.threads.unwrap_or_else(cores),
                rounds: args.rounds,
            };
            let results = match &args.batch_dir {
                Some(dir) => bench::run_with_batch(&config, dir)?,
                None => bench::run(&config)?,
            };
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                println!(
                    "{:<12} {:>8} {:>8} {:>8} {:>14} {:>14} {:>10}",
                    "mode", "key", "ca", "threads", "certs/s", "raw ceiling/s", "of ceiling"
                );
                for r in &results {
                    println!(
                        "{:<12} {:>8} {:>8} {:>8} {:>14.0} {:>14.0} {:>9.1}%",
                        r.mode,
                        r.key,
                        r.ca_key,
                        r.threads,
                        r.certs_per_sec,
                        r.raw_ceiling_per_sec,
                        r.efficiency * 100.0
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn batch(cli: &Cli, args: &BatchArgs, clock: &dyn Clock) -> Result<ExitCode> {
    let profile = DeviceProfile {
        organization: args.subject_o.clone(),
        organizational_unit: args.subject_ou.clone(),
        country: args.subject_c.clone(),
        state: args.subject_st.clone(),
        dn_qualifier: args.subject_dnq.clone(),
        validity: time::Duration::days(i64::from(args.days)),
        ..DeviceProfile::default()
    };
    profile.fixed_subject().context("certificate profile")?;
    if let Some(path) = &args.jitp_template {
        let template = JitpTemplate::from_file(path)?;
        template.check(&profile)?;
    }
    if !args.job.is_file() {
        return Err(Usage(format!("{}: no such job file", args.job.display())).into());
    }
    if args.cloud.dry_run {
        let job_config = JobConfig {
            thing_name_pattern: args.thing_name_pattern.clone(),
            default_key: args.key,
            track_duplicates: false,
        };
        let code =
            provline::cloud::cli::dry_run_batch(&args.job, &job_config, &args.cloud, cli.json)?;
        return Ok(ExitCode::from(code));
    }
    let ca = match &args.ca {
        Some(dir) => LocalCa::load(dir, clock.now())?,
        None => dev_ca(Path::new(DEV_CA_DIR), clock, cli.quiet)?,
    };
    let cloud = provline::cloud::cli::BatchCloud::prepare(&args.cloud, &ca)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| pipeline::default_out(&args.job));
    let config = BatchConfig {
        ledger: args
            .ledger
            .clone()
            .unwrap_or_else(|| pipeline::default_ledger(&out)),
        out,
        job: args.job.clone(),
        threads: args.threads.unwrap_or_else(cores),
        job_config: JobConfig {
            thing_name_pattern: args.thing_name_pattern.clone(),
            default_key: args.key,
            track_duplicates: false,
        },
        profile,
        durability: args.ledger_sync,
        reissue: args.reissue,
        bulk_jsonl: args.bulk_jsonl.clone(),
    };
    let mode = if !cli.quiet && !cli.json && std::io::stderr().is_terminal() {
        progress::Mode::Bar
    } else {
        progress::Mode::Silent
    };
    let mut progress = Progress::new(mode, None);
    let mut report = |row: &ManifestRow, outcome: Outcome| {
        if outcome == Outcome::Failed {
            progress.println(&format!(
                "failed: {}: {}",
                display_serial(&row.serial),
                row.error
            ));
        }
        progress.record(outcome);
    };
    let stop = AtomicBool::new(false);
    let result = pipeline::run_registering(&ca, &config, cloud.as_ref(), clock, &stop, &mut report);
    progress.finish();
    let summary = result?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({
                "issued": summary.issued,
                "skipped": summary.skipped,
                "failed": summary.failed,
                "interrupted": summary.interrupted,
                "seconds": summary.seconds,
                "devices_per_sec": summary.rate(),
                "out": config.out,
                "ledger": config.ledger,
            })
        );
    } else if !cli.quiet {
        println!(
            "{} issued, {} already done, {} failed in {:.2} s ({:.0} devices/s){}; manifest: {}",
            summary.issued,
            summary.skipped,
            summary.failed,
            summary.seconds,
            summary.rate(),
            if summary.interrupted {
                "; INTERRUPTED: run the same command again to finish"
            } else {
                ""
            },
            config.out.join(provline::output::MANIFEST_FILE).display()
        );
    }
    Ok(if summary.failed > 0 || summary.interrupted {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn export(path: &Path, format: &str) -> Result<ExitCode> {
    if !path.exists() {
        return Err(Usage(format!("{}: no such ledger", path.display())).into());
    }
    let reader = LedgerReader::open(path)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if format == "jsonl" {
        reader.for_each_certificate(|row: CertificateRow| -> Result<()> {
            serde_json::to_writer(&mut out, &row)?;
            out.write_all(b"\n")?;
            Ok(())
        })?;
    } else {
        let mut csv = csv::Writer::from_writer(&mut out);
        reader.for_each_certificate(|row: CertificateRow| -> Result<()> {
            csv.serialize(&row)?;
            Ok(())
        })?;
        csv.flush()?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn display_serial(serial: &str) -> &str {
    if serial.is_empty() {
        "(no serial)"
    } else {
        serial
    }
}

/// Loads the development CA, making it on first use.
fn dev_ca(dir: &Path, clock: &dyn Clock, quiet: bool) -> Result<LocalCa> {
    if dir.join(provline::ca::CA_CERT_FILE).exists() {
        return Ok(LocalCa::load(dir, clock.now())?);
    }
    let subject = dn::parse_subject(DEV_CA_SUBJECT).map_err(|e| Usage(e.to_string()))?;
    let ca = LocalCa::init(
        dir,
        &CaInit {
            key: KeyType::P256,
            subject,
            days: 3650,
        },
        clock.now(),
    )?;
    if !quiet {
        let tty = std::io::stderr().is_terminal();
        eprintln!(
            "{}note:{} no --ca given: created a DEVELOPMENT CA in {} (not for production devices)",
            if tty { "\x1b[33m" } else { "" },
            if tty { "\x1b[0m" } else { "" },
            dir.display()
        );
    }
    Ok(ca)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
