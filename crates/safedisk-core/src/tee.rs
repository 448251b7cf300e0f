//! The tee: stream an upstream body to the client and into a fill at once,
//! and detach the fill the moment it fails, stalls or lags.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use crate::health::Health;
use crate::{CacheError, ErrorKind, Fill, FillSummary};

/// Default bound on bytes waiting between the client side and the cache
/// side: 4 MiB.
pub const DEFAULT_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// What the client side does when the cache side is more than the buffer
/// behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LagPolicy {
    /// Abandon the fill at once; the client never waits. The default.
    #[default]
    Abandon,
    /// Hold the client while the cache catches up, for at most `max_total`
    /// summed over the whole body; then abandon the fill.
    Hold {
        /// Longest total time the client may be held.
        max_total: Duration,
    },
}

/// What happens to the fill when the client drops the body before the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientGonePolicy {
    /// Drop the upstream stream at once (closing its connection) and abort
    /// the fill. The default.
    #[default]
    Abort,
    /// Keep reading the upstream in a background task to finish the fill,
    /// for at most `deadline` and `max_bytes` bytes in total; past either,
    /// abort.
    FinishInBackground {
        /// Longest time the background task may take.
        deadline: Duration,
        /// Most bytes the whole body may have.
        max_bytes: u64,
    },
}

/// How a tee couples the client and the cache.
///
/// ```
/// use std::time::Duration;
/// use safedisk_core::{LagPolicy, TeePolicy};
///
/// let policy = TeePolicy::new()
///     .buffer_bytes(1 << 20)
///     .on_lag(LagPolicy::Hold { max_total: Duration::from_millis(500) });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TeePolicy {
    /// Most bytes handed to the cache side and not yet written. Default:
    /// [`DEFAULT_BUFFER_BYTES`] (4 MiB). A chunk larger than this is let
    /// through alone once the buffer is empty.
    pub buffer_bytes: usize,
    /// What to do when the buffer is full. Default: [`LagPolicy::Abandon`].
    pub on_lag: LagPolicy,
    /// What to do when the client goes away. Default:
    /// [`ClientGonePolicy::Abort`].
    pub on_client_gone: ClientGonePolicy,
}

impl Default for TeePolicy {
    fn default() -> Self {
        Self {
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            on_lag: LagPolicy::Abandon,
            on_client_gone: ClientGonePolicy::Abort,
        }
    }
}

impl TeePolicy {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`buffer_bytes`](Self::buffer_bytes); at least 1 and at most
    /// `u32::MAX`, clamped.
    #[must_use]
    pub fn buffer_bytes(mut self, bytes: usize) -> Self {
        self.buffer_bytes = bytes.clamp(1, u32::MAX as usize);
        self
    }

    /// Sets [`on_lag`](Self::on_lag).
    #[must_use]
    pub fn on_lag(mut self, policy: LagPolicy) -> Self {
        self.on_lag = policy;
        self
    }

    /// Sets [`on_client_gone`](Self::on_client_gone).
    #[must_use]
    pub fn on_client_gone(mut self, policy: ClientGonePolicy) -> Self {
        self.on_client_gone = policy;
        self
    }
}

/// Why a fill was abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum AbandonReason {
    /// The cache failed, with this kind (including
    /// [`Stalled`](ErrorKind::Stalled) and
    /// [`DeadlineExceeded`](ErrorKind::DeadlineExceeded)).
    Cache(ErrorKind),
    /// The cache fell more than the buffer behind.
    Lagged,
    /// The cache side panicked.
    Panicked,
    /// The client dropped the body before the end.
    ClientGone,
    /// The upstream stream yielded an error.
    UpstreamFailed,
    /// The upstream ended shorter, or ran longer, than its declared length.
    UpstreamLength,
    /// A background finish ran past its deadline or byte budget.
    BackgroundBudget,
}

impl AbandonReason {
    /// A short lowercase label, stable for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache(kind) => kind.as_str(),
            Self::Lagged => "lagged",
            Self::Panicked => "panicked",
            Self::ClientGone => "client_gone",
            Self::UpstreamFailed => "upstream_failed",
            Self::UpstreamLength => "upstream_length",
            Self::BackgroundBudget => "background_budget",
        }
    }

    /// Whether this says the cache is in trouble (as opposed to the client
    /// or the upstream). The breaker counts these.
    pub fn is_cache_failure(self) -> bool {
        match self {
            Self::Cache(kind) => kind.is_storage_failure(),
            Self::Lagged | Self::Panicked => true,
            _ => false,
        }
    }
}

impl fmt::Display for AbandonReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cache(kind) => write!(f, "cache failed: {kind}"),
            Self::Lagged => f.write_str("cache fell behind the buffer"),
            Self::Panicked => f.write_str("cache side panicked"),
            Self::ClientGone => f.write_str("client went away"),
            Self::UpstreamFailed => f.write_str("upstream failed"),
            Self::UpstreamLength => f.write_str("upstream length differs from declared"),
            Self::BackgroundBudget => f.write_str("background finish over budget"),
        }
    }
}

/// How a fill ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum FillOutcome {
    /// The entry was published.
    Committed {
        /// Its length and digest.
        summary: FillSummary,
        /// Time from the tee's start to the end of commit.
        elapsed: Duration,
    },
    /// The fill was abandoned and its writer aborted (or never begun).
    Abandoned {
        /// Why.
        reason: AbandonReason,
        /// Bytes the cache had accepted before it was abandoned.
        bytes_cached: u64,
        /// The cache error behind a [`AbandonReason::Cache`].
        error: Option<CacheError>,
        /// Time from the tee's start to the abandonment.
        elapsed: Duration,
    },
    /// No fill was attempted: the breaker is open, or no cache was given.
    Bypassed,
}

impl FillOutcome {
    /// Whether the entry was published.
    pub fn is_committed(&self) -> bool {
        matches!(self, Self::Committed { .. })
    }

    /// The reason, for an abandoned fill.
    pub fn abandon_reason(&self) -> Option<AbandonReason> {
        match self {
            Self::Abandoned { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// A short lowercase label: `committed`, `bypassed`, or the abandon
    /// reason's label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Committed { .. } => "committed",
            Self::Abandoned { reason, .. } => reason.as_str(),
            Self::Bypassed => "bypassed",
        }
    }
}

/// The error a [`TeeBody`] yields: the upstream's own error, or a body
/// whose length differs from the one it declared. Never a cache error.
#[derive(Debug)]
#[non_exhaustive]
pub enum BodyError<E> {
    /// The upstream stream yielded this error.
    Upstream(E),
    /// The upstream ended after `received` bytes of a declared `expected`.
    Truncated {
        /// Declared length.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// The upstream sent more than its declared `expected` bytes.
    TooLong {
        /// Declared length.
        expected: u64,
        /// Bytes received, counting the chunk that passed the length.
        received: u64,
    },
}

impl<E: fmt::Display> fmt::Display for BodyError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Upstream(e) => write!(f, "upstream error: {e}"),
            Self::Truncated { expected, received } => {
                write!(f, "upstream ended after {received} of {expected} bytes")
            }
            Self::TooLong { expected, received } => {
                write!(f, "upstream sent {received} bytes, more than {expected}")
            }
        }
    }
}

impl<E: StdError + 'static> StdError for BodyError<E> {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Upstream(e) => Some(e),
            _ => None,
        }
    }
}

/// Resolves to the [`FillOutcome`] of a tee.
///
/// Dropping the handle does not stop the fill; the outcome is then only
/// logged (and counted by the [`Cache`](crate::Cache) it came from).
#[must_use = "the fill runs either way; await the handle to learn its outcome"]
pub struct FillHandle {
    inner: HandleState,
}

enum HandleState {
    Ready(Option<FillOutcome>),
    Running {
        task: JoinHandle<FillOutcome>,
        progress: Arc<Progress>,
    },
}

impl FillHandle {
    pub(crate) fn ready(outcome: FillOutcome) -> Self {
        Self {
            inner: HandleState::Ready(Some(outcome)),
        }
    }
}

impl fmt::Debug for FillHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FillHandle").finish_non_exhaustive()
    }
}

impl Future for FillHandle {
    type Output = FillOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<FillOutcome> {
        match &mut self.inner {
            HandleState::Ready(outcome) => {
                Poll::Ready(outcome.take().expect("FillHandle polled after completion"))
            }
            HandleState::Running { task, progress } => {
                let joined = futures::ready!(Pin::new(task).poll(cx));
                Poll::Ready(joined.unwrap_or_else(|_| FillOutcome::Abandoned {
                    reason: AbandonReason::Panicked,
                    bytes_cached: progress.cached.load(Ordering::Relaxed),
                    error: None,
                    elapsed: progress.started.elapsed(),
                }))
            }
        }
    }
}

/// Shared between the body and the cache task for reporting.
#[derive(Debug)]
struct Progress {
    started: Instant,
    cached: AtomicU64,
}

enum Message {
    Chunk(Bytes, OwnedSemaphorePermit),
    /// The body is complete and of the declared length. Carries the cancel
    /// sender so that it stays open until the task has seen the end.
    End(oneshot::Sender<AbandonReason>),
}

/// The client side's connection to the cache task.
struct Link {
    chunks: mpsc::UnboundedSender<Message>,
    permits: Arc<Semaphore>,
    cancel: oneshot::Sender<AbandonReason>,
}

impl Link {
    /// Tells the cache task the body is complete: it commits.
    fn finish(self) {
        let _ = self.chunks.send(Message::End(self.cancel));
    }

    /// Tells the cache task to abandon the fill.
    fn abandon(self, reason: AbandonReason) {
        let _ = self.cancel.send(reason);
    }
}

/// A chunk waiting for buffer room under [`LagPolicy::Hold`].
struct Held {
    chunk: Bytes,
    acquire: Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>,
    timer: Pin<Box<Sleep>>,
    since: Instant,
}

/// The client's side of a tee: a stream of exactly the upstream's bytes and
/// errors, also an [`http_body::Body`] that hyper and axum can send.
///
/// See [`tee`].
pub struct TeeBody<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    upstream: Option<Pin<Box<S>>>,
    link: Option<Link>,
    held: Option<Held>,
    policy: TeePolicy,
    expected_len: Option<u64>,
    received: u64,
    hold_spent: Duration,
    runtime: Option<Handle>,
    finished: bool,
}

/// Streams `upstream` to the client and into `fill` at once.
///
/// Returns the body to send to the client and a handle to the fill's
/// outcome. The fill runs in its own tokio task, fed through a buffer of at
/// most [`TeePolicy::buffer_bytes`]:
///
/// - The body yields exactly the upstream's chunks and errors. A cache
///   error, stall, panic or lag never reaches it: the fill is detached and
///   the client goes on at the upstream's pace (or, under
///   [`LagPolicy::Hold`], is held for at most the stated total first).
/// - An upstream error, or a body shorter or longer than the fill's
///   [`expected_len`](crate::WriteOptions::expected_len), aborts the fill;
///   the client sees a [`BodyError`].
/// - Dropping the body before its end drops the upstream stream at once and
///   aborts the fill, unless [`ClientGonePolicy::FinishInBackground`] says
///   otherwise.
///
/// # Panics
///
/// When called outside a tokio runtime.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use bytes::Bytes;
/// use futures::{StreamExt, stream};
/// use safedisk_core::{CacheKey, Fill, MemoryBackend, TeePolicy, WriteOptions, tee};
///
/// let backend = MemoryBackend::new();
/// let key = CacheKey::new("crates", "serde/1.0.0/download")?;
/// let fill = Fill::begin(&backend, &key, WriteOptions::new()).await?;
///
/// let upstream = stream::iter([Ok::<_, std::io::Error>(Bytes::from("ab")), Ok(Bytes::from("c"))]);
/// let (body, outcome) = tee(upstream, fill, TeePolicy::new());
///
/// let sent: Vec<_> = body.map(|chunk| chunk.unwrap()).collect().await;
/// assert_eq!(sent.concat(), b"abc");
/// assert!(outcome.await.is_committed());
/// # Ok(())
/// # }
/// ```
pub fn tee<S, E>(upstream: S, fill: Fill, policy: TeePolicy) -> (TeeBody<S, E>, FillHandle)
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    tee_observed(upstream, fill, policy, None)
}

pub(crate) fn tee_observed<S, E>(
    upstream: S,
    fill: Fill,
    policy: TeePolicy,
    health: Option<Arc<Health>>,
) -> (TeeBody<S, E>, FillHandle)
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    let runtime = Handle::current();
    let expected_len = fill.options().expected_len;
    let progress = Arc::new(Progress {
        started: Instant::now(),
        cached: AtomicU64::new(0),
    });

    let (chunks_tx, chunks_rx) = mpsc::unbounded_channel();
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let permits = Arc::new(Semaphore::new(policy.buffer_bytes));

    let task = runtime.spawn(drive_fill(
        fill,
        chunks_rx,
        cancel_rx,
        CacheSideGuard {
            permits: permits.clone(),
            health,
            progress: progress.clone(),
            done: false,
        },
    ));

    let link = Link {
        chunks: chunks_tx,
        permits,
        cancel: cancel_tx,
    };
    let body = TeeBody::new(upstream, expected_len, policy, Some((link, runtime)));
    let handle = FillHandle {
        inner: HandleState::Running { task, progress },
    };
    (body, handle)
}

/// A body with no fill behind it: the upstream, passed through with the
/// same length checks.
pub(crate) fn passthrough<S, E>(upstream: S, expected_len: Option<u64>) -> TeeBody<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    TeeBody::new(upstream, expected_len, TeePolicy::default(), None)
}

impl<S, E> TeeBody<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    /// A body over `upstream`, feeding the cache task behind `fill` (its
    /// link, and the runtime a background finish would run on) if any.
    fn new(
        upstream: S,
        expected_len: Option<u64>,
        policy: TeePolicy,
        fill: Option<(Link, Handle)>,
    ) -> Self {
        let (link, runtime) = fill.unzip();
        Self {
            upstream: Some(Box::pin(upstream)),
            link,
            held: None,
            policy,
            expected_len,
            received: 0,
            hold_spent: Duration::ZERO,
            runtime,
            finished: false,
        }
    }

    /// Bytes passed to the client so far.
    pub fn bytes_sent(&self) -> u64 {
        self.received
    }

    /// Whether the fill is still attached (not abandoned, not finished).
    pub fn is_filling(&self) -> bool {
        self.link.is_some()
    }

    fn detach(&mut self, reason: AbandonReason) {
        self.held = None;
        if let Some(link) = self.link.take() {
            link.abandon(reason);
        }
    }

    /// Ends the stream: drops the upstream (closing its connection).
    fn finish(&mut self) {
        self.finished = true;
        self.upstream = None;
    }

    /// Hands a chunk to the cache side, if there is room.
    fn feed(&mut self, chunk: &Bytes) {
        let Some(link) = &self.link else { return };
        if chunk.is_empty() {
            return;
        }
        let wanted = chunk.len().min(self.policy.buffer_bytes) as u32;
        match link.permits.clone().try_acquire_many_owned(wanted) {
            Ok(permit) => self.send(chunk.clone(), permit),
            Err(tokio::sync::TryAcquireError::Closed) => {
                // The cache task is gone; it has its own outcome.
                self.link = None;
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => self.on_full(chunk, wanted),
        }
    }

    fn send(&mut self, chunk: Bytes, permit: OwnedSemaphorePermit) {
        if let Some(link) = &self.link
            && link.chunks.send(Message::Chunk(chunk, permit)).is_err()
        {
            self.link = None;
        }
    }

    fn on_full(&mut self, chunk: &Bytes, wanted: u32) {
        let LagPolicy::Hold { max_total } = self.policy.on_lag else {
            self.detach(AbandonReason::Lagged);
            return;
        };
        let budget = max_total.saturating_sub(self.hold_spent);
        if budget.is_zero() {
            self.detach(AbandonReason::Lagged);
            return;
        }
        let permits = self.link.as_ref().expect("linked").permits.clone();
        self.held = Some(Held {
            chunk: chunk.clone(),
            acquire: Box::pin(async move { permits.acquire_many_owned(wanted).await.ok() }),
            timer: Box::pin(tokio::time::sleep(budget)),
            since: Instant::now(),
        });
    }

    /// Drives a held chunk; `Ready` once it was sent or the fill detached.
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<Bytes> {
        let held = self.held.as_mut().expect("held chunk");
        let outcome = match held.acquire.as_mut().poll(cx) {
            Poll::Ready(permit) => Some(permit),
            Poll::Pending => match held.timer.as_mut().poll(cx) {
                Poll::Ready(()) => None,
                Poll::Pending => return Poll::Pending,
            },
        };

        let held = self.held.take().expect("held chunk");
        self.hold_spent += held.since.elapsed();
        match outcome {
            Some(Some(permit)) => self.send(held.chunk.clone(), permit),
            // The semaphore closed: the cache task ended on its own.
            Some(None) => self.link = None,
            None => self.detach(AbandonReason::Lagged),
        }
        Poll::Ready(held.chunk)
    }

    fn check_overlong(&self) -> Option<BodyError<E>> {
        match self.expected_len {
            Some(expected) if self.received > expected => Some(BodyError::TooLong {
                expected,
                received: self.received,
            }),
            _ => None,
        }
    }
}

impl<S, E> Stream for TeeBody<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    type Item = Result<Bytes, BodyError<E>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;

        if this.held.is_some() {
            let chunk = futures::ready!(this.poll_held(cx));
            return Poll::Ready(Some(Ok(chunk)));
        }
        let Some(upstream) = this.upstream.as_mut() else {
            return Poll::Ready(None);
        };

        match futures::ready!(upstream.as_mut().poll_next(cx)) {
            Some(Ok(chunk)) => {
                this.received += chunk.len() as u64;
                if let Some(err) = this.check_overlong() {
                    this.detach(AbandonReason::UpstreamLength);
                    this.finish();
                    return Poll::Ready(Some(Err(err)));
                }
                this.feed(&chunk);
                if this.held.is_some() {
                    let chunk = futures::ready!(this.poll_held(cx));
                    return Poll::Ready(Some(Ok(chunk)));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Some(Err(err)) => {
                this.detach(AbandonReason::UpstreamFailed);
                this.finish();
                Poll::Ready(Some(Err(BodyError::Upstream(err))))
            }
            None => {
                this.finish();
                if let Some(expected) = this.expected_len
                    && this.received != expected
                {
                    this.detach(AbandonReason::UpstreamLength);
                    return Poll::Ready(Some(Err(BodyError::Truncated {
                        expected,
                        received: this.received,
                    })));
                }
                if let Some(link) = this.link.take() {
                    link.finish();
                }
                Poll::Ready(None)
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, None)
    }
}

impl<S, E> http_body::Body for TeeBody<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    type Data = Bytes;
    type Error = BodyError<E>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.poll_next(cx)
            .map(|item| item.map(|chunk| chunk.map(http_body::Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.upstream.is_none() || self.expected_len == Some(self.received)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.expected_len {
            Some(len) => http_body::SizeHint::with_exact(len.saturating_sub(self.received)),
            None => http_body::SizeHint::default(),
        }
    }
}

impl<S, E> Drop for TeeBody<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    fn drop(&mut self) {
        let Some(link) = self.link.take() else { return };

        // An HTTP server stops polling once it has sent Content-Length
        // bytes and drops the body without asking for its end: a body that
        // delivered exactly its declared length is complete, not abandoned.
        // (Bytes past the declared length, had they been polled, would have
        // ended the fill as `UpstreamLength`.)
        if self.expected_len == Some(self.received) && self.held.is_none() {
            link.finish();
            return;
        }

        let ClientGonePolicy::FinishInBackground {
            deadline,
            max_bytes,
        } = self.policy.on_client_gone
        else {
            // Dropping the upstream (with self) closes its connection; the
            // cache task sees the channel close and aborts the fill.
            link.abandon(AbandonReason::ClientGone);
            return;
        };
        let (Some(upstream), Some(runtime)) = (self.upstream.take(), self.runtime.take()) else {
            link.abandon(AbandonReason::ClientGone);
            return;
        };

        let background = Background {
            upstream,
            link,
            pending: self.held.take().map(|held| held.chunk),
            expected_len: self.expected_len,
            received: self.received,
            max_bytes,
            buffer_bytes: self.policy.buffer_bytes,
        };
        runtime.spawn(background.run(deadline));
    }
}

impl<S, E> fmt::Debug for TeeBody<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TeeBody")
            .field("received", &self.received)
            .field("filling", &self.link.is_some())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// Finishes a fill after the client left, under a deadline and byte budget.
struct Background<S> {
    upstream: Pin<Box<S>>,
    link: Link,
    pending: Option<Bytes>,
    expected_len: Option<u64>,
    received: u64,
    max_bytes: u64,
    buffer_bytes: usize,
}

impl<S, E> Background<S>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    async fn run(mut self, deadline: Duration) {
        let verdict = tokio::time::timeout(deadline, self.pump()).await;
        let verdict = verdict.unwrap_or(Err(AbandonReason::BackgroundBudget));
        match verdict {
            Ok(()) => self.link.finish(),
            Err(reason) => self.link.abandon(reason),
        }
    }

    async fn pump(&mut self) -> Result<(), AbandonReason> {
        let mut queue: VecDeque<Bytes> = self.pending.take().into_iter().collect();
        loop {
            if let Some(chunk) = queue.pop_front() {
                send_waiting(&self.link, self.buffer_bytes, chunk).await?;
                continue;
            }
            match self.upstream.next().await {
                Some(Ok(chunk)) => {
                    self.received += chunk.len() as u64;
                    let over_declared = self.expected_len.is_some_and(|n| self.received > n);
                    if over_declared {
                        return Err(AbandonReason::UpstreamLength);
                    }
                    if self.received > self.max_bytes {
                        return Err(AbandonReason::BackgroundBudget);
                    }
                    queue.push_back(chunk);
                }
                Some(Err(_)) => return Err(AbandonReason::UpstreamFailed),
                None if self.expected_len.is_some_and(|n| self.received != n) => {
                    return Err(AbandonReason::UpstreamLength);
                }
                None => return Ok(()),
            }
        }
    }
}

/// Sends a chunk, waiting for buffer room. No client is waiting, so waiting
/// for the cache is fine here; the background deadline bounds it.
async fn send_waiting(link: &Link, buffer_bytes: usize, chunk: Bytes) -> Result<(), AbandonReason> {
    if chunk.is_empty() {
        return Ok(());
    }
    let wanted = chunk.len().min(buffer_bytes) as u32;
    let permit = link
        .permits
        .clone()
        .acquire_many_owned(wanted)
        .await
        .map_err(|_| AbandonReason::ClientGone)?;
    link.chunks
        .send(Message::Chunk(chunk, permit))
        .map_err(|_| AbandonReason::ClientGone)
}

/// Lives in the cache task. On any exit, including a panic, it closes the
/// buffer (so a held client is released at once) and, if no outcome was
/// reported, reports a panic to the breaker.
struct CacheSideGuard {
    permits: Arc<Semaphore>,
    health: Option<Arc<Health>>,
    progress: Arc<Progress>,
    done: bool,
}

impl CacheSideGuard {
    fn report(&mut self, outcome: &FillOutcome) {
        self.done = true;
        self.permits.close();
        if let Some(health) = &self.health {
            health.record(outcome);
        }
    }
}

impl Drop for CacheSideGuard {
    fn drop(&mut self) {
        self.permits.close();
        if !self.done
            && let Some(health) = &self.health
        {
            health.record(&FillOutcome::Abandoned {
                reason: AbandonReason::Panicked,
                bytes_cached: self.progress.cached.load(Ordering::Relaxed),
                error: None,
                elapsed: self.progress.started.elapsed(),
            });
        }
    }
}

async fn drive_fill(
    mut fill: Fill,
    mut chunks: mpsc::UnboundedReceiver<Message>,
    mut cancel: oneshot::Receiver<AbandonReason>,
    mut guard: CacheSideGuard,
) -> FillOutcome {
    let key = fill.key().clone();
    let progress = guard.progress.clone();
    let abandoned = |reason, error: Option<CacheError>, cached| FillOutcome::Abandoned {
        reason,
        bytes_cached: cached,
        error,
        elapsed: progress.started.elapsed(),
    };

    let outcome = loop {
        let message = tokio::select! {
            biased;
            reason = &mut cancel => {
                let reason = reason.unwrap_or(AbandonReason::ClientGone);
                let cached = fill.bytes_written();
                abort_fill(fill).await;
                break abandoned(reason, None, cached);
            }
            message = chunks.recv() => message,
        };

        match message {
            Some(Message::Chunk(chunk, permit)) => {
                let len = chunk.len() as u64;
                let written = tokio::select! {
                    biased;
                    reason = &mut cancel => Err(Ok(reason.unwrap_or(AbandonReason::ClientGone))),
                    result = fill.write(chunk) => result.map_err(Err),
                };
                drop(permit);
                match written {
                    Ok(()) => {
                        progress.cached.fetch_add(len, Ordering::Relaxed);
                    }
                    // Cancelled mid-write: the write future was dropped,
                    // which dropped (and so aborted) the backend's writer.
                    Err(Ok(reason)) => {
                        let cached = fill.bytes_written();
                        drop(fill);
                        break abandoned(reason, None, cached);
                    }
                    Err(Err(err)) => {
                        let cached = fill.bytes_written();
                        break abandoned(AbandonReason::Cache(err.kind()), Some(err), cached);
                    }
                }
            }
            Some(Message::End(_keep_open)) => {
                let cached = fill.bytes_written();
                break match fill.commit().await {
                    Ok(summary) => FillOutcome::Committed {
                        summary,
                        elapsed: progress.started.elapsed(),
                    },
                    Err(err) => abandoned(AbandonReason::Cache(err.kind()), Some(err), cached),
                };
            }
            None => {
                let cached = fill.bytes_written();
                abort_fill(fill).await;
                break abandoned(AbandonReason::ClientGone, None, cached);
            }
        }
    };

    log_outcome(&key, &outcome);
    guard.report(&outcome);
    outcome
}

async fn abort_fill(fill: Fill) {
    if let Err(err) = fill.abort().await {
        tracing::warn!(key = %err.key().map(ToString::to_string).unwrap_or_default(),
            backend = err.backend(), error = %err, "abort of an abandoned fill failed");
    }
}

fn log_outcome(key: &crate::CacheKey, outcome: &FillOutcome) {
    match outcome {
        FillOutcome::Committed { summary, elapsed } => tracing::debug!(
            key = %key,
            bytes = summary.len,
            elapsed_ms = elapsed.as_millis() as u64,
            "fill committed"
        ),
        FillOutcome::Abandoned {
            reason,
            bytes_cached,
            error,
            elapsed,
        } => {
            let error = error.as_ref().map(ToString::to_string).unwrap_or_default();
            if reason.is_cache_failure() {
                tracing::warn!(key = %key, reason = reason.as_str(), bytes = bytes_cached,
                    elapsed_ms = elapsed.as_millis() as u64, error, "fill abandoned");
            } else {
                tracing::info!(key = %key, reason = reason.as_str(), bytes = bytes_cached,
                    elapsed_ms = elapsed.as_millis() as u64, "fill abandoned");
            }
        }
        FillOutcome::Bypassed => {}
    }
}
