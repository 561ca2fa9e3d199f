//! Pacing of AWS IoT control-plane calls: one rate limiter per API.
//!
//! AWS throttles each control-plane API separately, per account and region
//! (CreateThing 100/s, AttachPolicy 15/s, ...), and every station that uses
//! the account shares those budgets. The station therefore keeps one limiter
//! per [`Api`], at the documented default rate (or a configured one) times
//! the station's [`Limits::with_account_share`].
//!
//! # Steady state: governor
//!
//! Each API's limiter is a [`governor`] GCRA limiter with a burst of one
//! token by default: calls are spaced `1 / rate` apart, so any one-second
//! window holds at most `rate + burst` calls. [`ApiLimiters::acquire`] asks
//! the limiter with `check()` and, when told "not until", sleeps with
//! [`tokio::time::sleep`] and asks again.
//!
//! # Adaptive rate: AIMD by replacing the limiter
//!
//! A governor quota is fixed for the life of its limiter. When a call comes
//! back throttled ([`ApiLimiters::on_throttled`]) the API's rate is
//! multiplied by [`Aimd::decrease_factor`], not below a floor; after
//! [`Aimd::quiet_period`] without throttling, successes
//! ([`ApiLimiters::on_success`]) raise it by [`Aimd::increase_per_second`] of
//! the configured rate per second, at most once per
//! [`Aimd::increase_interval`], up to the configured rate and never above.
//! Each change builds a new governor limiter at the new rate and swaps it in
//! behind a mutex (`Mutex<State>` holding an `Arc` of the limiter; waiters
//! fetch the current one on every try). The new limiter starts with its burst
//! spent, so a swap never lets an extra burst through; the cost is at most
//! one token per swap, and swaps happen only while the rate is moving: at
//! most once per decrease cooldown and once per increase interval.
//!
//! # Clock
//!
//! governor's default clock reads the machine's monotonic clock, which
//! `tokio::time::pause` does not stop. The limiters here use
//! [`TokioClock`], a `governor::clock::Clock` over [`tokio::time::Instant`],
//! and sleep with tokio's timer, so tests run on paused time deterministically
//! and instantly, and production runs on the real monotonic clock. tokio's
//! timer has a 1 ms resolution and fires on the tick after the deadline
//! (about 1.2 ms late on average); with a burst of one that lateness would
//! add to every period (47 calls/s at 50/s). [`ApiLimiters::acquire`]
//! therefore aims its sleep a millisecond early and sleeps again if it woke
//! too soon: measured on this machine, 49.4/s for one caller and 48.7/s for
//! 64 at 50/s. The limiter never grants early, so the one-second bound
//! holds whatever the timer does.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

/// How early [`ApiLimiters::acquire`] aims its sleep to make up for the
/// timer's lateness.
const TIMER_SLACK: std::time::Duration = std::time::Duration::from_millis(1);
/// The shortest sleep between two tries of a limiter.
const MIN_SLEEP: std::time::Duration = std::time::Duration::from_micros(50);

/// The rate used for an API whose default AWS does not publish: a guess,
/// on the low side, meant to be overridden once the account's quota is known.
pub const GUESSED_RATE: f64 = 10.0;

/// An AWS IoT control-plane API the station calls (the operation name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Api {
    /// CreateThing (100/s).
    CreateThing,
    /// DescribeThing (350/s).
    DescribeThing,
    /// UpdateThing (100/s).
    UpdateThing,
    /// DeleteThing (100/s).
    DeleteThing,
    /// ListThings (10/s).
    ListThings,
    /// AttachThingPrincipal (100/s).
    AttachThingPrincipal,
    /// DetachThingPrincipal (rate not published: guessed).
    DetachThingPrincipal,
    /// ListThingPrincipals (rate not published: guessed).
    ListThingPrincipals,
    /// AddThingToThingGroup (100/s).
    AddThingToThingGroup,
    /// CreateThingType (rate not published: guessed).
    CreateThingType,
    /// CreateThingGroup (rate not published: guessed).
    CreateThingGroup,
    /// AttachPolicy (15/s).
    AttachPolicy,
    /// CreatePolicy (rate not published: guessed).
    CreatePolicy,
    /// GetPolicy (10/s).
    GetPolicy,
    /// ListAttachedPolicies (rate not published: guessed).
    ListAttachedPolicies,
    /// RegisterCertificate (rate not published: guessed).
    RegisterCertificate,
    /// RegisterCertificateWithoutCA (10/s).
    RegisterCertificateWithoutCA,
    /// CreateCertificateFromCsr (rate not published: guessed).
    CreateCertificateFromCsr,
    /// CreateKeysAndCertificate (rate not published: guessed).
    CreateKeysAndCertificate,
    /// DescribeCertificate (10/s).
    DescribeCertificate,
    /// UpdateCertificate (rate not published: guessed).
    UpdateCertificate,
    /// DeleteCertificate (rate not published: guessed).
    DeleteCertificate,
    /// RegisterCACertificate (rate not published: guessed).
    RegisterCACertificate,
    /// DescribeCACertificate (rate not published: guessed).
    DescribeCACertificate,
    /// UpdateCACertificate (rate not published: guessed).
    UpdateCACertificate,
    /// GetRegistrationCode (rate not published: guessed).
    GetRegistrationCode,
    /// RegisterThing (about 10/s).
    RegisterThing,
    /// CreateProvisioningTemplate (rate not published: guessed).
    CreateProvisioningTemplate,
    /// DescribeProvisioningTemplate (rate not published: guessed).
    DescribeProvisioningTemplate,
    /// StartThingRegistrationTask (rate not published: guessed).
    StartThingRegistrationTask,
    /// ListThingRegistrationTaskReports (rate not published: guessed).
    ListThingRegistrationTaskReports,
    /// DescribeEndpoint (rate not published: guessed).
    DescribeEndpoint,
    /// DescribeThingType (rate not published: guessed).
    DescribeThingType,
    /// DescribeThingGroup (rate not published: guessed).
    DescribeThingGroup,
}

impl Api {
    /// Every API, in declaration order.
    pub const ALL: [Api; 34] = [
        Api::CreateThing,
        Api::DescribeThing,
        Api::UpdateThing,
        Api::DeleteThing,
        Api::ListThings,
        Api::AttachThingPrincipal,
        Api::DetachThingPrincipal,
        Api::ListThingPrincipals,
        Api::AddThingToThingGroup,
        Api::CreateThingType,
        Api::CreateThingGroup,
        Api::AttachPolicy,
        Api::CreatePolicy,
        Api::GetPolicy,
        Api::ListAttachedPolicies,
        Api::RegisterCertificate,
        Api::RegisterCertificateWithoutCA,
        Api::CreateCertificateFromCsr,
        Api::CreateKeysAndCertificate,
        Api::DescribeCertificate,
        Api::UpdateCertificate,
        Api::DeleteCertificate,
        Api::RegisterCACertificate,
        Api::DescribeCACertificate,
        Api::UpdateCACertificate,
        Api::GetRegistrationCode,
        Api::RegisterThing,
        Api::CreateProvisioningTemplate,
        Api::DescribeProvisioningTemplate,
        Api::StartThingRegistrationTask,
        Api::ListThingRegistrationTaskReports,
        Api::DescribeEndpoint,
        Api::DescribeThingType,
        Api::DescribeThingGroup,
    ];

    /// The operation name, as AWS spells it.
    pub fn name(self) -> &'static str {
        match self {
            Api::CreateThing => "CreateThing",
            Api::DescribeThing => "DescribeThing",
            Api::UpdateThing => "UpdateThing",
            Api::DeleteThing => "DeleteThing",
            Api::ListThings => "ListThings",
            Api::AttachThingPrincipal => "AttachThingPrincipal",
            Api::DetachThingPrincipal => "DetachThingPrincipal",
            Api::ListThingPrincipals => "ListThingPrincipals",
            Api::AddThingToThingGroup => "AddThingToThingGroup",
            Api::CreateThingType => "CreateThingType",
            Api::CreateThingGroup => "CreateThingGroup",
            Api::AttachPolicy => "AttachPolicy",
            Api::CreatePolicy => "CreatePolicy",
            Api::GetPolicy => "GetPolicy",
            Api::ListAttachedPolicies => "ListAttachedPolicies",
            Api::RegisterCertificate => "RegisterCertificate",
            Api::RegisterCertificateWithoutCA => "RegisterCertificateWithoutCA",
            Api::CreateCertificateFromCsr => "CreateCertificateFromCsr",
            Api::CreateKeysAndCertificate => "CreateKeysAndCertificate",
            Api::DescribeCertificate => "DescribeCertificate",
            Api::UpdateCertificate => "UpdateCertificate",
            Api::DeleteCertificate => "DeleteCertificate",
            Api::RegisterCACertificate => "RegisterCACertificate",
            Api::DescribeCACertificate => "DescribeCACertificate",
            Api::UpdateCACertificate => "UpdateCACertificate",
            Api::GetRegistrationCode => "GetRegistrationCode",
            Api::RegisterThing => "RegisterThing",
            Api::CreateProvisioningTemplate => "CreateProvisioningTemplate",
            Api::DescribeProvisioningTemplate => "DescribeProvisioningTemplate",
            Api::StartThingRegistrationTask => "StartThingRegistrationTask",
            Api::ListThingRegistrationTaskReports => "ListThingRegistrationTaskReports",
            Api::DescribeEndpoint => "DescribeEndpoint",
            Api::DescribeThingType => "DescribeThingType",
            Api::DescribeThingGroup => "DescribeThingGroup",
        }
    }

    /// AWS's default rate for the API in calls per second, per account and
    /// region, or [`GUESSED_RATE`] where AWS publishes none (see
    /// [`Self::rate_is_published`]).
    pub fn default_rate(self) -> f64 {
        match self {
            Api::DescribeThing => 350.0,
            Api::CreateThing
            | Api::UpdateThing
            | Api::DeleteThing
            | Api::AttachThingPrincipal
            | Api::AddThingToThingGroup => 100.0,
            Api::AttachPolicy => 15.0,
            Api::RegisterCertificateWithoutCA
            | Api::ListThings
            | Api::DescribeCertificate
            | Api::GetPolicy
            | Api::RegisterThing => 10.0,
            _ => GUESSED_RATE,
        }
    }

    /// Whether [`Self::default_rate`] is AWS's published default (true) or
    /// [`GUESSED_RATE`] (false).
    pub fn rate_is_published(self) -> bool {
        matches!(
            self,
            Api::DescribeThing
                | Api::CreateThing
                | Api::UpdateThing
                | Api::DeleteThing
                | Api::AttachThingPrincipal
                | Api::AddThingToThingGroup
                | Api::AttachPolicy
                | Api::RegisterCertificateWithoutCA
                | Api::ListThings
                | Api::DescribeCertificate
                | Api::GetPolicy
                | Api::RegisterThing
        )
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Api {
    type Err = LimitsError;

    /// The operation name, ASCII case ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Api::ALL
            .into_iter()
            .find(|api| api.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| LimitsError::UnknownApi {
                name: s.to_string(),
            })
    }
}

/// A rate configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitsError {
    /// A name that is not an [`Api`].
    #[error("unknown AWS IoT API {name:?}")]
    UnknownApi {
        /// The name given.
        name: String,
    },
    /// An item of a rate list that is not `Api=rate`.
    #[error(
        "rate override {item:?} is not of the form Api=calls-per-second (e.g. CreateThing=50)"
    )]
    Syntax {
        /// The item.
        item: String,
    },
    /// A rate that is not a positive, finite number of calls per second.
    #[error("{api}: rate {value:?} is not a positive number of calls per second")]
    Rate {
        /// The API.
        api: Api,
        /// The value given.
        value: String,
    },
    /// The same API twice in one rate list.
    #[error("{api} is given twice in the rate overrides")]
    Duplicate {
        /// The API.
        api: Api,
    },
    /// An account share outside (0, 1].
    #[error("account share {share} is not in (0, 1]: it is this station's fraction of the account's rates")]
    AccountShare {
        /// The value given.
        share: f64,
    },
    /// An AIMD parameter out of its range.
    #[error("AIMD setting {name} = {value} is out of range: {expected}")]
    Aimd {
        /// The setting.
        name: &'static str,
        /// The value given.
        value: String,
        /// What it must be.
        expected: &'static str,
    },
}

/// How the rate adapts to throttling (additive increase, multiplicative
/// decrease).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    /// On throttling the rate is multiplied by this, in (0, 1). Default 0.5.
    pub decrease_factor: f64,
    /// After one decrease, further throttling within this time does not
    /// decrease again: calls already in flight at the old rate come back
    /// throttled too, and one overload should cost one decrease.
    /// Default 1 s (AWS's buckets refill per second).
    pub decrease_cooldown: Duration,
    /// The floor, as a fraction of the configured rate, in (0, 1].
    /// Default 0.01.
    pub floor_fraction: f64,
    /// The floor in calls per second, whichever of the two floors is higher
    /// (but never above the configured rate). Default 0.5.
    pub floor_rate: f64,
    /// How long after the last throttling before the rate may rise.
    /// Default 1 s.
    pub quiet_period: Duration,
    /// The increase, as a fraction of the configured rate per second of
    /// success, in (0, 1]. Default 0.05.
    pub increase_per_second: f64,
    /// At most one increase (one limiter swap) per this time. Default 1 s.
    pub increase_interval: Duration,
}

impl Default for Aimd {
    fn default() -> Self {
        Aimd {
            decrease_factor: 0.5,
            decrease_cooldown: Duration::from_secs(1),
            floor_fraction: 0.01,
            floor_rate: 0.5,
            quiet_period: Duration::from_secs(1),
            increase_per_second: 0.05,
            increase_interval: Duration::from_secs(1),
        }
    }
}

impl Aimd {
    fn validate(&self) -> Result<(), LimitsError> {
        let bad = |name, value: f64, expected| LimitsError::Aimd {
            name,
            value: value.to_string(),
            expected,
        };
        if !(self.decrease_factor > 0.0 && self.decrease_factor < 1.0) {
            return Err(bad("decrease_factor", self.decrease_factor, "in (0, 1)"));
        }
        if !(self.floor_fraction > 0.0 && self.floor_fraction <= 1.0) {
            return Err(bad("floor_fraction", self.floor_fraction, "in (0, 1]"));
        }
        if !(self.floor_rate > 0.0 && self.floor_rate.is_finite()) {
            return Err(bad("floor_rate", self.floor_rate, "positive"));
        }
        if !(self.increase_per_second > 0.0 && self.increase_per_second <= 1.0) {
            return Err(bad(
                "increase_per_second",
                self.increase_per_second,
                "in (0, 1]",
            ));
        }
        if self.increase_interval.is_zero() {
            return Err(LimitsError::Aimd {
                name: "increase_interval",
                value: "0s".into(),
                expected: "longer than zero",
            });
        }
        Ok(())
    }
}

/// The rate configuration: defaults, overrides, the account share, burst
/// and AIMD settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    overrides: HashMap<Api, f64>,
    account_share: f64,
    burst: NonZeroU32,
    aimd: Aimd,
}

impl Default for Limits {
    /// AWS's defaults, the whole account to this station, burst 1, default
    /// AIMD.
    fn default() -> Self {
        Limits {
            overrides: HashMap::new(),
            account_share: 1.0,
            burst: NonZeroU32::MIN,
            aimd: Aimd::default(),
        }
    }
}

impl Limits {
    /// Sets the account's rate for one API, in calls per second (before the
    /// account share).
    pub fn with_rate(mut self, api: Api, rate: f64) -> Result<Self, LimitsError> {
        check_rate(api, rate)?;
        self.overrides.insert(api, rate);
        Ok(self)
    }

    /// Sets rates from a list such as `CreateThing=50,AttachPolicy=10`
    /// (see [`parse_overrides`]).
    pub fn with_rates(mut self, list: &str) -> Result<Self, LimitsError> {
        self.overrides.extend(parse_overrides(list)?);
        Ok(self)
    }

    /// This station's fraction of the account's rates, in (0, 1]: 0.25 when
    /// four stations share the account.
    pub fn with_account_share(mut self, share: f64) -> Result<Self, LimitsError> {
        if !(share > 0.0 && share <= 1.0) {
            return Err(LimitsError::AccountShare { share });
        }
        self.account_share = share;
        Ok(self)
    }

    /// How many calls may go back to back after an idle spell (default 1).
    /// Any one-second window holds at most `rate + burst` calls.
    pub fn with_burst(mut self, burst: NonZeroU32) -> Self {
        self.burst = burst;
        self
    }

    /// Sets how the rate adapts to throttling.
    pub fn with_aimd(mut self, aimd: Aimd) -> Result<Self, LimitsError> {
        aimd.validate()?;
        self.aimd = aimd;
        Ok(self)
    }

    /// The station's configured rate for an API: the override or AWS's
    /// default, times the account share. The adaptive rate never exceeds it.
    pub fn configured_rate(&self, api: Api) -> f64 {
        self.overrides
            .get(&api)
            .copied()
            .unwrap_or_else(|| api.default_rate())
            * self.account_share
    }

    /// The account share.
    pub fn account_share(&self) -> f64 {
        self.account_share
    }

    /// The burst.
    pub fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    /// The AIMD settings.
    pub fn aimd(&self) -> &Aimd {
        &self.aimd
    }
}

fn check_rate(api: Api, rate: f64) -> Result<(), LimitsError> {
    // Below one call a day, or infinite, is a typo rather than a rate.
    if rate.is_finite() && rate >= 1e-5 {
        Ok(())
    } else {
        Err(LimitsError::Rate {
            api,
            value: rate.to_string(),
        })
    }
}

/// Parses rate overrides for a command-line flag: `Api=rate` items
/// separated by commas, e.g. `CreateThing=50,AttachPolicy=10`; API names are
/// AWS's operation names (ASCII case ignored), rates are calls per second
/// for the whole account. An empty string gives no overrides.
pub fn parse_overrides(list: &str) -> Result<HashMap<Api, f64>, LimitsError> {
    let mut out = HashMap::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, value) = item.split_once('=').ok_or_else(|| LimitsError::Syntax {
            item: item.to_string(),
        })?;
        let api: Api = name.parse()?;
        let rate: f64 = value.trim().parse().map_err(|_| LimitsError::Rate {
            api,
            value: value.trim().to_string(),
        })?;
        check_rate(api, rate)?;
        if out.insert(api, rate).is_some() {
            return Err(LimitsError::Duplicate { api });
        }
    }
    Ok(out)
}

/// governor's clock over tokio's: follows `tokio::time::pause` in tests and
/// the monotonic clock otherwise. Instants are nanoseconds since the clock
/// was made.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Instant,
}

impl TokioClock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        TokioClock {
            origin: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

/// One API's pacing: its limits and its adaptive state.
#[derive(Debug)]
struct Slot {
    configured: f64,
    floor: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rate: f64,
    limiter: Arc<Limiter>,
    last_throttled: Option<Instant>,
    last_decrease: Option<Instant>,
    last_change: Instant,
}

/// The station's limiters, one per [`Api`], with AIMD on top.
///
/// Shared by every task that calls AWS (`Arc<ApiLimiters>`); all methods
/// take `&self`.
#[derive(Debug)]
pub struct ApiLimiters {
    slots: HashMap<Api, Slot>,
    clock: TokioClock,
    burst: NonZeroU32,
    aimd: Aimd,
}

impl ApiLimiters {
    /// Limiters for every API at the configured rates.
    pub fn new(limits: &Limits) -> Self {
        let clock = TokioClock::new();
        let now = Instant::now();
        let slots = Api::ALL
            .into_iter()
            .map(|api| {
                let configured = limits.configured_rate(api);
                let floor = (configured * limits.aimd.floor_fraction)
                    .max(limits.aimd.floor_rate)
                    .min(configured);
                let limiter = Arc::new(Limiter::direct_with_clock(
                    quota(configured, limits.burst),
                    clock,
                ));
                let state = State {
                    rate: configured,
                    limiter,
                    last_throttled: None,
                    last_decrease: None,
                    last_change: now,
                };
                (
                    api,
                    Slot {
                        configured,
                        floor,
                        state: Mutex::new(state),
                    },
                )
            })
            .collect();
        ApiLimiters {
            slots,
            clock,
            burst: limits.burst,
            aimd: limits.aimd,
        }
    }

    fn slot(&self, api: Api) -> &Slot {
        // Every Api is in ALL, and `new` makes a slot for each.
        &self.slots[&api]
    }

    /// Waits until a call to `api` may go out, and takes its token.
    pub async fn acquire(&self, api: Api) {
        let slot = self.slot(api);
        loop {
            // The limiter may be swapped while we sleep: fetch it every try.
            let limiter = Arc::clone(&lock(&slot.state).limiter);
            match limiter.check() {
                Ok(()) => return,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    // tokio's timer fires on the millisecond tick after the
                    // deadline (about 1.2 ms late on average), and with a
                    // burst of one the lateness adds to every period: aim a
                    // millisecond early. A wake-up that is then still early
                    // sleeps the rest (under paused time: exactly 1 ms).
                    tokio::time::sleep(wait.saturating_sub(TIMER_SLACK).max(MIN_SLEEP)).await;
                }
            }
        }
    }

    /// Records that a call to `api` came back throttled: the rate drops by
    /// the decrease factor (once per cooldown), not below the floor.
    pub fn on_throttled(&self, api: Api) {
        let slot = self.slot(api);
        let now = Instant::now();
        let mut state = lock(&slot.state);
        state.last_throttled = Some(now);
        let cooled = state
            .last_decrease
            .is_none_or(|t| now.duration_since(t) >= self.aimd.decrease_cooldown);
        if !cooled {
            return;
        }
        state.last_decrease = Some(now);
        let rate = (state.rate * self.aimd.decrease_factor).max(slot.floor);
        self.set_rate(&mut state, rate, now);
    }

    /// Records that a call to `api` went through without throttling (any
    /// answer but "throttled"): after the quiet period the rate climbs back
    /// towards the configured rate.
    pub fn on_success(&self, api: Api) {
        let slot = self.slot(api);
        let mut state = lock(&slot.state);
        if state.rate >= slot.configured {
            return;
        }
        let now = Instant::now();
        // Recovery time counts from the later of the last change and the end
        // of the quiet period after the last throttling.
        let mut since = state.last_change;
        if let Some(t) = state.last_throttled {
            since = since.max(t + self.aimd.quiet_period);
        }
        if now < since + self.aimd.increase_interval {
            return;
        }
        let secs = now.duration_since(since).as_secs_f64();
        let rate = (state.rate + self.aimd.increase_per_second * slot.configured * secs)
            .min(slot.configured);
        self.set_rate(&mut state, rate, now);
    }

    /// The API's current rate in calls per second.
    pub fn current_rate(&self, api: Api) -> f64 {
        lock(&self.slot(api).state).rate
    }

    /// The API's configured rate (AWS's default or the override, times the
    /// account share): the most the current rate can be.
    pub fn configured_rate(&self, api: Api) -> f64 {
        self.slot(api).configured
    }

    fn set_rate(&self, state: &mut State, rate: f64, now: Instant) {
        state.rate = rate;
        state.last_change = now;
        let limiter = Limiter::direct_with_clock(quota(rate, self.burst), self.clock);
        // Start with the burst spent, so that the swap lets nothing extra
        // through. A fresh limiter always has its burst, so this succeeds.
        let _ = limiter.check_n(self.burst);
        state.limiter = Arc::new(limiter);
    }
}

fn quota(rate: f64, burst: NonZeroU32) -> Quota {
    // Rates are validated positive and finite, so the period is a positive
    // finite duration; at least 1 ns even for absurdly high rates.
    let period = Duration::from_secs_f64(1.0 / rate).max(Duration::from_nanos(1));
    Quota::with_period(period)
        .unwrap_or_else(|| unreachable!("period is at least 1 ns"))
        .allow_burst(burst)
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update leaves the state whole: a panic elsewhere cannot tear it.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls `acquire` from `tasks` concurrent tasks for `secs` simulated
    /// seconds; returns the grant times in seconds since the start, sorted.
    async fn grants(limiters: Arc<ApiLimiters>, api: Api, tasks: usize, secs: f64) -> Vec<f64> {
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let limiters = Arc::clone(&limiters);
            handles.push(tokio::spawn(async move {
                let mut times = Vec::new();
                // Bounded, so that a limiter that does not wait fails the
                // test instead of spinning on stopped time.
                while times.len() < 100_000 {
                    limiters.acquire(api).await;
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    times.push(now.duration_since(start).as_secs_f64());
                }
                times
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.expect("task"));
        }
        all.sort_by(f64::total_cmp);
        all
    }

    /// The most grants in any closed one-second window (`times` sorted).
    fn max_per_second(times: &[f64]) -> usize {
        let mut end = 0;
        let mut most = 0;
        for (i, &t) in times.iter().enumerate() {
            while end < times.len() && times[end] <= t + 1.0 + 1e-9 {
                end += 1;
            }
            most = most.max(end - i);
        }
        most
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_holds_the_limit_and_uses_it() {
        for (rate, tasks) in [(10.0, 1), (50.0, 1), (10.0, 4), (50.0, 8)] {
            let limits = Limits::default().with_rate(Api::CreateThing, rate).unwrap();
            let limiters = Arc::new(ApiLimiters::new(&limits));
            let times = grants(limiters, Api::CreateThing, tasks, 30.0).await;
            let peak = max_per_second(&times);
            assert!(
                peak <= rate as usize + 1,
                "rate {rate}, {tasks} task(s): {peak} calls in one second"
            );
            let average = times.len() as f64 / 30.0;
            assert!(
                average >= 0.95 * rate,
                "rate {rate}, {tasks} task(s): average {average}/s"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_is_configurable_and_bounded() {
        let limits = Limits::default()
            .with_rate(Api::AttachPolicy, 10.0)
            .unwrap()
            .with_burst(NonZeroU32::new(5).unwrap());
        let limiters = Arc::new(ApiLimiters::new(&limits));
        let times = grants(limiters, Api::AttachPolicy, 3, 20.0).await;
        // The first five go at once, then 10/s.
        assert!(times[..5].iter().all(|&t| t == 0.0), "{:?}", &times[..6]);
        assert!(times[5] > 0.0);
        assert!(max_per_second(&times) <= 15);
        assert!(times.len() as f64 / 20.0 >= 9.5);
    }

    #[tokio::test(start_paused = true)]
    async fn account_share_scales_every_rate() {
        let limits = Limits::default().with_account_share(0.25).unwrap();
        let limiters = Arc::new(ApiLimiters::new(&limits));
        assert_eq!(limiters.configured_rate(Api::CreateThing), 25.0);
        assert_eq!(limiters.current_rate(Api::DescribeThing), 87.5);
        assert_eq!(limiters.current_rate(Api::AttachPolicy), 3.75);
        let times = grants(Arc::clone(&limiters), Api::CreateThing, 2, 30.0).await;
        let average = times.len() as f64 / 30.0;
        assert!((23.75..=25.5).contains(&average), "average {average}/s");
        assert!(max_per_second(&times) <= 26);
    }

    #[test]
    fn defaults_follow_the_published_table() {
        let limits = Limits::default();
        for (api, rate) in [
            (Api::CreateThing, 100.0),
            (Api::DescribeThing, 350.0),
            (Api::AttachThingPrincipal, 100.0),
            (Api::AddThingToThingGroup, 100.0),
            (Api::AttachPolicy, 15.0),
            (Api::RegisterCertificateWithoutCA, 10.0),
            (Api::ListThings, 10.0),
            (Api::DescribeCertificate, 10.0),
            (Api::GetPolicy, 10.0),
            (Api::RegisterThing, 10.0),
        ] {
            assert_eq!(limits.configured_rate(api), rate, "{api}");
            assert!(api.rate_is_published(), "{api}");
        }
        for api in [
            Api::CreateKeysAndCertificate,
            Api::CreateCertificateFromCsr,
            Api::RegisterCertificate,
            Api::CreatePolicy,
            Api::UpdateCertificate,
        ] {
            assert_eq!(limits.configured_rate(api), GUESSED_RATE, "{api}");
            assert!(!api.rate_is_published(), "{api}");
        }
        for api in Api::ALL {
            assert_eq!(api.name().parse::<Api>().unwrap(), api);
            if !api.rate_is_published() {
                assert_eq!(api.default_rate(), GUESSED_RATE, "{api}");
            }
        }
    }

    #[test]
    fn all_lists_every_api_once() {
        // Exhaustive: a new variant does not compile here until it is given
        // a place, which must be its index in ALL (slots are made from ALL).
        fn place(api: Api) -> usize {
            match api {
                Api::CreateThing => 0,
                Api::DescribeThing => 1,
                Api::UpdateThing => 2,
                Api::DeleteThing => 3,
                Api::ListThings => 4,
                Api::AttachThingPrincipal => 5,
                Api::DetachThingPrincipal => 6,
                Api::ListThingPrincipals => 7,
                Api::AddThingToThingGroup => 8,
                Api::CreateThingType => 9,
                Api::CreateThingGroup => 10,
                Api::AttachPolicy => 11,
                Api::CreatePolicy => 12,
                Api::GetPolicy => 13,
                Api::ListAttachedPolicies => 14,
                Api::RegisterCertificate => 15,
                Api::RegisterCertificateWithoutCA => 16,
                Api::CreateCertificateFromCsr => 17,
                Api::CreateKeysAndCertificate => 18,
                Api::DescribeCertificate => 19,
                Api::UpdateCertificate => 20,
                Api::DeleteCertificate => 21,
                Api::RegisterCACertificate => 22,
                Api::DescribeCACertificate => 23,
                Api::UpdateCACertificate => 24,
                Api::GetRegistrationCode => 25,
                Api::RegisterThing => 26,
                Api::CreateProvisioningTemplate => 27,
                Api::DescribeProvisioningTemplate => 28,
                Api::StartThingRegistrationTask => 29,
                Api::ListThingRegistrationTaskReports => 30,
                Api::DescribeEndpoint => 31,
                Api::DescribeThingType => 32,
                Api::DescribeThingGroup => 33,
            }
        }
        for (i, api) in Api::ALL.into_iter().enumerate() {
            assert_eq!(place(api), i, "{api}");
        }
    }

    #[test]
    fn overrides_parse_from_a_flag() {
        let limits = Limits::default()
            .with_rates(" CreateThing=50, attachpolicy=7.5 ,")
            .unwrap()
            .with_account_share(0.5)
            .unwrap();
        assert_eq!(limits.configured_rate(Api::CreateThing), 25.0);
        assert_eq!(limits.configured_rate(Api::AttachPolicy), 3.75);
        assert_eq!(limits.configured_rate(Api::DescribeThing), 175.0);
        assert!(parse_overrides("").unwrap().is_empty());

        let err = |s: &str| parse_overrides(s).unwrap_err();
        assert_eq!(
            err("CreateThing"),
            LimitsError::Syntax {
                item: "CreateThing".into()
            }
        );
        assert_eq!(
            err("CreateThings=5"),
            LimitsError::UnknownApi {
                name: "CreateThings".into()
            }
        );
        for bad in ["x", "0", "-3", "inf", "NaN"] {
            assert!(
                matches!(
                    err(&format!("AttachPolicy={bad}")),
                    LimitsError::Rate {
                        api: Api::AttachPolicy,
                        ..
                    }
                ),
                "{bad}"
            );
        }
        assert_eq!(
            err("AttachPolicy=1,AttachPolicy=2"),
            LimitsError::Duplicate {
                api: Api::AttachPolicy
            }
        );
        for share in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(
                Limits::default().with_account_share(share).is_err(),
                "{share}"
            );
        }
        let aimd = Aimd {
            decrease_factor: 1.0,
            ..Aimd::default()
        };
        assert!(matches!(
            Limits::default().with_aimd(aimd),
            Err(LimitsError::Aimd {
                name: "decrease_factor",
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_drops_the_rate_then_it_recovers_to_the_configured_rate() {
        let api = Api::CreateThing;
        let limiters = ApiLimiters::new(&Limits::default());
        limiters.on_throttled(api);
        assert_eq!(limiters.current_rate(api), 50.0);
        // In-flight calls coming back throttled do not halve it again.
        limiters.on_throttled(api);
        assert_eq!(limiters.current_rate(api), 50.0);
        tokio::time::advance(Duration::from_millis(1001)).await;
        limiters.on_throttled(api);
        assert_eq!(limiters.current_rate(api), 25.0);

        // Quiet period: no increase yet.
        let start = Instant::now();
        let mut rates = vec![];
        while Instant::now() < start + Duration::from_secs(60) && rates.len() < 100_000 {
            limiters.acquire(api).await;
            limiters.on_success(api);
            rates.push((start.elapsed().as_secs_f64(), limiters.current_rate(api)));
        }
        assert!(rates
            .iter()
            .filter(|(t, _)| *t < 1.9)
            .all(|&(_, r)| r == 25.0));
        assert!(rates.windows(2).all(|w| w[0].1 <= w[1].1), "never falls");
        assert!(rates.iter().all(|&(_, r)| r <= 100.0), "never above");
        // +5/s per second from 25 needs 15 s after the quiet second.
        let full = rates.iter().find(|&&(_, r)| r == 100.0).expect("recovers");
        assert!((15.0..=18.0).contains(&full.0), "back at {}", full.0);
        assert_eq!(limiters.current_rate(api), 100.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_never_falls_below_the_floor() {
        let api = Api::AttachPolicy;
        let limiters = ApiLimiters::new(&Limits::default());
        for _ in 0..20 {
            limiters.on_throttled(api);
            tokio::time::advance(Duration::from_secs(2)).await;
        }
        assert_eq!(limiters.current_rate(api), 0.5);
        // And pacing still works at the floor: 2 s per call.
        limiters.acquire(api).await;
        let t = Instant::now();
        limiters.acquire(api).await;
        assert_eq!(t.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_decrease_takes_effect_at_once() {
        let api = Api::CreateThing;
        let limiters = Arc::new(ApiLimiters::new(&Limits::default()));
        limiters.acquire(api).await;
        limiters.on_throttled(api);
        // The next call waits a full period at the new rate (50/s).
        let t = Instant::now();
        limiters.acquire(api).await;
        assert_eq!(t.elapsed(), Duration::from_millis(20));
    }

    /// An account that allows `quota` successful calls in any trailing
    /// second and throttles the rest, called by `workers` tasks with `latency`
    /// per call. Returns per-second (calls, throttled) counts.
    async fn against_a_true_quota(
        limiters: Arc<ApiLimiters>,
        api: Api,
        quota: usize,
        workers: usize,
        latency: Duration,
        secs: u64,
    ) -> Vec<(usize, usize)> {
        use std::collections::VecDeque;
        let start = Instant::now();
        let end = start + Duration::from_secs(secs);
        let accepted = Arc::new(Mutex::new(VecDeque::<Instant>::new()));
        let log = Arc::new(Mutex::new(vec![(0usize, 0usize); secs as usize]));
        let mut handles = Vec::new();
        for _ in 0..workers {
            let (limiters, accepted, log) = (
                Arc::clone(&limiters),
                Arc::clone(&accepted),
                Arc::clone(&log),
            );
            handles.push(tokio::spawn(async move {
                for _ in 0..100_000 {
                    limiters.acquire(api).await;
                    let now = Instant::now();
                    if now >= end {
                        return;
                    }
                    let throttled = {
                        let mut acc = accepted.lock().unwrap();
                        while acc
                            .front()
                            .is_some_and(|&t| now.duration_since(t) >= Duration::from_secs(1))
                        {
                            acc.pop_front();
                        }
                        let full = acc.len() >= quota;
                        if !full {
                            acc.push_back(now);
                        }
                        full
                    };
                    let second = now.duration_since(start).as_secs() as usize;
                    {
                        let mut log = log.lock().unwrap();
                        log[second].0 += 1;
                        log[second].1 += usize::from(throttled);
                    }
                    tokio::time::sleep(latency).await;
                    if throttled {
                        limiters.on_throttled(api);
                    } else {
                        limiters.on_success(api);
                    }
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        Arc::try_unwrap(log).unwrap().into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_wrong_guess_settles_under_the_true_quota() {
        // The station believes 100/s; the account allows 40/s.
        let api = Api::CreateThing;
        let limiters = Arc::new(ApiLimiters::new(&Limits::default()));
        let log = against_a_true_quota(
            Arc::clone(&limiters),
            api,
            40,
            4,
            Duration::from_millis(30),
            90,
        )
        .await;
        let first: usize = log[..3].iter().map(|s| s.1).sum();
        assert!(first > 0, "the guess is too high at first");
        // Settled within five seconds: from then on no second carries more
        // calls than the quota (plus one), and throttling stays rare in every
        // ten-second stretch.
        let tail = &log[5..];
        assert!(tail.iter().all(|s| s.0 <= 41), "{log:?}");
        for block in tail.chunks(10) {
            let calls: usize = block.iter().map(|s| s.0).sum();
            let throttled: usize = block.iter().map(|s| s.1).sum();
            assert!(throttled * 100 < calls * 3, "{block:?}");
        }
        let calls: usize = tail.iter().map(|s| s.0).sum();
        let throttled: usize = tail.iter().map(|s| s.1).sum();
        let rate = calls as f64 / tail.len() as f64;
        let share = throttled as f64 / calls as f64;
        eprintln!(
            "settled: {rate:.1} calls/s, {:.2}% throttled",
            share * 100.0
        );
        assert!(rate < 40.0, "{rate} calls/s");
        assert!(rate > 20.0, "too timid: {rate} calls/s");
        assert!(share < 0.02, "{:.2}% throttled", share * 100.0);
        assert!(limiters.current_rate(api) < 100.0);
    }
}
