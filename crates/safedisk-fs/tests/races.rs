//! Concurrent writers of one key never mix bytes; create-only has exactly
//! one winner; readers see an old entry or a whole new one.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{content, get_bytes, key, put, temp_files};
use safedisk_core::{CacheBackend, ErrorKind, WriteMode, WriteOptions};
use safedisk_fs::{Durability, FsBackend, FsOptions};

const WRITERS: u64 = 8;
const ROUNDS: u64 = 6;

fn body(writer: u64) -> Vec<u8> {
    content(writer, 100_000 + writer as usize * 37_000)
}

async fn race(durability: Durability, mode: WriteMode) {
    let dir = tempfile::tempdir().unwrap();
    let backend =
        Arc::new(FsBackend::open(dir.path(), FsOptions::new().durability(durability)).unwrap());
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..WRITERS).map(body).collect());

    for round in 0..ROUNDS {
        let key = key(&format!("contested-{round}"));
        let stop = Arc::new(AtomicBool::new(false));

        // A reader that keeps reading while the writers race.
        let reader = tokio::spawn({
            let (backend, bodies, key, stop) =
                (backend.clone(), bodies.clone(), key.clone(), stop.clone());
            async move {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(bytes) = get_bytes(&*backend, &key).await.unwrap() {
                        assert!(bodies.contains(&bytes), "a read saw mixed or partial bytes");
                        reads += 1;
                    }
                    tokio::task::yield_now().await;
                }
                reads
            }
        });

        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (backend, bodies, key) = (backend.clone(), bodies.clone(), key.clone());
                tokio::spawn(async move {
                    let options = WriteOptions::new()
                        .mode(mode)
                        .expected_len(bodies[w as usize].len() as u64);
                    let chunk = 4096 + w as usize * 5000;
                    put(&*backend, &key, &bodies[w as usize], chunk, options)
                        .await
                        .map(|_| w)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for writer in writers {
            match writer.await.unwrap() {
                Ok(w) => winners.push(w),
                Err(err) => {
                    assert_eq!(mode, WriteMode::CreateOnly, "overwrite failed: {err}");
                    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        reader.await.unwrap();

        let stored = get_bytes(&*backend, &key).await.unwrap().unwrap();
        match mode {
            WriteMode::CreateOnly => {
                assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
                assert!(
                    stored == bodies[winners[0] as usize],
                    "round {round}: not the winner's"
                );
            }
            _ => {
                assert_eq!(winners.len(), WRITERS as usize);
                assert!(bodies.contains(&stored), "round {round}: mixed bytes");
            }
        }
    }
    assert_eq!(temp_files(dir.path()), 0);
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_races_never_mix_durable() {
    race(Durability::Durable, WriteMode::Overwrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_races_never_mix_nosync() {
    race(Durability::NoSync, WriteMode::Overwrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_has_one_winner_durable() {
    race(Durability::Durable, WriteMode::CreateOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_has_one_winner_nosync() {
    race(Durability::NoSync, WriteMode::CreateOnly).await;
}

/// Once an entry exists, overwriting it never makes it look absent: a
/// reader that opens the file an overwrite is about to replace reads the
/// newer entry instead of reporting a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrites_never_hide_the_entry() {
    const OVERWRITES: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let options = FsOptions::new().durability(Durability::NoSync);
    let backend = Arc::new(FsBackend::open(dir.path(), options).unwrap());
    let key = key("overwritten");
    // Small bodies keep each overwrite short, so renames land often while
    // readers are between opening a file and registering as its reader.
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..4).map(|w| content(w, 2_000)).collect());
    put(&*backend, &key, &bodies[0], 2_000, WriteOptions::new())
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (backend, bodies, key, stop) =
                (backend.clone(), bodies.clone(), key.clone(), stop.clone());
            tokio::spawn(async move {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let bytes = get_bytes(&*backend, &key).await.unwrap();
                    let bytes = bytes.expect("the entry vanished during an overwrite");
                    assert!(bodies.contains(&bytes), "a read saw mixed or partial bytes");
                    reads += 1;
                }
                reads
            })
        })
        .collect();

    for n in 0..OVERWRITES {
        let body = &bodies[(n % 4) as usize];
        put(&*backend, &key, body, 700, WriteOptions::new())
            .await
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "a reader never got to read");
    }
}
