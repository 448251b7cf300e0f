//! A tee surviving a failing cache.
//!
//! Serves one 8 MiB artifact, paced like a fast upstream, through
//! `Cache::tee` in four situations: a healthy cache, a cache that runs out
//! of space half-way, a cache whose writes stall, and a cache too slow to
//! keep up. In every case the client receives every byte, unchanged and on
//! time; only the fill's outcome differs. Then it shows the breaker opening
//! after repeated failures.
//!
//! Run: `cargo run --release -p safedisk-core --example failing_cache`

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, stream};
use safedisk_core::{
    BreakerConfig, Cache, CacheBackend, CacheError, CacheKey, CacheWriter, Entry, FillSummary,
    MemoryBackend, RecoveryReport, TeePolicy, WriteOptions,
};
use sha2::{Digest, Sha256};

const SIZE: usize = 8 << 20;
const CHUNK: usize = 64 << 10;

/// What is wrong with the cache.
#[derive(Debug, Clone, Copy)]
enum Trouble {
    None,
    Stall,
    Slow,
}

/// A memory backend whose writes can stall or crawl.
#[derive(Debug)]
struct Troubled {
    inner: MemoryBackend,
    trouble: Trouble,
}

#[derive(Debug)]
struct TroubledWriter {
    inner: Box<dyn CacheWriter>,
    trouble: Trouble,
    writes: usize,
}

#[async_trait]
impl CacheBackend for Troubled {
    fn name(&self) -> &str {
        "memory"
    }

    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        Ok(Box::new(TroubledWriter {
            inner: self.inner.begin(key, options).await?,
            trouble: self.trouble,
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

#[async_trait]
impl CacheWriter for TroubledWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        self.writes += 1;
        match self.trouble {
            Trouble::Stall if self.writes > 16 => std::future::pending().await,
            Trouble::Slow => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => {}
        }
        self.inner.write(chunk).await
    }

    async fn commit(self: Box<Self>, summary: FillSummary) -> Result<(), CacheError> {
        self.inner.commit(summary).await
    }

    async fn abort(self: Box<Self>) -> Result<(), CacheError> {
        self.inner.abort().await
    }
}

fn artifact() -> Bytes {
    Bytes::from((0..SIZE).map(|i| (i % 253) as u8).collect::<Vec<_>>())
}

/// The artifact in 64 KiB chunks, one every 2 ms (about 32 MiB/s).
fn upstream(body: Bytes) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let chunks: Vec<Bytes> = (0..SIZE)
        .step_by(CHUNK)
        .map(|at| body.slice(at..at + CHUNK))
        .collect();
    stream::iter(chunks).then(|chunk| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(chunk)
    })
}

async fn serve(cache: &Cache, name: &str, body: &Bytes) -> (bool, Duration, String) {
    let key = CacheKey::new("npm", name).expect("key");
    // No expected length: a full cache then fails mid-stream rather than
    // refusing at begin, which is the harder case for a tee.
    let options = WriteOptions::new().idle_deadline(Duration::from_millis(250));

    let started = Instant::now();
    let (client, fill) = cache.tee(&key, options, upstream(body.clone())).await;
    let mut hasher = Sha256::new();
    let mut client = std::pin::pin!(client);
    while let Some(chunk) = client.next().await {
        hasher.update(chunk.expect("the client never sees a cache error"));
    }
    let client_time = started.elapsed();

    let intact = hasher.finalize()[..] == Sha256::digest(body)[..];
    let outcome = fill.await;
    (intact, client_time, outcome.label().to_owned())
}

#[tokio::main]
async fn main() {
    let body = artifact();
    println!(
        "serving an {} MiB artifact through a tee, paced at about 32 MiB/s\n",
        SIZE >> 20
    );
    println!(
        "{:<22} {:>12} {:>12}  fill outcome",
        "cache", "client ok", "client ms"
    );

    // The stalled cache gets a buffer larger than the artifact, so that only
    // the idle deadline can detect it; the others a 1 MiB buffer.
    let cases: [(&str, Arc<dyn CacheBackend>); 4] = [
        (
            "healthy",
            Arc::new(Troubled {
                inner: MemoryBackend::new(),
                trouble: Trouble::None,
            }),
        ),
        (
            "full after 4 MiB",
            Arc::new(MemoryBackend::with_capacity(4 << 20)),
        ),
        (
            "stalls after 1 MiB",
            Arc::new(Troubled {
                inner: MemoryBackend::new(),
                trouble: Trouble::Stall,
            }),
        ),
        (
            "10x slower than source",
            Arc::new(Troubled {
                inner: MemoryBackend::new(),
                trouble: Trouble::Slow,
            }),
        ),
    ];
    for (label, backend) in cases {
        let buffer = if label.starts_with("stalls") {
            16 << 20
        } else {
            1 << 20
        };
        let cache = Cache::with_config(
            backend.clone(),
            TeePolicy::new().buffer_bytes(buffer),
            BreakerConfig::new(),
        );
        let name = format!("{}.tgz", label.replace(' ', "-"));
        let (intact, took, outcome) = serve(&cache, &name, &body).await;
        let cached = CacheKey::new("npm", name).expect("key");
        let visible = backend.get(&cached).await.expect("get").is_some();
        println!(
            "{:<22} {:>12} {:>12}  {outcome}{}",
            label,
            if intact { "yes" } else { "NO" },
            took.as_millis(),
            if visible {
                " (entry published)"
            } else {
                " (nothing published)"
            },
        );
        assert!(intact, "client bytes differ for {label}");
    }

    println!("\nbreaker: a cache with room for nothing, threshold 3");
    let cache = Cache::with_config(
        Arc::new(MemoryBackend::with_capacity(0)),
        TeePolicy::new(),
        BreakerConfig::new().failure_threshold(3),
    );
    for i in 0..5 {
        let (intact, took, outcome) = serve(&cache, &format!("b{i}.tgz"), &body).await;
        let health = cache.health();
        println!(
            "request {i}: client ok {intact}, {} ms, fill {outcome}, breaker {}",
            took.as_millis(),
            health.state.as_str()
        );
    }
}
