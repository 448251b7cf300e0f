//! A test upstream over loopback TCP, and a proxy in front of it.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream;
use safedisk_core::{CacheBackend, CacheKey};
use safedisk_proxy::ecosystem::Ecosystem;
use safedisk_proxy::server::{self, ProxyConfig, RunningProxy};

/// How the upstream sends one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The whole body.
    #[default]
    Whole,
    /// Declares the full length, sends half, then closes.
    Truncate,
}

#[derive(Debug, Default)]
pub struct UpstreamState {
    pub requests: Mutex<HashMap<String, usize>>,
    pub modes: Mutex<HashMap<String, Mode>>,
    /// Delay before each 16 KiB chunk.
    pub pace: Mutex<Duration>,
    pub total: AtomicUsize,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
}

impl Upstream {
    pub fn requests(&self, path: &str) -> usize {
        *self.state.requests.lock().unwrap().get(path).unwrap_or(&0)
    }

    pub fn set_mode(&self, path: &str, mode: Mode) {
        self.state
            .modes
            .lock()
            .unwrap()
            .insert(path.to_owned(), mode);
    }

    pub fn set_pace(&self, pace: Duration) {
        *self.state.pace.lock().unwrap() = pace;
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Deterministic content of a path: its length depends on the path.
pub fn artifact(path: &str) -> Vec<u8> {
    let seed = path
        .bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    let len = 200_000 + (seed as usize) * 1000;
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect()
}

async fn serve_path(State(state): State<Arc<UpstreamState>>, Path(path): Path<String>) -> Response {
    *state
        .requests
        .lock()
        .unwrap()
        .entry(path.clone())
        .or_default() += 1;
    state.total.fetch_add(1, Ordering::SeqCst);
    if path.ends_with("missing.tgz") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let is_metadata =
        !path.contains('.') || path.ends_with("list") || path.contains("maven-metadata");
    if is_metadata {
        let body = format!(
            "{{\"path\":\"{path}\",\"n\":{}}}",
            state.total.load(Ordering::SeqCst)
        );
        return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    }

    let data = artifact(&path);
    let mode = state
        .modes
        .lock()
        .unwrap()
        .get(&path)
        .copied()
        .unwrap_or_default();
    let pace = *state.pace.lock().unwrap();
    let declared = data.len();
    let sent = match mode {
        Mode::Whole => data.len(),
        Mode::Truncate => data.len() / 2,
    };
    let chunks: Vec<Bytes> = data[..sent]
        .chunks(16 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();
    let body = stream::unfold(chunks.into_iter(), move |mut chunks| async move {
        let chunk = chunks.next()?;
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
        Some((Ok::<_, std::io::Error>(chunk), chunks))
    });
    let body = match mode {
        Mode::Whole => Body::from_stream(body),
        Mode::Truncate => {
            // End with an error so the server closes the connection short of
            // the declared length.
            let fail = stream::once(async { Err(std::io::Error::other("cut")) });
            Body::from_stream(futures::StreamExt::chain(body, fail))
        }
    };
    (
        [
            (header::CONTENT_LENGTH, declared.to_string()),
            (header::CONTENT_TYPE, "application/x-test".to_owned()),
            (header::ETAG, format!("\"{}\"", declared)),
        ],
        body,
    )
        .into_response()
}

pub async fn upstream() -> Upstream {
    let state = Arc::new(UpstreamState::default());
    let router = Router::new()
        .route("/{*path}", axum::routing::get(serve_path))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Upstream { addr, state }
}

/// A proxy with every ecosystem pointed at `upstream` under `/NAME/`.
pub async fn proxy(
    upstream: &Upstream,
    backend: Arc<dyn CacheBackend>,
    configure: impl FnOnce(ProxyConfig) -> ProxyConfig,
) -> RunningProxy {
    let mut config = ProxyConfig::new();
    for eco in Ecosystem::ALL {
        let url = format!("http://{}/{}/", upstream.addr, eco.as_str());
        config = config.upstream(eco, url.parse().unwrap());
    }
    server::start(configure(config), backend).unwrap()
}

/// One artifact path and one metadata path per ecosystem.
pub fn paths() -> Vec<(Ecosystem, &'static str, &'static str)> {
    vec![
        (Ecosystem::Npm, "left-pad/-/left-pad-1.3.0.tgz", "left-pad"),
        (
            Ecosystem::Pypi,
            "packages/ab/cd/six-1.16.0.tar.gz",
            "simple/six/",
        ),
        (
            Ecosystem::Crates,
            "api/v1/crates/serde/1.0.0/download",
            "se/rd/serde",
        ),
        (
            Ecosystem::Maven,
            "org/example/lib/1.0.0/lib-1.0.0.jar",
            "org/example/lib/maven-metadata.xml",
        ),
        (
            Ecosystem::Go,
            "example.com/m/@v/v1.0.0.zip",
            "example.com/m/@v/list",
        ),
    ]
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub fn url(proxy: &RunningProxy, eco: Ecosystem, path: &str) -> String {
    format!("http://{}/{}/{}", proxy.addr(), eco.as_str(), path)
}

/// GETs a URL and reads the whole body; `Err` when the body failed.
pub async fn fetch(
    client: &reqwest::Client,
    url: &str,
) -> (
    reqwest::StatusCode,
    reqwest::header::HeaderMap,
    Result<Vec<u8>, String>,
) {
    let response = client.get(url).send().await.expect("request sent");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .bytes()
        .await
        .map(|b| b.to_vec())
        .map_err(|e| e.to_string());
    (status, headers, body)
}

/// The proxy's `/_safedisk/health` JSON.
pub async fn health(client: &reqwest::Client, proxy: &RunningProxy) -> serde_json::Value {
    let url = format!("http://{}/_safedisk/health", proxy.addr());
    let (status, _, body) = fetch(client, &url).await;
    assert_eq!(status, 200);
    serde_json::from_slice(&body.unwrap()).unwrap()
}

/// The proxy's `/_safedisk/metrics` text.
pub async fn metrics(client: &reqwest::Client, proxy: &RunningProxy) -> String {
    let url = format!("http://{}/_safedisk/metrics", proxy.addr());
    let (status, _, body) = fetch(client, &url).await;
    assert_eq!(status, 200);
    String::from_utf8(body.unwrap()).unwrap()
}

/// Waits up to 5 s for the fill of `key`, which finishes in the
/// background after the client's response, to be published.
pub async fn wait_cached(backend: &dyn CacheBackend, key: &CacheKey) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while backend.get(key).await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "{key}: never cached");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
