//! A real ENOSPC: 16 concurrent tees of artifacts larger than a size-limited
//! tmpfs. Alone in its binary, so the descriptor count is this test's own.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Tmpfs, fd_count, free_bytes, key};
use futures::{StreamExt, stream};
use safedisk_core::{
    AbandonReason, BreakerConfig, Cache, CacheBackend, ErrorKind, FillOutcome, LagPolicy,
    TeePolicy, WriteOptions,
};
use safedisk_fs::{FsBackend, FsOptions, SpaceFloor};

const TEES: u64 = 16;
const CHUNK: usize = 64 * 1024;
const CHUNKS: u64 = 96; // 6 MiB per artifact, on a 4 MiB filesystem

/// Each chunk is one repeated byte, different for every tee and position,
/// so a lost, repeated or misplaced chunk shows.
fn chunk(tee: u64, index: u64) -> Bytes {
    Bytes::from(vec![(tee * 37 + index * 11) as u8; CHUNK])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_costs_the_fills_never_the_clients() {
    let Some(fs) = Tmpfs::mount("4m", "full_disk_costs_the_fills_never_the_clients") else {
        return;
    };
    let backend = Arc::new(
        FsBackend::open(
            fs.path(),
            FsOptions::new().space_floor(SpaceFloor::Bytes(0)),
        )
        .unwrap(),
    );
    // Hold lets a slow cache side catch up, so every fill meets the full
    // disk rather than being dropped for lag; the breaker stays closed so
    // every tee tries.
    let cache = Cache::with_config(
        backend.clone(),
        TeePolicy::new().on_lag(LagPolicy::Hold {
            max_total: Duration::from_secs(30),
        }),
        BreakerConfig::new().failure_threshold(1000),
    );
    let free_before = free_bytes(fs.path());
    let fds_before = fd_count();

    // Half the tees declare their length (refused at begin, before a byte
    // streams); half do not (they run into ENOSPC while writing).
    let mut tees = Vec::new();
    for tee in 0..TEES {
        let upstream =
            stream::iter((0..CHUNKS).map(move |i| Ok::<_, std::io::Error>(chunk(tee, i))));
        let mut options = WriteOptions::new();
        if tee % 2 == 0 {
            options = options.expected_len(CHUNKS * CHUNK as u64);
        }
        let (body, fill) = cache
            .tee(&key(&format!("big-{tee}")), options, upstream)
            .await;
        tees.push((tee, body, fill));
    }

    let outcomes =
        futures::future::join_all(tees.into_iter().map(|(tee, body, fill)| async move {
            let mut body = body;
            let mut received = Vec::new();
            while let Some(part) = body.next().await {
                received.push(part.expect("the client never sees a cache error"));
            }
            let expected: Vec<Bytes> = (0..CHUNKS).map(|i| chunk(tee, i)).collect();
            assert!(received == expected, "tee {tee}: client bytes differ");
            (tee, fill.await)
        }))
        .await;

    for (tee, outcome) in &outcomes {
        match outcome {
            FillOutcome::Abandoned {
                reason: AbandonReason::Cache(ErrorKind::NoSpace),
                error: Some(err),
                ..
            } => assert_eq!(err.kind(), ErrorKind::NoSpace),
            other => panic!("tee {tee}: expected a no-space abandon, got {other:?}"),
        }
    }
    let written: Vec<_> = outcomes
        .iter()
        .filter_map(|(tee, outcome)| match outcome {
            FillOutcome::Abandoned { bytes_cached, .. } if tee % 2 == 1 => Some(*bytes_cached),
            _ => None,
        })
        .collect();
    assert!(
        written.iter().any(|&b| b > 0),
        "no unknown-length fill streamed anything before the disk filled: {written:?}"
    );

    // Nothing left: no temp file, no entry, space and descriptors back.
    assert_eq!(backend.pending().await.unwrap(), 0);
    assert_eq!(common::temp_files(fs.path()), 0);
    for tee in 0..TEES {
        assert!(
            backend
                .get(&key(&format!("big-{tee}")))
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(free_bytes(fs.path()), free_before);
    let deadline = Instant::now() + Duration::from_secs(2);
    while fd_count() != fds_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fd_count(), fds_before, "descriptors leaked");

    drop(cache);
    drop(backend);
    drop(fs);
}
