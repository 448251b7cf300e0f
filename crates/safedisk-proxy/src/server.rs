//! The proxy server: routes, hits, misses through the tee, pass-through
//! metadata, health and metrics.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{StreamExt, TryStreamExt};
use safedisk_core::{
    BreakerConfig, Cache, CacheBackend, CacheKey, EntryMetadata, LagPolicy, TeePolicy, WriteOptions,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use url::Url;

use crate::ecosystem::Ecosystem;
use crate::metrics;

/// Default timeout for connecting to an upstream: 5 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default timeout for an upstream read to make progress: 30 s.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Default number of idle upstream connections kept per host: 32.
pub const DEFAULT_POOL_IDLE_PER_HOST: usize = 32;

/// Default time an idle upstream connection is kept: 30 s.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default lag policy of the proxy's tee: hold the client for at most 1 s
/// in total while the cache catches up, then abandon the fill.
///
/// Core's own default abandons at once; a proxy holds a little because a
/// client on loopback or a fast LAN outruns most disks, and abandoning every
/// such fill would leave large artifacts uncached for good. A failing cache
/// still detaches at once; only a slow or stalled one costs the client up to
/// this much.
pub const DEFAULT_LAG_POLICY: LagPolicy = LagPolicy::Hold {
    max_total: Duration::from_secs(1),
};

/// Default length of the listen queue: 1024 connections.
///
/// tokio's own default (128) overflows when a few hundred clients connect at
/// once, and a dropped connection attempt is retried only a second later.
pub const DEFAULT_ACCEPT_BACKLOG: u32 = 1024;

/// Default time a client has to send its request headers: 10 s.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Default limit on a request's header block: 16 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;

/// How the proxy runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// Where to listen. Default: `127.0.0.1:0` (a free port).
    pub listen: SocketAddr,
    /// The upstream base URL of each served ecosystem. Default: none.
    pub upstreams: BTreeMap<Ecosystem, Url>,
    /// How the tee couples clients and the cache. Default:
    /// [`TeePolicy::default`] with [`DEFAULT_LAG_POLICY`].
    pub policy: TeePolicy,
    /// When the cache is bypassed after failures. Default:
    /// [`BreakerConfig::default`].
    pub breaker: BreakerConfig,
    /// Deadlines of each fill (expected length, digest and metadata are
    /// set per request). Default: [`WriteOptions::default`].
    pub fill: WriteOptions,
    /// Upstream connect timeout. Default: [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Upstream read timeout: the longest an upstream may send nothing.
    /// Default: [`DEFAULT_READ_TIMEOUT`].
    pub read_timeout: Duration,
    /// Idle upstream connections kept per host for reuse; 0 closes each
    /// after its response. Default: [`DEFAULT_POOL_IDLE_PER_HOST`].
    pub pool_idle_per_host: usize,
    /// How long an idle upstream connection is kept. Default:
    /// [`DEFAULT_POOL_IDLE_TIMEOUT`].
    pub pool_idle_timeout: Duration,
    /// Length of the listen queue. Default: [`DEFAULT_ACCEPT_BACKLOG`].
    pub accept_backlog: u32,
    /// Time a client has to send its headers. Default:
    /// [`DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// Largest request header block. Default: [`DEFAULT_MAX_HEADER_BYTES`].
    pub max_header_bytes: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstreams: BTreeMap::new(),
            policy: TeePolicy::default().on_lag(DEFAULT_LAG_POLICY),
            breaker: BreakerConfig::default(),
            fill: WriteOptions::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            pool_idle_per_host: DEFAULT_POOL_IDLE_PER_HOST,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            accept_backlog: DEFAULT_ACCEPT_BACKLOG,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

impl ProxyConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`listen`](Self::listen).
    #[must_use]
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Adds an upstream.
    #[must_use]
    pub fn upstream(mut self, ecosystem: Ecosystem, base: Url) -> Self {
        self.upstreams.insert(ecosystem, base);
        self
    }

    /// Sets [`policy`](Self::policy).
    #[must_use]
    pub fn policy(mut self, policy: TeePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets [`breaker`](Self::breaker).
    #[must_use]
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// Sets [`pool_idle_per_host`](Self::pool_idle_per_host).
    #[must_use]
    pub fn pool_idle_per_host(mut self, connections: usize) -> Self {
        self.pool_idle_per_host = connections;
        self
    }

    /// Sets [`fill`](Self::fill).
    #[must_use]
    pub fn fill(mut self, options: WriteOptions) -> Self {
        self.fill = options;
        self
    }
}

/// Shared by every request.
#[derive(Debug)]
struct AppState {
    cache: Cache,
    upstreams: BTreeMap<Ecosystem, Url>,
    client: reqwest::Client,
    fill: WriteOptions,
    /// Keys with a fill in flight: other misses of the same key stream
    /// from the upstream uncached.
    filling: Mutex<HashSet<CacheKey>>,
    counters: metrics::Counters,
}

/// A proxy serving in the background.
#[derive(Debug)]
pub struct RunningProxy {
    addr: SocketAddr,
    cache: Cache,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    state: Arc<AppState>,
}

impl RunningProxy {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cache behind it, for its health and its backend.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Fills in flight now.
    pub fn fills_in_flight(&self) -> usize {
        self.state.filling.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Stops accepting, lets requests in progress finish (for at most
    /// `grace`), and returns when the server is down.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(grace, self.task).await;
    }
}

/// Starts the proxy over `backend`, serving on a task of the current tokio
/// runtime.
///
/// # Panics
///
/// Outside a tokio runtime.
///
/// # Errors
///
/// When the listen address cannot be bound or the HTTP client cannot be
/// built.
pub fn start(config: ProxyConfig, backend: Arc<dyn CacheBackend>) -> std::io::Result<RunningProxy> {
    let client = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .read_timeout(config.read_timeout)
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(config.pool_idle_per_host)
        .no_proxy()
        .build()
        .map_err(std::io::Error::other)?;
    let cache = Cache::with_config(backend, config.policy, config.breaker);
    let state = Arc::new(AppState {
        cache: cache.clone(),
        upstreams: config.upstreams.clone(),
        client,
        fill: config.fill.clone(),
        filling: Mutex::new(HashSet::new()),
        counters: metrics::Counters::default(),
    });

    let router = Router::new()
        .route("/_safedisk/health", get(health))
        .route("/_safedisk/metrics", get(metrics_text))
        .route("/{ecosystem}/{*path}", get(proxy))
        .fallback(not_found)
        .with_state(state.clone());

    let listener = listen(config.listen, config.accept_backlog)?;
    let addr = listener.local_addr()?;
    let (shutdown, stop) = watch::channel(false);
    let task = tokio::spawn(serve(listener, router, config, stop));
    tracing::info!(%addr, "proxy listening");

    Ok(RunningProxy {
        addr,
        cache,
        shutdown,
        task,
        state,
    })
}

fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Accepts connections until told to stop, then waits for the open ones.
async fn serve(
    listener: TcpListener,
    router: Router,
    config: ProxyConfig,
    mut stop: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .max_buf_size(config.max_header_bytes.max(8192));
    let graceful = GracefulShutdown::new();

    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that leaves, or a body that ends in an upstream error,
            // ends the connection here; neither is the server's failure.
            let _ = connection.await;
        });
    }
    graceful.shutdown().await;
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "no such route; use /ECOSYSTEM/PATH")
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{message}\n"),
    )
        .into_response()
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let body = metrics::health_json(
        &state.cache.health(),
        &state.counters,
        state.cache.backend().usage(),
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let body = metrics::prometheus(
        &state.cache.health(),
        &state.counters,
        state.cache.backend().usage(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn proxy(
    State(state): State<Arc<AppState>>,
    Path((ecosystem, path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Ok(ecosystem) = ecosystem.parse::<Ecosystem>() else {
        state.counters.bad_request();
        return error_response(
            StatusCode::NOT_FOUND,
            &format!("unknown ecosystem {ecosystem:?}; expected npm, pypi, crates, maven or go"),
        );
    };
    let Some(base) = state.upstreams.get(&ecosystem) else {
        state.counters.bad_request();
        return error_response(
            StatusCode::NOT_FOUND,
            &format!("no upstream configured for {ecosystem}"),
        );
    };
    let mut url = match base.join(&path) {
        Ok(url) if url.as_str().starts_with(base.as_str()) => url,
        _ => {
            state.counters.bad_request();
            return error_response(StatusCode::BAD_REQUEST, "path escapes the upstream");
        }
    };

    if !ecosystem.is_artifact(&path) {
        url.set_query(query.as_deref());
        state.counters.pass_through();
        return pass_through(&state, url, &headers).await;
    }
    let key = match CacheKey::new(ecosystem.as_str(), path.clone()) {
        Ok(key) => key,
        Err(err) => {
            state.counters.bad_request();
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("bad artifact path: {err}"),
            );
        }
    };

    match state.cache.backend().get(&key).await {
        Ok(Some(entry)) => {
            state.counters.hit();
            return hit(entry, ecosystem, &path);
        }
        Ok(None) => {}
        Err(err) => {
            // A corrupt or unreadable entry is a miss; the backend has
            // removed or reported it.
            tracing::warn!(key = %key, error = %err, "cache read failed; serving from upstream");
        }
    }
    state.counters.miss();
    miss(state, key, ecosystem, &path, url, &headers).await
}

fn hit(entry: safedisk_core::Entry, ecosystem: Ecosystem, path: &str) -> Response {
    let meta = entry.meta;
    let content_type = meta
        .metadata
        .content_type
        .clone()
        .unwrap_or_else(|| ecosystem.default_content_type(path).to_owned());
    let etag = meta
        .metadata
        .etag
        .clone()
        .unwrap_or_else(|| format!("\"sha256-{}\"", meta.summary.sha256_hex()));

    let mut response = Response::new(Body::from_stream(entry.body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.len()));
    insert_header(headers, header::CONTENT_TYPE, &content_type);
    insert_header(headers, header::ETAG, &etag);
    headers.insert("x-cache", HeaderValue::from_static("hit"));
    response
}

fn insert_header(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Sends the request upstream; `Err` is the 502 to return.
async fn fetch(
    state: &AppState,
    url: Url,
    headers: &HeaderMap,
) -> Result<reqwest::Response, Response> {
    let mut request = state.client.get(url.clone());
    for name in [header::ACCEPT, header::ACCEPT_ENCODING, header::USER_AGENT] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
    }
    request.send().await.map_err(|err| {
        state.counters.upstream_error();
        tracing::warn!(%url, error = %err, "upstream request failed");
        error_response(StatusCode::BAD_GATEWAY, "upstream request failed")
    })
}

/// The upstream's status and the headers a client needs, taken before the
/// body is.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
}

impl Head {
    fn of(upstream: &reqwest::Response) -> Self {
        let mut headers = HeaderMap::new();
        for name in [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::ETAG,
            header::LAST_MODIFIED,
            header::CACHE_CONTROL,
            header::CONTENT_ENCODING,
        ] {
            if let Some(value) = upstream.headers().get(&name) {
                headers.insert(name, value.clone());
            }
        }
        Self {
            status: upstream.status(),
            headers,
        }
    }

    fn respond(self, body: Body, cache: &'static str) -> Response {
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
            .headers_mut()
            .insert("x-cache", HeaderValue::from_static(cache));
        response
    }
}

type UpstreamBody = futures::stream::MapErr<
    futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    fn(reqwest::Error) -> std::io::Error,
>;

fn body_of(upstream: reqwest::Response) -> UpstreamBody {
    let to_io: fn(reqwest::Error) -> std::io::Error = std::io::Error::other;
    upstream.bytes_stream().boxed().map_err(to_io)
}

async fn pass_through(state: &AppState, url: Url, headers: &HeaderMap) -> Response {
    let upstream = match fetch(state, url, headers).await {
        Ok(upstream) => upstream,
        Err(response) => return response,
    };
    let head = Head::of(&upstream);
    head.respond(Body::from_stream(body_of(upstream)), "pass")
}

async fn miss(
    state: Arc<AppState>,
    key: CacheKey,
    ecosystem: Ecosystem,
    path: &str,
    url: Url,
    headers: &HeaderMap,
) -> Response {
    let upstream = match fetch(&state, url.clone(), headers).await {
        Ok(upstream) => upstream,
        Err(response) => return response,
    };
    let head = Head::of(&upstream);
    // Only a whole, successful body is an artifact; anything else passes.
    if upstream.status() != StatusCode::OK {
        return head.respond(Body::from_stream(body_of(upstream)), "pass");
    }

    let claimed = state
        .filling
        .lock()
        .map(|mut filling| filling.insert(key.clone()))
        .unwrap_or(false);
    if !claimed {
        state.counters.uncached_miss();
        return head.respond(Body::from_stream(body_of(upstream)), "miss");
    }

    let content_type = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| ecosystem.default_content_type(path))
        .to_owned();
    let mut metadata = EntryMetadata::new()
        .content_type(content_type)
        .origin(url.as_str());
    if let Some(etag) = head.headers.get(header::ETAG).and_then(|v| v.to_str().ok()) {
        metadata = metadata.etag(etag);
    }
    let mut options = state.fill.clone().metadata(metadata);
    if let Some(len) = upstream.content_length() {
        options = options.expected_len(len);
    }

    let (body, fill) = state.cache.tee(&key, options, body_of(upstream)).await;
    let release = state.clone();
    tokio::spawn(async move {
        // The outcome itself is logged and counted by the cache's health.
        let _outcome = fill.await;
        if let Ok(mut filling) = release.filling.lock() {
            filling.remove(&key);
        }
        release.counters.fill_ended();
    });
    head.respond(Body::new(body), "miss")
}
