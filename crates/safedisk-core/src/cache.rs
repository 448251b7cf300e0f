//! [`Cache`]: a backend, a tee policy and a breaker, behind one call.

use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use tokio::time::Instant;

use crate::health::Health;
use crate::tee::{passthrough, tee_observed};
use crate::{
    AbandonReason, BreakerConfig, CacheBackend, CacheKey, Fill, FillHandle, FillOutcome,
    HealthSnapshot, TeeBody, TeePolicy, WriteOptions,
};

/// What a proxy handler holds: a backend, the tee policy, and the breaker
/// that keeps a failing backend out of the request path.
///
/// [`tee`](Self::tee) is the one call a handler needs on a cache miss. It
/// consults the breaker, begins a fill, and tees; every outcome feeds the
/// breaker, whether or not anyone awaits the [`FillHandle`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use bytes::Bytes;
/// use futures::{StreamExt, stream};
/// use safedisk_core::{Cache, CacheKey, MemoryBackend, WriteOptions};
///
/// let cache = Cache::new(Arc::new(MemoryBackend::new()));
/// let key = CacheKey::new("go", "golang.org/x/text/@v/v0.14.0.zip")?;
/// let upstream = stream::iter([Ok::<_, std::io::Error>(Bytes::from("zip bytes"))]);
///
/// let (body, fill) = cache.tee(&key, WriteOptions::new().expected_len(9), upstream).await;
/// let sent: Vec<_> = body.collect().await;
/// assert_eq!(sent.len(), 1);
/// assert!(fill.await.is_committed());
/// assert_eq!(cache.health().committed, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Cache {
    backend: Arc<dyn CacheBackend>,
    policy: TeePolicy,
    health: Arc<Health>,
}

impl Cache {
    /// A cache over `backend` with the default [`TeePolicy`] and
    /// [`BreakerConfig`].
    pub fn new(backend: Arc<dyn CacheBackend>) -> Self {
        Self::with_config(backend, TeePolicy::default(), BreakerConfig::default())
    }

    /// A cache with the given policy and breaker settings.
    pub fn with_config(
        backend: Arc<dyn CacheBackend>,
        policy: TeePolicy,
        breaker: BreakerConfig,
    ) -> Self {
        let health = Arc::new(Health::new(breaker, backend.name()));
        Self {
            backend,
            policy,
            health,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn CacheBackend> {
        &self.backend
    }

    /// The tee policy.
    pub fn policy(&self) -> &TeePolicy {
        &self.policy
    }

    /// The breaker and counters.
    pub fn health_handle(&self) -> &Arc<Health> {
        &self.health
    }

    /// A snapshot of the breaker and counters.
    pub fn health(&self) -> HealthSnapshot {
        self.health.snapshot()
    }

    /// Streams `upstream` to the caller and, when the breaker allows, into a
    /// new fill of `key` (see [`tee`](crate::tee)).
    ///
    /// While the breaker is open no fill is begun and the outcome is
    /// [`FillOutcome::Bypassed`]. A backend that refuses the fill at begin
    /// (no space, stalled) yields an abandoned outcome at once, and the body
    /// passes the upstream through. Either way the body carries the same
    /// length checks against `options.expected_len`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while the fill begins leaves nothing behind.
    pub async fn tee<S, E>(
        &self,
        key: &CacheKey,
        options: WriteOptions,
        upstream: S,
    ) -> (TeeBody<S, E>, FillHandle)
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Send + 'static,
    {
        let expected_len = options.expected_len;
        if !self.health.admit() {
            return (
                passthrough(upstream, expected_len),
                FillHandle::ready(FillOutcome::Bypassed),
            );
        }

        let started = Instant::now();
        match Fill::begin(&*self.backend, key, options).await {
            Ok(fill) => tee_observed(upstream, fill, self.policy, Some(self.health.clone())),
            Err(err) => {
                tracing::warn!(key = %key, backend = self.backend.name(), error = %err,
                    "fill refused at begin; serving uncached");
                let outcome = FillOutcome::Abandoned {
                    reason: AbandonReason::Cache(err.kind()),
                    bytes_cached: 0,
                    error: Some(err),
                    elapsed: started.elapsed(),
                };
                self.health.record(&outcome);
                (
                    passthrough(upstream, expected_len),
                    FillHandle::ready(outcome),
                )
            }
        }
    }
}
