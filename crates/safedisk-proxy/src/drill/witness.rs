//! A backend wrapper that notes when a real fault first surfaced for each
//! key, so faults the drill does not inject (a tmpfs that is really full)
//! are timed from the moment the backend reported them, as injected ones
//! are from their fault records.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use safedisk_core::{
    CacheBackend, CacheError, CacheKey, CacheWriter, Entry, FillSummary, RecoveryReport,
    WriteOptions,
};

/// When each key's first begin, write or commit error surfaced.
type Sightings = Arc<Mutex<HashMap<String, Instant>>>;

/// Passes every call to the inner backend and notes the first error of
/// each key's fill.
pub struct Witness {
    inner: Arc<dyn CacheBackend>,
    seen: Sightings,
}

impl Witness {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn CacheBackend>) -> Self {
        Self {
            inner,
            seen: Arc::default(),
        }
    }

    /// When the first error of a fill of `key` surfaced, if one did.
    pub fn first_error(&self, key: &CacheKey) -> Option<Instant> {
        self.seen.lock().ok()?.get(&key.to_string()).copied()
    }
}

fn note(seen: &Sightings, key: &str) {
    if let Ok(mut seen) = seen.lock() {
        seen.entry(key.to_owned()).or_insert_with(Instant::now);
    }
}

impl fmt::Debug for Witness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Witness")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl CacheBackend for Witness {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        match self.inner.begin(key, options).await {
            Ok(writer) => Ok(Box::new(WitnessWriter {
                inner: writer,
                key: key.to_string(),
                seen: self.seen.clone(),
            })),
            Err(err) => {
                note(&self.seen, &key.to_string());
                Err(err)
            }
        }
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Entry>, CacheError> {
        self.inner.get(key).await
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool, CacheError> {
        self.inner.remove(key).await
    }

    async fn recover(&self) -> Result<RecoveryReport, CacheError> {
        self.inner.recover().await
    }

    async fn pending(&self) -> Result<u64, CacheError> {
        self.inner.pending().await
    }

    fn usage(&self) -> Option<safedisk_core::Usage> {
        self.inner.usage()
    }
}

struct WitnessWriter {
    inner: Box<dyn CacheWriter>,
    key: String,
    seen: Sightings,
}

impl fmt::Debug for WitnessWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WitnessWriter")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl CacheWriter for WitnessWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        let written = self.inner.write(chunk).await;
        if written.is_err() {
            note(&self.seen, &self.key);
        }
        written
    }

    async fn commit(self: Box<Self>, summary: FillSummary) -> Result<(), CacheError> {
        let (seen, key) = (self.seen.clone(), self.key.clone());
        let committed = self.inner.commit(summary).await;
        if committed.is_err() {
            note(&seen, &key);
        }
        committed
    }

    async fn abort(self: Box<Self>) -> Result<(), CacheError> {
        self.inner.abort().await
    }
}
