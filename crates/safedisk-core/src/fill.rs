//! [`Fill`]: one write of one entry, with the checks and deadlines that
//! every backend shares.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::{
    CacheBackend, CacheError, CacheKey, CacheWriter, ErrorKind, FillSummary, Operation,
    WriteOptions,
};

/// One fill of one key: stream bytes in, then [`commit`](Self::commit) or
/// [`abort`](Self::abort).
///
/// `Fill` wraps a backend's [`CacheWriter`] and adds what every backend must
/// do the same way, so no backend does it on its own:
///
/// - **Length and digest.** Bytes are counted and hashed as they pass. A
///   write that would pass [`WriteOptions::expected_len`] fails at once;
///   commit fails on a short count or on a digest other than
///   [`WriteOptions::expected_sha256`], and the backend's commit is never
///   called, so a bad body is never published.
/// - **Deadlines.** Every backend call runs under the idle deadline and
///   whatever is left of the total deadline. A call that overruns is
///   cancelled (its future dropped) and the fill aborted, with
///   [`ErrorKind::Stalled`] or [`ErrorKind::DeadlineExceeded`].
/// - **One way out.** After any error, or after a call's future was dropped
///   half-way, the fill is finished: the writer has been aborted, and further
///   calls fail with [`ErrorKind::Aborted`].
///
/// Dropping a `Fill` drops the writer, which aborts it (see
/// [`CacheWriter`]'s drop rule); no runtime is needed for that.
///
/// The deadlines use tokio's timer, so the calls must run inside a tokio
/// runtime with time enabled.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use bytes::Bytes;
/// use safedisk_core::{CacheBackend, CacheKey, Fill, MemoryBackend, WriteOptions};
///
/// let backend: Arc<dyn CacheBackend> = Arc::new(MemoryBackend::new());
/// let key = CacheKey::new("pypi", "requests-2.31.0.tar.gz")?;
///
/// let mut fill = Fill::begin(&*backend, &key, WriteOptions::new().expected_len(5)).await?;
/// fill.write(Bytes::from_static(b"hello")).await?;
/// let summary = fill.commit().await?;
/// assert_eq!(summary.len, 5);
///
/// let entry = backend.get(&key).await?.expect("published");
/// assert_eq!(entry.meta.len(), 5);
/// # Ok(())
/// # }
/// ```
#[must_use = "a fill that is dropped is aborted; call commit() to publish it"]
pub struct Fill {
    writer: Option<Box<dyn CacheWriter>>,
    backend: String,
    key: CacheKey,
    options: WriteOptions,
    hasher: Sha256,
    written: u64,
    deadline: Instant,
}

impl Fill {
    /// Starts a fill of `key` on `backend`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves nothing behind (the backend's
    /// [`begin`](CacheBackend::begin) promises the same).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] for bad options; whatever the backend
    /// refuses with; [`ErrorKind::Stalled`] if the backend does not answer
    /// within the idle deadline.
    pub async fn begin(
        backend: &dyn CacheBackend,
        key: &CacheKey,
        options: WriteOptions,
    ) -> Result<Self, CacheError> {
        let name = backend.name().to_owned();
        options
            .validate(&name)
            .map_err(|e| e.with_key(key).with_operation(Operation::Begin))?;

        let deadline = Instant::now() + options.total_deadline;
        let limits = Limits {
            idle: options.idle_deadline,
            total: options.total_deadline,
            deadline,
        };
        let writer = limits
            .run(Operation::Begin, &name, key, backend.begin(key, &options))
            .await?;

        Ok(Self {
            writer: Some(writer),
            backend: name,
            key: key.clone(),
            options,
            hasher: Sha256::new(),
            written: 0,
            deadline,
        })
    }

    /// The key being filled.
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// The options the fill was begun with.
    pub fn options(&self) -> &WriteOptions {
        &self.options
    }

    /// Bytes accepted so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Whether the fill can still take writes (no error, no cancelled call,
    /// not committed or aborted).
    pub fn is_open(&self) -> bool {
        self.writer.is_some()
    }

    /// Streams one chunk into the fill.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: if the future is dropped, the fill is finished
    /// (the writer is dropped, which aborts it) and later calls fail with
    /// [`ErrorKind::Aborted`].
    ///
    /// # Errors
    ///
    /// [`ErrorKind::LengthMismatch`] when the chunk would pass the expected
    /// length; [`ErrorKind::Stalled`] or [`ErrorKind::DeadlineExceeded`]
    /// when the backend overruns; anything the backend reports. After an
    /// error the fill has been aborted.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        // A backend that never waits (memory, a page-cache hit) would let a
        // fill loop hold its worker thread for the whole body; spending
        // tokio's cooperative budget yields now and then, so timers,
        // deadlines and other requests keep running.
        tokio::task::coop::consume_budget().await;
        let mut writer = self.take_writer(Operation::Write)?;

        let len = chunk.len() as u64;
        if let Some(expected) = self.options.expected_len
            && self.written + len > expected
        {
            let err = self.mismatch(ErrorKind::LengthMismatch, Operation::Write, || {
                format!(
                    "{} bytes, more than the expected {expected}",
                    self.written + len
                )
            });
            abort_quietly(self.limits(), &self.backend, &self.key, writer).await;
            return Err(err);
        }

        self.hasher.update(&chunk);
        let limits = self.limits();
        let result = limits
            .run(
                Operation::Write,
                &self.backend,
                &self.key,
                writer.write(chunk),
            )
            .await;

        match result {
            Ok(()) => {
                self.written += len;
                self.writer = Some(writer);
                Ok(())
            }
            Err(err) => {
                abort_quietly(self.limits(), &self.backend, &self.key, writer).await;
                Err(err)
            }
        }
    }

    /// Checks the count and digest, then has the backend make the bytes
    /// durable and publish them in one step.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped before the backend's publish step, the fill
    /// is aborted. If it is dropped during that step, a backend may still
    /// publish the complete, verified entry; a partial one is never published.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::LengthMismatch`] or [`ErrorKind::IntegrityMismatch`]
    /// before anything is published; [`ErrorKind::AlreadyExists`] in
    /// create-only mode; a deadline kind; storage errors. On error nothing
    /// new is visible, with the exception stated under cancel safety for a
    /// deadline that fires during the publish step.
    pub async fn commit(mut self) -> Result<FillSummary, CacheError> {
        let writer = self.take_writer(Operation::Commit)?;

        if let Some(expected) = self.options.expected_len
            && self.written != expected
        {
            let err = self.mismatch(ErrorKind::LengthMismatch, Operation::Commit, || {
                format!("{} bytes, expected {expected}", self.written)
            });
            abort_quietly(self.limits(), &self.backend, &self.key, writer).await;
            return Err(err);
        }

        let sha256: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        if let Some(expected) = self.options.expected_sha256
            && sha256 != expected
        {
            let err = self.mismatch(ErrorKind::IntegrityMismatch, Operation::Commit, || {
                format!(
                    "sha256 {}, expected {}",
                    hex::encode(sha256),
                    hex::encode(expected)
                )
            });
            abort_quietly(self.limits(), &self.backend, &self.key, writer).await;
            return Err(err);
        }

        let summary = FillSummary {
            len: self.written,
            sha256,
        };
        let limits = self.limits();
        limits
            .run(
                Operation::Commit,
                &self.backend,
                &self.key,
                writer.commit(summary),
            )
            .await?;
        Ok(summary)
    }

    /// Abandons the fill and has the backend release what it holds.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the writer, which aborts it.
    ///
    /// # Errors
    ///
    /// A backend that failed to release something, or overran the idle
    /// deadline doing so (the writer is then dropped, which aborts it
    /// synchronously). The fill is abandoned either way. Aborting a fill
    /// that already failed is `Ok`.
    pub async fn abort(mut self) -> Result<(), CacheError> {
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        let limits = self.limits();
        limits
            .run(Operation::Abort, &self.backend, &self.key, writer.abort())
            .await
    }

    fn take_writer(&mut self, op: Operation) -> Result<Box<dyn CacheWriter>, CacheError> {
        self.writer.take().ok_or_else(|| {
            CacheError::new(ErrorKind::Aborted, op, self.backend.clone())
                .with_key(&self.key)
                .with_detail("fill already finished by an earlier error or cancelled call")
        })
    }

    fn mismatch(
        &self,
        kind: ErrorKind,
        op: Operation,
        detail: impl FnOnce() -> String,
    ) -> CacheError {
        CacheError::new(kind, op, self.backend.clone())
            .with_key(&self.key)
            .with_detail(detail())
    }

    fn limits(&self) -> Limits {
        Limits {
            idle: self.options.idle_deadline,
            total: self.options.total_deadline,
            deadline: self.deadline,
        }
    }
}

/// Aborts after a failure; the failure is what the caller hears about.
async fn abort_quietly(
    limits: Limits,
    backend: &str,
    key: &CacheKey,
    writer: Box<dyn CacheWriter>,
) {
    // The total deadline may already be spent; give the abort its own idle
    // allowance so the backend can release resources cleanly.
    let limits = Limits {
        deadline: Instant::now() + limits.idle,
        ..limits
    };
    if let Err(err) = limits
        .run(Operation::Abort, backend, key, writer.abort())
        .await
    {
        tracing::warn!(key = %key, backend, error = %err,
            "abort after a failed fill did not finish cleanly");
    }
}

impl fmt::Debug for Fill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fill")
            .field("key", &self.key)
            .field("backend", &self.backend)
            .field("written", &self.written)
            .field("open", &self.writer.is_some())
            .finish_non_exhaustive()
    }
}

/// The deadline rule, in one place: a call may take the idle deadline or
/// what is left of the total, whichever is shorter.
#[derive(Clone, Copy)]
struct Limits {
    idle: Duration,
    total: Duration,
    deadline: Instant,
}

impl Limits {
    async fn run<T>(
        self,
        op: Operation,
        backend: &str,
        key: &CacheKey,
        call: impl Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // A zero timeout still polls the call once; a spent deadline
            // must not let even a fast call through.
            return Err(CacheError::deadline(op, backend, key, self.total));
        }
        let (limit, by_total) = if left < self.idle {
            (left, true)
        } else {
            (self.idle, false)
        };

        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) if by_total => Err(CacheError::deadline(op, backend, key, self.total)),
            Err(_) => Err(CacheError::stalled(op, backend, key, self.idle)),
        }
    }
}
