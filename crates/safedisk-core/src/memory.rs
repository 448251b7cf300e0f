//! [`MemoryBackend`]: the reference implementation of the contract.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream;

use crate::{
    CacheBackend, CacheError, CacheKey, CacheWriter, Entry, EntryMeta, EntryMetadata, ErrorKind,
    FillSummary, Operation, RecoveryReport, Usage, WriteMode, WriteOptions,
};

const NAME: &str = "memory";

/// A backend that keeps entries in memory. It obeys the whole contract and
/// is the model other backends are compared against.
///
/// - Publish is one map insert under a lock: readers see the old entry or
///   the new one.
/// - Writers buffer their bytes privately; abort and drop free them.
/// - With a capacity ([`with_capacity`](Self::with_capacity)), published
///   bytes plus bytes buffered by fills in flight never pass it, and a write
///   that would is refused with [`ErrorKind::NoSpace`]: a real out-of-space
///   path, without a disk. Default: no capacity.
/// - "Durable" means as long as the backend value lives.
/// - [`recover`](CacheBackend::recover) has nothing to sweep: a dead
///   process's memory is gone.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug, Default)]
struct Shared {
    entries: HashMap<CacheKey, Stored>,
    capacity: Option<u64>,
    /// Bytes of published entries plus bytes held by fills in flight.
    used: u64,
    pending: u64,
}

#[derive(Debug, Clone)]
struct Stored {
    meta: EntryMeta,
    chunks: Arc<[Bytes]>,
}

impl MemoryBackend {
    /// An empty backend with no capacity limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty backend that holds at most `bytes` (published plus in
    /// flight).
    pub fn with_capacity(bytes: u64) -> Self {
        let backend = Self::new();
        backend.lock().capacity = Some(bytes);
        backend
    }

    /// Bytes held now: published entries plus fills in flight.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    /// Number of published entries.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock cannot leave the map half-updated:
        // every critical section is a handful of infallible steps.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl CacheBackend for MemoryBackend {
    fn name(&self) -> &str {
        NAME
    }

    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        let mut shared = self.lock();
        if let (Some(capacity), Some(expected)) = (shared.capacity, options.expected_len)
            && shared.used + expected > capacity
        {
            return Err(no_space(
                key,
                Operation::Begin,
                expected,
                capacity - shared.used,
            ));
        }
        shared.pending += 1;
        drop(shared);

        Ok(Box::new(MemoryWriter {
            backend: self.clone(),
            key: key.clone(),
            mode: options.mode,
            metadata: options.metadata.clone(),
            chunks: Vec::new(),
            held: 0,
            finished: false,
        }))
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Entry>, CacheError> {
        let Some(stored) = self.lock().entries.get(key).cloned() else {
            return Ok(None);
        };
        let chunks = stored.chunks.clone();
        let body = stream::iter((0..chunks.len()).map(move |i| Ok(chunks[i].clone())));
        Ok(Some(Entry {
            meta: stored.meta,
            body: Box::pin(body),
        }))
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool, CacheError> {
        let mut shared = self.lock();
        match shared.entries.remove(key) {
            Some(stored) => {
                shared.used -= stored.meta.len();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn recover(&self) -> Result<RecoveryReport, CacheError> {
        Ok(RecoveryReport::default())
    }

    async fn pending(&self) -> Result<u64, CacheError> {
        Ok(self.lock().pending)
    }

    fn usage(&self) -> Option<Usage> {
        let shared = self.lock();
        let published: u64 = shared.entries.values().map(|s| s.meta.len()).sum();
        Some(Usage {
            entries: shared.entries.len() as u64,
            bytes_used: published,
            bytes_reserved: shared.used - published,
            limit: shared.capacity,
            ..Usage::default()
        })
    }
}

#[derive(Debug)]
struct MemoryWriter {
    backend: MemoryBackend,
    key: CacheKey,
    mode: WriteMode,
    metadata: EntryMetadata,
    chunks: Vec<Bytes>,
    /// Bytes of this fill counted in `Shared::used`.
    held: u64,
    finished: bool,
}

impl MemoryWriter {
    fn release(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let mut shared = self.backend.lock();
        shared.used -= self.held;
        shared.pending -= 1;
        self.held = 0;
        self.chunks.clear();
    }
}

#[async_trait]
impl CacheWriter for MemoryWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        let len = chunk.len() as u64;
        {
            let mut shared = self.backend.lock();
            if let Some(capacity) = shared.capacity
                && shared.used + len > capacity
            {
                let room = capacity - shared.used;
                return Err(no_space(&self.key, Operation::Write, len, room));
            }
            shared.used += len;
        }
        self.held += len;
        // Copy, as a real backend would: the caller's buffer is theirs.
        self.chunks.push(Bytes::from(BytesMut::from(&chunk[..])));
        Ok(())
    }

    async fn commit(mut self: Box<Self>, summary: FillSummary) -> Result<(), CacheError> {
        let chunks: Arc<[Bytes]> = std::mem::take(&mut self.chunks).into();
        let mut shared = self.backend.lock();

        if self.mode == WriteMode::CreateOnly && shared.entries.contains_key(&self.key) {
            drop(shared);
            self.release();
            return Err(
                CacheError::new(ErrorKind::AlreadyExists, Operation::Commit, NAME)
                    .with_key(&self.key),
            );
        }

        let stored = Stored {
            meta: EntryMeta::new(summary, self.metadata.clone()),
            chunks,
        };
        if let Some(old) = shared.entries.insert(self.key.clone(), stored) {
            shared.used -= old.meta.len();
        }
        // The bytes now belong to the entry, not to the fill.
        shared.pending -= 1;
        self.held = 0;
        self.finished = true;
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<(), CacheError> {
        self.release();
        Ok(())
    }
}

impl Drop for MemoryWriter {
    fn drop(&mut self) {
        self.release();
    }
}

fn no_space(key: &CacheKey, op: Operation, wanted: u64, room: u64) -> CacheError {
    CacheError::new(ErrorKind::NoSpace, op, NAME)
        .with_key(key)
        .with_detail(format!(
            "{wanted} bytes wanted, {room} left of the capacity"
        ))
}
