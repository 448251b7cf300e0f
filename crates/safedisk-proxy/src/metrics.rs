//! Counters for the health endpoint and Prometheus metrics.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use safedisk_core::{HealthSnapshot, Usage};

/// Request counters, beside the cache's own [`HealthSnapshot`].
#[derive(Debug, Default)]
pub struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    uncached_misses: AtomicU64,
    pass_through: AtomicU64,
    bad_requests: AtomicU64,
    upstream_errors: AtomicU64,
    fills_ended: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn hit(&self) {
        bump(&self.hits);
    }

    pub(crate) fn miss(&self) {
        bump(&self.misses);
    }

    pub(crate) fn uncached_miss(&self) {
        bump(&self.uncached_misses);
    }

    pub(crate) fn pass_through(&self) {
        bump(&self.pass_through);
    }

    pub(crate) fn bad_request(&self) {
        bump(&self.bad_requests);
    }

    pub(crate) fn upstream_error(&self) {
        bump(&self.upstream_errors);
    }

    pub(crate) fn fill_ended(&self) {
        bump(&self.fills_ended);
    }

    fn pairs(&self) -> [(&'static str, &'static str, u64); 7] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("hits", "Requests served from the cache.", get(&self.hits)),
            (
                "misses",
                "Artifact requests not in the cache.",
                get(&self.misses),
            ),
            (
                "uncached_misses",
                "Misses streamed uncached because a fill of the key was in flight.",
                get(&self.uncached_misses),
            ),
            (
                "pass_through",
                "Metadata requests passed through uncached.",
                get(&self.pass_through),
            ),
            (
                "bad_requests",
                "Requests refused with a 4xx.",
                get(&self.bad_requests),
            ),
            (
                "upstream_errors",
                "Upstream requests that failed before a response.",
                get(&self.upstream_errors),
            ),
            (
                "fills_ended",
                "Fills that reached an outcome.",
                get(&self.fills_ended),
            ),
        ]
    }
}

/// The health endpoint's JSON. `storage` is the backend's
/// [`usage`](safedisk_core::CacheBackend::usage), `null` when it keeps none.
pub fn health_json(health: &HealthSnapshot, counters: &Counters, usage: Option<Usage>) -> String {
    let mut requests = serde_json::Map::new();
    for (name, _, value) in counters.pairs() {
        requests.insert(name.into(), value.into());
    }
    let value = serde_json::json!({
        "breaker": health.state.as_str(),
        "consecutive_failures": health.consecutive_failures,
        "fills": {
            "committed": health.committed,
            "bytes_committed": health.bytes_committed,
            "abandoned": health.abandoned,
            "bytes_abandoned": health.bytes_abandoned,
            "bypassed": health.bypassed,
        },
        "breaker_opened": health.opened,
        "requests": requests,
        "storage": usage.map(|usage| serde_json::json!({
            "entries": usage.entries,
            "bytes_used": usage.bytes_used,
            "bytes_reserved": usage.bytes_reserved,
            "limit": usage.limit,
            "evictions": usage.evictions,
        })),
    });
    value.to_string()
}

/// The metrics in Prometheus text format; the `safedisk_storage_*` ones
/// only when the backend reports its [`Usage`].
pub fn prometheus(health: &HealthSnapshot, counters: &Counters, usage: Option<Usage>) -> String {
    let mut out = String::new();
    let mut metric = |kind: &str, name: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP safedisk_{name} {help}");
        let _ = writeln!(out, "# TYPE safedisk_{name} {kind}");
        let _ = writeln!(out, "safedisk_{name} {value}");
    };
    if let Some(usage) = usage {
        metric(
            "gauge",
            "storage_entries",
            "Published entries.",
            usage.entries,
        );
        metric(
            "gauge",
            "storage_bytes_used",
            "Space the published entries take.",
            usage.bytes_used,
        );
        metric(
            "gauge",
            "storage_bytes_reserved",
            "Space held by or promised to fills in flight.",
            usage.bytes_reserved,
        );
        if let Some(limit) = usage.limit {
            metric(
                "gauge",
                "storage_limit_bytes",
                "The most the cache will hold.",
                limit,
            );
        }
        metric(
            "counter",
            "storage_evictions_total",
            "Entries evicted to stay under the limit.",
            usage.evictions,
        );
    }
    let mut counter = |name: &str, help: &str, value: u64| metric("counter", name, help, value);
    for (name, help, value) in counters.pairs() {
        counter(&format!("requests_{name}_total"), help, value);
    }
    counter(
        "fills_committed_total",
        "Fills published.",
        health.committed,
    );
    counter(
        "fill_bytes_committed_total",
        "Bytes published.",
        health.bytes_committed,
    );
    counter(
        "fills_bypassed_total",
        "Requests that bypassed an open breaker.",
        health.bypassed,
    );
    counter(
        "breaker_opened_total",
        "Times the breaker opened.",
        health.opened,
    );

    let _ = writeln!(
        out,
        "# HELP safedisk_fills_abandoned_total Fills abandoned, by reason."
    );
    let _ = writeln!(out, "# TYPE safedisk_fills_abandoned_total counter");
    for (reason, count) in &health.abandoned {
        let _ = writeln!(
            out,
            "safedisk_fills_abandoned_total{{reason=\"{reason}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP safedisk_breaker_state 0 closed, 1 half-open, 2 open."
    );
    let _ = writeln!(out, "# TYPE safedisk_breaker_state gauge");
    let state = match health.state {
        safedisk_core::BreakerState::Closed => 0,
        safedisk_core::BreakerState::HalfOpen => 1,
        safedisk_core::BreakerState::Open => 2,
    };
    let _ = writeln!(out, "safedisk_breaker_state {state}");
    out
}
