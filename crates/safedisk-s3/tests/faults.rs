//! Real faults under the backend: the S3 server's disk fills up, and the
//! server stops answering mid-upload. Clients of a tee never notice either.

mod support;

use std::path::Path as FsPath;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, stream};
use safedisk_core::{
    AbandonReason, BreakerConfig, Cache, CacheBackend, CacheKey, ErrorKind, FillOutcome, LagPolicy,
    TeePolicy, WriteOptions,
};
use safedisk_s3::testing::{S3TestServer, TcpRelay};
use safedisk_s3::{MIN_PART_SIZE, ObjectStoreBackend, S3Options};
use safedisk_testkit::probe;
use support::body;
use tokio::time::Instant;

const MIB: usize = 1024 * 1024;

/// An upstream that yields `bytes` in 256 KiB chunks.
fn upstream(bytes: &Bytes) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + use<> {
    let chunks: Vec<_> = (0..bytes.len())
        .step_by(256 * 1024)
        .map(|at| Ok(bytes.slice(at..(at + 256 * 1024).min(bytes.len()))))
        .collect();
    stream::iter(chunks)
}

/// A cache whose tee holds the client while the backend is slow (up to
/// 30 s), so that a fill ends by the backend's failure or the deadline, not
/// by lag.
fn cache(backend: ObjectStoreBackend) -> Cache {
    let policy = TeePolicy::new().on_lag(LagPolicy::Hold {
        max_total: Duration::from_secs(30),
    });
    Cache::with_config(Arc::new(backend), policy, BreakerConfig::default())
}

/// Tees `bytes` through `cache`, returns what the client received and the
/// fill's outcome.
async fn tee(
    cache: &Cache,
    key: &CacheKey,
    options: WriteOptions,
    bytes: &Bytes,
) -> (Bytes, FillOutcome) {
    let (body, fill) = cache.tee(key, options, upstream(bytes)).await;
    let received: Vec<Bytes> = body
        .map(|chunk| chunk.expect("client chunk"))
        .collect()
        .await;
    (received.concat().into(), fill.await)
}

/// A size-limited tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !status.success() {
            return Err(format!("mount -t tmpfs failed with {status}"));
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &FsPath {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn manifests(server: &S3TestServer) -> Vec<String> {
    let objects = server.objects().unwrap();
    objects
        .into_iter()
        .filter(|o| o.contains("/entries/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_disk_costs_entries_not_responses() {
    let tmpfs = match Tmpfs::mount("8m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            println!("SKIP: server disk full test needs a tmpfs mount: {why}");
            return;
        }
    };
    let server = S3TestServer::start_in(tmpfs.path()).await.unwrap();
    let options = S3Options::new().part_size(MIN_PART_SIZE);
    let backend = ObjectStoreBackend::new(server.store(), "cache", options).unwrap();
    let cache = cache(backend.clone());
    let idle = safedisk_core::DEFAULT_IDLE_DEADLINE;
    let write_options = |len: usize| {
        WriteOptions::new()
            .expected_len(len as u64)
            .idle_deadline(idle)
            .total_deadline(Duration::from_secs(20))
    };

    // 20 MiB into 8 MiB: a part fails with the server's 500 from ENOSPC.
    let key = CacheKey::new("npm", "big/-/big-1.0.0.tgz").unwrap();
    let bytes = body(20 * MIB, 1);
    let started = Instant::now();
    let (received, outcome) = tee(&cache, &key, write_options(bytes.len()), &bytes).await;
    let elapsed = started.elapsed();

    assert_eq!(received, bytes, "the client gets every byte");
    let FillOutcome::Abandoned { reason, error, .. } = &outcome else {
        panic!("expected an abandoned fill, got {outcome:?}");
    };
    // The client's own bounded retries gave up, not the fill's deadline:
    // retries did not hold the fill up to its idle deadline.
    assert_eq!(
        *reason,
        AbandonReason::Cache(ErrorKind::Backend),
        "{error:?}"
    );
    assert!(error.as_ref().unwrap().is_transient());
    assert!(
        elapsed < Duration::from_secs(10),
        "abandoned after {elapsed:?}"
    );
    println!("disk full: fill abandoned after {elapsed:?}");

    assert!(backend.get(&key).await.unwrap().is_none());
    assert_eq!(manifests(&server), Vec::<String>::new());
    assert_eq!(backend.pending().await.unwrap(), 0);

    // Three tees at once, 7 MiB each, into what is left: every client is
    // served in full; whatever was committed reads back whole, the rest is
    // not there at all.
    let bodies: Vec<_> = (0..3).map(|i| body(7 * MIB, 10 + i)).collect();
    let runs = bodies.iter().enumerate().map(|(i, bytes)| {
        let cache = cache.clone();
        let key = CacheKey::new("npm", format!("concurrent-{i}")).unwrap();
        async move {
            let (received, outcome) = tee(&cache, &key, write_options(bytes.len()), bytes).await;
            (key, received, outcome)
        }
    });
    let results = futures::future::join_all(runs).await;
    let mut committed = 0;
    for ((key, received, outcome), bytes) in results.iter().zip(&bodies) {
        assert_eq!(received, bytes, "{key}: client bytes");
        match backend.get(key).await.unwrap() {
            Some(entry) => {
                assert!(outcome.is_committed(), "{key}: {outcome:?}");
                let stored: Vec<Bytes> = entry.body.map(|c| c.unwrap()).collect().await;
                assert_eq!(&Bytes::from(stored.concat()), bytes, "{key}: stored bytes");
                committed += 1;
            }
            None => assert!(!outcome.is_committed(), "{key}: {outcome:?}"),
        }
    }
    assert!(committed < 3, "7 MiB x 3 cannot fit in 8 MiB");
    assert_eq!(backend.pending().await.unwrap(), 0);

    // Every upload the backend started is completed or aborted: no upload
    // record is left on the server. (Stored parts may remain: when a
    // CompleteMultipartUpload fails mid-copy, s3s-fs has already dropped the
    // upload record, so nobody can abort it; on S3 the bucket's lifecycle
    // rule covers that case.)
    let mut records = Vec::new();
    for _ in 0..40 {
        records = server.open_uploads().unwrap();
        records.retain(|name| name.ends_with(".json"));
        if records.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(records, Vec::<String>::new(), "upload records left open");
}

/// Waits up to `bound` for `count()` to come back to `baseline`; returns the
/// last value seen.
async fn settles_to(baseline: usize, bound: Duration, count: impl Fn() -> usize) -> usize {
    let deadline = Instant::now() + bound;
    loop {
        let now = count();
        if now <= baseline || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_is_abandoned_at_the_idle_deadline() {
    let server = S3TestServer::start().await.unwrap();
    let relay = Arc::new(TcpRelay::start(server.addr()).await.unwrap());
    let store = S3TestServer::store_builder_for(&relay.endpoint())
        .build()
        .unwrap();
    let options = S3Options::new().part_size(MIN_PART_SIZE);
    let backend = ObjectStoreBackend::new(Arc::new(store), "cache", options).unwrap();
    let cache = cache(backend.clone());
    let ports = [relay.addr().port(), server.addr().port()];
    let connections = move || probe::connections(&ports).iter().sum::<usize>();
    let baseline = connections();

    // The first part goes through; then the server hangs.
    let key = CacheKey::new("npm", "hung").unwrap();
    let bytes = body(24 * MIB, 2);
    let idle = Duration::from_secs(1);
    let write_options = WriteOptions::new()
        .expected_len(bytes.len() as u64)
        .idle_deadline(idle);
    let first_part = bytes.slice(..6 * MIB);
    let rest = bytes.slice(6 * MIB..);
    let relay_control = relay.clone();
    let hanging_upstream = upstream(&first_part)
        .chain(stream::once(async move {
            // Let the first part reach the server before it stops answering.
            tokio::time::sleep(Duration::from_millis(300)).await;
            relay_control.stop_answering();
            Ok(Bytes::new())
        }))
        .chain(upstream(&rest));

    // Sample the connection count while the fill runs, to see that the
    // count sees the fill's connections at all.
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(connections(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let started = Instant::now();
    let (body, fill) = cache.tee(&key, write_options, hanging_upstream).await;
    let received: Vec<Bytes> = body.map(|chunk| chunk.unwrap()).collect().await;
    let outcome = fill.await;
    let elapsed = started.elapsed();
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    assert!(peak > baseline, "the fill's connections were counted");

    assert_eq!(
        Bytes::from(received.concat()),
        bytes,
        "the client gets every byte"
    );
    assert_eq!(
        outcome.abandon_reason(),
        Some(AbandonReason::Cache(ErrorKind::Stalled)),
        "{outcome:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "abandoned after {elapsed:?}"
    );
    println!("stalled server: fill abandoned after {elapsed:?}");
    assert_eq!(backend.pending().await.unwrap(), 0);

    // Every connection the fill opened closes: cancelled requests at once,
    // the abort request when its own timeout gives up on the hung server,
    // idle pooled ones after the pool's idle timeout.
    let during = connections();
    let after = settles_to(baseline, Duration::from_secs(20), connections).await;
    println!(
        "connections: baseline {baseline}, peak {peak}, after abandon {during}, settled {after}"
    );
    assert_eq!(after, baseline, "ESTABLISHED connections back to baseline");

    // Nothing was published, and once the server answers again the entry
    // is simply absent.
    relay.resume();
    assert!(backend.get(&key).await.unwrap().is_none());
    assert_eq!(manifests(&server), Vec::<String>::new());
}
