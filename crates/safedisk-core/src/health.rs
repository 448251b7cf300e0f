//! Cache health: a breaker fed by fill outcomes, and counters for health
//! endpoints and metrics.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::FillOutcome;

/// Default number of cache failures in a row that opens the breaker: 5.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;

/// Default time the breaker stays open before letting one fill probe: 30 s.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);

/// When the breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Cache failures in a row (with no commit between) that open the
    /// breaker. Default: [`DEFAULT_FAILURE_THRESHOLD`] (5). At least 1.
    pub failure_threshold: u32,
    /// Time the breaker stays open before one probe fill is let through.
    /// Default: [`DEFAULT_COOLDOWN`] (30 s).
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            cooldown: DEFAULT_COOLDOWN,
        }
    }
}

impl BreakerConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`failure_threshold`](Self::failure_threshold), at least 1.
    #[must_use]
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures.max(1);
        self
    }

    /// Sets [`cooldown`](Self::cooldown).
    #[must_use]
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Fills are attempted.
    Closed,
    /// Fills are bypassed until the cooldown ends.
    Open,
    /// The cooldown ended: one probe fill is allowed; its success closes the
    /// breaker, a cache failure opens it again.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// A point-in-time copy of the cache's health, for health endpoints and
/// metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthSnapshot {
    /// The breaker's state.
    pub state: BreakerState,
    /// Cache failures since the last commit.
    pub consecutive_failures: u32,
    /// Fills committed.
    pub committed: u64,
    /// Bytes committed.
    pub bytes_committed: u64,
    /// Fills abandoned, by [`AbandonReason`](crate::AbandonReason) label.
    pub abandoned: BTreeMap<&'static str, u64>,
    /// Bytes accepted by fills that were then abandoned.
    pub bytes_abandoned: u64,
    /// Requests that bypassed the cache because the breaker was open.
    pub bypassed: u64,
    /// Times the breaker opened.
    pub opened: u64,
}

/// The breaker and counters. Shared by a [`Cache`](crate::Cache) and its
/// fill tasks.
#[derive(Debug)]
pub struct Health {
    config: BreakerConfig,
    backend: String,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive: u32,
    committed: u64,
    bytes_committed: u64,
    abandoned: BTreeMap<&'static str, u64>,
    bytes_abandoned: u64,
    bypassed: u64,
    opened: u64,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl State {
    /// What callers see: an open breaker whose cooldown has passed is
    /// half-open.
    fn public(self) -> BreakerState {
        match self {
            State::Closed => BreakerState::Closed,
            State::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

impl Health {
    /// A closed breaker with zeroed counters. `backend` names the cache in
    /// log events.
    pub fn new(config: BreakerConfig, backend: impl Into<String>) -> Self {
        Self {
            config,
            backend: backend.into(),
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive: 0,
                committed: 0,
                bytes_committed: 0,
                abandoned: BTreeMap::new(),
                bytes_abandoned: 0,
                bypassed: 0,
                opened: 0,
            }),
        }
    }

    /// Whether a new fill may begin. `false` counts a bypass. When the
    /// cooldown has passed, the first caller gets `true` as the probe and
    /// the breaker turns half-open; others are bypassed until the probe's
    /// outcome is recorded.
    pub fn admit(&self) -> bool {
        let mut inner = self.lock();
        let admitted = match inner.state {
            State::Closed => true,
            State::Open { until } if Instant::now() >= until => {
                inner.state = State::HalfOpen { probing: true };
                tracing::info!(backend = %self.backend, "cache breaker half-open: probing with one fill");
                true
            }
            State::HalfOpen { probing: false } => {
                inner.state = State::HalfOpen { probing: true };
                true
            }
            State::Open { .. } | State::HalfOpen { probing: true } => false,
        };
        if !admitted {
            inner.bypassed += 1;
        }
        admitted
    }

    /// Feeds one fill outcome to the counters and the breaker.
    pub fn record(&self, outcome: &FillOutcome) {
        let mut inner = self.lock();
        match outcome {
            FillOutcome::Committed { summary, .. } => {
                inner.committed += 1;
                inner.bytes_committed += summary.len;
                inner.consecutive = 0;
                if let State::HalfOpen { .. } = inner.state {
                    inner.state = State::Closed;
                    tracing::info!(backend = %self.backend, "cache breaker closed: probe fill committed");
                }
            }
            FillOutcome::Abandoned {
                reason,
                bytes_cached,
                ..
            } => {
                *inner.abandoned.entry(reason.as_str()).or_default() += 1;
                inner.bytes_abandoned += bytes_cached;
                if reason.is_cache_failure() {
                    inner.consecutive = inner.consecutive.saturating_add(1);
                    self.on_failure(&mut inner, reason.as_str());
                } else if let State::HalfOpen { probing: true } = inner.state {
                    // The probe told us nothing about the cache; let the
                    // next fill probe.
                    inner.state = State::HalfOpen { probing: false };
                }
            }
            FillOutcome::Bypassed => {}
        }
    }

    fn on_failure(&self, inner: &mut Inner, reason: &str) {
        let open = match inner.state {
            State::HalfOpen { .. } => true,
            State::Closed => inner.consecutive >= self.config.failure_threshold,
            State::Open { .. } => false,
        };
        if open {
            inner.state = State::Open {
                until: Instant::now() + self.config.cooldown,
            };
            inner.opened += 1;
            tracing::warn!(
                backend = %self.backend,
                failures = inner.consecutive,
                reason,
                cooldown_ms = self.config.cooldown.as_millis() as u64,
                "cache breaker opened: bypassing the cache"
            );
        }
    }

    /// The breaker's state now. An open breaker whose cooldown has passed
    /// reads as half-open.
    pub fn state(&self) -> BreakerState {
        self.lock().state.public()
    }

    /// A copy of the state and counters, taken at one moment.
    pub fn snapshot(&self) -> HealthSnapshot {
        let inner = self.lock();
        HealthSnapshot {
            state: inner.state.public(),
            consecutive_failures: inner.consecutive,
            committed: inner.committed,
            bytes_committed: inner.bytes_committed,
            abandoned: inner.abandoned.clone(),
            bytes_abandoned: inner.bytes_abandoned,
            bypassed: inner.bypassed,
            opened: inner.opened,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each critical section only updates counters; a panic cannot leave
        // them inconsistent in a way that matters.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
