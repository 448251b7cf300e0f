//! What the size limit costs: commit throughput with eviction active
//! against the same workload with no limit, and open time with many
//! entries.
//!
//! **Commit throughput.** Two backends on one filesystem, no syncs: one
//! with `max_size`, filled to its limit before timing, so every commit of
//! a round has to evict; one without a limit. Each round writes the same
//! batch (8 concurrent fills, each object declaring its length) with both,
//! in an order that alternates per round, after a `sync` (untimed) so no
//! batch pays for another's writeback. The unlimited backend keeps
//! everything (it grows by one batch per round and never deletes), while
//! the limited one pays for its evictions inside the timed batch. The ratio (limited throughput
//! over unlimited) is taken per round; the median is reported.
//!
//! **Open time.** A root with `SAFEDISK_BENCH_OPEN_ENTRIES` entries
//! (default 100 000, 1 KiB each) is opened several times (warm page
//! cache): the scan that rebuilds the index is part of every open.
//!
//! Run: `cargo bench -p safedisk-fs --bench capacity`. Environment:
//! `SAFEDISK_BENCH_DIR` (default: the system temp dir),
//! `SAFEDISK_BENCH_ROUNDS` (default 7), `SAFEDISK_BENCH_SIZES`
//! (comma-separated bytes; default 65536,1048576),
//! `SAFEDISK_BENCH_OPEN_ENTRIES` (default 100000; 0 skips),
//! `SAFEDISK_BENCH_AA=1` (the "limited" backend gets no limit: an A/A run
//! that shows the bias of the setup itself).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{BenchEnv, env_or};
use futures::future::join_all;
use safedisk_core::{CacheKey, Fill, WriteOptions};
use safedisk_fs::{Durability, FsBackend, FsOptions, SpaceFloor};

const CHUNK: usize = 64 * 1024;
const CONCURRENCY: usize = 8;
/// The limited backend's size, and the bytes one batch writes.
const LIMIT: u64 = 64 << 20;

fn main() {
    let env = BenchEnv::new("7", "65536,1048576");
    let open_entries: usize = env_or("SAFEDISK_BENCH_OPEN_ENTRIES", "100000")
        .parse()
        .unwrap();
    let (dir, rounds, sizes, runtime) = (&env.dir, env.rounds, &env.sizes, &env.runtime);

    println!(
        "| size | limited MB/s | unlimited MB/s | limited / unlimited (median of rounds) | evictions |"
    );
    println!("|---|---|---|---|---|");
    for &size in sizes {
        runtime.block_on(throughput(dir.path(), size, rounds));
    }

    if open_entries > 0 {
        runtime.block_on(open_time(dir.path(), open_entries));
    }
}

fn options() -> FsOptions {
    FsOptions::new()
        .durability(Durability::NoSync)
        .space_floor(SpaceFloor::Bytes(0))
}

async fn throughput(dir: &Path, size: usize, rounds: usize) {
    let limited_options = if std::env::var_os("SAFEDISK_BENCH_AA").is_some() {
        options()
    } else {
        options().max_size(LIMIT)
    };
    let limited = FsBackend::open(dir.join(format!("limited-{size}")), limited_options).unwrap();
    let unlimited = FsBackend::open(dir.join(format!("unlimited-{size}")), options()).unwrap();
    let data = Bytes::from(
        (0..size)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
            .collect::<Vec<u8>>(),
    );
    let count = (LIMIT as usize / size).max(CONCURRENCY);

    // Fill the limited cache to its limit: from here on every commit
    // evicts.
    batch(&limited, "warm", count, &data).await;
    batch(&limited, "warm2", count, &data).await;
    let evictions_before = limited.usage().evictions;

    let (mut limited_times, mut unlimited_times, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut limited_time = Duration::ZERO;
        let mut unlimited_time = Duration::ZERO;
        for turn in 0..2 {
            let prefix = format!("r{round}");
            // No batch pays for another's writeback.
            tokio::task::spawn_blocking(|| {
                // SAFETY: `sync` takes no arguments and cannot fail.
                unsafe { libc::sync() }
            })
            .await
            .unwrap();
            if (round + turn) % 2 == 0 {
                limited_time = batch(&limited, &prefix, count, &data).await;
            } else {
                unlimited_time = batch(&unlimited, &prefix, count, &data).await;
            }
        }
        limited_times.push(limited_time);
        unlimited_times.push(unlimited_time);
        ratios.push(unlimited_time.as_secs_f64() / limited_time.as_secs_f64());
    }

    let bytes = (count * size) as f64;
    let rate = |times: &[Duration]| {
        median(
            times
                .iter()
                .map(|t| bytes / t.as_secs_f64() / 1e6)
                .collect(),
        )
    };
    println!(
        "| {} | {:.0} | {:.0} | {:.2} | {} |",
        human(size),
        rate(&limited_times),
        rate(&unlimited_times),
        median(ratios),
        limited.usage().evictions - evictions_before,
    );
}

/// Writes `count` objects with `CONCURRENCY` fills at a time; returns the
/// time taken.
async fn batch(backend: &FsBackend, prefix: &str, count: usize, data: &Bytes) -> Duration {
    let started = Instant::now();
    for group in (0..count).collect::<Vec<_>>().chunks(CONCURRENCY) {
        join_all(group.iter().map(|&i| {
            let key = CacheKey::new("bench", format!("{prefix}-{i}")).unwrap();
            async move {
                let options = WriteOptions::new().expected_len(data.len() as u64);
                let mut fill = Fill::begin(backend, &key, options).await.unwrap();
                let mut offset = 0;
                while offset < data.len() {
                    let end = (offset + CHUNK).min(data.len());
                    fill.write(data.slice(offset..end)).await.unwrap();
                    offset = end;
                }
                fill.commit().await.unwrap();
            }
        }))
        .await;
    }
    started.elapsed()
}

async fn open_time(dir: &Path, entries: usize) {
    let root = dir.join("open");
    let backend = Arc::new(FsBackend::open(&root, options()).unwrap());
    let data = Bytes::from(vec![7u8; 1024]);
    let started = Instant::now();
    let per_task = entries.div_ceil(CONCURRENCY);
    join_all((0..CONCURRENCY).map(|task| {
        let backend = backend.clone();
        let data = data.clone();
        tokio::spawn(async move {
            for i in task * per_task..((task + 1) * per_task).min(entries) {
                let key = CacheKey::new("bench", format!("open-{i}")).unwrap();
                let options = WriteOptions::new().expected_len(1024);
                let mut fill = Fill::begin(&*backend, &key, options).await.unwrap();
                fill.write(data.clone()).await.unwrap();
                fill.commit().await.unwrap();
            }
        })
    }))
    .await;
    println!(
        "\nopen time: {entries} entries written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(backend.usage().entries, entries as u64);
    drop(backend);

    let empty = dir.join("open-empty");
    let mut times = Vec::new();
    let mut empty_times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let backend = FsBackend::open(&root, options()).unwrap();
        times.push(started.elapsed().as_secs_f64());
        assert_eq!(backend.usage().entries, entries as u64);

        let started = Instant::now();
        drop(FsBackend::open(&empty, options()).unwrap());
        empty_times.push(started.elapsed().as_secs_f64());
    }
    println!(
        "open of {entries} entries: median {:.3} s over 5 opens (empty root: {:.4} s)",
        median(times),
        median(empty_times)
    );
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn human(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}
