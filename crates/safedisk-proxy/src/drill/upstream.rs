//! The drill's synthetic upstream: deterministic artifacts for all five
//! ecosystems, served over loopback TCP with a declared length, whole,
//! paced, or truncated on purpose.
//!
//! Every response carries `Connection: close`, so no connection to the
//! upstream is ever kept idle in a pool: an ESTABLISHED connection to its
//! port is a request in progress, which is what the drill's leak checks
//! count.

use std::collections::HashMap;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::Stream;
use safedisk_testkit::payload;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use url::Url;

use crate::ecosystem::Ecosystem;

/// Bytes per chunk the upstream writes.
const CHUNK: usize = 64 * 1024;

/// Bytes per chunk in [`Delivery::Paced`].
const PACED_CHUNK: usize = 16 * 1024;

/// Pause before each chunk in [`Delivery::Paced`].
const PACE: Duration = Duration::from_millis(2);

/// How big an artifact is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    /// 256 KiB: disk faults, client aborts, truncation.
    Small,
    /// 5 MiB + 256 KiB: one full part of a multipart upload plus a tail,
    /// so object store part faults are reached.
    Large,
}

impl Size {
    /// The length in bytes.
    pub fn bytes(self) -> usize {
        match self {
            Self::Small => 256 * 1024,
            Self::Large => safedisk_s3::MIN_PART_SIZE + 256 * 1024,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Small => "small",
            Self::Large => "large",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "small" => Some(Self::Small),
            "large" => Some(Self::Large),
            _ => None,
        }
    }
}

/// How the upstream sends a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// As fast as the connection takes it.
    Whole,
    /// Small chunks with a pause before each, so a client that leaves
    /// half-way leaves while the upstream is still sending.
    Paced,
    /// Declares the full length, sends half (paced), then closes the
    /// connection.
    Truncated,
}

impl Delivery {
    fn as_str(self) -> &'static str {
        match self {
            Self::Whole => "whole",
            Self::Paced => "paced",
            Self::Truncated => "truncated",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "whole" => Some(Self::Whole),
            "paced" => Some(Self::Paced),
            "truncated" => Some(Self::Truncated),
            _ => None,
        }
    }
}

/// One synthetic artifact's bytes and digest.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// The bytes every path of its ecosystem and size serves.
    pub bytes: Bytes,
    /// Their SHA-256.
    pub sha256: [u8; 32],
}

/// When a response body ended, by request path.
#[derive(Debug, Clone, Copy)]
pub struct BodyEnd {
    /// When the upstream stopped sending.
    pub at: Instant,
    /// Whether it sent everything it declared.
    pub complete: bool,
}

#[derive(Debug, Default)]
struct Shared {
    artifacts: HashMap<(Ecosystem, Size), Artifact>,
    /// Path (as requested) to when its body ended, for every response:
    /// sent in full, truncated on purpose, or dropped because the peer
    /// went away.
    ends: Mutex<HashMap<String, BodyEnd>>,
}

/// A running synthetic upstream.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Generates the artifacts and starts serving on `127.0.0.1:0`.
    ///
    /// # Errors
    ///
    /// When the port cannot be bound.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start() -> std::io::Result<Self> {
        let mut artifacts = HashMap::new();
        for (n, ecosystem) in Ecosystem::ALL.into_iter().enumerate() {
            for size in [Size::Small, Size::Large] {
                let bytes = Bytes::from(payload::pseudo_random(n as u64 + 1, size.bytes()));
                let sha256 = Sha256::digest(&bytes).into();
                artifacts.insert((ecosystem, size), Artifact { bytes, sha256 });
            }
        }
        let shared = Arc::new(Shared {
            artifacts,
            ends: Mutex::new(HashMap::new()),
        });

        let router = Router::new()
            .route("/{delivery}/{size}/{ecosystem}/{*path}", get(serve))
            .with_state(shared.clone());
        let listener = loopback_listener()?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// The port, for connection counts.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The base URL an ecosystem's upstream has, for a size and delivery;
    /// it ends with `/`.
    pub fn base(&self, ecosystem: Ecosystem, size: Size, delivery: Delivery) -> Url {
        let text = format!(
            "http://{}/{}/{}/{}/",
            self.addr,
            delivery.as_str(),
            size.as_str(),
            ecosystem.as_str()
        );
        Url::parse(&text).expect("a loopback url parses")
    }

    /// The artifact served for an ecosystem and size.
    pub fn artifact(&self, ecosystem: Ecosystem, size: Size) -> &Artifact {
        &self.shared.artifacts[&(ecosystem, size)]
    }

    /// When the body of the last request for `path` (relative to the
    /// ecosystem's base) ended, if it has.
    pub fn body_end(&self, path: &str) -> Option<BodyEnd> {
        let ends = self.shared.ends.lock().ok()?;
        ends.get(path).copied()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener on `127.0.0.1:0` with a deep accept queue: the default of
/// 128 overflows when hundreds of clients connect at once, and the kernel
/// then drops SYNs that are retried only a second later.
pub fn loopback_listener() -> std::io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.listen(4096)
}

/// The artifact path of package `name` at version 1.0.0, as each
/// ecosystem's registry lays it out.
pub fn artifact_path(ecosystem: Ecosystem, name: &str) -> String {
    match ecosystem {
        Ecosystem::Npm => format!("{name}/-/{name}-1.0.0.tgz"),
        Ecosystem::Pypi => format!("packages/aa/bb/{name}-1.0.0.tar.gz"),
        Ecosystem::Crates => format!("api/v1/crates/{name}/1.0.0/download"),
        Ecosystem::Maven => format!("org/example/{name}/1.0.0/{name}-1.0.0.jar"),
        Ecosystem::Go => format!("example.com/{name}/@v/v1.0.0.zip"),
    }
}

async fn serve(
    State(shared): State<Arc<Shared>>,
    Path((delivery, size, ecosystem, path)): Path<(String, String, String, String)>,
) -> Response {
    let (Some(delivery), Some(size), Ok(ecosystem)) = (
        Delivery::parse(&delivery),
        Size::parse(&size),
        ecosystem.parse::<Ecosystem>(),
    ) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let artifact = &shared.artifacts[&(ecosystem, size)];

    let body = SyntheticBody {
        bytes: artifact.bytes.clone(),
        sent: 0,
        delivery,
        pause: None,
        path,
        shared: shared.clone(),
        ended: false,
    };
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(artifact.bytes.len()),
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A response body that records when it ended, however it ended.
struct SyntheticBody {
    bytes: Bytes,
    sent: usize,
    delivery: Delivery,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    path: String,
    shared: Arc<Shared>,
    ended: bool,
}

impl SyntheticBody {
    fn end(&mut self, complete: bool) {
        if self.ended {
            return;
        }
        self.ended = true;
        let end = BodyEnd {
            at: Instant::now(),
            complete,
        };
        if let Ok(mut ends) = self.shared.ends.lock() {
            ends.insert(std::mem::take(&mut self.path), end);
        }
    }
}

impl Stream for SyntheticBody {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let total = self.bytes.len();
        if self.delivery == Delivery::Truncated && self.sent >= total / 2 {
            // An error after the head makes the server close the
            // connection short of the declared length.
            self.end(false);
            return Poll::Ready(Some(Err(std::io::Error::other("truncated on purpose"))));
        }
        if self.sent >= total {
            self.end(true);
            return Poll::Ready(None);
        }

        // A truncated body is paced too, so what precedes the cut has left
        // the server's buffers when the connection closes.
        let chunk = if self.delivery != Delivery::Whole {
            let pause = self
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(PACE)));
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
            PACED_CHUNK
        } else {
            CHUNK
        };
        let start = self.sent;
        let end = (start + chunk).min(total);
        self.sent = end;
        Poll::Ready(Some(Ok(self.bytes.slice(start..end))))
    }
}

impl Drop for SyntheticBody {
    fn drop(&mut self) {
        // Dropped before the end: the peer went away.
        self.end(false);
    }
}
