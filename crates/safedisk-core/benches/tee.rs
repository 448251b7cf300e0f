//! Cost of the tee on the client's path.
//!
//! Forwards a 256 MiB body in 64 KiB chunks to a sink that copies every
//! byte (standing for the socket write) in three ways, interleaved round by
//! round so machine drift hits all alike:
//!
//! - `plain`: the upstream stream straight to the sink, no tee;
//! - `tee`: through `tee` into a fill on a fast in-memory writer that keeps
//!   nothing, with the default policy (abandon on lag);
//! - `tee-hold`: the same, but the client waits for the cache when it lags,
//!   so every fill completes (the cache side, which hashes, sets the pace);
//! - `inline`: no tee, but the forwarding task also hashes every chunk with
//!   SHA-256: the least a cache written inline on the client's path, with
//!   verification, would cost. `tee-hold` is compared against it.
//!
//! Prints medians, the throughput ratio against `plain`, the per-chunk
//! overhead, and how many fills committed.
//!
//! Run: `cargo bench -p safedisk-core --bench tee` (set `TEE_BENCH_ROUNDS`
//! for more than 7 rounds).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use safedisk_core::{
    CacheBackend, CacheError, CacheKey, CacheWriter, Entry, Fill, FillSummary, LagPolicy,
    RecoveryReport, TeePolicy, WriteOptions, tee,
};

const TOTAL: usize = 256 << 20;
const CHUNK: usize = 64 << 10;

/// Accepts every byte at once and keeps none: the cache side costs only
/// what `Fill` itself does (counting, hashing, deadlines).
#[derive(Debug, Default)]
struct Sink {
    written: Arc<AtomicU64>,
}

#[derive(Debug)]
struct SinkWriter {
    written: Arc<AtomicU64>,
}

#[async_trait]
impl CacheBackend for Sink {
    fn name(&self) -> &str {
        "sink"
    }

    async fn begin(
        &self,
        _key: &CacheKey,
        _options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        Ok(Box::new(SinkWriter {
            written: self.written.clone(),
        }))
    }

    async fn get(&self, _key: &CacheKey) -> Result<Option<Entry>, CacheError> {
        Ok(None)
    }

    async fn remove(&self, _key: &CacheKey) -> Result<bool, CacheError> {
        Ok(false)
    }

    async fn recover(&self) -> Result<RecoveryReport, CacheError> {
        Ok(RecoveryReport::default())
    }

    async fn pending(&self) -> Result<u64, CacheError> {
        Ok(0)
    }
}

#[async_trait]
impl CacheWriter for SinkWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        self.written
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn commit(self: Box<Self>, _summary: FillSummary) -> Result<(), CacheError> {
        Ok(())
    }

    async fn abort(self: Box<Self>) -> Result<(), CacheError> {
        Ok(())
    }
}

fn upstream(body: &Bytes) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let chunks: Vec<Bytes> = (0..body.len())
        .step_by(CHUNK)
        .map(|at| body.slice(at..(at + CHUNK).min(body.len())))
        .collect();
    stream::iter(chunks.into_iter().map(Ok))
}

/// Copies every chunk into `out`, as a socket write would.
async fn forward<S, E>(mut body: S, out: &mut [u8]) -> u64
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Debug,
{
    let mut sent = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("chunk");
        out[..chunk.len()].copy_from_slice(&chunk);
        sent += chunk.len() as u64;
    }
    sent
}

async fn run_plain(body: &Bytes, out: &mut [u8]) -> Duration {
    let started = Instant::now();
    let sent = forward(upstream(body), out).await;
    assert_eq!(sent, TOTAL as u64);
    started.elapsed()
}

async fn run_inline(body: &Bytes, out: &mut [u8]) -> Duration {
    use sha2::Digest;

    let started = Instant::now();
    let mut hasher = sha2::Sha256::new();
    let mut source = upstream(body);
    let mut sent = 0usize;
    while let Some(chunk) = source.next().await {
        let chunk = chunk.expect("chunk");
        hasher.update(&chunk);
        out[..chunk.len()].copy_from_slice(&chunk);
        sent += chunk.len();
    }
    std::hint::black_box(hasher.finalize());
    assert_eq!(sent, TOTAL);
    started.elapsed()
}

async fn run_tee(
    backend: &Sink,
    body: &Bytes,
    out: &mut [u8],
    policy: TeePolicy,
) -> (Duration, bool) {
    let key = CacheKey::new("bench", "body").expect("key");
    let started = Instant::now();
    let options = WriteOptions::new().expected_len(TOTAL as u64);
    let fill = Fill::begin(backend, &key, options).await.expect("begin");
    let (client, handle) = tee(upstream(body), fill, policy);
    let sent = forward(client, out).await;
    let elapsed = started.elapsed();
    assert_eq!(sent, TOTAL as u64);
    (elapsed, handle.await.is_committed())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("TEE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let body = Bytes::from((0..TOTAL).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut out = vec![0u8; CHUNK];
    let backend = Sink::default();
    let hold = TeePolicy::new().on_lag(LagPolicy::Hold {
        max_total: Duration::from_secs(60),
    });

    let (mut plain, mut teed, mut held) = (Vec::new(), Vec::new(), Vec::new());
    let mut inline = Vec::new();
    let (mut teed_committed, mut held_committed) = (0, 0);
    runtime.block_on(async {
        // Warm-up: page in the body and the output buffer.
        run_plain(&body, &mut out).await;
        for _ in 0..rounds {
            plain.push(run_plain(&body, &mut out).await.as_secs_f64());
            let (t, committed) = run_tee(&backend, &body, &mut out, TeePolicy::new()).await;
            teed.push(t.as_secs_f64());
            teed_committed += usize::from(committed);
            let (t, committed) = run_tee(&backend, &body, &mut out, hold).await;
            held.push(t.as_secs_f64());
            held_committed += usize::from(committed);
            inline.push(run_inline(&body, &mut out).await.as_secs_f64());
        }
    });

    let chunks = (TOTAL / CHUNK) as f64;
    let mib = (TOTAL >> 20) as f64;
    let (plain, teed, held) = (median(plain), median(teed), median(held));
    let inline = median(inline);
    println!(
        "tee bench: {mib} MiB in {} KiB chunks, {rounds} interleaved rounds, medians",
        CHUNK >> 10
    );
    println!(
        "{:<10} {:>10} {:>12} {:>14} {:>16}",
        "case", "ms", "MiB/s", "ratio vs plain", "overhead/chunk"
    );
    let cases = [
        ("plain", plain),
        ("tee", teed),
        ("inline", inline),
        ("tee-hold", held),
    ];
    for (name, secs) in cases {
        println!(
            "{:<10} {:>10.1} {:>12.0} {:>14.3} {:>13.0} ns",
            name,
            secs * 1e3,
            mib / secs,
            plain / secs,
            (secs - plain) / chunks * 1e9,
        );
    }
    println!(
        "tee-hold vs inline (both hash every byte): {:.3}",
        inline / held
    );
    println!("fills committed: tee {teed_committed}/{rounds}, tee-hold {held_committed}/{rounds}");
}
