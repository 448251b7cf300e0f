//! The drill harness reports intact clients, detach times and leaks.

use std::sync::Arc;

use async_trait::async_trait;
use safedisk_core::{
    CacheBackend, CacheError, CacheKey, CacheWriter, Entry, FillSummary, MemoryBackend,
    RecoveryReport, WriteOptions,
};
use safedisk_testkit::drill::{self, DrillConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drill_passes_and_reports_detach_times() {
    let backend = Arc::new(MemoryBackend::new());
    let config = DrillConfig::new()
        .requests(32)
        .plan("seed=3; write@after=256KiB:enospc".parse().unwrap());
    let report = drill::run(backend, config).await;

    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.requests.len(), 32);
    assert!(report.requests.iter().all(|r| r.outcome == "no_space"));
    assert!(report.requests.iter().all(|r| !r.visible));
    assert_eq!(report.faults.len(), 32);
    let p99 = report.detach_quantile(0.99).expect("faults hit every fill");
    assert!(p99.as_millis() < 1000, "detach p99 {p99:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_aborts_drop_the_upstream_at_once() {
    let backend = Arc::new(MemoryBackend::new());
    let config = DrillConfig::new().requests(8).client_abort(2, 128 * 1024);
    let report = drill::run(backend, config).await;

    assert!(report.passed(), "{report:#?}");
    for request in &report.requests {
        if request.client_aborted {
            assert_eq!(request.outcome, "client_gone");
            assert!(!request.visible);
        } else {
            assert_eq!(request.outcome, "committed");
            assert!(request.visible);
        }
        assert!(request.upstream_dropped_after.is_some());
    }
}

/// A memory backend whose writers, when abandoned, are forgotten instead of
/// released: the pending count never comes down.
#[derive(Debug)]
struct Leaky(MemoryBackend);

#[derive(Debug)]
struct LeakyWriter(Option<Box<dyn CacheWriter>>);

#[async_trait]
impl CacheBackend for Leaky {
    fn name(&self) -> &str {
        "leaky"
    }

    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        Ok(Box::new(LeakyWriter(Some(
            self.0.begin(key, options).await?,
        ))))
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Entry>, CacheError> {
        self.0.get(key).await
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool, CacheError> {
        self.0.remove(key).await
    }

    async fn recover(&self) -> Result<RecoveryReport, CacheError> {
        self.0.recover().await
    }

    async fn pending(&self) -> Result<u64, CacheError> {
        self.0.pending().await
    }
}

#[async_trait]
impl CacheWriter for LeakyWriter {
    async fn write(&mut self, chunk: bytes::Bytes) -> Result<(), CacheError> {
        self.0.as_mut().expect("open").write(chunk).await
    }

    async fn commit(mut self: Box<Self>, summary: FillSummary) -> Result<(), CacheError> {
        self.0.take().expect("open").commit(summary).await
    }

    async fn abort(self: Box<Self>) -> Result<(), CacheError> {
        Ok(())
    }
}

impl Drop for LeakyWriter {
    fn drop(&mut self) {
        std::mem::forget(self.0.take());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leak_is_reported() {
    let backend = Arc::new(Leaky(MemoryBackend::new()));
    let config = DrillConfig::new()
        .requests(4)
        .plan("seed=3; write@after=64KiB:eio".parse().unwrap());
    let mut config = config;
    config.grace = std::time::Duration::from_millis(200);
    let report = drill::run(backend, config).await;

    assert!(!report.passed());
    let leak = report.leak.expect("the leak is reported");
    assert!(leak.contains("pending fills 0 -> 4"), "{leak}");
    // The clients were served all the same.
    assert!(report.requests.iter().all(|r| r.client_bytes_ok));
}
