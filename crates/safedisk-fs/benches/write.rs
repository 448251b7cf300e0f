//! Write throughput of the disk backend against the alternatives, in one
//! run, on one directory, interleaved.
//!
//! For each object size and durability setting, every round writes a batch
//! of objects with each contender in turn (the order rotates each round),
//! and `sync`s and deletes between batches so no batch pays for another's
//! writeback. A ratio is taken per round (this backend's time against the
//! other's on the same round), and the median over rounds is reported.
//!
//! Contenders, each given the bytes as 64 KiB chunks with the length known:
//!
//! - `safedisk`: [`FsBackend`] through `safedisk_core::Fill` (length and
//!   SHA-256 checked, deadlines armed), from async code.
//! - `safedisk, reserve_space off`: the same without `fallocate` at begin.
//! - `plain`: the practical limit; one blocking task per object that
//!   writes a temp file, `fsync`s it, renames it and `fsync`s the
//!   directory (no syncs when durability is off).
//! - `plain+sha256`: the same loop, also computing the SHA-256 that `Fill`
//!   computes for every fill: the practical limit for a cache that checks
//!   what it stores.
//! - `cacache`: `SyncWriter` in one blocking task per object (with its size
//!   hint, which makes it `mmap` the file, for single-chunk objects only:
//!   cacache 13.1 panics when a hinted object arrives in several writes).
//!   cacache has no fsync at all, so it runs with durability off only.
//! - `object_store`: `LocalFileSystem::put` with `with_fsync` on or off.
//!
//! Run: `cargo bench -p safedisk-fs --bench write`. Environment:
//! `SAFEDISK_BENCH_DIR` (default: the system temp dir), `SAFEDISK_BENCH_ROUNDS`
//! (default 5), `SAFEDISK_BENCH_SIZES` (comma-separated bytes; default
//! 4096,1048576,67108864).

use std::io::Write;
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::BenchEnv;
use object_store::ObjectStoreExt;
use object_store::local::LocalFileSystem;
use safedisk_core::{CacheKey, Fill, WriteOptions};
use safedisk_fs::{Durability, FsBackend, FsOptions, SpaceFloor};
use sha2::Digest;

const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Contender {
    Safedisk,
    SafediskNoReserve,
    Plain,
    PlainSha256,
    Cacache,
    ObjectStore,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Self::Safedisk => "safedisk",
            Self::SafediskNoReserve => "safedisk, reserve_space off",
            Self::Plain => "plain",
            Self::PlainSha256 => "plain+sha256",
            Self::Cacache => "cacache",
            Self::ObjectStore => "object_store",
        }
    }
}

struct Setup {
    root: PathBuf,
    durable: bool,
    backend: FsBackend,
    unreserved: FsBackend,
    store: Arc<LocalFileSystem>,
}

fn main() {
    let env = BenchEnv::new("5", "4096,1048576,67108864");
    let (dir, rounds, sizes, runtime) = (&env.dir, env.rounds, &env.sizes, &env.runtime);
    println!(
        "| size | durable | contender | median MB/s | median objects/s | safedisk / contender |"
    );
    println!("|---|---|---|---|---|---|");

    for durable in [true, false] {
        let setup = setup(dir.path(), durable);
        for &size in sizes {
            let contenders: &[Contender] = if durable {
                &[
                    Contender::Safedisk,
                    Contender::SafediskNoReserve,
                    Contender::Plain,
                    Contender::PlainSha256,
                    Contender::ObjectStore,
                ]
            } else {
                &[
                    Contender::Safedisk,
                    Contender::SafediskNoReserve,
                    Contender::Plain,
                    Contender::PlainSha256,
                    Contender::Cacache,
                    Contender::ObjectStore,
                ]
            };
            let results = runtime.block_on(group(&setup, size, rounds, contenders));
            report(size, durable, contenders, &results);
        }
    }
}

fn setup(dir: &Path, durable: bool) -> Setup {
    let root = dir.join(if durable { "durable" } else { "nosync" });
    let durability = if durable {
        Durability::Durable
    } else {
        Durability::NoSync
    };
    let options = FsOptions::new()
        .durability(durability)
        .space_floor(SpaceFloor::Bytes(0));
    let backend = FsBackend::open(root.join("safedisk"), options.clone()).unwrap();
    let unreserved =
        FsBackend::open(root.join("unreserved"), options.reserve_space(false)).unwrap();
    for sub in ["plain", "cacache", "object_store"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let store = LocalFileSystem::new_with_prefix(root.join("object_store"))
        .unwrap()
        .with_fsync(durable);
    Setup {
        root,
        durable,
        backend,
        unreserved,
        store: Arc::new(store),
    }
}

/// Objects per batch: about 1 MiB of 4 KiB objects, 32 MiB of 1 MiB ones,
/// two of anything larger.
fn batch_len(size: usize) -> usize {
    match size {
        0..=65_536 => 256,
        65_537..=4_194_304 => 32,
        _ => 2,
    }
}

/// Times per contender per round.
async fn group(
    setup: &Setup,
    size: usize,
    rounds: usize,
    contenders: &[Contender],
) -> Vec<Vec<Duration>> {
    let data = Bytes::from(
        (0..size)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
            .collect::<Vec<u8>>(),
    );
    let chunks: Arc<Vec<Bytes>> = Arc::new(
        (0..size.div_ceil(CHUNK).max(1))
            .map(|i| data.slice(i * CHUNK..((i + 1) * CHUNK).min(size)))
            .collect(),
    );
    let count = batch_len(size);
    let mut times = vec![Vec::new(); contenders.len()];

    // One untimed warm-up round, then the measured ones.
    for round in 0..=rounds {
        for offset in 0..contenders.len() {
            let index = (round + offset) % contenders.len();
            let contender = contenders[index];
            let started = Instant::now();
            for i in 0..count {
                let name = format!("r{round}-o{i}");
                write_one(setup, contender, &name, size, &chunks).await;
            }
            let elapsed = started.elapsed();
            if round > 0 {
                times[index].push(elapsed);
            }
            clean(setup, contender).await;
        }
    }
    times
}

async fn write_one(
    setup: &Setup,
    contender: Contender,
    name: &str,
    size: usize,
    chunks: &Arc<Vec<Bytes>>,
) {
    match contender {
        Contender::Safedisk | Contender::SafediskNoReserve => {
            let backend = if contender == Contender::Safedisk {
                &setup.backend
            } else {
                &setup.unreserved
            };
            let key = CacheKey::new("bench", name).unwrap();
            let options = WriteOptions::new()
                .expected_len(size as u64)
                .total_deadline(Duration::from_secs(300))
                .idle_deadline(Duration::from_secs(60));
            let mut fill = Fill::begin(backend, &key, options).await.unwrap();
            for chunk in chunks.iter() {
                fill.write(chunk.clone()).await.unwrap();
            }
            fill.commit().await.unwrap();
        }
        Contender::Plain | Contender::PlainSha256 => {
            let dir = setup.root.join("plain");
            let (name, chunks, durable) = (name.to_owned(), chunks.clone(), setup.durable);
            let hash = contender == Contender::PlainSha256;
            tokio::task::spawn_blocking(move || plain_write(&dir, &name, &chunks, durable, hash))
                .await
                .unwrap();
        }
        Contender::Cacache => {
            let dir = setup.root.join("cacache");
            let (name, chunks) = (name.to_owned(), chunks.clone());
            tokio::task::spawn_blocking(move || {
                // cacache's size hint maps the temp file and then takes the
                // whole object in one write; it panics on chunked writes. So
                // the hint is given only for single-chunk objects.
                let mut options = cacache::WriteOpts::new();
                if chunks.len() == 1 {
                    options = options.size(size);
                }
                let mut writer = options.open_sync(&dir, &name).unwrap();
                for chunk in chunks.iter() {
                    writer.write_all(chunk).unwrap();
                }
                writer.commit().unwrap();
            })
            .await
            .unwrap();
        }
        Contender::ObjectStore => {
            let path = object_store::path::Path::from(name);
            let payload: object_store::PutPayload = chunks.iter().cloned().collect();
            setup.store.put(&path, payload).await.unwrap();
        }
    }
}

/// The practical limit: write, fsync, rename, fsync the directory; with
/// `hash`, also the SHA-256 that a verifying cache must compute.
fn plain_write(dir: &Path, name: &str, chunks: &[Bytes], durable: bool, hash: bool) {
    let mut hasher = sha2::Sha256::new();
    let temp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .unwrap();
    for chunk in chunks {
        if hash {
            hasher.update(chunk);
        }
        file.write_all(chunk).unwrap();
    }
    std::hint::black_box(hasher.finalize());
    if durable {
        file.sync_all().unwrap();
    }
    drop(file);
    std::fs::rename(&temp, dir.join(name)).unwrap();
    if durable {
        std::fs::File::open(dir).unwrap().sync_all().unwrap();
    }
}

/// Deletes what a batch wrote and flushes dirty pages, untimed.
async fn clean(setup: &Setup, contender: Contender) {
    let root = setup.root.clone();
    let backend = if contender == Contender::SafediskNoReserve {
        setup.unreserved.clone()
    } else {
        setup.backend.clone()
    };
    tokio::task::spawn_blocking(move || {
        let sub = match contender {
            Contender::Safedisk | Contender::SafediskNoReserve => {
                // Remove the entries but keep the shard directories, as a
                // cache in use has them.
                let entries = backend.root().join("entries");
                for shard in std::fs::read_dir(&entries).unwrap() {
                    for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
                        std::fs::remove_file(file.unwrap().path()).unwrap();
                    }
                }
                rustix::fs::sync();
                return;
            }
            Contender::PlainSha256 => "plain",
            other => other.name(),
        };
        let dir = root.join(sub);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        rustix::fs::sync();
    })
    .await
    .unwrap();
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn report(size: usize, durable: bool, contenders: &[Contender], times: &[Vec<Duration>]) {
    let count = batch_len(size) as f64;
    let ours = &times[0];
    for (index, contender) in contenders.iter().enumerate() {
        let secs: Vec<f64> = times[index].iter().map(Duration::as_secs_f64).collect();
        let mbps = median(secs.iter().map(|s| count * size as f64 / s / 1e6).collect());
        let ops = median(secs.iter().map(|s| count / s).collect());
        // Per-round ratio of throughputs: the other's time over ours.
        let ratio = median(
            times[index]
                .iter()
                .zip(ours)
                .map(|(theirs, ours)| theirs.as_secs_f64() / ours.as_secs_f64())
                .collect(),
        );
        println!(
            "| {} | {} | {} | {:.1} | {:.0} | {:.2} |",
            human(size),
            if durable { "yes" } else { "no" },
            contender.name(),
            mbps,
            ops,
            ratio
        );
    }
}

fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}
