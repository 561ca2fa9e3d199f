//! Retrying cloud calls: classification of failures, backoff, and the
//! driver that paces, retries and feeds throttling back to the limiters.
//!
//! A call's failure is described by a [`CallError`] (the AWS error code, the
//! HTTP status, or a transport failure), and [`classify`] maps it to a
//! [`Retry`] class. [`run_with_retry`] takes a limiter token before every
//! attempt, reports throttling to [`ApiLimiters::on_throttled`] (and every
//! other answer to [`ApiLimiters::on_success`]), sleeps an exponential
//! backoff with full jitter between attempts, and gives up with a typed
//! [`RetryError`] naming the API and the attempts.
//!
//! # AWS error codes
//!
//! The code decides, as in the AWS SDKs: AWS sends throttling as HTTP 400.
//! The status is used only when there is no known code.
//!
//! | code | class | why |
//! |---|---|---|
//! | `ThrottlingException`, `TooManyRequestsException`, `Throttling`, `RequestLimitExceeded`, `SlowDown`, `RequestThrottled` | [`Retry::Throttled`] | over the API's rate |
//! | `LimitExceededException` | [`Retry::Permanent`] | in AWS IoT this is a quota (things in a group, certificates, policy versions, CA certificates with one subject), not a rate: waiting does not help |
//! | `ServiceUnavailableException`, `InternalFailureException`, `InternalServerException`, `InternalException`, `InternalError`, `RequestTimeout`, `RequestTimeoutException` | [`Retry::Transient`] | AWS's side |
//! | `ConflictingResourceUpdateException` | [`Retry::Transient`] | two pending updates of one resource; the other one finishes |
//! | `ResourceAlreadyExistsException` | [`Retry::AlreadyDone`] | the station's steps are idempotent; see below |
//! | `ResourceNotFoundException`, `InvalidRequestException`, `UnauthorizedException`, `CertificateValidationException`, `CertificateStateException`, `CertificateConflictException`, `DeleteConflictException`, `VersionConflictException`, `VersionsLimitExceededException`, `MalformedPolicyException`, `RegistrationCodeValidationException`, `InvalidStateTransitionException`, `ValidationException`, `AccessDeniedException`, `ExpiredTokenException`, `UnrecognizedClientException`, `InvalidSignatureException` | [`Retry::Permanent`] | the request or the credentials are wrong |
//! | no code or an unknown one: status 429 | [`Retry::Throttled`] | |
//! | no code or an unknown one: status 5xx | [`Retry::Transient`] | e.g. a proxy's or a local stand-in's HTML error page |
//! | no code or an unknown one: other status, or none | [`Retry::Permanent`] | |
//! | timeout, connection refused, reset or dropped | [`Retry::Transient`] | |
//! | request not built or not signed | [`Retry::Permanent`] | |
//!
//! [`Retry::AlreadyDone`] means a resource with that identity exists. For
//! RegisterCertificate or AddThingToThingGroup that is the station's own
//! earlier attempt. For CreateThing or CreatePolicy it may be another
//! configuration under the same name (CreateThing with the same
//! configuration succeeds again): the calling step decides whether the
//! existing resource is its own (e.g. with DescribeThing).
//!
//! Retrying a timed-out or dropped call may run it twice on AWS's side; the
//! station's steps are written to be idempotent, and a second run shows up
//! as success or [`Retry::AlreadyDone`].

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::limits::{Api, ApiLimiters};

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Retry {
    /// The call succeeded.
    Done,
    /// The call failed because its effect is already there: a success for an
    /// idempotent step (see the module docs for what the step must check).
    AlreadyDone,
    /// Over the rate: slow this API down and try again.
    Throttled,
    /// A failure that may pass (5xx, timeouts, dropped connections): try again.
    Transient,
    /// A failure that will not pass by trying again (4xx other than
    /// throttling).
    Permanent,
}

impl Retry {
    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Retry::Throttled | Retry::Transient)
    }
}

impl fmt::Display for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Retry::Done => "done",
            Retry::AlreadyDone => "already done",
            Retry::Throttled => "throttled",
            Retry::Transient => "transient",
            Retry::Permanent => "permanent",
        })
    }
}

/// How a call failed, before any answer or with one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// AWS (or something in between) answered with an error.
    Service,
    /// No answer in time.
    Timeout,
    /// The connection could not be made, or was reset or dropped before the
    /// answer.
    Connection,
    /// The request could not be built or signed: nothing was sent.
    Request,
}

/// A failed cloud call, as the SDK layer reports it.
#[derive(Debug)]
pub struct CallError {
    /// The API called.
    pub api: Api,
    /// How it failed.
    pub kind: FailureKind,
    /// AWS's error code (`x-amzn-ErrorType` or the body's `__type`), without
    /// any `:`-suffix or namespace prefix.
    pub code: Option<String>,
    /// The HTTP status, if an answer came.
    pub status: Option<u16>,
    /// AWS's message, if any.
    pub message: Option<String>,
    /// The underlying error (the SDK's), kept for its chain.
    pub source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl CallError {
    /// A service error with a code and a status.
    pub fn service(api: Api, code: &str, status: u16) -> Self {
        CallError {
            api,
            kind: FailureKind::Service,
            code: Some(code.to_string()),
            status: Some(status),
            message: None,
            source: None,
        }
    }

    /// A failure with no answer (or no code): a timeout, a dropped
    /// connection, an unbuilt request, or a bare status.
    pub fn bare(api: Api, kind: FailureKind, status: Option<u16>) -> Self {
        CallError {
            api,
            kind,
            code: None,
            status,
            message: None,
            source: None,
        }
    }

    /// Adds AWS's message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Adds the underlying error.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The class of this failure (see [`classify`]).
    pub fn class(&self) -> Retry {
        classify(self)
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.api)?;
        match (&self.code, self.kind) {
            (Some(code), _) => f.write_str(code)?,
            (None, FailureKind::Service) => f.write_str("service error")?,
            (None, FailureKind::Timeout) => f.write_str("timed out")?,
            (None, FailureKind::Connection) => f.write_str("connection failed")?,
            (None, FailureKind::Request) => f.write_str("request not sent")?,
        }
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}

impl StdError for CallError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

const THROTTLING: &[&str] = &[
    "ThrottlingException",
    "TooManyRequestsException",
    "Throttling",
    "ThrottledException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "SlowDown",
];

const TRANSIENT: &[&str] = &[
    "ServiceUnavailableException",
    "ServiceUnavailable",
    "InternalFailureException",
    "InternalFailure",
    "InternalServerException",
    "InternalServerError",
    "InternalException",
    "InternalError",
    "RequestTimeout",
    "RequestTimeoutException",
    "ConflictingResourceUpdateException",
];

/// Codes known to be permanent. Unknown codes with a 4xx status are
/// permanent too; these are listed so a 5xx status does not override them.
const PERMANENT: &[&str] = &[
    "LimitExceededException",
    "ResourceNotFoundException",
    "InvalidRequestException",
    "UnauthorizedException",
    "CertificateValidationException",
    "CertificateStateException",
    "CertificateConflictException",
    "DeleteConflictException",
    "VersionConflictException",
    "VersionsLimitExceededException",
    "MalformedPolicyException",
    "RegistrationCodeValidationException",
    "InvalidStateTransitionException",
    "ValidationException",
    "AccessDeniedException",
    "ExpiredTokenException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
];

/// The class of a failed call. Pure: the code decides when it is known,
/// then the status, then the kind of failure (table in the module docs).
pub fn classify(err: &CallError) -> Retry {
    if let Some(code) = err.code.as_deref() {
        if THROTTLING.contains(&code) {
            return Retry::Throttled;
        }
        if TRANSIENT.contains(&code) {
            return Retry::Transient;
        }
        if code == "ResourceAlreadyExistsException" {
            return Retry::AlreadyDone;
        }
        if PERMANENT.contains(&code) {
            return Retry::Permanent;
        }
    }
    match (err.status, err.kind) {
        (Some(429), _) => Retry::Throttled,
        (Some(500..=599), _) => Retry::Transient,
        (Some(_), _) => Retry::Permanent,
        (None, FailureKind::Timeout | FailureKind::Connection) => Retry::Transient,
        (None, FailureKind::Service | FailureKind::Request) => Retry::Permanent,
    }
}

/// The class of an attempt's result: [`Retry::Done`] for a success.
pub fn classify_result<T>(result: &Result<T, CallError>) -> Retry {
    match result {
        Ok(_) => Retry::Done,
        Err(e) => classify(e),
    }
}

/// A retry policy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// No attempt at all.
    #[error("max attempts must be at least 1")]
    NoAttempts,
    /// A zero base delay, or a cap below the base.
    #[error("backoff base {base:?} must be above zero and at most the cap {cap:?}")]
    Backoff {
        /// The base.
        base: Duration,
        /// The cap.
        cap: Duration,
    },
}

/// The random source of the jitter: SplitMix64 over an atomic counter.
/// Not for secrets; seeded from the standard library's per-process random
/// hash keys, or from a fixed seed for reproducible runs.
#[derive(Debug)]
pub struct Jitter {
    state: AtomicU64,
}

impl Jitter {
    /// A random seed.
    pub fn random() -> Self {
        Self::seeded(RandomState::new().hash_one(0x6a09_e667_f3bc_c908_u64))
    }

    /// A fixed seed: the same delays every run.
    pub fn seeded(seed: u64) -> Self {
        Jitter {
            state: AtomicU64::new(seed),
        }
    }

    fn next_u64(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, max].
    fn up_to(&self, max: Duration) -> Duration {
        let max = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        let r = self.next_u64();
        Duration::from_nanos(match max.checked_add(1) {
            Some(n) => r % n,
            None => r,
        })
    }
}

impl Clone for Jitter {
    fn clone(&self) -> Self {
        Jitter::seeded(self.next_u64())
    }
}

/// Exponential backoff with full jitter and an attempt budget.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    base: Duration,
    cap: Duration,
    max_attempts: u32,
    jitter: Jitter,
}

impl Default for RetryPolicy {
    /// Base 100 ms, cap 20 s, 8 attempts, random jitter.
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(20),
            max_attempts: 8,
            jitter: Jitter::random(),
        }
    }
}

impl RetryPolicy {
    /// A policy: the delay after the n-th failed attempt is uniform in
    /// `[0, min(cap, base * 2^(n-1))]`; at most `max_attempts` attempts in
    /// all (1: no retry).
    pub fn new(base: Duration, cap: Duration, max_attempts: u32) -> Result<Self, PolicyError> {
        if max_attempts == 0 {
            return Err(PolicyError::NoAttempts);
        }
        if base.is_zero() || base > cap {
            return Err(PolicyError::Backoff { base, cap });
        }
        Ok(RetryPolicy {
            base,
            cap,
            max_attempts,
            jitter: Jitter::random(),
        })
    }

    /// Replaces the jitter source (e.g. a seeded one for tests).
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The attempt budget.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The base delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The longest delay after the `failed`-th failed attempt (from 1):
    /// `min(cap, base * 2^(failed-1))`.
    pub fn ceiling(&self, failed: u32) -> Duration {
        let doublings = failed.saturating_sub(1).min(31);
        self.base.saturating_mul(1 << doublings).min(self.cap)
    }

    /// The delay to sleep after the `failed`-th failed attempt: uniform in
    /// `[0, ceiling(failed)]`.
    pub fn delay(&self, failed: u32) -> Duration {
        self.jitter.up_to(self.ceiling(failed))
    }
}

/// A call that ended well.
#[derive(Debug)]
pub struct Completed<T> {
    /// What came of it.
    pub outcome: Outcome<T>,
    /// Attempts made, the last included.
    pub attempts: u32,
}

/// A call's good ending.
#[derive(Debug)]
pub enum Outcome<T> {
    /// It succeeded.
    Done(T),
    /// It failed with [`Retry::AlreadyDone`]: the resource exists.
    AlreadyDone(CallError),
}

/// A call that did not end well.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError {
    /// A failure that trying again will not cure.
    #[error("{api}: failed on attempt {attempts}, not retried")]
    Permanent {
        /// The API.
        api: Api,
        /// Attempts made.
        attempts: u32,
        /// The failure.
        #[source]
        last: CallError,
    },
    /// Every attempt of the budget failed with a retryable failure.
    #[error("{api}: gave up after {attempts} attempts, the last one {class}")]
    Exhausted {
        /// The API.
        api: Api,
        /// Attempts made: the policy's budget.
        attempts: u32,
        /// The last failure's class.
        class: Retry,
        /// The last failure.
        #[source]
        last: CallError,
    },
}

impl RetryError {
    /// The API.
    pub fn api(&self) -> Api {
        match self {
            RetryError::Permanent { api, .. } | RetryError::Exhausted { api, .. } => *api,
        }
    }

    /// Attempts made.
    pub fn attempts(&self) -> u32 {
        match self {
            RetryError::Permanent { attempts, .. } | RetryError::Exhausted { attempts, .. } => {
                *attempts
            }
        }
    }

    /// The last failure.
    pub fn last(&self) -> &CallError {
        match self {
            RetryError::Permanent { last, .. } | RetryError::Exhausted { last, .. } => last,
        }
    }
}

/// Runs `call` against `api` until it succeeds, fails for good, or the
/// policy's attempt budget is spent.
///
/// Before every attempt it waits for the API's limiter. A throttled attempt
/// slows the API down ([`ApiLimiters::on_throttled`]); any other answer
/// counts as a success for pacing ([`ApiLimiters::on_success`]), except a
/// transient failure, which says nothing about the rate. Between attempts it
/// sleeps [`RetryPolicy::delay`] with tokio's timer.
pub async fn run_with_retry<T, F, Fut>(
    limits: &ApiLimiters,
    policy: &RetryPolicy,
    api: Api,
    mut call: F,
) -> Result<Completed<T>, RetryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut attempts = 0;
    loop {
        limits.acquire(api).await;
        attempts += 1;
        let result = call().await;
        let class = classify_result(&result);
        match class {
            Retry::Throttled => limits.on_throttled(api),
            Retry::Transient => {}
            Retry::Done | Retry::AlreadyDone | Retry::Permanent => limits.on_success(api),
        }
        let err = match result {
            Ok(value) => {
                return Ok(Completed {
                    outcome: Outcome::Done(value),
                    attempts,
                })
            }
            Err(err) => err,
        };
        match class {
            Retry::AlreadyDone => {
                return Ok(Completed {
                    outcome: Outcome::AlreadyDone(err),
                    attempts,
                })
            }
            Retry::Throttled | Retry::Transient => {
                if attempts >= policy.max_attempts {
                    return Err(RetryError::Exhausted {
                        api,
                        attempts,
                        class,
                        last: err,
                    });
                }
                tracing::debug!(%api, attempts, %class, error = %err, "retrying");
                tokio::time::sleep(policy.delay(attempts)).await;
            }
            Retry::Done | Retry::Permanent => {
                return Err(RetryError::Permanent {
                    api,
                    attempts,
                    last: err,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::limits::Limits;
    use std::cell::Cell;
    use tokio::time::Instant;

    fn throttled(api: Api) -> CallError {
        CallError::service(api, "ThrottlingException", 400).with_message("Rate exceeded")
    }

    #[test]
    fn aws_codes_map_to_classes() {
        let api = Api::CreateThing;
        let code = |c: &str, s: u16| classify(&CallError::service(api, c, s));
        assert_eq!(code("ThrottlingException", 400), Retry::Throttled);
        assert_eq!(code("TooManyRequestsException", 429), Retry::Throttled);
        assert_eq!(code("LimitExceededException", 410), Retry::Permanent);
        assert_eq!(code("LimitExceededException", 400), Retry::Permanent);
        assert_eq!(code("ServiceUnavailableException", 503), Retry::Transient);
        assert_eq!(code("InternalFailureException", 500), Retry::Transient);
        assert_eq!(
            code("ResourceAlreadyExistsException", 409),
            Retry::AlreadyDone
        );
        assert_eq!(code("ResourceNotFoundException", 404), Retry::Permanent);
        assert_eq!(code("InvalidRequestException", 400), Retry::Permanent);
        assert_eq!(code("UnauthorizedException", 401), Retry::Permanent);
        assert_eq!(
            code("CertificateValidationException", 400),
            Retry::Permanent
        );
        // The code decides over the status.
        assert_eq!(code("ThrottlingException", 500), Retry::Throttled);
        assert_eq!(code("InvalidRequestException", 503), Retry::Permanent);
        // Unknown codes fall back to the status.
        assert_eq!(code("SomethingNew", 503), Retry::Transient);
        assert_eq!(code("SomethingNew", 429), Retry::Throttled);
        assert_eq!(code("SomethingNew", 400), Retry::Permanent);

        let bare = |k, s| classify(&CallError::bare(api, k, s));
        assert_eq!(bare(FailureKind::Service, Some(500)), Retry::Transient);
        assert_eq!(bare(FailureKind::Service, Some(404)), Retry::Permanent);
        assert_eq!(bare(FailureKind::Service, None), Retry::Permanent);
        assert_eq!(bare(FailureKind::Timeout, None), Retry::Transient);
        assert_eq!(bare(FailureKind::Connection, None), Retry::Transient);
        assert_eq!(bare(FailureKind::Request, None), Retry::Permanent);
        assert_eq!(classify_result::<()>(&Ok(())), Retry::Done);
    }

    #[test]
    fn backoff_stays_in_bounds_and_grows() {
        let policy = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(20), 12)
            .unwrap()
            .with_jitter(Jitter::seeded(7));
        let ceilings: Vec<_> = (1..=12).map(|n| policy.ceiling(n)).collect();
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[3], Duration::from_millis(800));
        assert!(ceilings.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(ceilings[11], Duration::from_secs(20));
        assert_eq!(policy.ceiling(1000), Duration::from_secs(20));

        let mut means = Vec::new();
        for n in 1..=12 {
            let samples: Vec<_> = (0..2000).map(|_| policy.delay(n)).collect();
            assert!(samples.iter().all(|d| *d <= policy.ceiling(n)), "n={n}");
            let mean = samples.iter().sum::<Duration>() / 2000;
            // Full jitter: the mean is half the ceiling, give or take.
            let half = policy.ceiling(n) / 2;
            assert!(
                mean > half.mul_f64(0.9) && mean < half.mul_f64(1.1),
                "n={n}: mean {mean:?}, ceiling {:?}",
                policy.ceiling(n)
            );
            // Spread over the range, not stuck at one end.
            let max = samples.iter().max().unwrap();
            let min = samples.iter().min().unwrap();
            assert!(*max > policy.ceiling(n).mul_f64(0.95));
            assert!(*min < policy.ceiling(n).mul_f64(0.05));
            means.push(mean);
        }
        assert!(means.windows(2).take(7).all(|w| w[0] < w[1]), "{means:?}");
    }

    #[test]
    fn bad_policies_are_refused() {
        assert_eq!(
            RetryPolicy::new(Duration::from_millis(1), Duration::from_secs(1), 0).unwrap_err(),
            PolicyError::NoAttempts
        );
        assert!(RetryPolicy::new(Duration::ZERO, Duration::from_secs(1), 3).is_err());
        assert!(RetryPolicy::new(Duration::from_secs(2), Duration::from_secs(1), 3).is_err());
    }

    fn setup() -> (ApiLimiters, RetryPolicy) {
        (
            ApiLimiters::new(&Limits::default()),
            RetryPolicy::default().with_jitter(Jitter::seeded(1)),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn throttled_then_success_takes_two_attempts() {
        let (limits, policy) = setup();
        let api = Api::AttachPolicy;
        let calls = Cell::new(0);
        let done = run_with_retry(&limits, &policy, api, || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n == 1 {
                    Err(throttled(api))
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(done.attempts, 2);
        assert!(matches!(done.outcome, Outcome::Done(2)));
        assert_eq!(limits.current_rate(api), 7.5, "throttling slowed it");
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failure_is_not_retried() {
        let (limits, policy) = setup();
        let api = Api::RegisterCertificate;
        let calls = Cell::new(0);
        let err = run_with_retry(&limits, &policy, api, || {
            calls.set(calls.get() + 1);
            async move {
                Err::<(), _>(
                    CallError::service(api, "CertificateValidationException", 400)
                        .with_message("The certificate is not valid"),
                )
            }
        })
        .await
        .unwrap_err();
        assert_eq!(calls.get(), 1);
        assert_eq!(err.attempts(), 1);
        assert_eq!(err.api(), api);
        assert!(matches!(err, RetryError::Permanent { .. }));
        assert_eq!(limits.current_rate(api), 10.0);
        let text = err.to_string();
        assert!(
            text.contains("RegisterCertificate") && text.contains("attempt 1"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn already_exists_counts_as_done() {
        let (limits, policy) = setup();
        let api = Api::CreateThing;
        let done = run_with_retry(&limits, &policy, api, || async move {
            Err::<(), _>(CallError::service(
                api,
                "ResourceAlreadyExistsException",
                409,
            ))
        })
        .await
        .unwrap();
        assert_eq!(done.attempts, 1);
        assert!(matches!(done.outcome, Outcome::AlreadyDone(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_budget_names_the_api_and_the_attempts() {
        let (limits, policy) = setup();
        let api = Api::DescribeThing;
        let calls = Cell::new(0);
        let start = Instant::now();
        let err = run_with_retry(&limits, &policy, api, || {
            calls.set(calls.get() + 1);
            async move { Err::<(), _>(CallError::bare(api, FailureKind::Timeout, None)) }
        })
        .await
        .unwrap_err();
        assert_eq!(calls.get(), 8);
        assert_eq!(err.attempts(), policy.max_attempts());
        assert!(matches!(
            err,
            RetryError::Exhausted {
                api: Api::DescribeThing,
                attempts: 8,
                class: Retry::Transient,
                ..
            }
        ));
        assert_eq!(err.last().kind, FailureKind::Timeout);
        // Seven sleeps, each within its ceiling: at most 0.1+0.2+...+6.4 s,
        // plus pacing.
        let elapsed = start.elapsed();
        assert!(elapsed <= Duration::from_millis(12_700 + 50), "{elapsed:?}");
        // Jittered: seven uniform draws summing to the full 12.7 s would be
        // a policy that sleeps its ceilings (the seed is fixed).
        assert!(elapsed < Duration::from_millis(11_000), "{elapsed:?}");
        assert!(elapsed > Duration::from_millis(500), "{elapsed:?}");
        let text = err.to_string();
        assert!(
            text.contains("DescribeThing") && text.contains("8 attempts"),
            "{text}"
        );
        assert!(StdError::source(&err).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_all_the_way_slows_the_api_each_time() {
        let (limits, policy) = setup();
        let api = Api::CreateThing;
        let err = run_with_retry(&limits, &policy, api, || async move {
            Err::<(), _>(throttled(api))
        })
        .await
        .unwrap_err();
        assert!(matches!(
            err,
            RetryError::Exhausted {
                class: Retry::Throttled,
                attempts: 8,
                ..
            }
        ));
        // Decreases are at most one per second of cooldown; at least one
        // happened, and the floor holds.
        let rate = limits.current_rate(api);
        assert!((1.0..=50.0).contains(&rate), "{rate}");
    }
}
