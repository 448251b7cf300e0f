//! The proxy over real loopback TCP, for every ecosystem: hits, misses,
//! metadata pass-through, bad requests, and the contract's acceptance
//! checks with a failing cache.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use safedisk_core::{CacheBackend, CacheKey, MemoryBackend, WriteOptions};
use safedisk_faulty::Faulty;
use safedisk_fs::{FsBackend, FsOptions};
use safedisk_s3::{ObjectStoreBackend, S3Options};
use safedisk_testkit::probe::{LeakProbe, established};
use support::{
    Mode, artifact, client, fetch, health, metrics, paths, proxy, upstream, url, wait_cached,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn disk() -> (Arc<dyn CacheBackend>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    (Arc::new(backend), dir)
}

fn faulty(backend: Arc<dyn CacheBackend>, plan: &str) -> Arc<dyn CacheBackend> {
    Arc::new(Faulty::from_arc(backend, plan.parse().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_fills_and_the_next_request_is_a_hit() {
    let upstream = upstream().await;
    let (backend, _dir) = disk();
    let proxy = proxy(&upstream, backend.clone(), |c| c).await;
    let client = client();

    for (eco, path, _) in paths() {
        let expected = artifact(&format!("{eco}/{path}"));
        let (status, headers, body) = fetch(&client, &url(&proxy, eco, path)).await;
        assert_eq!(status, 200, "{eco} miss");
        assert_eq!(headers["x-cache"], "miss");
        assert!(body.unwrap() == expected, "{eco}: miss bytes");

        // The fill finishes in the background; wait for the entry.
        wait_cached(&*backend, &CacheKey::new(eco.as_str(), path).unwrap()).await;

        let (status, headers, body) = fetch(&client, &url(&proxy, eco, path)).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-cache"], "hit", "{eco}");
        assert_eq!(headers["content-length"], expected.len().to_string());
        assert_eq!(headers["content-type"], "application/x-test");
        assert_eq!(headers["etag"], format!("\"{}\"", expected.len()));
        assert!(body.unwrap() == expected, "{eco}: hit bytes");
        assert_eq!(
            upstream.requests(&format!("{eco}/{path}")),
            1,
            "{eco}: upstream asked twice"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_passes_through_uncached() {
    let upstream = upstream().await;
    let backend: Arc<dyn CacheBackend> = Arc::new(MemoryBackend::new());
    let proxy = proxy(&upstream, backend.clone(), |c| c).await;
    let client = client();

    for (eco, _, metadata) in paths() {
        for _ in 0..2 {
            let (status, headers, body) = fetch(&client, &url(&proxy, eco, metadata)).await;
            assert_eq!(status, 200, "{eco}/{metadata}");
            assert_eq!(headers["x-cache"], "pass");
            assert!(String::from_utf8(body.unwrap()).unwrap().contains(metadata));
        }
        assert_eq!(
            upstream.requests(&format!("{eco}/{metadata}")),
            2,
            "{eco}: metadata cached"
        );
    }
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_failure_mid_body_costs_only_the_entry() {
    let upstream = upstream().await;
    let (disk, _dir) = disk();
    let plan = "seed=1; write@after=64KiB:enospc";
    let proxy = proxy(&upstream, faulty(disk.clone(), plan), |c| c).await;
    let client = client();
    let probe = LeakProbe::new().backend(disk.clone()).port(upstream.port());

    for (eco, path, _) in paths() {
        let expected = artifact(&format!("{eco}/{path}"));
        let started = Instant::now();
        let (status, _, body) = fetch(&client, &url(&proxy, eco, path)).await;
        assert_eq!(status, 200);
        assert!(body.unwrap() == expected, "{eco}: client bytes");
        // No timeout was waited for: the default idle deadline is 5 s.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{eco}: {:?}",
            started.elapsed()
        );

        // Nothing partial is ever served: the next request goes upstream
        // again and gets the whole artifact.
        let (_, headers, body) = fetch(&client, &url(&proxy, eco, path)).await;
        assert_eq!(headers["x-cache"], "miss", "{eco}");
        assert!(body.unwrap() == expected);
        let key = CacheKey::new(eco.as_str(), path).unwrap();
        assert!(
            disk.get(&key).await.unwrap().is_none(),
            "{eco}: partial entry"
        );
    }
    let health = proxy.cache().health();
    assert!(health.abandoned.get("no_space").copied().unwrap_or(0) >= 5);

    let after = probe.snapshot().await;
    assert_eq!(after.pending, 0, "temp files left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_closes_the_upstream_connection() {
    let upstream = upstream().await;
    upstream.set_pace(Duration::from_millis(20));
    let backend: Arc<dyn CacheBackend> = Arc::new(MemoryBackend::new());
    let proxy = proxy(&upstream, backend.clone(), |c| c).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    for (eco, path, _) in paths() {
        let before = established(upstream.port()).len();
        let mut response = client.get(url(&proxy, eco, path)).send().await.unwrap();
        response.chunk().await.unwrap().expect("first bytes");
        assert!(
            established(upstream.port()).len() > before,
            "{eco}: no upstream connection"
        );
        drop(response);

        // The upstream needs seconds more at this pace; its connection
        // must close long before that.
        let deadline = Instant::now() + Duration::from_secs(1);
        while established(upstream.port()).len() > before {
            assert!(Instant::now() < deadline, "{eco}: upstream connection held");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let key = CacheKey::new(eco.as_str(), path).unwrap();
        assert!(
            backend.get(&key).await.unwrap().is_none(),
            "{eco}: partial entry"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while backend.pending().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "fills left pending");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stalled_fills_hold_nothing_afterwards() {
    let upstream = upstream().await;
    let (disk, _dir) = disk();
    let plan = "seed=1; write@nth=2:stall";
    let proxy = proxy(&upstream, faulty(disk.clone(), plan), |c| {
        c.fill(WriteOptions::new().idle_deadline(Duration::from_millis(200)))
            .breaker(safedisk_core::BreakerConfig::new().failure_threshold(1000))
            // Pooled keep-alive connections are reuse, not leaks; without a
            // pool every connection must close once its request is done.
            .pool_idle_per_host(0)
    })
    .await;
    let client = client();
    let probe = LeakProbe::new().backend(disk.clone()).port(upstream.port());
    let baseline = probe.snapshot().await;

    let mut requests = Vec::new();
    for i in 0..32 {
        let (eco, path, _) = paths()[i % 5];
        let target = url(&proxy, eco, path);
        let client = client.clone();
        requests.push(tokio::spawn(async move {
            let (_, _, body) = fetch(&client, &target).await;
            (eco, path, body)
        }));
    }
    for request in requests {
        let (eco, path, body) = request.await.unwrap();
        assert!(
            body.unwrap() == artifact(&format!("{eco}/{path}")),
            "{eco}: client bytes"
        );
    }
    drop(client);

    let settled = probe.settled(&baseline, Duration::from_secs(3)).await;
    assert!(settled.is_ok(), "{}", settled.unwrap_err());
    assert_eq!(proxy.fills_in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_cut_short_is_never_served_as_complete() {
    let upstream = upstream().await;
    let (eco, path, _) = paths()[0];
    upstream.set_mode(&format!("{eco}/{path}"), Mode::Truncate);
    // Paced, so the response has started when the upstream is cut.
    upstream.set_pace(Duration::from_millis(1));
    let (disk, _dir) = disk();
    let proxy = proxy(&upstream, disk.clone(), |c| c).await;

    let (status, _, body) = fetch(&client(), &url(&proxy, eco, path)).await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "a truncated body looked complete");
    let key = CacheKey::new(eco.as_str(), path).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(disk.get(&key).await.unwrap().is_none());
    assert_eq!(disk.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502() {
    let upstream = upstream().await;
    let backend: Arc<dyn CacheBackend> = Arc::new(MemoryBackend::new());
    let mut config_upstream = safedisk_proxy::server::ProxyConfig::new();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    config_upstream = config_upstream.upstream(
        safedisk_proxy::ecosystem::Ecosystem::Npm,
        dead.parse().unwrap(),
    );
    let proxy = safedisk_proxy::server::start(config_upstream, backend).unwrap();
    let _ = upstream;

    let target = format!("http://{}/npm/a/-/a-1.0.0.tgz", proxy.addr());
    let (status, _, _) = fetch(&client(), &target).await;
    assert_eq!(status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_clear_4xx_and_never_touch_the_cache() {
    let upstream = upstream().await;
    let backend: Arc<dyn CacheBackend> = Arc::new(MemoryBackend::new());
    let proxy = proxy(&upstream, backend.clone(), |c| c).await;
    let client = client();

    let (status, _, body) =
        fetch(&client, &format!("http://{}/rubygems/x.gem", proxy.addr())).await;
    assert_eq!(status, 404);
    assert!(
        String::from_utf8(body.unwrap())
            .unwrap()
            .contains("unknown ecosystem")
    );

    // Encoded traversal decodes to a name with `..` segments: not a key.
    let target = format!("http://{}/npm/a/-/..%2F..%2Fetc%2Fpasswd.tgz", proxy.addr());
    let (status, _, body) = fetch(&client, &target).await;
    assert_eq!(status, 400, "{:?}", body);

    // A header block past the limit is refused by the server itself.
    let mut socket = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let request = format!(
        "GET /npm/a/-/a-1.0.0.tgz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = socket.write_all(request.as_bytes()).await;
    let mut answer = vec![0u8; 64];
    let n = socket.read(&mut answer).await.unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    assert_eq!(
        upstream
            .state
            .total
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_key_make_one_fill() {
    let upstream = upstream().await;
    upstream.set_pace(Duration::from_millis(5));
    let backend: Arc<dyn CacheBackend> = Arc::new(MemoryBackend::new());
    let proxy = proxy(&upstream, backend.clone(), |c| c).await;
    let client = client();
    let (eco, path, _) = paths()[2];
    let expected = artifact(&format!("{eco}/{path}"));

    let target = url(&proxy, eco, path);
    let (a, b) = tokio::join!(fetch(&client, &target), fetch(&client, &target));
    let labels = [a.1["x-cache"].clone(), b.1["x-cache"].clone()];
    assert!(a.2.unwrap() == expected && b.2.unwrap() == expected);
    assert!(labels.iter().all(|l| l == "miss"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let health = proxy.cache().health();
    assert_eq!(health.committed, 1, "{health:?}");
    let text = metrics(&client, &proxy).await;
    assert!(
        text.contains("safedisk_requests_uncached_misses_total 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_breaker() {
    let upstream = upstream().await;
    let backend = faulty(Arc::new(MemoryBackend::new()), "seed=1; write:eio");
    let proxy = proxy(&upstream, backend, |c| {
        c.breaker(safedisk_core::BreakerConfig::new().failure_threshold(2))
    })
    .await;
    let client = client();
    let (eco, path, _) = paths()[4];
    for _ in 0..3 {
        let (_, _, body) = fetch(&client, &url(&proxy, eco, path)).await;
        assert!(body.is_ok());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let json = health(&client, &proxy).await;
    assert_eq!(json["breaker"], "open");
    assert_eq!(json["fills"]["abandoned"]["io"], 2);
    assert_eq!(json["fills"]["bypassed"], 1);
}

/// A disk cache with a size limit reports what it holds and what it
/// evicted, in both the health JSON and the Prometheus text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_usage_and_evictions_are_reported() {
    const LIMIT: u64 = 1024 * 1024;
    let upstream = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn CacheBackend> =
        Arc::new(FsBackend::open(dir.path(), FsOptions::new().max_size(LIMIT)).unwrap());
    let proxy = proxy(&upstream, backend.clone(), |c| c).await;
    let client = client();

    // Five artifacts of 200 to 455 kB: more than the limit holds.
    let mut total = 0;
    for (eco, path, _) in paths() {
        let (status, _, body) = fetch(&client, &url(&proxy, eco, path)).await;
        assert_eq!(status, 200);
        total += body.unwrap().len() as u64;
        wait_cached(&*backend, &CacheKey::new(eco.as_str(), path).unwrap()).await;
    }
    assert!(total > LIMIT, "the artifacts must not fit: {total} bytes");

    let json = health(&client, &proxy).await;
    let storage = &json["storage"];
    let entries = storage["entries"].as_u64().unwrap();
    let evictions = storage["evictions"].as_u64().unwrap();
    let used = storage["bytes_used"].as_u64().unwrap();
    assert_eq!(storage["limit"], LIMIT, "{json}");
    assert!(evictions >= 1, "nothing evicted: {json}");
    assert_eq!(entries + evictions, 5, "{json}");
    assert!(used > 0 && used <= LIMIT, "{json}");

    let text = metrics(&client, &proxy).await;
    for line in [
        format!("safedisk_storage_entries {entries}"),
        format!("safedisk_storage_bytes_used {used}"),
        format!("safedisk_storage_limit_bytes {LIMIT}"),
        format!("safedisk_storage_evictions_total {evictions}"),
        "# TYPE safedisk_storage_bytes_reserved gauge".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
}

/// A backend that keeps no count, such as an object store bucket, reports
/// none: no storage metrics, and `null` in the health JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_without_usage_reports_none() {
    let store = Arc::new(object_store::memory::InMemory::new());
    let bucket = ObjectStoreBackend::new(store, "cache", S3Options::new()).unwrap();
    assert!(bucket.usage().is_none());

    let upstream = upstream().await;
    let proxy = proxy(&upstream, Arc::new(bucket), |c| c).await;
    let client = client();
    let json = health(&client, &proxy).await;
    assert!(json["storage"].is_null(), "{json}");
    assert!(json["breaker"].is_string(), "{json}");
    let text = metrics(&client, &proxy).await;
    assert!(!text.contains("safedisk_storage_"), "{text}");
    assert!(text.contains("safedisk_breaker_state 0"), "{text}");
}
