//! Test helpers for safedisk-core's integration tests: a backend whose
//! writers misbehave on cue, and upstream streams with known bytes.

#![allow(dead_code, unreachable_pub)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use safedisk_core::{
    CacheBackend, CacheError, CacheKey, CacheWriter, Entry, ErrorKind, FillSummary, MemoryBackend,
    Operation, RecoveryReport, WriteOptions,
};

/// How one writer misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Script {
    /// Refuse at begin with this kind.
    pub fail_begin: Option<ErrorKind>,
    /// Fail the write that would take the total past this many bytes.
    pub fail_after: Option<(u64, ErrorKind)>,
    /// Never finish the write that would take the total past this many bytes.
    pub stall_after: Option<u64>,
    /// Sleep this long in every write.
    pub delay_per_write: Option<Duration>,
    /// Panic in the nth write (0-based).
    pub panic_on_write: Option<usize>,
}

type ScriptFn = dyn Fn(&CacheKey) -> Script + Send + Sync;

/// A memory backend whose writers follow a [`Script`] chosen per key.
pub struct ScriptedBackend {
    pub inner: MemoryBackend,
    script: Arc<ScriptFn>,
    pub begins: AtomicUsize,
}

impl std::fmt::Debug for ScriptedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScriptedBackend")
    }
}

impl ScriptedBackend {
    pub fn new(script: impl Fn(&CacheKey) -> Script + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryBackend::new(),
            script: Arc::new(script),
            begins: AtomicUsize::new(0),
        })
    }

    pub fn always(script: Script) -> Arc<Self> {
        Self::new(move |_| script)
    }
}

#[async_trait]
impl CacheBackend for ScriptedBackend {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        let script = (self.script)(key);
        if let Some(kind) = script.fail_begin {
            return Err(CacheError::new(kind, Operation::Begin, "scripted").with_key(key));
        }
        let inner = self.inner.begin(key, options).await?;
        Ok(Box::new(ScriptedWriter {
            inner,
            key: key.clone(),
            script,
            written: 0,
            writes: 0,
        }))
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
}

#[derive(Debug)]
struct ScriptedWriter {
    inner: Box<dyn CacheWriter>,
    key: CacheKey,
    script: Script,
    written: u64,
    writes: usize,
}

#[async_trait]
impl CacheWriter for ScriptedWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        let n = self.writes;
        self.writes += 1;
        let after = self.written + chunk.len() as u64;

        if self.script.panic_on_write == Some(n) {
            panic!("scripted panic in write {n}");
        }
        if let Some(delay) = self.script.delay_per_write {
            tokio::time::sleep(delay).await;
        }
        if let Some(limit) = self.script.stall_after
            && after > limit
        {
            std::future::pending::<()>().await;
        }
        if let Some((limit, kind)) = self.script.fail_after
            && after > limit
        {
            return Err(CacheError::new(kind, Operation::Write, "scripted").with_key(&self.key));
        }

        self.written = after;
        self.inner.write(chunk).await
    }

    async fn commit(self: Box<Self>, summary: FillSummary) -> Result<(), CacheError> {
        self.inner.commit(summary).await
    }

    async fn abort(self: Box<Self>) -> Result<(), CacheError> {
        self.inner.abort().await
    }
}

/// `total` bytes of a pattern that differs per `seed`, in `chunk`-byte pieces.
pub fn payload(total: usize, chunk: usize, seed: u8) -> Vec<Bytes> {
    let bytes: Vec<u8> = (0..total)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    bytes
        .chunks(chunk.max(1))
        .map(Bytes::copy_from_slice)
        .collect()
}

pub fn concat(chunks: &[Bytes]) -> Vec<u8> {
    chunks.iter().flat_map(|c| c.iter().copied()).collect()
}

pub type Upstream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

/// The chunks, one every `pace` (none when zero).
pub fn upstream(chunks: Vec<Bytes>, pace: Duration) -> Upstream {
    let s = stream::iter(chunks).then(move |c| async move {
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
        Ok(c)
    });
    Box::pin(s)
}

/// The chunks, one every `pace`, then an upstream error.
pub fn failing_upstream(chunks: Vec<Bytes>, pace: Duration) -> Upstream {
    let error = stream::once(async { Err(io::Error::other("upstream reset")) });
    Box::pin(upstream(chunks, pace).chain(error))
}

/// A stream that sets a flag when it is dropped: it stands for the upstream
/// connection, whose drop closes the socket.
pub struct DropFlag<S> {
    inner: S,
    dropped: Arc<AtomicBool>,
}

impl<S> DropFlag<S> {
    pub fn new(inner: S) -> (Self, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        (
            Self {
                inner,
                dropped: dropped.clone(),
            },
            dropped,
        )
    }
}

impl<S: Stream + Unpin> Stream for DropFlag<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl<S> Drop for DropFlag<S> {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

/// Nothing is visible under `key` and no fill of `backend` is pending.
pub async fn assert_nothing_left(backend: &dyn CacheBackend, key: &CacheKey) {
    assert!(
        backend.get(key).await.unwrap().is_none(),
        "{key} is visible"
    );
    assert_eq!(backend.pending().await.unwrap(), 0, "fills still pending");
}

/// Reads an entry to the end.
pub async fn read_entry(backend: &dyn CacheBackend, key: &CacheKey) -> Option<Vec<u8>> {
    let entry = backend.get(key).await.expect("get")?;
    let chunks: Vec<Bytes> = entry.body.map(|c| c.expect("entry chunk")).collect().await;
    Some(concat(&chunks))
}

/// Waits until the runtime's live task count is at most `baseline`, for at
/// most `within`; returns the last count seen.
pub async fn settle_tasks(baseline: usize, within: Duration) -> usize {
    let handle = tokio::runtime::Handle::current();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let alive = handle.metrics().num_alive_tasks();
        if alive <= baseline || tokio::time::Instant::now() >= deadline {
            return alive;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn key(name: &str) -> CacheKey {
    CacheKey::new("npm", name).expect("valid key")
}
