//! Download throughput through the proxy against the upstream directly,
//! and requests per second for small hits.
//!
//! In one run, interleaved round by round over loopback TCP:
//!
//! - `direct`: a 256 MiB artifact straight from the upstream;
//! - `miss`: the same through the proxy with an empty disk cache (the
//!   entry is removed before each round), so it streams through the tee
//!   and is written, fsynced and published;
//! - `hit`: the same through the proxy from the disk cache.
//!
//! Then 64 concurrent clients fetch small (4 KiB) cached artifacts for a
//! few seconds, against the same clients fetching from the upstream.
//!
//! Run: `cargo bench -p safedisk-proxy --bench proxy` (`PROXY_BENCH_ROUNDS`
//! sets the rounds, default 5; `PROXY_BENCH_MIB` the artifact size).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use bytes::Bytes;
use futures::{StreamExt, stream};
use safedisk_core::{CacheBackend, CacheKey};
use safedisk_fs::{FsBackend, FsOptions};
use safedisk_proxy::ecosystem::Ecosystem;
use safedisk_proxy::server::{self, ProxyConfig};

const SMALL: usize = 4096;
const SMALL_FILES: usize = 256;
const CLIENTS: usize = 64;

struct Artifacts {
    big: Bytes,
    small: Bytes,
}

async fn artifact(
    State(artifacts): State<Arc<Artifacts>>,
    Path(path): Path<String>,
) -> impl IntoResponse {
    let body = if path.contains("big") {
        artifacts.big.clone()
    } else {
        artifacts.small.clone()
    };
    let len = body.len();
    let chunks: Vec<Bytes> = (0..len)
        .step_by(64 * 1024)
        .map(|at| body.slice(at..(at + 64 * 1024).min(len)))
        .collect();
    (
        [(header::CONTENT_LENGTH, len.to_string())],
        Body::from_stream(stream::iter(
            chunks.into_iter().map(Ok::<_, std::io::Error>),
        )),
    )
}

async fn download(client: &reqwest::Client, url: &str) -> u64 {
    let response = client.get(url).send().await.expect("request");
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    let mut body = response.bytes_stream();
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        total += chunk.expect("body").len() as u64;
    }
    total
}

/// Requests per second of `CLIENTS` clients fetching `urls` for `window`.
async fn small_rps(client: &reqwest::Client, urls: Arc<Vec<String>>, window: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..CLIENTS {
        let (client, urls, done) = (client.clone(), urls.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut i = worker;
            while started.elapsed() < window {
                assert_eq!(download(&client, &urls[i % urls.len()]).await, SMALL as u64);
                done.fetch_add(1, Ordering::Relaxed);
                i += CLIENTS;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rounds = env("PROXY_BENCH_ROUNDS", 5);
    let mib = env("PROXY_BENCH_MIB", 256);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(rounds, mib));
}

async fn run(rounds: usize, mib: usize) {
    let artifacts = Arc::new(Artifacts {
        big: Bytes::from((0..mib << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
        small: Bytes::from(vec![7u8; SMALL]),
    });
    let router = Router::new()
        .route("/{*path}", axum::routing::get(artifact))
        .with_state(artifacts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await.expect("upstream") });

    let dir = tempfile::tempdir_in(std::env::var("PROXY_BENCH_DIR").unwrap_or_else(|_| ".".into()))
        .expect("temp dir");
    let backend: Arc<dyn CacheBackend> =
        Arc::new(FsBackend::open(dir.path(), FsOptions::new()).expect("disk cache"));
    let base = format!("http://{upstream}/npm/").parse().expect("url");
    let proxy = server::start(
        ProxyConfig::new().upstream(Ecosystem::Npm, base),
        backend.clone(),
    )
    .expect("proxy");
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");

    let path = "big/-/big-1.0.0.tgz";
    let direct_url = format!("http://{upstream}/npm/{path}");
    let proxy_url = format!("http://{}/npm/{path}", proxy.addr());
    let key = CacheKey::new("npm", path).expect("key");
    let (mut direct, mut miss, mut hit) = (Vec::new(), Vec::new(), Vec::new());
    let wait_for_entry = async |backend: &Arc<dyn CacheBackend>| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while backend.get(&key).await.expect("get").is_none() {
            assert!(
                Instant::now() < deadline,
                "the miss was not cached: {:?}",
                proxy.cache().health()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };

    download(&client, &direct_url).await;
    for round in 0..rounds {
        let timed = async |url: &str| {
            let started = Instant::now();
            let bytes = download(&client, url).await;
            assert_eq!(bytes, (mib << 20) as u64);
            (mib as f64) / started.elapsed().as_secs_f64()
        };
        direct.push(timed(&direct_url).await);
        backend.remove(&key).await.expect("remove");
        miss.push(timed(&proxy_url).await);
        wait_for_entry(&backend).await;
        hit.push(timed(&proxy_url).await);
        eprintln!(
            "round {round}: direct {:.0}, miss {:.0}, hit {:.0} MiB/s",
            direct[round], miss[round], hit[round]
        );
    }

    let small_paths: Vec<String> = (0..SMALL_FILES)
        .map(|i| format!("small/-/small-{i}.tgz"))
        .collect();
    let cached: Arc<Vec<String>> = Arc::new(
        small_paths
            .iter()
            .map(|p| format!("http://{}/npm/{p}", proxy.addr()))
            .collect(),
    );
    let straight: Arc<Vec<String>> = Arc::new(
        small_paths
            .iter()
            .map(|p| format!("http://{upstream}/npm/{p}"))
            .collect(),
    );
    for url in cached.iter() {
        download(&client, url).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let window = Duration::from_secs(3);
    let direct_rps = small_rps(&client, straight.clone(), window).await;
    let hit_rps = small_rps(&client, cached.clone(), window).await;
    let direct_rps_2 = small_rps(&client, straight, window).await;
    let hit_rps_2 = small_rps(&client, cached, window).await;

    let (direct, miss, hit) = (median(direct), median(miss), median(hit));
    println!("proxy bench: {mib} MiB artifact over loopback, {rounds} interleaved rounds, medians");
    println!("{:<8} {:>10} {:>16}", "case", "MiB/s", "ratio vs direct");
    for (name, rate) in [("direct", direct), ("miss", miss), ("hit", hit)] {
        println!("{name:<8} {rate:>10.0} {:>16.3}", rate / direct);
    }
    let health = proxy.cache().health();
    println!("fills committed: {} (one per miss round)", health.committed);
    println!(
        "small hits ({SMALL} B, {CLIENTS} clients): {:.0} req/s through the proxy, {:.0} req/s direct, ratio {:.3}",
        (hit_rps + hit_rps_2) / 2.0,
        (direct_rps + direct_rps_2) / 2.0,
        (hit_rps + hit_rps_2) / (direct_rps + direct_rps_2)
    );
    proxy.shutdown(Duration::from_secs(2)).await;
}
