//! The command line of the cloud: `cloud setup`, `cloud verify`, and the
//! registration flags of `batch`, with the functions that run them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::aws::AwsRegistry;
use super::config::{ConfigError, StationConfig};
use super::limits::{ApiLimiters, Limits, LimitsError};
use super::register::{Device, Mode, Registered, Registrar};
use super::registry::{Cloud, CloudError};
use super::retry::RetryPolicy;
use super::setup::{self, Change, SetupError};
use super::verify;
use crate::ca::{CaError, LocalCa};
use crate::job::{JobConfig, JobError, JobReader};
use crate::ledger::{CaId, Ledger, LedgerError, LedgerReader};

/// First backoff in milliseconds (default 200).
pub const RETRY_BASE_ENV: &str = "PROVLINE_RETRY_BASE_MS";
const DEFAULT_RETRY_BASE_MS: u64 = 200;
const RETRY_CAP: Duration = Duration::from_secs(20);

const ENV_HELP: &str = "\
AWS settings come from the default chain: AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL / \
AWS_ENDPOINT_URL_IOT, environment credentials.
Environment knobs: PROVLINE_AWS_TIMEOUT_MS (per-attempt timeout, default 10000), \
PROVLINE_RETRY_BASE_MS (first backoff, default 200).";

/// `provline cloud ...`.
#[derive(Args, Debug)]
#[command(after_help = ENV_HELP)]
pub struct CloudArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CloudCommand,
}

/// The cloud subcommands.
#[derive(Subcommand, Debug)]
pub enum CloudCommand {
    /// One-time, idempotent setup from a station configuration file:
    /// policies, thing type, groups, JITP CA, fleet provisioning.
    #[command(after_help = ENV_HELP)]
    Setup(SetupArgs),
    /// Check that AWS IoT holds every device the ledger says is registered.
    #[command(after_help = ENV_HELP)]
    Verify(VerifyArgs),
}

/// `cloud setup`.
#[derive(Args, Debug)]
pub struct SetupArgs {
    /// The station configuration file (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Print the calls setup would make; make none (no credentials needed).
    #[arg(long)]
    pub dry_run: bool,
}

/// `cloud verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The ledger.
    #[arg(long)]
    pub ledger: PathBuf,
    /// The CA folder whose devices to check.
    #[arg(long)]
    pub ca: PathBuf,
    /// The station configuration (device policy, rates, region).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// The registration flags of `batch`.
#[derive(Args, Debug, Clone)]
pub struct RegisterArgs {
    /// Per-device registration with AWS IoT: none (JITP), certificate, thing,
    /// register-thing, aws-signed. Environment: PROVLINE_AWS_TIMEOUT_MS
    /// (per-attempt timeout, default 10000), PROVLINE_RETRY_BASE_MS (first
    /// backoff, default 200); AWS settings from AWS_PROFILE, AWS_REGION,
    /// AWS_ENDPOINT_URL.
    #[arg(long, value_enum, default_value_t = Mode::None)]
    pub register: Mode,
    /// The station configuration file (needed unless --register none).
    #[arg(long)]
    pub cloud_config: Option<PathBuf>,
    /// This station's share of the account's API quotas, in (0, 1] (0.25: four stations).
    #[arg(long)]
    pub account_share: Option<f64>,
    /// One API's rate for the account, e.g. CreateThing=10 (repeatable).
    #[arg(long = "rate", value_name = "API=TPS")]
    pub rates: Vec<String>,
    /// Attempts per call before the device fails.
    #[arg(long, default_value_t = 8)]
    pub retry_budget: u32,
    /// Print the registration calls each device would need; make none.
    #[arg(long)]
    pub dry_run: bool,
}

/// A cloud command that could not run (exit 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Setup's local checks.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// A rate flag.
    #[error("--rate/--account-share")]
    Limits(#[from] LimitsError),
    /// The ledger.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The CA.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The job.
    #[error(transparent)]
    Job(#[from] JobError),
    /// Bad usage.
    #[error("{0}")]
    Usage(String),
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("provline-cloud")
        .enable_all()
        .build()
        .map_err(|e| CliError::Usage(format!("starting the cloud runtime: {e}")))
}

/// The retry policy: [`RETRY_BASE_ENV`], 20 s cap, `budget` attempts.
pub fn retry_policy(budget: u32) -> Result<RetryPolicy, CliError> {
    let base = std::env::var(RETRY_BASE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .unwrap_or(DEFAULT_RETRY_BASE_MS);
    RetryPolicy::new(Duration::from_millis(base), RETRY_CAP, budget)
        .map_err(|e| CliError::Usage(format!("--retry-budget: {e}")))
}

async fn cloud(
    limits: &Limits,
    config: Option<&StationConfig>,
    budget: u32,
) -> Result<Cloud, CliError> {
    let region = config.and_then(|c| c.account.region.as_deref());
    Ok(Cloud {
        registry: Arc::new(AwsRegistry::from_env(region).await),
        limits: Arc::new(ApiLimiters::new(limits)),
        policy: retry_policy(budget)?,
    })
}

/// `cloud setup`: 0 done, 1 some resource failed.
pub fn run_setup(args: &SetupArgs, json: bool, quiet: bool) -> Result<u8, CliError> {
    let config = StationConfig::load(&args.config)?;
    let now = time::OffsetDateTime::now_utc();
    let resources = setup::plan(&config, now)?;
    if args.dry_run {
        let mut calls = Vec::new();
        for r in &resources {
            for (api, target) in r.calls() {
                let line = format!("would call {api} {target}");
                if json {
                    calls.push(json!({"api": api.name(), "target": target, "kind": r.kind(), "name": r.name()}));
                } else {
                    println!("{}", line.trim_end());
                }
            }
        }
        if json {
            println!("{}", json!({ "dry_run": true, "calls": calls }));
        }
        return Ok(0);
    }
    let rt = runtime()?;
    let limits = config.limits()?;
    let results = rt.block_on(async {
        let cloud = cloud(&limits, Some(&config), 8).await?;
        let mut results = Vec::new();
        for r in &resources {
            results.push(setup::apply(&cloud, r, now).await);
        }
        Ok::<_, CliError>(results)
    })?;
    let mut failed = 0;
    let mut changed = 0;
    let mut rows = Vec::new();
    for (r, result) in resources.iter().zip(&results) {
        match result {
            Ok(change) => {
                if *change != Change::Unchanged {
                    changed += 1;
                }
                if !json && !quiet {
                    println!("{} {} {}", change.as_str(), r.kind(), r.name());
                }
                rows.push(json!({"kind": r.kind(), "name": r.name(), "status": change.as_str()}));
            }
            Err(e) => {
                failed += 1;
                eprintln!("failed {} {}: {}", r.kind(), r.name(), e.manifest_text());
                rows.push(json!({"kind": r.kind(), "name": r.name(), "status": "failed", "api": e.api.name(), "error": e.to_string()}));
            }
        }
    }
    if json {
        println!(
            "{}",
            json!({"resources": rows, "changed": changed, "failed": failed})
        );
    } else if !quiet {
        if changed == 0 && failed == 0 {
            println!("nothing to change");
        } else {
            println!(
                "{changed} changed, {} unchanged, {failed} failed",
                resources.len() - changed - failed
            );
        }
    }
    Ok(u8::from(failed > 0))
}

/// `cloud verify`: 0 AWS agrees with the ledger, 1 differences.
pub fn run_verify(args: &VerifyArgs, json: bool, quiet: bool) -> Result<u8, CliError> {
    let config = args
        .config
        .as_deref()
        .map(StationConfig::load)
        .transpose()?;
    let ca = LocalCa::load(&args.ca, time::OffsetDateTime::now_utc())?;
    let ca_id = CaId::of_certificate(ca.cert_der());
    if !args.ledger.exists() {
        return Err(CliError::Usage(format!(
            "{}: no such ledger",
            args.ledger.display()
        )));
    }
    let devices = LedgerReader::open(&args.ledger)?.registered_devices(&ca_id)?;
    let limits = match &config {
        Some(c) => c.limits()?,
        None => Limits::default(),
    };
    let policy = config.as_ref().and_then(|c| c.device.policy.clone());
    let rt = runtime()?;
    let results = rt.block_on(async {
        let cloud = cloud(&limits, config.as_ref(), 8).await?;
        let checks = devices
            .iter()
            .map(|d| verify::verify_device(&cloud, d, policy.as_deref()));
        Ok::<_, CliError>(futures_util::future::join_all(checks).await)
    })?;
    let mut diffs = Vec::new();
    for (dev, result) in devices.iter().zip(results) {
        match result {
            Ok(found) => diffs.extend(found),
            Err(e) => diffs.push(verify::Difference {
                serial: dev.serial.clone(),
                thing_name: dev.thing_name.clone(),
                what: format!("could not check: {}", e.manifest_text()),
            }),
        }
    }
    if json {
        println!(
            "{}",
            json!({"checked": devices.len(), "differences": diffs})
        );
    } else {
        for d in &diffs {
            println!("{d}");
        }
        if !quiet {
            println!(
                "{} registered device(s) checked, {} difference(s)",
                devices.len(),
                diffs.len()
            );
        }
    }
    Ok(u8::from(!diffs.is_empty()))
}

/// Runs a cloud subcommand; the exit code.
pub fn run(args: &CloudArgs, json: bool, quiet: bool) -> Result<u8, CliError> {
    match &args.command {
        CloudCommand::Setup(a) => run_setup(a, json, quiet),
        CloudCommand::Verify(a) => run_verify(a, json, quiet),
    }
}

/// What a batch registers with: the registrar and the runtime its calls
/// run on.
pub struct BatchCloud {
    runtime: tokio::runtime::Runtime,
    registrar: Registrar,
}

impl std::fmt::Debug for BatchCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchCloud")
            .field("registrar", &self.registrar)
            .finish_non_exhaustive()
    }
}

impl BatchCloud {
    /// The registration a batch's flags ask for; `None` for `--register none`.
    pub fn prepare(args: &RegisterArgs, ca: &LocalCa) -> Result<Option<BatchCloud>, CliError> {
        if args.register == Mode::None {
            return Ok(None);
        }
        let config = load_batch_config(args)?;
        let limits = batch_limits(args, &config)?;
        let runtime = runtime()?;
        let cloud = runtime.block_on(cloud(&limits, Some(&config), args.retry_budget))?;
        let registrar = Registrar::new(
            cloud,
            args.register,
            Arc::new(config),
            ca.cert_pem(),
            ca.cert_der(),
        )
        .map_err(CliError::Usage)?;
        Ok(Some(BatchCloud { runtime, registrar }))
    }

    /// The registrar.
    pub fn registrar(&self) -> &Registrar {
        &self.registrar
    }

    /// Registers `devices` concurrently, blocking the calling thread (not a
    /// runtime thread) until every one is registered, failed, or (`None`)
    /// left for the next run because `stop` was set first.
    pub fn register(
        &self,
        ledger: &Ledger,
        devices: &[Device],
        stop: &std::sync::atomic::AtomicBool,
    ) -> Vec<Option<Result<Registered, CloudError>>> {
        self.runtime
            .handle()
            .block_on(self.registrar.register_all(ledger, devices, stop))
    }
}

fn load_batch_config(args: &RegisterArgs) -> Result<StationConfig, CliError> {
    let path = args.cloud_config.as_deref().ok_or_else(|| {
        CliError::Usage(format!(
            "--register {} needs --cloud-config FILE",
            args.register
        ))
    })?;
    Ok(StationConfig::load(path)?)
}

/// The configuration's limits with the flags on top.
pub fn batch_limits(args: &RegisterArgs, config: &StationConfig) -> Result<Limits, CliError> {
    let mut limits = config.limits()?;
    for item in &args.rates {
        limits = limits.with_rates(item)?;
    }
    if let Some(share) = args.account_share {
        limits = limits.with_account_share(share)?;
    }
    Ok(limits)
}

/// `batch --dry-run`: the registration calls each row would need; none made.
pub fn dry_run_batch(
    job: &Path,
    job_config: &JobConfig,
    args: &RegisterArgs,
    json: bool,
) -> Result<u8, CliError> {
    let config = if args.register == Mode::None {
        args.cloud_config
            .as_deref()
            .map(StationConfig::load)
            .transpose()?
    } else {
        Some(load_batch_config(args)?)
    };
    if let Some(c) = &config {
        batch_limits(args, c)?;
    }
    let mut out = Vec::new();
    let mut rows = 0usize;
    for row in JobReader::open(job, job_config.clone())? {
        let Ok(req) = row else { continue };
        rows += 1;
        let groups = config
            .as_ref()
            .map(|c| c.groups_for(&req.groups))
            .unwrap_or_else(|| req.groups.clone());
        for step in args.register.steps(&groups) {
            let target = match &step {
                super::register::Step::AddToGroup(g) => format!("{} {g}", req.thing_name),
                _ => req.thing_name.clone(),
            };
            if json {
                out.push(json!({"serial": req.serial, "api": step.api().name(), "target": target}));
            } else {
                println!("would call {} {target}", step.api());
            }
        }
    }
    if json {
        println!(
            "{}",
            json!({"dry_run": true, "devices": rows, "calls": out})
        );
    } else if args.register == Mode::None {
        println!("--register none: no per-device call ({rows} device(s); JITP registers them on first connect)");
    }
    Ok(0)
}
