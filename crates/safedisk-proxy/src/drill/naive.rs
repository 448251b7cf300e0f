//! The anti-pattern the drill measures SafeDisk against: a naive tee.
//!
//! **Do not build a proxy like this.** It is here only so the drill can show,
//! on the same machine and the same faults, what the common bug costs.
//!
//! The handler does what many caching proxies do: for each chunk from the
//! upstream it first writes the chunk to the cache writer, inline, and only
//! then forwards it to the client. When the upstream ends it commits what
//! it has, also inline, before ending the response. So:
//!
//! - a stalled cache write stalls the producer: the client waits, holding
//!   its connection and the upstream's, until the server's write timeout
//!   ends the response;
//! - a slow cache slows the client to the cache's pace;
//! - a cache error ends the response early: the client's body is cut short
//!   of its declared length;
//! - an upstream error is taken as the end of the body (the way an ignored
//!   copy error is), and the prefix is committed as a complete entry.
//!
//! The server bounds each response with a write timeout, as real servers
//! do, and that timeout is what finally releases a stalled request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use safedisk_core::{CacheBackend, CacheKey, CacheWriter, FillSummary, WriteOptions};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use url::Url;

use crate::ecosystem::Ecosystem;

/// Default write timeout of the naive server: 2 s, short so the drill
/// stays quick; real servers use 30 s to several minutes, and every
/// stalled request holds its connections that long.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

struct NaiveState {
    backend: Arc<dyn CacheBackend>,
    upstreams: BTreeMap<Ecosystem, Url>,
    client: reqwest::Client,
    write_timeout: Duration,
}

/// A naive tee proxy serving in the background.
#[derive(Debug)]
pub struct NaiveServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl NaiveServer {
    /// Starts the naive proxy on `127.0.0.1:0`, serving `/NAME/PATH` from
    /// each upstream base through `backend`, with a server write timeout of
    /// `write_timeout` per response.
    ///
    /// # Errors
    ///
    /// When the port cannot be bound or the HTTP client cannot be built.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start(
        backend: Arc<dyn CacheBackend>,
        upstreams: BTreeMap<Ecosystem, Url>,
        write_timeout: Duration,
    ) -> std::io::Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(std::io::Error::other)?;
        let state = Arc::new(NaiveState {
            backend,
            upstreams,
            client,
            write_timeout,
        });
        let router = Router::new()
            .route("/{ecosystem}/{*path}", get(handle))
            .with_state(state);

        let listener = super::upstream::loopback_listener()?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self { addr, stop, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits up to `grace` for open connections.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
        }
    }
}

async fn handle(
    State(state): State<Arc<NaiveState>>,
    Path((ecosystem, path)): Path<(String, String)>,
) -> Response {
    let deadline = Instant::now() + state.write_timeout;
    let Ok(ecosystem) = ecosystem.parse::<Ecosystem>() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (Some(base), Ok(key)) = (
        state.upstreams.get(&ecosystem),
        CacheKey::new(ecosystem.as_str(), path.clone()),
    ) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Ok(url) = base.join(&path) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let upstream = match state.client.get(url).send().await {
        Ok(upstream) => upstream,
        Err(_) => return StatusCode::BAD_GATEWAY.into_response(),
    };
    let content_length = upstream.content_length();
    // A cache that refuses the fill is skipped; the trouble starts when
    // it accepts and then fails.
    let writer = state.backend.begin(&key, &WriteOptions::new()).await.ok();

    let tee = NaiveTee {
        upstream: upstream.bytes_stream().boxed(),
        writer,
        hasher: Sha256::new(),
        len: 0,
        deadline,
        done: false,
    };
    let body = futures::stream::unfold(tee, |mut tee| async move {
        let item = tee.next().await?;
        Some((item, tee))
    });
    let mut response = Response::new(Body::from_stream(body));
    if let Some(len) = content_length {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    response
}

/// The inline tee: write to the cache, then forward.
struct NaiveTee {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    writer: Option<Box<dyn CacheWriter>>,
    hasher: Sha256,
    len: u64,
    deadline: Instant,
    done: bool,
}

impl NaiveTee {
    /// The next chunk for the client, within the server's write timeout.
    async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        if self.done {
            return None;
        }
        match tokio::time::timeout_at(self.deadline, self.step()).await {
            Ok(item) => item,
            Err(_) => {
                // The server gives up on the response; dropping the writer
                // aborts the fill.
                self.done = true;
                self.writer = None;
                Some(Err(std::io::Error::other("server write timeout")))
            }
        }
    }

    async fn step(&mut self) -> Option<std::io::Result<Bytes>> {
        match self.upstream.next().await {
            Some(Ok(chunk)) => {
                // The bug: the producer waits on the cache before the
                // client gets the chunk, and a cache error ends the
                // client's response.
                if let Some(writer) = self.writer.as_mut()
                    && let Err(err) = writer.write(chunk.clone()).await
                {
                    self.done = true;
                    self.writer = None;
                    return Some(Err(std::io::Error::other(err)));
                }
                self.hasher.update(&chunk);
                self.len += chunk.len() as u64;
                Some(Ok(chunk))
            }
            // The second bug: an upstream error reads as the end of the
            // body, and what arrived is committed as if it were all.
            Some(Err(_)) | None => {
                self.done = true;
                if let Some(writer) = self.writer.take() {
                    let summary = FillSummary {
                        len: self.len,
                        sha256: std::mem::take(&mut self.hasher).finalize().into(),
                    };
                    let _ = writer.commit(summary).await;
                }
                None
            }
        }
    }
}
