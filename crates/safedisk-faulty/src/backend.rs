//! [`Faulty`]: a backend that injects a plan's faults into another.

use std::fmt;
use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use safedisk_core::{
    CacheBackend, CacheError, CacheKey, CacheWriter, Entry, ErrorKind, FillSummary, Operation,
    RecoveryReport, WriteOptions,
};

use crate::inject::{Fired, Injector, Site};
use crate::{FaultAction, FaultPlan, FaultPoint, FaultRecord};

/// A backend that passes every call to an inner backend and injects the
/// faults of a [`FaultPlan`] on the way.
///
/// `Faulty` is transparent where no rule fires: its
/// [`name`](CacheBackend::name) is the inner backend's, so errors and
/// health labels read the same with and without it, and
/// [`pending`](CacheBackend::pending) is always the inner backend's count,
/// so leak checks see the real state. An injected error says so in its
/// detail (`injected by fault rule 0, write:enospc`).
///
/// What each action does at each point:
///
/// - **errors** fail the call without passing it on; an errno error is
///   built from [`io::Error::from_raw_os_error`], so
///   [`CacheError::raw_os_error`] and the kind are those of the real error.
///   At `commit` the inner writer is aborted first, so nothing is
///   published. At `abort` the inner writer is
///   [crashed](CacheWriter::crash) rather than aborted: a failed abort
///   releases nothing, and what it leaves is for
///   [`recover`](CacheBackend::recover). At `commit@published` the entry
///   is published and the caller still sees the error.
/// - **short** passes a prefix of the chunk to the inner writer, then
///   fails with [`ErrorKind::ShortWrite`].
/// - **stall** never finishes; dropping the call's future (as
///   [`Fill`](safedisk_core::Fill)'s idle deadline does) ends it, and the
///   inner writer is dropped, which aborts it.
/// - **delay** and **rate** sleep on tokio's timer, then go on.
/// - **corrupt** flips one byte of the entry's body stream.
/// - **crash** calls the inner writer's [`CacheWriter::crash`] and fails
///   with [`ErrorKind::Aborted`]; at `begin` the inner fill is begun and
///   crashed at once; at `commit@published` the entry stays published.
///
/// Cloning shares the counts, generators and record.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use bytes::Bytes;
/// use safedisk_core::{CacheBackend, CacheKey, ErrorKind, Fill, MemoryBackend, WriteOptions};
/// use safedisk_faulty::Faulty;
///
/// let backend = Faulty::new(MemoryBackend::new(), "write@nth=2:enospc".parse()?);
/// let key = CacheKey::new("npm", "a.tgz")?;
///
/// let mut fill = Fill::begin(&backend, &key, WriteOptions::new()).await?;
/// fill.write(Bytes::from_static(b"first")).await?;
/// let err = fill.write(Bytes::from_static(b"second")).await.unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::NoSpace);
/// assert_eq!(err.raw_os_error(), Some(28));
/// assert_eq!(backend.records().len(), 1);
/// assert!(backend.get(&key).await?.is_none());
/// # Ok(())
/// # }
/// ```
pub struct Faulty<B: ?Sized> {
    injector: Arc<Injector>,
    inner: Arc<B>,
}

impl<B: CacheBackend> Faulty<B> {
    /// Wraps `inner` with `plan`.
    pub fn new(inner: B, plan: FaultPlan) -> Self {
        Self::from_arc(Arc::new(inner), plan)
    }
}

impl<B: CacheBackend + ?Sized> Faulty<B> {
    /// Wraps a shared backend, such as an `Arc<dyn CacheBackend>`, with
    /// `plan`.
    pub fn from_arc(inner: Arc<B>, plan: FaultPlan) -> Self {
        Self {
            injector: Arc::new(Injector::new(plan)),
            inner,
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<B> {
        &self.inner
    }

    /// The plan.
    pub fn plan(&self) -> &FaultPlan {
        self.injector.plan()
    }

    /// Every fault injected so far, oldest first.
    pub fn records(&self) -> Vec<FaultRecord> {
        self.injector.records()
    }

    fn error(&self, fired: Fired, op: Operation, key: Option<&CacheKey>) -> CacheError {
        injected_error(fired, op, self.inner.name(), key)
    }
}

impl<B: ?Sized> Clone for Faulty<B> {
    fn clone(&self) -> Self {
        Self {
            injector: self.injector.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<B: CacheBackend + ?Sized> fmt::Debug for Faulty<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faulty")
            .field("plan", &self.plan().to_string())
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl<B: CacheBackend + ?Sized> CacheBackend for Faulty<B> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        let verdict = self.injector.decide(Site::Begin, key, 0);
        if let Some(fired) = verdict.wait(None).await {
            if fired.action == FaultAction::Crash {
                self.inner.begin(key, options).await?.crash();
            }
            return Err(self.error(fired, Operation::Begin, Some(key)));
        }

        let inner = self.inner.begin(key, options).await?;
        Ok(Box::new(FaultyWriter {
            inner: Some(inner),
            injector: self.injector.clone(),
            backend: self.inner.name().to_owned(),
            key: key.clone(),
            writes: 0,
            written: 0,
        }))
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Entry>, CacheError> {
        let verdict = self.injector.decide(Site::Get, key, 0);
        if let Some(fired) = verdict.wait(None).await {
            return Err(self.error(fired, Operation::Get, Some(key)));
        }

        let Some(entry) = self.inner.get(key).await? else {
            return Ok(None);
        };
        let body = verdict.read_stream(entry.meta.len(), entry.body);
        Ok(Some(Entry {
            meta: entry.meta,
            body,
        }))
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool, CacheError> {
        let verdict = self.injector.decide(Site::Remove, key, 0);
        if let Some(fired) = verdict.wait(None).await {
            return Err(self.error(fired, Operation::Remove, Some(key)));
        }
        self.inner.remove(key).await
    }

    async fn recover(&self) -> Result<RecoveryReport, CacheError> {
        let verdict = self.injector.decide(Site::Recover, &"", 0);
        if let Some(fired) = verdict.wait(None).await {
            return Err(self.error(fired, Operation::Recover, None));
        }
        self.inner.recover().await
    }

    async fn pending(&self) -> Result<u64, CacheError> {
        self.inner.pending().await
    }

    fn usage(&self) -> Option<safedisk_core::Usage> {
        self.inner.usage()
    }
}

/// The writer of a [`Faulty`] fill: the inner writer, or nothing once it
/// crashed.
#[derive(Debug)]
struct FaultyWriter {
    inner: Option<Box<dyn CacheWriter>>,
    injector: Arc<Injector>,
    backend: String,
    key: CacheKey,
    /// Writes reached so far, including the current one.
    writes: u64,
    /// Bytes the inner writer accepted.
    written: u64,
}

impl FaultyWriter {
    fn take_inner(&mut self, op: Operation) -> Result<Box<dyn CacheWriter>, CacheError> {
        self.inner.take().ok_or_else(|| self.crashed(op))
    }

    fn crashed(&self, op: Operation) -> CacheError {
        CacheError::new(ErrorKind::Aborted, op, self.backend.clone())
            .with_key(&self.key)
            .with_detail("writer crashed by an injected fault")
    }

    fn error(&self, fired: Fired, op: Operation) -> CacheError {
        injected_error(fired, op, &self.backend, Some(&self.key))
    }
}

#[async_trait]
impl CacheWriter for FaultyWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        if self.inner.is_none() {
            return Err(self.crashed(Operation::Write));
        }

        self.writes += 1;
        let len = chunk.len() as u64;
        let site = Site::Write {
            nth: self.writes,
            len,
        };
        let verdict = self.injector.decide(site, &self.key, self.written);
        let failure = verdict.wait(Some(len)).await;

        let Some(inner) = self.inner.as_mut() else {
            return Err(self.crashed(Operation::Write));
        };
        let Some(fired) = failure else {
            inner.write(chunk).await?;
            self.written += len;
            return Ok(());
        };
        match fired.action {
            FaultAction::ShortWrite => {
                let keep = match fired.point {
                    FaultPoint::WriteAfter(limit) => limit.saturating_sub(self.written).min(len),
                    _ => len / 2,
                };
                if keep > 0 {
                    inner.write(chunk.slice(..keep as usize)).await?;
                    self.written += keep;
                }
                Err(self
                    .error(fired, Operation::Write)
                    .with_detail(format!("stored {keep} of {len} bytes; {}", fired.detail())))
            }
            FaultAction::Crash => {
                if let Some(inner) = self.inner.take() {
                    inner.crash();
                }
                Err(self.error(fired, Operation::Write))
            }
            _ => Err(self.error(fired, Operation::Write)),
        }
    }

    async fn commit(mut self: Box<Self>, summary: FillSummary) -> Result<(), CacheError> {
        let inner = self.take_inner(Operation::Commit)?;

        // Before publish: a stall here owns the inner writer, so dropping
        // the call drops (and aborts) it.
        let verdict = self.injector.decide(Site::Commit, &self.key, self.written);
        if let Some(fired) = verdict.wait(None).await {
            if fired.action == FaultAction::Crash {
                inner.crash();
            } else if let Err(err) = inner.abort().await {
                tracing::warn!(key = %self.key, backend = %self.backend, error = %err,
                    "abort after an injected commit failure did not finish cleanly");
            }
            return Err(self.error(fired, Operation::Commit));
        }

        inner.commit(summary).await?;

        // After publish: the entry is visible whatever the caller hears.
        let verdict = self
            .injector
            .decide(Site::CommitPublished, &self.key, self.written);
        match verdict.wait(None).await {
            Some(fired) => Err(self.error(fired, Operation::Commit)),
            None => Ok(()),
        }
    }

    async fn abort(mut self: Box<Self>) -> Result<(), CacheError> {
        // A crashed writer holds nothing a live process could release.
        let Some(inner) = self.inner.take() else {
            return Ok(());
        };

        let verdict = self.injector.decide(Site::Abort, &self.key, self.written);
        match verdict.wait(None).await {
            Some(fired) => {
                inner.crash();
                Err(self.error(fired, Operation::Abort))
            }
            None => inner.abort().await,
        }
    }

    fn crash(mut self: Box<Self>) {
        if let Some(inner) = self.inner.take() {
            inner.crash();
        }
    }
}

/// The error a failing action produces, as the real failure would look.
pub(crate) fn injected_error(
    fired: Fired,
    op: Operation,
    backend: &str,
    key: Option<&CacheKey>,
) -> CacheError {
    let err = match fired.action {
        FaultAction::Errno(errno) => {
            CacheError::from_io(io::Error::from_raw_os_error(errno), op, backend)
        }
        FaultAction::Error(kind) => CacheError::new(kind, op, backend),
        FaultAction::ShortWrite => CacheError::new(ErrorKind::ShortWrite, op, backend),
        _ => CacheError::new(ErrorKind::Aborted, op, backend),
    };
    let err = err.with_detail(fired.detail());
    match key {
        Some(key) => err.with_key(key),
        None => err,
    }
}
