//! What the backend tests share: keys, fills, and a backend that
//! shows what a crash leaves behind.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use safedisk_core::{
    CacheBackend, CacheError, CacheKey, CacheWriter, Entry, Fill, FillSummary, MemoryBackend,
    RecoveryReport, WriteOptions,
};
use safedisk_faulty::{FaultPlan, Faulty};

pub fn key(name: &str) -> CacheKey {
    CacheKey::new("test", name).unwrap()
}

pub fn plan(text: &str) -> FaultPlan {
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"))
}

pub fn faulty(text: &str) -> Faulty<MemoryBackend> {
    Faulty::new(MemoryBackend::new(), plan(text))
}

/// Begins, writes each chunk, commits.
pub async fn fill(
    backend: &dyn CacheBackend,
    key: &CacheKey,
    chunks: &[&[u8]],
) -> Result<FillSummary, CacheError> {
    fill_with(backend, key, chunks, WriteOptions::new()).await
}

pub async fn fill_with(
    backend: &dyn CacheBackend,
    key: &CacheKey,
    chunks: &[&[u8]],
    options: WriteOptions,
) -> Result<FillSummary, CacheError> {
    let mut fill = Fill::begin(backend, key, options).await?;
    for chunk in chunks {
        fill.write(Bytes::copy_from_slice(chunk)).await?;
    }
    fill.commit().await
}

/// The published bytes under `key`, if any.
pub async fn read(backend: &dyn CacheBackend, key: &CacheKey) -> Option<Vec<u8>> {
    let Entry { body, .. } = backend.get(key).await.unwrap()?;
    let chunks: Vec<Bytes> = body.try_collect().await.unwrap();
    Some(chunks.concat())
}

/// A memory backend whose writers leave a leftover when they crash, as a
/// disk backend leaves a temp file: counted in `pending` until `recover`
/// sweeps it. It also counts crashes and aborts.
#[derive(Debug, Clone, Default)]
pub struct Leftovers {
    pub inner: MemoryBackend,
    pub counts: Arc<Counts>,
}

#[derive(Debug, Default)]
pub struct Counts {
    pub crashes: AtomicU64,
    pub aborts: AtomicU64,
    pub leftovers: AtomicU64,
}

impl Counts {
    pub fn crashes(&self) -> u64 {
        self.crashes.load(Ordering::SeqCst)
    }

    pub fn aborts(&self) -> u64 {
        self.aborts.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl CacheBackend for Leftovers {
    fn name(&self) -> &str {
        "leftovers"
    }

    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        let inner = self.inner.begin(key, options).await?;
        Ok(Box::new(LeftoverWriter {
            inner,
            counts: self.counts.clone(),
        }))
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Entry>, CacheError> {
        self.inner.get(key).await
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool, CacheError> {
        self.inner.remove(key).await
    }

    async fn recover(&self) -> Result<RecoveryReport, CacheError> {
        let swept = self.counts.leftovers.swap(0, Ordering::SeqCst);
        let mut report = RecoveryReport::default();
        report.removed = (0..swept).map(|i| format!("leftover {i}")).collect();
        Ok(report)
    }

    async fn pending(&self) -> Result<u64, CacheError> {
        Ok(self.inner.pending().await? + self.counts.leftovers.load(Ordering::SeqCst))
    }
}

#[derive(Debug)]
struct LeftoverWriter {
    inner: Box<dyn CacheWriter>,
    counts: Arc<Counts>,
}

#[async_trait]
impl CacheWriter for LeftoverWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        self.inner.write(chunk).await
    }

    async fn commit(self: Box<Self>, summary: FillSummary) -> Result<(), CacheError> {
        self.inner.commit(summary).await
    }

    async fn abort(self: Box<Self>) -> Result<(), CacheError> {
        self.counts.aborts.fetch_add(1, Ordering::SeqCst);
        self.inner.abort().await
    }

    fn crash(self: Box<Self>) {
        self.counts.crashes.fetch_add(1, Ordering::SeqCst);
        self.counts.leftovers.fetch_add(1, Ordering::SeqCst);
        self.inner.crash();
    }
}
