//! Upload throughput of the backend against plain `object_store` multipart
//! writes, on the same in-process S3 server, in one run.
//!
//! Three ways of writing the same body, interleaved round by round so that
//! drift in the machine's load hits all of them alike:
//!
//! - `plain`: `object_store::WriteMultipart` with the same part size,
//!   waiting for capacity at the same number of parts in flight;
//! - `writer`: this backend's writer driven directly (write, commit): the
//!   storage path alone;
//! - `fill`: through `safedisk_core::Fill`, which also hashes the bytes and
//!   runs every call under the deadlines: what a user gets.
//!
//! The upstream makes a fresh 64 KiB chunk each time (as a network body
//! would), so the growth of the resident set during a run shows what each
//! way buffers. The timed part ends when the object is published (for the
//! backend: the manifest put); removing it afterwards is not timed.
//!
//! Environment: `SAFEDISK_BENCH_SIZES_MIB` (default `64,512`),
//! `SAFEDISK_BENCH_ROUNDS` (default 3).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use safedisk_core::{CacheBackend, CacheKey, Fill, FillSummary, WriteOptions};
use safedisk_s3::testing::S3TestServer;
use safedisk_s3::{DEFAULT_PART_SIZE, DEFAULT_PARTS_IN_FLIGHT, ObjectStoreBackend, S3Options};

const CHUNK: usize = 64 * 1024;
const MIB: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Plain,
    Writer,
    Fill,
}

/// A body of `len` bytes as fresh chunks copied from a template.
struct Upstream {
    template: Bytes,
    left: usize,
    at: usize,
}

impl Upstream {
    fn new(template: &Bytes, len: usize) -> Self {
        Self {
            template: template.clone(),
            left: len,
            at: 0,
        }
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.left == 0 {
            return None;
        }
        let len = CHUNK.min(self.left);
        let start = self.at % (self.template.len() - CHUNK);
        self.at += CHUNK;
        self.left -= len;
        Some(Bytes::copy_from_slice(&self.template[start..start + len]))
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples the resident set every 5 ms while `run` runs; returns the run's
/// duration and the peak growth over the resident set at the start.
async fn measured<F: std::future::Future<Output = ()>>(run: F) -> (Duration, u64) {
    let start_rss = rss_bytes();
    let peak = Arc::new(AtomicU64::new(start_rss));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let started = Instant::now();
    run.await;
    let elapsed = started.elapsed();
    sampler.abort();
    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
    (elapsed, peak.load(Ordering::Relaxed) - start_rss)
}

async fn plain(store: &Arc<dyn ObjectStore>, template: &Bytes, len: usize) {
    let path = Path::from("plain/object");
    let upload = store.put_multipart(&path).await.unwrap();
    let mut writer = WriteMultipart::new_with_chunk_size(upload, DEFAULT_PART_SIZE);
    let mut upstream = Upstream::new(template, len);
    while let Some(chunk) = upstream.next_chunk() {
        writer
            .wait_for_capacity(DEFAULT_PARTS_IN_FLIGHT)
            .await
            .unwrap();
        writer.put(chunk);
    }
    writer.finish().await.unwrap();
}

async fn backend_writer(backend: &ObjectStoreBackend, template: &Bytes, len: usize) {
    let key = CacheKey::new("bench", "writer").unwrap();
    let mut writer = backend.begin(&key, &WriteOptions::new()).await.unwrap();
    let mut upstream = Upstream::new(template, len);
    while let Some(chunk) = upstream.next_chunk() {
        writer.write(chunk).await.unwrap();
    }
    // The writer trusts the summary it is given; the digest is not checked
    // on this path, only recorded.
    let summary = FillSummary {
        len: len as u64,
        sha256: [0; 32],
    };
    writer.commit(summary).await.unwrap();
}

async fn fill(backend: &ObjectStoreBackend, template: &Bytes, len: usize) {
    let key = CacheKey::new("bench", "fill").unwrap();
    let options = WriteOptions::new()
        .expected_len(len as u64)
        .total_deadline(Duration::from_secs(600));
    let mut fill = Fill::begin(backend, &key, options).await.unwrap();
    let mut upstream = Upstream::new(template, len);
    while let Some(chunk) = upstream.next_chunk() {
        fill.write(chunk).await.unwrap();
    }
    fill.commit().await.unwrap();
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(value) => value
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .collect(),
        Err(_) => default.to_vec(),
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // then only a smoke run of one small body is made.
    let benching = std::env::args().any(|a| a == "--bench");
    let sizes = if benching {
        env_list("SAFEDISK_BENCH_SIZES_MIB", &[64, 512])
    } else {
        vec![8]
    };
    let rounds = if benching {
        env_list("SAFEDISK_BENCH_ROUNDS", &[3])[0].max(1)
    } else {
        1
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = S3TestServer::start().await.unwrap();
        let store = server.store();
        let options = S3Options::new()
            .part_size(DEFAULT_PART_SIZE)
            .parts_in_flight(DEFAULT_PARTS_IN_FLIGHT);
        let backend = ObjectStoreBackend::new(store.clone(), "bench", options).unwrap();
        let mut template = vec![0u8; 4 * MIB];
        for (i, byte) in template.iter_mut().enumerate() {
            *byte = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        }
        let template = Bytes::from(template);

        println!(
            "part size {} MiB, {} parts in flight, {rounds} rounds, chunks of {} KiB",
            DEFAULT_PART_SIZE / MIB,
            DEFAULT_PARTS_IN_FLIGHT,
            CHUNK / 1024
        );
        for size_mib in sizes {
            let len = size_mib * MIB;
            let ways = [Way::Plain, Way::Writer, Way::Fill];
            let mut times: Vec<Vec<Duration>> = vec![Vec::new(); ways.len()];
            let mut peaks = vec![0u64; ways.len()];
            for round in 0..rounds {
                // Rotate the order each round so no way always goes first.
                for offset in 0..ways.len() {
                    let index = (offset + round) % ways.len();
                    let (elapsed, peak) = match ways[index] {
                        Way::Plain => measured(plain(&store, &template, len)).await,
                        Way::Writer => measured(backend_writer(&backend, &template, len)).await,
                        Way::Fill => measured(fill(&backend, &template, len)).await,
                    };
                    times[index].push(elapsed);
                    peaks[index] = peaks[index].max(peak);

                    // Clean up outside the timed part, so the server's disk
                    // holds one body at a time.
                    match ways[index] {
                        Way::Plain => store.delete(&Path::from("plain/object")).await.unwrap(),
                        Way::Writer | Way::Fill => {
                            for name in ["writer", "fill"] {
                                let key = CacheKey::new("bench", name).unwrap();
                                backend.remove(&key).await.unwrap();
                            }
                        }
                    }
                }
            }

            let plain_time = median(times[0].clone());
            for (index, way) in ways.iter().enumerate() {
                let time = median(times[index].clone());
                let throughput = size_mib as f64 / time.as_secs_f64();
                let ratio = plain_time.as_secs_f64() / time.as_secs_f64();
                println!(
                    "{size_mib:>4} MiB {:<6} median {:>8.1} ms  {:>7.1} MiB/s  {ratio:.3}x plain  \
                     peak RSS growth {:>5.1} MiB",
                    format!("{way:?}").to_lowercase(),
                    time.as_secs_f64() * 1000.0,
                    throughput,
                    peaks[index] as f64 / MIB as f64,
                );
            }
        }
    });
}
