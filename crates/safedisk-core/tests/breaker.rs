//! The breaker opens on repeated cache failures, bypasses the cache while
//! open, lets one probe through after the cooldown, and closes on success.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use safedisk_core::{
    AbandonReason, BreakerConfig, BreakerState, Cache, ErrorKind, FillOutcome, TeePolicy,
    WriteOptions,
};
use support::{Script, ScriptedBackend, concat, key, payload, upstream};

const COOLDOWN: Duration = Duration::from_millis(200);

/// A cache whose backend fails every write with no space while `failing`.
fn cache(failing: Arc<AtomicBool>) -> (Cache, Arc<ScriptedBackend>) {
    let backend = ScriptedBackend::new(move |_| Script {
        fail_after: failing
            .load(Ordering::SeqCst)
            .then_some((0, ErrorKind::NoSpace)),
        ..Script::default()
    });
    let breaker = BreakerConfig::new().failure_threshold(3).cooldown(COOLDOWN);
    let cache = Cache::with_config(backend.clone(), TeePolicy::new(), breaker);
    (cache, backend)
}

async fn request(cache: &Cache, name: &str) -> (Vec<u8>, FillOutcome) {
    let chunks = payload(4096, 1024, 1);
    let expected = concat(&chunks);
    let (body, fill) = cache
        .tee(
            &key(name),
            WriteOptions::new(),
            upstream(chunks, Duration::ZERO),
        )
        .await;
    let received: Vec<u8> = body
        .map(|c| c.expect("client chunk").to_vec())
        .concat()
        .await;
    assert_eq!(received, expected, "{name}: client bytes");
    (received, fill.await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_bypasses_half_opens_and_closes() {
    let failing = Arc::new(AtomicBool::new(true));
    let (cache, backend) = cache(failing.clone());

    // Three failures in a row open it.
    for i in 0..3 {
        assert_eq!(cache.health().state, BreakerState::Closed);
        let (_, outcome) = request(&cache, &format!("fail-{i}")).await;
        assert_eq!(
            outcome.abandon_reason(),
            Some(AbandonReason::Cache(ErrorKind::NoSpace))
        );
    }
    assert_eq!(cache.health().state, BreakerState::Open);
    assert_eq!(cache.health().opened, 1);

    // Open: the client is served, no writer is begun.
    let begins = backend.begins.load(Ordering::SeqCst);
    let (_, outcome) = request(&cache, "bypassed").await;
    assert!(matches!(outcome, FillOutcome::Bypassed));
    assert_eq!(backend.begins.load(Ordering::SeqCst), begins);
    assert_eq!(cache.health().bypassed, 1);

    // After the cooldown one probe goes through; a failing probe re-opens.
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    assert_eq!(cache.health().state, BreakerState::HalfOpen);
    let (_, outcome) = request(&cache, "probe-fails").await;
    assert!(!outcome.is_committed());
    assert_eq!(backend.begins.load(Ordering::SeqCst), begins + 1);
    assert_eq!(cache.health().state, BreakerState::Open);
    assert_eq!(cache.health().opened, 2);

    // The cache recovers; the next probe commits and closes the breaker.
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    let (_, outcome) = request(&cache, "probe-ok").await;
    assert!(outcome.is_committed(), "{outcome:?}");
    let health = cache.health();
    assert_eq!(health.state, BreakerState::Closed);
    assert_eq!(health.consecutive_failures, 0);
    assert_eq!(health.committed, 1);
    assert_eq!(health.abandoned.get("no_space"), Some(&4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_probe_while_half_open() {
    let failing = Arc::new(AtomicBool::new(true));
    let (cache, backend) = cache(failing.clone());
    for i in 0..3 {
        request(&cache, &format!("fail-{i}")).await;
    }
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;

    // The probe's body is held open, so its outcome is not known yet.
    let begins = backend.begins.load(Ordering::SeqCst);
    let slow = upstream(payload(4096, 1024, 2), Duration::from_millis(50));
    let (probe_body, probe) = cache.tee(&key("probe"), WriteOptions::new(), slow).await;
    let (_, second) = request(&cache, "during-probe").await;
    assert!(matches!(second, FillOutcome::Bypassed));
    assert_eq!(backend.begins.load(Ordering::SeqCst), begins + 1);

    probe_body.for_each(|_| async {}).await;
    assert!(probe.await.is_committed());
    assert_eq!(cache.health().state, BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_upstream_trouble_do_not_open_the_breaker() {
    let (cache, _) = cache(Arc::new(AtomicBool::new(false)));
    for i in 0..10 {
        let chunks = payload(4096, 1024, 3);
        let options = WriteOptions::new().expected_len(100_000);
        let (body, fill) = cache
            .tee(
                &key(&format!("short-{i}")),
                options,
                upstream(chunks, Duration::ZERO),
            )
            .await;
        body.for_each(|_| async {}).await;
        assert_eq!(
            fill.await.abandon_reason(),
            Some(AbandonReason::UpstreamLength)
        );
    }
    let health = cache.health();
    assert_eq!(health.state, BreakerState::Closed);
    assert_eq!(health.consecutive_failures, 0);
    assert_eq!(health.abandoned.get("upstream_length"), Some(&10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_at_begin_counts_and_serves_uncached() {
    let backend = ScriptedBackend::always(Script {
        fail_begin: Some(ErrorKind::QuotaExceeded),
        ..Script::default()
    });
    let breaker = BreakerConfig::new().failure_threshold(2).cooldown(COOLDOWN);
    let cache = Cache::with_config(backend, TeePolicy::new(), breaker);

    for i in 0..2 {
        let (_, outcome) = request(&cache, &format!("refused-{i}")).await;
        assert_eq!(
            outcome.abandon_reason(),
            Some(AbandonReason::Cache(ErrorKind::QuotaExceeded))
        );
    }
    assert_eq!(cache.health().state, BreakerState::Open);
}
