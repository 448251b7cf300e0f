//! The size limit: accounting by allocated blocks, least-recently-used
//! eviction, readers of evicted entries, the index after a restart, and a
//! size-limited tmpfs that must never report ENOSPC itself.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Tmpfs, content, get_bytes, key, put, read_all};
use futures::StreamExt;
use safedisk_core::{CacheBackend, ErrorKind, Fill, WriteOptions};
use safedisk_fs::{Durability, FsBackend, FsOptions, SpaceFloor};

fn options(limit: u64) -> FsOptions {
    FsOptions::new()
        .durability(Durability::NoSync)
        .space_floor(SpaceFloor::Bytes(0))
        .max_size(limit)
}

/// Entry files and the space they take, counted on disk.
fn on_disk(root: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    for shard in std::fs::read_dir(root.join("entries")).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let meta = file.unwrap().metadata().unwrap();
            files += 1;
            bytes += meta.blocks() * 512;
        }
    }
    (files, bytes)
}

/// Waits until evicted entries are unlinked: a commit may leave that to
/// a pass on the blocking pool.
async fn settle(backend: &FsBackend) -> safedisk_fs::FsUsage {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let usage = backend.usage();
        if usage.bytes_freeing == 0 {
            return usage;
        }
        assert!(
            Instant::now() < deadline,
            "unlinks never finished: {usage:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn with_len(len: usize) -> WriteOptions {
    WriteOptions::new().expected_len(len as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_never_passes_the_limit_with_32_writers() {
    const LIMIT: u64 = 4 << 20;
    const WRITERS: u64 = 32;
    const EACH: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FsBackend::open(dir.path(), options(LIMIT)).unwrap());

    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let backend = backend.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = 0;
            for i in 0..EACH {
                let seed = writer * 100 + i;
                let len = 8_000 + (seed as usize * 7_919) % 56_000;
                let bytes = content(seed, len);
                // Half declare their length, half reserve as they grow.
                let options = if seed % 2 == 0 {
                    with_len(len)
                } else {
                    WriteOptions::new()
                };
                let name = format!("w{writer}-{i}");
                put(&*backend, &key(&name), &bytes, 5_000, options)
                    .await
                    .unwrap();
                written += len as u64;

                let usage = backend.usage();
                assert!(usage.bytes_used <= LIMIT, "{usage:?}");
                let counted = usage.bytes_used
                    + usage.bytes_reserved
                    + usage.bytes_freeing
                    + usage.bytes_held_by_readers;
                assert!(counted <= LIMIT, "{usage:?}");
            }
            written
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert!(total > 2 * LIMIT, "the workload must overflow the limit");

    let usage = settle(&backend).await;
    assert!(usage.evictions > 0, "{usage:?}");
    assert_eq!(usage.bytes_reserved, 0);
    assert_eq!(usage.bytes_freeing, 0);
    assert_eq!(on_disk(dir.path()), (usage.entries, usage.bytes_used));
    assert!(usage.bytes_used <= LIMIT);
    assert!(
        usage.bytes_used > LIMIT / 2,
        "eviction went too far: {usage:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_recently_used_entries_are_kept() {
    // Entries whose files take 68 KiB each: 13 stay under the point
    // (15/16 of 1 MiB) where eviction ahead of need starts.
    const LEN: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), options(1 << 20)).unwrap();
    let write = |i: u64| {
        let backend = &backend;
        async move {
            let bytes = content(i, LEN);
            put(
                backend,
                &key(&format!("e{i}")),
                &bytes,
                16_384,
                with_len(LEN),
            )
            .await
            .unwrap();
        }
    };

    for i in 0..13 {
        write(i).await;
    }
    assert_eq!(backend.usage().evictions, 0);

    // Reading e0 makes it the most recently used; e1 is now the oldest.
    assert!(get_bytes(&backend, &key("e0")).await.unwrap().is_some());
    for i in 13..20 {
        write(i).await;
    }

    // Look on disk (a get would count as a use).
    let usage = settle(&backend).await;
    assert_eq!(on_disk(dir.path()).0, usage.entries);
    let kept: Vec<u64> = (0..20)
        .filter(|&i| common::entry_file(dir.path(), &key(&format!("e{i}"))).exists())
        .collect();

    // By last use the order is e1..e12, e0, e13..e19: what is kept is
    // the newest part of that order.
    let order: Vec<u64> = (1..13).chain([0]).chain(13..20).collect();
    let first_kept = order.iter().position(|i| kept.contains(i)).unwrap();
    let mut expected = order[first_kept..].to_vec();
    expected.sort_unstable();
    assert_eq!(
        kept, expected,
        "kept entries are not the most recently used"
    );
    assert!(kept.contains(&0));
    assert!((12..=15).contains(&kept.len()), "{kept:?}");
    assert_eq!(usage.evictions, 20 - kept.len() as u64);
    for &i in &kept {
        let bytes = get_bytes(&backend, &key(&format!("e{i}"))).await.unwrap();
        assert!(bytes == Some(content(i, LEN)), "e{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_keeps_reading_an_evicted_entry() {
    // Three entries of 300 KiB fit under 1 MiB; a fourth does not.
    const LEN: usize = 300 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), options(1 << 20)).unwrap();
    let old = content(1, LEN);
    put(&backend, &key("old"), &old, 64 * 1024, with_len(LEN))
        .await
        .unwrap();

    let entry = backend.get(&key("old")).await.unwrap().expect("published");
    let mut body = entry.body;
    let mut read = body.next().await.unwrap().unwrap().to_vec();
    assert!(read.len() < LEN, "the rest must come from the file");

    // Two more, each read since, so "old" is the least recently used.
    for name in ["b", "c"] {
        put(
            &backend,
            &key(name),
            &content(2, LEN),
            64 * 1024,
            with_len(LEN),
        )
        .await
        .unwrap();
        assert!(get_bytes(&backend, &key(name)).await.unwrap().is_some());
    }

    // "old" goes first; its blocks stay allocated while it is read, so
    // "b" has to go too.
    put(
        &backend,
        &key("d"),
        &content(3, LEN),
        64 * 1024,
        with_len(LEN),
    )
    .await
    .unwrap();
    let usage = backend.usage();
    assert_eq!(usage.evictions, 2, "{usage:?}");
    assert!(backend.get(&key("old")).await.unwrap().is_none());
    assert!(backend.get(&key("b")).await.unwrap().is_none());
    assert!(usage.bytes_held_by_readers >= LEN as u64, "{usage:?}");
    assert_eq!(on_disk(dir.path()), (2, usage.bytes_used));
    assert!(usage.bytes_used + usage.bytes_held_by_readers <= 1 << 20);

    while let Some(chunk) = body.next().await {
        read.extend_from_slice(&chunk.unwrap());
    }
    assert!(read == old, "evicted entry read back differs");
    drop(body);
    assert_eq!(backend.usage().bytes_held_by_readers, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_cannot_fit_is_refused_before_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), options(256 * 1024)).unwrap();
    put(
        &backend,
        &key("small"),
        &content(1, 1000),
        1000,
        with_len(1000),
    )
    .await
    .unwrap();

    // Larger than the limit itself: refused at begin; nothing evicted.
    let err = Fill::begin(&backend, &key("huge"), with_len(300 * 1024))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    assert_eq!(err.raw_os_error(), None);
    assert_eq!(backend.usage().evictions, 0);

    // A fill in flight holds its reservation: a second one that would
    // need it is refused, though evicting "small" was tried first.
    let held = Fill::begin(&backend, &key("held"), with_len(200 * 1024))
        .await
        .unwrap();
    let err = Fill::begin(&backend, &key("more"), with_len(100 * 1024))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);

    // A fill of unknown length fails at the write that would pass it.
    let mut grow = Fill::begin(&backend, &key("grow"), WriteOptions::new())
        .await
        .unwrap();
    let mut failed = None;
    for i in 0..64 {
        if let Err(err) = grow.write(Bytes::from(vec![7u8; 64 * 1024])).await {
            failed = Some((i, err));
            break;
        }
    }
    // The fourth write fills the 256 KiB batch, which cannot fit.
    let (at, err) = failed.expect("a write must fail");
    assert_eq!(at, 3);
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    assert_eq!(err.raw_os_error(), None);
    drop(held);

    let usage = backend.usage();
    assert_eq!(usage.bytes_reserved, 0, "{usage:?}");
    assert_eq!(common::temp_files(dir.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_after_a_restart_matches_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), options(1 << 20)).unwrap();
    for i in 0..30u64 {
        let len = 1_000 + (i as usize * 37_000) % 90_000;
        put(
            &backend,
            &key(&format!("r{i}")),
            &content(i, len),
            8_192,
            with_len(len),
        )
        .await
        .unwrap();
    }
    assert!(backend.remove(&key("r29")).await.unwrap());

    // A live fill's temp file is not an entry and is not counted.
    let mut live = Fill::begin(&backend, &key("live"), WriteOptions::new())
        .await
        .unwrap();
    live.write(Bytes::from(vec![1u8; 300 * 1024]))
        .await
        .unwrap();
    live.write(Bytes::from(vec![2u8; 300 * 1024]))
        .await
        .unwrap();
    assert_eq!(common::temp_files(dir.path()), 1);
    // Each batch is reserved before its write returns.
    let before = settle(&backend).await;
    assert!(before.evictions > 0);
    assert!(before.bytes_reserved >= 600 * 1024, "{before:?}");
    assert_eq!(on_disk(dir.path()), (before.entries, before.bytes_used));

    let reopened = FsBackend::open(dir.path(), options(1 << 20)).unwrap();
    let after = reopened.usage();
    assert_eq!(after.entries, before.entries);
    assert_eq!(after.bytes_used, before.bytes_used);
    assert_eq!(after.bytes_reserved, 0);
    assert_eq!(after.evictions, 0);
    assert_eq!(on_disk(dir.path()), (after.entries, after.bytes_used));
    live.abort().await.unwrap();
}

/// 9 MiB of tmpfs under an 8 MiB limit: writers of both kinds, readers
/// and removers for a while. Every refusal must be the backend's own (no
/// errno), never the filesystem's ENOSPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_limit_never_lets_the_filesystem_fill() {
    const LIMIT: u64 = 8 << 20;
    let Some(fs) = Tmpfs::mount("9m", "a_full_limit_never_lets_the_filesystem_fill") else {
        return;
    };
    let backend = Arc::new(
        FsBackend::open(
            fs.path(),
            FsOptions::new()
                .space_floor(SpaceFloor::Bytes(0))
                .max_size(LIMIT),
        )
        .unwrap(),
    );

    let mut tasks = Vec::new();
    for worker in 0..12u64 {
        let backend = backend.clone();
        tasks.push(tokio::spawn(async move {
            let (mut committed, mut refused) = (0u64, 0u64);
            for step in 0..60u64 {
                let seed = worker * 1000 + step;
                let name = format!("k{}", seed % 97);
                match (worker + step) % 5 {
                    0..=2 => {
                        let len = 4_096 + (seed as usize * 104_729) % (2 << 20);
                        let options = if step % 2 == 0 {
                            with_len(len)
                        } else {
                            WriteOptions::new()
                        };
                        let bytes = content(seed, len);
                        match put(&*backend, &key(&name), &bytes, 64 * 1024, options).await {
                            Ok(_) => committed += 1,
                            Err(err) => {
                                assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
                                assert_eq!(err.raw_os_error(), None, "filesystem full: {err}");
                                refused += 1;
                            }
                        }
                    }
                    3 => {
                        if let Some(entry) = backend.get(&key(&name)).await.unwrap() {
                            let len = entry.meta.len();
                            assert_eq!(read_all(entry).await.unwrap().len() as u64, len);
                        }
                    }
                    _ => {
                        backend.remove(&key(&name)).await.unwrap();
                    }
                }
                let usage = backend.usage();
                let counted = usage.bytes_used
                    + usage.bytes_reserved
                    + usage.bytes_freeing
                    + usage.bytes_held_by_readers;
                assert!(counted <= LIMIT, "{usage:?}");
            }
            (committed, refused)
        }));
    }
    let (mut committed, mut refused) = (0, 0);
    for task in tasks {
        let (c, r) = task.await.unwrap();
        committed += c;
        refused += r;
    }

    let usage = settle(&backend).await;
    println!("committed {committed}, refused {refused}, {usage:?}");
    assert!(
        usage.evictions > 0,
        "the limit was never reached: {usage:?}"
    );
    assert!(committed > 100);
    assert!(refused > 0, "no fill ever met the limit");
    assert_eq!(on_disk(fs.path()), (usage.entries, usage.bytes_used));
    drop(backend);
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_overwrites_leave_the_index_true_to_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FsBackend::open(dir.path(), options(64 << 20)).unwrap());
    let mut tasks = Vec::new();
    for writer in 0..8u64 {
        let backend = backend.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..20u64 {
                let len = 1_000 + ((writer * 20 + round) as usize * 15_013) % 200_000;
                let bytes = content(writer, len);
                put(&*backend, &key("same"), &bytes, 32_768, with_len(len))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let usage = backend.usage();
    assert_eq!(on_disk(dir.path()), (1, usage.bytes_used), "{usage:?}");
    assert_eq!(usage.entries, 1);
    assert_eq!(usage.bytes_reserved, 0);
}
