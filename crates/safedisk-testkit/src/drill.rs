//! A tee drill: many concurrent tees over a backend with a fault plan,
//! against a synthetic upstream, with a report of what each client got and
//! what was still held afterwards.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use safedisk_core::{CacheBackend, CacheKey, Fill, FillOutcome, TeePolicy, WriteOptions, tee};
use safedisk_faulty::{FaultPlan, FaultRecord, Faulty};
use tokio::time::Instant;

use crate::probe::{LeakProbe, Snapshot};

/// What a drill runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DrillConfig {
    /// Concurrent requests. Default: 16.
    pub requests: usize,
    /// Bytes of each synthetic artifact. Default: 1 MiB.
    pub body_len: usize,
    /// Bytes per upstream chunk. Default: 64 KiB.
    pub chunk_len: usize,
    /// Delay before each upstream chunk. Default: 1 ms.
    pub pace: Duration,
    /// Faults to inject into the backend. Default: none.
    pub plan: FaultPlan,
    /// The tee policy. Default: [`TeePolicy::default`].
    pub policy: TeePolicy,
    /// Idle deadline of each fill. Default: 200 ms, so stalls show quickly.
    pub idle_deadline: Duration,
    /// Clients that drop their body after this many bytes, every nth
    /// request (`(n, bytes)`). Default: none.
    pub client_abort: Option<(usize, usize)>,
    /// Time allowed for everything to be released afterwards. Default: 2 s.
    pub grace: Duration,
}

impl Default for DrillConfig {
    fn default() -> Self {
        Self {
            requests: 16,
            body_len: 1 << 20,
            chunk_len: 64 << 10,
            pace: Duration::from_millis(1),
            plan: FaultPlan::new(0),
            policy: TeePolicy::default(),
            idle_deadline: Duration::from_millis(200),
            client_abort: None,
            grace: Duration::from_secs(2),
        }
    }
}

impl DrillConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`requests`](Self::requests).
    #[must_use]
    pub fn requests(mut self, n: usize) -> Self {
        self.requests = n;
        self
    }

    /// Sets [`body_len`](Self::body_len).
    #[must_use]
    pub fn body_len(mut self, bytes: usize) -> Self {
        self.body_len = bytes;
        self
    }

    /// Sets [`pace`](Self::pace).
    #[must_use]
    pub fn pace(mut self, pace: Duration) -> Self {
        self.pace = pace;
        self
    }

    /// Sets [`plan`](Self::plan).
    #[must_use]
    pub fn plan(mut self, plan: FaultPlan) -> Self {
        self.plan = plan;
        self
    }

    /// Sets [`policy`](Self::policy).
    #[must_use]
    pub fn policy(mut self, policy: TeePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets [`client_abort`](Self::client_abort).
    #[must_use]
    pub fn client_abort(mut self, every: usize, after_bytes: usize) -> Self {
        self.client_abort = Some((every.max(1), after_bytes));
        self
    }
}

/// What happened to one request.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RequestReport {
    /// The request's key.
    pub key: String,
    /// The client received exactly the upstream's bytes (or, for a client
    /// that left early, a prefix of them).
    pub client_bytes_ok: bool,
    /// The client was one that left early.
    pub client_aborted: bool,
    /// Time from the request's start to the client's last byte.
    pub client_elapsed: Duration,
    /// The fill outcome's label (`committed`, `no_space`, `stalled`, ...).
    pub outcome: String,
    /// Time from the first fault injected into this request's fill to the
    /// fill being detached; `None` when no fault hit it.
    pub detach_after_fault: Option<Duration>,
    /// Time from the request's start to the upstream stream being dropped
    /// (its connection closed).
    pub upstream_dropped_after: Option<Duration>,
    /// The entry is readable after the drill.
    pub visible: bool,
}

/// What a drill found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DrillReport {
    /// Each request, in order.
    pub requests: Vec<RequestReport>,
    /// Every injected fault.
    pub faults: Vec<FaultRecord>,
    /// Resources before the drill.
    pub before: Snapshot,
    /// Resources after the grace period.
    pub after: Snapshot,
    /// What leaked, if anything, as a readable message.
    pub leak: Option<String>,
}

impl DrillReport {
    /// Every client's bytes intact, every visible entry committed, nothing
    /// leaked.
    pub fn passed(&self) -> bool {
        self.leak.is_none()
            && self
                .requests
                .iter()
                .all(|r| r.client_bytes_ok && (r.visible == (r.outcome == "committed")))
    }

    /// The given quantile (0.0 to 1.0) of detach-after-fault times.
    pub fn detach_quantile(&self, q: f64) -> Option<Duration> {
        let mut times: Vec<Duration> = self
            .requests
            .iter()
            .filter_map(|r| r.detach_after_fault)
            .collect();
        if times.is_empty() {
            return None;
        }
        times.sort();
        let at = ((times.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(times[at])
    }
}

/// A synthetic artifact, different for each request.
fn artifact(index: usize, len: usize) -> Bytes {
    Bytes::from(crate::payload::pseudo_random(index as u64, len))
}

/// Records when the upstream stream is dropped.
struct Upstream<S> {
    inner: S,
    dropped: Arc<Mutex<Option<Instant>>>,
}

impl<S: Stream + Unpin> Stream for Upstream<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl<S> Drop for Upstream<S> {
    fn drop(&mut self) {
        *self.dropped.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
}

/// Runs the drill against `backend` wrapped in the config's fault plan.
///
/// # Panics
///
/// Outside a tokio runtime.
pub async fn run(backend: Arc<dyn CacheBackend>, config: DrillConfig) -> DrillReport {
    let probe = LeakProbe::new().backend(backend.clone());
    let before = probe.snapshot().await;
    let faulty = Arc::new(Faulty::from_arc(backend.clone(), config.plan.clone()));
    let created = Instant::now();

    let mut tasks = Vec::new();
    for index in 0..config.requests {
        let faulty = faulty.clone();
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            request(&faulty, index, &config).await
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("drill request panicked"));
    }

    let faults = faulty.records();
    let mut requests = Vec::new();
    for (mut report, detached) in results {
        let key: CacheKey = drill_key(&report.key);
        let first_fault = faults.iter().find(|f| f.key == key.to_string());
        report.detach_after_fault = first_fault.and_then(|fault| {
            let at = created + fault.elapsed;
            detached.map(|d| d.saturating_duration_since(at))
        });
        report.visible = matches!(backend.get(&key).await, Ok(Some(_)));
        requests.push(report);
    }

    drop(faulty);
    let (after, leak) = match probe.settled(&before, config.grace).await {
        Ok(after) => (after, None),
        Err(leak) => (leak.after.clone(), Some(leak.to_string())),
    };
    DrillReport {
        requests,
        faults,
        before,
        after,
        leak,
    }
}

fn drill_key(name: &str) -> CacheKey {
    CacheKey::new("drill", name).expect("drill key")
}

async fn request(
    backend: &Faulty<dyn CacheBackend>,
    index: usize,
    config: &DrillConfig,
) -> (RequestReport, Option<Instant>) {
    let name = format!("artifact-{index}.tgz");
    let key = drill_key(&name);
    let body = artifact(index, config.body_len);
    let dropped = Arc::new(Mutex::new(None));
    let chunks: Vec<Bytes> = (0..body.len())
        .step_by(config.chunk_len.max(1))
        .map(|at| body.slice(at..(at + config.chunk_len).min(body.len())))
        .collect();
    let pace = config.pace;
    let source = Upstream {
        inner: Box::pin(stream::iter(chunks).then(move |chunk| async move {
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            Ok::<_, std::io::Error>(chunk)
        })),
        dropped: dropped.clone(),
    };
    let aborts_after = config
        .client_abort
        .filter(|(every, _)| index.is_multiple_of(*every))
        .map(|(_, bytes)| bytes);

    let started = Instant::now();
    let options = WriteOptions::new()
        .expected_len(body.len() as u64)
        .idle_deadline(config.idle_deadline);
    let (received, outcome, detached) = match Fill::begin(backend, &key, options).await {
        Ok(fill) => {
            let (client, handle) = tee(source, fill, config.policy);
            let received = read_client(client, aborts_after).await;
            let outcome = handle.await;
            (received, outcome, Some(Instant::now()))
        }
        Err(err) => {
            let received = read_client(source, aborts_after).await;
            let outcome = FillOutcome::Abandoned {
                reason: safedisk_core::AbandonReason::Cache(err.kind()),
                bytes_cached: 0,
                error: Some(err),
                elapsed: started.elapsed(),
            };
            (received, outcome, Some(Instant::now()))
        }
    };
    let client_elapsed = started.elapsed();

    let client_bytes_ok = match aborts_after {
        Some(_) => body.starts_with(&received),
        None => received == body[..],
    };
    let upstream_dropped_after = dropped
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .map(|at| at.saturating_duration_since(started));
    let report = RequestReport {
        key: name,
        client_bytes_ok,
        client_aborted: aborts_after.is_some(),
        client_elapsed,
        outcome: outcome.label().to_owned(),
        detach_after_fault: None,
        upstream_dropped_after,
        visible: false,
    };
    (report, detached)
}

/// Reads a client body to its end (or until `stop_after` bytes), keeping
/// what arrived. A body error ends the read.
async fn read_client<S, T, E>(body: S, stop_after: Option<usize>) -> Vec<u8>
where
    S: Stream<Item = Result<T, E>>,
    T: AsRef<[u8]>,
{
    let mut body = std::pin::pin!(body);
    let mut received = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        received.extend_from_slice(chunk.as_ref());
        if stop_after.is_some_and(|limit| received.len() >= limit) {
            break;
        }
    }
    received
}
