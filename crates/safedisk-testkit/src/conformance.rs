//! The conformance suite: one check per point of the contract, runnable
//! against any backend.
//!
//! A backend author gives a factory of fresh [`Subject`]s (a backend, what
//! it can do, and how to reopen it on the same storage) and gets one test per
//! check from [`conformance_tests!`](crate::conformance_tests):
//!
//! ```
//! use std::sync::Arc;
//! use safedisk_core::MemoryBackend;
//! use safedisk_testkit::conformance::{Capabilities, Subject};
//!
//! safedisk_testkit::conformance_tests!(|| async {
//!     Subject::new(Arc::new(MemoryBackend::new())).capabilities(Capabilities::memory())
//! });
//! ```
//!
//! A check the backend cannot support (by its [`Capabilities`], or for lack
//! of a reopen) is reported as skipped with the reason, printed as a `SKIP`
//! line on standard error, never counted as passed by [`Report`].

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt, stream};
use safedisk_core::{
    AbandonReason, CacheBackend, CacheError, CacheKey, EntryMeta, EntryMetadata, ErrorKind, Fill,
    FillSummary, Operation, TeePolicy, WriteMode, WriteOptions, tee,
};
use safedisk_faulty::{FaultPlan, Faulty};
use sha2::{Digest, Sha256};

/// What a backend can promise beyond the core contract. Checks that need a
/// capability the backend lacks are skipped, with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// [`WriteMode::CreateOnly`] has exactly one winner under concurrency.
    pub create_only: bool,
    /// An entry opened by `get` reads to the end even if it is overwritten
    /// or removed meanwhile.
    pub stable_reads: bool,
    /// A crashed fill leaves something on storage that `recover` must
    /// sweep (a temp file, an upload); `pending` counts it until then.
    pub crash_leaves_residue: bool,
}

impl Capabilities {
    /// Everything: what a disk backend promises.
    pub fn all() -> Self {
        Self {
            create_only: true,
            stable_reads: true,
            crash_leaves_residue: true,
        }
    }

    /// What the memory backend promises: everything, and a crash leaves
    /// nothing behind.
    pub fn memory() -> Self {
        Self {
            crash_leaves_residue: false,
            ..Self::all()
        }
    }

    /// Sets [`create_only`](Self::create_only).
    #[must_use]
    pub fn create_only(mut self, yes: bool) -> Self {
        self.create_only = yes;
        self
    }

    /// Sets [`stable_reads`](Self::stable_reads).
    #[must_use]
    pub fn stable_reads(mut self, yes: bool) -> Self {
        self.stable_reads = yes;
        self
    }

    /// Sets [`crash_leaves_residue`](Self::crash_leaves_residue).
    #[must_use]
    pub fn crash_leaves_residue(mut self, yes: bool) -> Self {
        self.crash_leaves_residue = yes;
        self
    }
}

type Reopen = Arc<dyn Fn() -> BoxFuture<'static, Arc<dyn CacheBackend>> + Send + Sync>;

/// A backend under test: a fresh, empty instance, its capabilities, and
/// optionally a way to open a second instance on the same storage (as after
/// a restart).
pub struct Subject {
    backend: Arc<dyn CacheBackend>,
    capabilities: Capabilities,
    reopen: Option<Reopen>,
    keep: Vec<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subject")
            .field("backend", &self.backend)
            .field("capabilities", &self.capabilities)
            .field("reopen", &self.reopen.is_some())
            .finish_non_exhaustive()
    }
}

impl Subject {
    /// A subject with [`Capabilities::all`] and no reopen.
    pub fn new(backend: Arc<dyn CacheBackend>) -> Self {
        Self {
            backend,
            capabilities: Capabilities::all(),
            reopen: None,
            keep: Vec::new(),
        }
    }

    /// Sets the capabilities. Default: [`Capabilities::all`].
    #[must_use]
    pub fn capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// How to open another instance on the same storage, as a restarted
    /// process would. Default: none, and the checks that need it skip.
    #[must_use]
    pub fn reopen<F, Fut>(mut self, reopen: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Arc<dyn CacheBackend>> + Send + 'static,
    {
        self.reopen = Some(Arc::new(move || Box::pin(reopen())));
        self
    }

    /// Keeps `value` alive as long as the subject (a temp dir, a server).
    #[must_use]
    pub fn keep_alive(mut self, value: impl Any + Send + Sync) -> Self {
        self.keep.push(Box::new(value));
        self
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn CacheBackend> {
        &self.backend
    }
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The backend kept the promise.
    Passed,
    /// The check could not run against this backend; the reason says why.
    Skipped(String),
    /// The backend broke the promise; the message says how.
    Failed(String),
}

/// One check of the suite.
#[derive(Clone, Copy)]
pub struct Check {
    /// The check's name, also the name of its generated test.
    pub name: &'static str,
    /// The contract point it holds the backend to.
    pub point: &'static str,
    run: fn(Subject) -> BoxFuture<'static, Result<(), Failure>>,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .field("point", &self.point)
            .finish()
    }
}

/// How a check ended early.
#[derive(Debug)]
enum Failure {
    Skip(String),
    Fail(String),
}

impl From<CacheError> for Failure {
    fn from(err: CacheError) -> Self {
        Failure::Fail(format!("unexpected error: {err} ({err:?})"))
    }
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(Failure::Fail(format!($($fmt)+)));
        }
    };
}

macro_rules! checks {
    ($($name:ident: $point:literal),+ $(,)?) => {
        /// Every check, in the order of the contract's points.
        pub const CHECKS: &[Check] = &[
            $(Check { name: stringify!($name), point: $point, run: |s| Box::pin($name(s)) }),+
        ];

        /// Generates one `#[test]` per conformance check, each calling the
        /// factory for a fresh [`Subject`](crate::conformance::Subject).
        ///
        /// The factory is a closure returning a future of a `Subject`. The
        /// tests run on a two-thread tokio runtime of their own, so the
        /// calling crate needs no tokio test macros.
        #[macro_export]
        macro_rules! conformance_tests {
            ($factory:expr) => {
                $(
                    #[test]
                    fn $name() {
                        $crate::conformance::run_blocking(stringify!($name), $factory);
                    }
                )+
            };
        }
    };
}

checks! {
    detach_on_cache_error: "1. detach, don't block",
    deadlines_enforced: "4. deadlines",
    atomic_publish: "5. atomic publish",
    length_and_digest_enforced: "5. atomic publish",
    upstream_error_never_committed: "5. atomic publish",
    no_poison_after_abort: "6. no poison",
    no_poison_after_drop: "6. no poison",
    no_poison_after_failed_commit: "6. no poison",
    recover_sweeps: "6. no poison",
    durable_on_ok: "7. durable on ok",
    typed_errors: "8. typed errors",
    one_winner_overwrite: "9. one winner",
    one_winner_create_only: "9. one winner",
    safe_keys: "10. safe keys",
    readers_keep_their_entry: "5. atomic publish",
    remove_and_get: "5. atomic publish",
    empty_entry_and_metadata: "5. atomic publish",
}

/// Runs the check called `name` against `subject`.
///
/// # Panics
///
/// When no check has that name.
pub async fn run(name: &str, subject: Subject) -> Verdict {
    let check = CHECKS
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no conformance check named {name:?}"));
    match (check.run)(subject).await {
        Ok(()) => Verdict::Passed,
        Err(Failure::Skip(reason)) => Verdict::Skipped(reason),
        Err(Failure::Fail(message)) => Verdict::Failed(message),
    }
}

/// Runs one check on a fresh two-thread runtime: panics when it fails,
/// prints a `SKIP` line to standard error (uncaptured) when it is skipped.
/// [`conformance_tests!`](crate::conformance_tests) calls this.
///
/// # Panics
///
/// When the check fails, with the check's message.
pub fn run_blocking<F, Fut>(name: &str, factory: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Subject>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let verdict = runtime.block_on(async {
        let subject = factory().await;
        run(name, subject).await
    });
    match verdict {
        Verdict::Passed => {}
        Verdict::Skipped(reason) => skip_notice(name, &reason),
        Verdict::Failed(message) => panic!("conformance check {name} failed: {message}"),
    }
}

/// Prints a skip where the test harness does not capture it.
pub(crate) fn skip_notice(name: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {name}: {reason}");
}

/// What [`run_all`] found.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Report {
    /// Each check's name and verdict, in suite order.
    pub verdicts: Vec<(&'static str, Verdict)>,
}

impl Report {
    /// Names of the failed checks.
    pub fn failed(&self) -> Vec<&'static str> {
        self.verdicts
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Failed(_)))
            .map(|(name, _)| *name)
            .collect()
    }

    /// The verdict of one check.
    pub fn verdict(&self, name: &str) -> Option<&Verdict> {
        self.verdicts
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count =
            |pred: fn(&Verdict) -> bool| self.verdicts.iter().filter(|(_, v)| pred(v)).count();
        for (name, verdict) in &self.verdicts {
            match verdict {
                Verdict::Passed => writeln!(f, "pass {name}")?,
                Verdict::Skipped(reason) => writeln!(f, "SKIP {name}: {reason}")?,
                Verdict::Failed(message) => writeln!(f, "FAIL {name}: {message}")?,
            }
        }
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            count(|v| matches!(v, Verdict::Passed)),
            count(|v| matches!(v, Verdict::Failed(_))),
            count(|v| matches!(v, Verdict::Skipped(_))),
        )
    }
}

/// Runs every check, each against a fresh subject from `factory`.
pub async fn run_all<F, Fut>(factory: F) -> Report
where
    F: Fn() -> Fut,
    Fut: Future<Output = Subject>,
{
    let mut report = Report::default();
    for check in CHECKS {
        let verdict = run(check.name, factory().await).await;
        report.verdicts.push((check.name, verdict));
    }
    report
}

// ---------------------------------------------------------------------------
// Helpers shared by the checks.

const CHUNK: usize = 64 * 1024;

/// Deterministic content that differs per `seed`.
pub(crate) fn content(len: usize, seed: u8) -> Vec<u8> {
    crate::payload::pseudo_random(seed.into(), len)
}

pub(crate) fn key(name: &str) -> CacheKey {
    CacheKey::new("conformance", name).expect("valid key")
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

async fn write_all(fill: &mut Fill, data: &[u8]) -> Result<(), CacheError> {
    for chunk in data.chunks(CHUNK) {
        fill.write(Bytes::copy_from_slice(chunk)).await?;
    }
    Ok(())
}

pub(crate) async fn put(
    backend: &dyn CacheBackend,
    key: &CacheKey,
    data: &[u8],
    options: WriteOptions,
) -> Result<FillSummary, CacheError> {
    let mut fill = Fill::begin(backend, key, options).await?;
    write_all(&mut fill, data).await?;
    fill.commit().await
}

pub(crate) async fn read(
    backend: &dyn CacheBackend,
    key: &CacheKey,
) -> Result<Option<(EntryMeta, Vec<u8>)>, CacheError> {
    let Some(entry) = backend.get(key).await? else {
        return Ok(None);
    };
    let mut body = entry.body;
    let mut data = Vec::with_capacity(entry.meta.len() as usize);
    while let Some(chunk) = body.next().await {
        data.extend_from_slice(&chunk?);
    }
    Ok(Some((entry.meta, data)))
}

/// Reads `key` and checks the entry against its own metadata.
async fn read_verified(
    backend: &dyn CacheBackend,
    key: &CacheKey,
) -> Result<Option<Vec<u8>>, Failure> {
    let Some((meta, data)) = read(backend, key).await? else {
        return Ok(None);
    };
    ensure!(
        meta.len() == data.len() as u64,
        "{key}: metadata says {} bytes, the body has {}",
        meta.len(),
        data.len()
    );
    ensure!(
        meta.summary.sha256 == sha256(&data),
        "{key}: body does not match the recorded sha256"
    );
    Ok(Some(data))
}

async fn expect_absent(
    backend: &dyn CacheBackend,
    key: &CacheKey,
    when: &str,
) -> Result<(), Failure> {
    let found = read(backend, key).await?;
    ensure!(
        found.is_none(),
        "{when}: {key} is readable ({} bytes)",
        found.map_or(0, |(_, d)| d.len())
    );
    Ok(())
}

/// Waits up to 2 s for the backend to report no pending fills.
async fn expect_no_pending(backend: &dyn CacheBackend, when: &str) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let pending = backend.pending().await?;
        if pending == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{when}: {pending} unpublished fill(s) still held after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn faulty(backend: &Arc<dyn CacheBackend>, plan: &str) -> Faulty<dyn CacheBackend> {
    let plan: FaultPlan = plan.parse().expect("valid fault plan");
    Faulty::from_arc(backend.clone(), plan)
}

fn short_deadlines() -> WriteOptions {
    WriteOptions::new().idle_deadline(Duration::from_millis(200))
}

// ---------------------------------------------------------------------------
// The checks.

/// A cache error mid-stream: the client gets every byte, the fill is
/// abandoned with the error's kind, nothing is published or left pending.
async fn detach_on_cache_error(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let faulty = faulty(&backend, "seed=1; write@after=256KiB:enospc");
    let k = key("detach.tgz");
    let data = content(1 << 20, 1);

    let fill = Fill::begin(&faulty, &k, WriteOptions::new()).await?;
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(CHUNK)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let (body, handle) = tee(stream::iter(chunks), fill, TeePolicy::new());
    let received: Vec<u8> = body
        .map(|c| c.map(|b| b.to_vec()).unwrap_or_default())
        .concat()
        .await;
    let outcome = handle.await;

    ensure!(received == data, "client bytes differ from the upstream's");
    ensure!(
        outcome.abandon_reason() == Some(AbandonReason::Cache(ErrorKind::NoSpace)),
        "fill outcome {outcome:?}, expected abandoned with no_space"
    );
    expect_absent(&*backend, &k, "after a failed fill").await?;
    expect_no_pending(&*backend, "after a failed fill").await
}

/// A stalled write and a stalled commit are cancelled by the idle deadline
/// and the fill aborted; and the backend never blocks its runtime thread,
/// which is what lets a deadline fire at all.
async fn deadlines_enforced(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;

    for (plan, at) in [
        ("seed=1; write@nth=2:stall", "write"),
        ("seed=1; commit:stall", "commit"),
    ] {
        let faulty = faulty(&backend, plan);
        let k = key(&format!("stall-{at}.tgz"));
        let started = Instant::now();

        let mut fill = Fill::begin(&faulty, &k, short_deadlines()).await?;
        let result = match write_all(&mut fill, &content(256 * 1024, 2)).await {
            Ok(()) => fill.commit().await.map(|_| ()),
            Err(err) => Err(err),
        };
        let took = started.elapsed();

        let Err(err) = result else {
            return Err(Failure::Fail(format!("a stalled {at} succeeded")));
        };
        ensure!(err.kind() == ErrorKind::Stalled, "stalled {at}: {err}");
        ensure!(
            took < Duration::from_secs(2),
            "stalled {at} ended after {took:?}, idle deadline 200 ms"
        );
        expect_absent(&*backend, &k, &format!("after a stalled {at}")).await?;
        expect_no_pending(&*backend, &format!("after a stalled {at}")).await?;
    }

    let gap = largest_scheduling_gap(backend.clone()).await?;
    ensure!(
        gap < Duration::from_secs(1),
        "the backend blocked its runtime thread for {gap:?} during a fill; \
         no deadline can fire while it does"
    );
    Ok(())
}

/// Runs a 16 MiB fill and read on a single-threaded runtime next to a
/// ticker, and returns the longest time the ticker could not run for
/// reasons of the runtime thread's own: a gap less the time the kernel kept
/// the thread waiting for a CPU, so a loaded machine does not read as a
/// blocking backend.
async fn largest_scheduling_gap(backend: Arc<dyn CacheBackend>) -> Result<Duration, Failure> {
    let largest = Arc::new(AtomicU64::new(0));
    let recorded = largest.clone();
    // Made here, not on the timed thread: building it is not the backend's
    // time.
    let data = content(16 << 20, 3);
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let mut last = Instant::now();
            let mut last_wait = run_queue_wait();
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let wait = run_queue_wait();
                    let gap = last
                        .elapsed()
                        .saturating_sub(wait.saturating_sub(last_wait));
                    recorded.fetch_max(gap.as_nanos() as u64, Ordering::Relaxed);
                    last = Instant::now();
                    last_wait = wait;
                }
            });
            // Let the ticker start before the fill takes the thread.
            tokio::task::yield_now().await;
            let k = key("scheduling.tgz");
            let result = put(&*backend, &k, &data, WriteOptions::new()).await;
            let read = read(&*backend, &k).await;
            // Let the ticker measure the gap that ended with the last call.
            tokio::time::sleep(Duration::from_millis(20)).await;
            ticker.abort();
            result.map(|_| ()).and(read.map(|_| ()))
        })
    });
    match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(result)) => result?,
        _ => return Err(Failure::Fail("the fill thread panicked".into())),
    }
    Ok(Duration::from_nanos(largest.load(Ordering::Relaxed)))
}

/// Time this thread has spent runnable but waiting for a CPU
/// (`/proc/thread-self/schedstat`, second field); zero where unavailable,
/// which makes the gap plain wall-clock time.
fn run_queue_wait() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|text| text.split_whitespace().nth(1)?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// Nothing is visible before commit, and readers racing a commit see the
/// old entry or the new one, whole, never a prefix or a mix.
async fn atomic_publish(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let k = key("atomic.tgz");
    let old = content(256 * 1024, 4);
    let new = content(384 * 1024, 5);

    let mut fill = Fill::begin(&*backend, &k, WriteOptions::new()).await?;
    write_all(&mut fill, &old).await?;
    expect_absent(&*backend, &k, "after writes, before commit").await?;
    fill.commit().await?;
    ensure!(
        read_verified(&*backend, &k).await?.as_deref() == Some(&old[..]),
        "the committed entry does not read back"
    );

    let reader = {
        let backend = backend.clone();
        let (k, old, new) = (k.clone(), old.clone(), new.clone());
        tokio::spawn(async move {
            let mut seen_new = false;
            for _ in 0..400 {
                match read(&*backend, &k).await {
                    Ok(Some((meta, data))) if data == old || data == new => {
                        if meta.summary.sha256 != sha256(&data) {
                            return Err("a read's metadata belongs to another version".to_owned());
                        }
                        seen_new |= data == new;
                        if seen_new && data == old {
                            return Err("the old entry came back after the new one".to_owned());
                        }
                    }
                    Ok(Some((_, data))) => {
                        return Err(format!(
                            "a reader saw {} bytes of neither version",
                            data.len()
                        ));
                    }
                    Ok(None) => return Err("the entry vanished during an overwrite".to_owned()),
                    Err(err) => return Err(format!("read failed: {err}")),
                }
                tokio::task::yield_now().await;
            }
            Ok(())
        })
    };

    let mut fill = Fill::begin(&*backend, &k, WriteOptions::new()).await?;
    for chunk in new.chunks(16 * 1024) {
        fill.write(Bytes::copy_from_slice(chunk)).await?;
        tokio::task::yield_now().await;
    }
    fill.commit().await?;

    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(message)) => return Err(Failure::Fail(message)),
        Err(err) => return Err(Failure::Fail(format!("reader panicked: {err}"))),
    }
    ensure!(
        read_verified(&*backend, &k).await?.as_deref() == Some(&new[..]),
        "after the overwrite the new entry does not read back"
    );
    Ok(())
}

/// A body of the wrong length or digest is refused and the entry that was
/// there stays whole.
async fn length_and_digest_enforced(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let k = key("checked.tgz");
    let old = content(100_000, 6);
    put(&*backend, &k, &old, WriteOptions::new()).await?;

    let bad = content(50_000, 7);
    let cases = [
        (
            WriteOptions::new().expected_len(50_001),
            ErrorKind::LengthMismatch,
        ),
        (
            WriteOptions::new().expected_len(49_999),
            ErrorKind::LengthMismatch,
        ),
        (
            WriteOptions::new().expected_sha256(sha256(&old)),
            ErrorKind::IntegrityMismatch,
        ),
    ];
    for (options, kind) in cases {
        let result = put(&*backend, &k, &bad, options).await;
        ensure!(
            result.as_ref().err().map(CacheError::kind) == Some(kind),
            "expected {kind:?}, got {result:?}"
        );
        ensure!(
            read_verified(&*backend, &k).await?.as_deref() == Some(&old[..]),
            "a refused fill ({kind:?}) disturbed the entry that was there"
        );
        expect_no_pending(&*backend, "after a refused fill").await?;
    }

    let summary = put(
        &*backend,
        &k,
        &bad,
        WriteOptions::new()
            .expected_len(bad.len() as u64)
            .expected_sha256(sha256(&bad)),
    )
    .await?;
    ensure!(
        summary.sha256 == sha256(&bad),
        "commit reported a wrong digest"
    );
    ensure!(
        read_verified(&*backend, &k).await?.as_deref() == Some(&bad[..]),
        "a fill with a matching length and digest did not publish"
    );
    Ok(())
}

/// Through a tee, an upstream error leaves nothing published.
async fn upstream_error_never_committed(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let k = key("upstream-error.tgz");
    let data = content(200_000, 8);

    let fill = Fill::begin(&*backend, &k, WriteOptions::new()).await?;
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(CHUNK)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .chain([Err(std::io::Error::other("upstream reset"))])
        .collect();
    let (body, handle) = tee(stream::iter(chunks), fill, TeePolicy::new());
    body.for_each(|_| async {}).await;
    let outcome = handle.await;

    ensure!(
        outcome.abandon_reason() == Some(AbandonReason::UpstreamFailed),
        "fill outcome {outcome:?}, expected abandoned for the upstream error"
    );
    expect_absent(&*backend, &k, "after an upstream error").await?;
    expect_no_pending(&*backend, "after an upstream error").await
}

async fn no_poison_after_abort(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let k = key("aborted.tgz");

    let mut fill = Fill::begin(&*backend, &k, WriteOptions::new()).await?;
    write_all(&mut fill, &content(300_000, 9)).await?;
    fill.abort().await?;

    expect_absent(&*backend, &k, "after abort").await?;
    expect_no_pending(&*backend, "after abort").await
}

/// A fill dropped on a thread with no runtime is aborted all the same.
async fn no_poison_after_drop(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let k = key("dropped.tgz");

    let mut fill = Fill::begin(&*backend, &k, WriteOptions::new()).await?;
    write_all(&mut fill, &content(300_000, 10)).await?;
    let dropped = std::thread::spawn(move || drop(fill)).join();
    ensure!(
        dropped.is_ok(),
        "dropping a fill outside a runtime panicked"
    );

    expect_absent(&*backend, &k, "after drop").await?;
    expect_no_pending(&*backend, "after drop").await
}

async fn no_poison_after_failed_commit(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let faulty = faulty(&backend, "seed=1; commit:eio");
    let k = key("failed-commit.tgz");

    let result = put(&faulty, &k, &content(300_000, 11), WriteOptions::new()).await;
    ensure!(
        result.as_ref().err().map(CacheError::kind) == Some(ErrorKind::Io),
        "expected the injected commit failure, got {result:?}"
    );
    expect_absent(&*backend, &k, "after a failed commit").await?;
    expect_no_pending(&*backend, "after a failed commit").await
}

/// After a crash mid-fill, `recover` sweeps what the dead fill left; it
/// never touches published entries or live fills.
async fn recover_sweeps(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let published = key("survivor.tgz");
    let survivor = content(100_000, 12);
    put(&*backend, &published, &survivor, WriteOptions::new()).await?;

    let faulty = faulty(&backend, "seed=1; write@nth=3:crash");
    let crashed = key("crashed.tgz");
    let result = put(
        &faulty,
        &crashed,
        &content(400_000, 13),
        WriteOptions::new(),
    )
    .await;
    ensure!(result.is_err(), "the crash was not injected");
    if subject.capabilities.crash_leaves_residue {
        let pending = backend.pending().await?;
        ensure!(
            pending >= 1,
            "a crashed fill left nothing pending, though the backend says a crash leaves residue"
        );
    }

    let live = key("live.tgz");
    let live_data = content(200_000, 14);
    let mut live_fill = Fill::begin(&*backend, &live, WriteOptions::new()).await?;
    write_all(&mut live_fill, &live_data[..100_000]).await?;

    backend.recover().await?;

    write_all(&mut live_fill, &live_data[100_000..]).await?;
    live_fill.commit().await.map_err(|err| {
        Failure::Fail(format!(
            "recover broke a live fill: its commit failed with {err}"
        ))
    })?;
    ensure!(
        read_verified(&*backend, &live).await?.as_deref() == Some(&live_data[..]),
        "the live fill's entry is wrong after recover"
    );
    ensure!(
        read_verified(&*backend, &published).await?.as_deref() == Some(&survivor[..]),
        "recover disturbed a published entry"
    );
    expect_absent(&*backend, &crashed, "after crash and recover").await?;
    expect_no_pending(&*backend, "after recover").await?;

    if let Some(reopen) = &subject.reopen {
        let reopened = reopen().await;
        reopened.recover().await?;
        expect_absent(&*reopened, &crashed, "after reopen").await?;
        expect_no_pending(&*reopened, "after reopen and recover").await?;
    }
    Ok(())
}

/// What commit acknowledged is there after a restart.
async fn durable_on_ok(subject: Subject) -> Result<(), Failure> {
    let Some(reopen) = &subject.reopen else {
        return Err(Failure::Skip("the subject has no reopen".into()));
    };
    let k = key("durable.tgz");
    let data = content(500_000, 15);
    let metadata = EntryMetadata::new().content_type("application/octet-stream");
    put(
        &*subject.backend,
        &k,
        &data,
        WriteOptions::new().metadata(metadata.clone()),
    )
    .await?;

    let reopened = reopen().await;
    let found = read(&*reopened, &k).await?;
    let Some((meta, body)) = found else {
        return Err(Failure::Fail(
            "a committed entry is gone after reopen".into(),
        ));
    };
    ensure!(
        body == data,
        "a committed entry reads differently after reopen"
    );
    ensure!(meta.metadata == metadata, "metadata changed across reopen");
    Ok(())
}

/// Each failure class arrives as its kind, with the key, operation and
/// backend, and the failed fill is cleaned up.
async fn typed_errors(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let cases = [
        ("enospc", ErrorKind::NoSpace, 28),
        ("edquot", ErrorKind::QuotaExceeded, 122),
        ("efbig", ErrorKind::FileTooLarge, 27),
        ("eio", ErrorKind::Io, 5),
        ("erofs", ErrorKind::ReadOnly, 30),
    ];
    for (errno, kind, raw) in cases {
        for (point, op) in [
            ("write@nth=2", Operation::Write),
            ("commit", Operation::Commit),
        ] {
            let faulty = faulty(&backend, &format!("seed=1; {point}:{errno}"));
            let k = key(&format!("typed-{errno}.tgz"));
            let result = put(&faulty, &k, &content(200_000, 16), WriteOptions::new()).await;
            let Err(err) = result else {
                return Err(Failure::Fail(format!("{point}:{errno} was not reported")));
            };
            ensure!(
                err.kind() == kind,
                "{point}:{errno} arrived as {:?}",
                err.kind()
            );
            ensure!(
                err.operation() == op,
                "{point}:{errno} names {:?}",
                err.operation()
            );
            ensure!(err.key() == Some(&k), "{point}:{errno} lost the key");
            ensure!(
                err.raw_os_error() == Some(raw),
                "{point}:{errno} lost the errno"
            );
            ensure!(
                !err.backend().is_empty(),
                "{point}:{errno} names no backend"
            );
            expect_absent(&*backend, &k, &format!("after {point}:{errno}")).await?;
            expect_no_pending(&*backend, &format!("after {point}:{errno}")).await?;
        }
    }
    Ok(())
}

/// Begins `n` fills of one key and writes their contents interleaved.
async fn interleaved_fills(
    backend: &dyn CacheBackend,
    k: &CacheKey,
    mode: WriteMode,
    n: usize,
) -> Result<(Vec<Fill>, Vec<Vec<u8>>), Failure> {
    let contents: Vec<Vec<u8>> = (0..n)
        .map(|i| content(100_000 + i * 37_000, 20 + i as u8))
        .collect();
    let mut fills = Vec::new();
    for _ in 0..n {
        fills.push(Fill::begin(backend, k, WriteOptions::new().mode(mode)).await?);
    }
    let longest = contents.iter().map(Vec::len).max().unwrap_or(0);
    for at in (0..longest).step_by(16 * 1024) {
        for (fill, data) in fills.iter_mut().zip(&contents) {
            if at < data.len() {
                let end = (at + 16 * 1024).min(data.len());
                fill.write(Bytes::copy_from_slice(&data[at..end])).await?;
            }
        }
    }
    Ok((fills, contents))
}

/// Interleaved fills of one key never mix; the last commit wins, and
/// concurrent commits leave exactly one whole version.
async fn one_winner_overwrite(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let k = key("overwrite.tgz");

    let (fills, contents) = interleaved_fills(&*backend, &k, WriteMode::Overwrite, 6).await?;
    let order = [3usize, 0, 5, 1, 4, 2];
    let mut fills: Vec<Option<Fill>> = fills.into_iter().map(Some).collect();
    for &i in &order {
        fills[i].take().expect("each fill once").commit().await?;
        ensure!(
            read_verified(&*backend, &k).await?.as_deref() == Some(&contents[i][..]),
            "after committing fill {i}, the entry is not its content"
        );
    }

    let (fills, contents) = interleaved_fills(&*backend, &k, WriteMode::Overwrite, 6).await?;
    let commits = futures::future::join_all(fills.into_iter().map(Fill::commit)).await;
    for result in commits {
        result?;
    }
    let found = read_verified(&*backend, &k).await?;
    ensure!(
        found.as_ref().is_some_and(|d| contents.contains(d)),
        "after concurrent commits the entry is none of the versions"
    );
    expect_no_pending(&*backend, "after concurrent commits").await
}

/// Concurrent create-only commits of one key: exactly one wins, the rest
/// fail with `already_exists`, and the entry is the winner's.
async fn one_winner_create_only(subject: Subject) -> Result<(), Failure> {
    if !subject.capabilities.create_only {
        return Err(Failure::Skip(
            "the backend does not promise create-only".into(),
        ));
    }
    let backend = subject.backend;
    let k = key("create-only.tgz");

    let (fills, contents) = interleaved_fills(&*backend, &k, WriteMode::CreateOnly, 6).await?;
    let commits = futures::future::join_all(fills.into_iter().map(Fill::commit)).await;

    let winners: Vec<usize> = (0..commits.len()).filter(|&i| commits[i].is_ok()).collect();
    ensure!(
        winners.len() == 1,
        "{} create-only commits succeeded",
        winners.len()
    );
    for result in &commits {
        if let Err(err) = result {
            ensure!(
                err.kind() == ErrorKind::AlreadyExists,
                "a losing create-only commit failed with {:?}",
                err.kind()
            );
        }
    }
    ensure!(
        read_verified(&*backend, &k).await?.as_deref() == Some(&contents[winners[0]][..]),
        "the entry is not the winner's content"
    );

    let late = put(
        &*backend,
        &k,
        b"late",
        WriteOptions::new().mode(WriteMode::CreateOnly),
    )
    .await;
    ensure!(
        late.as_ref().err().map(CacheError::kind) == Some(ErrorKind::AlreadyExists),
        "a create-only fill of a published key gave {late:?}"
    );
    expect_no_pending(&*backend, "after create-only races").await
}

/// Keys at the edges of what is allowed each map to their own entry.
async fn safe_keys(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let long_name = vec!["s".repeat(255); 4].join("/");
    let names: Vec<(&str, String)> = vec![
        ("npm", "a".into()),
        ("pypi", "a".into()),
        ("npm", "a..b/..c/.d".into()),
        ("npm", "tmp".into()),
        ("npm", "entries".into()),
        ("npm", "ünïcødé/名前.tgz".into()),
        ("npm", "x".repeat(255)),
        ("npm", long_name),
        ("npm", CacheKey::new("npm", "a").expect("key").digest_hex()),
        ("go", "github.com/!a/b/@v/v1.0.0.zip".into()),
    ];
    let keys: Vec<CacheKey> = names
        .iter()
        .map(|(ns, name)| CacheKey::new(*ns, name.clone()).expect("edge key is valid"))
        .collect();

    for (i, k) in keys.iter().enumerate() {
        put(
            &*backend,
            k,
            &content(1000 + i, 40 + i as u8),
            WriteOptions::new(),
        )
        .await?;
    }
    for (i, k) in keys.iter().enumerate() {
        let expected = content(1000 + i, 40 + i as u8);
        ensure!(
            read_verified(&*backend, k).await?.as_deref() == Some(&expected[..]),
            "{k} does not read back its own content"
        );
    }
    Ok(())
}

/// An entry opened before an overwrite and a remove reads to the end.
async fn readers_keep_their_entry(subject: Subject) -> Result<(), Failure> {
    if !subject.capabilities.stable_reads {
        return Err(Failure::Skip(
            "the backend does not promise stable reads".into(),
        ));
    }
    let backend = subject.backend;
    let k = key("reader.tgz");
    let old = content(1 << 20, 50);
    put(&*backend, &k, &old, WriteOptions::new()).await?;

    let Some(entry) = backend.get(&k).await? else {
        return Err(Failure::Fail("the entry is missing".into()));
    };
    let mut body = entry.body;
    let mut data = match body.next().await {
        Some(chunk) => chunk?.to_vec(),
        None => Vec::new(),
    };

    put(&*backend, &k, &content(1 << 20, 51), WriteOptions::new()).await?;
    backend.remove(&k).await?;

    while let Some(chunk) = body.next().await {
        data.extend_from_slice(&chunk?);
    }
    ensure!(data == old, "an opened entry changed under its reader");
    Ok(())
}

async fn remove_and_get(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let k = key("removed.tgz");

    ensure!(
        !backend.remove(&k).await?,
        "removing a missing key reported an entry"
    );
    put(&*backend, &k, &content(10_000, 60), WriteOptions::new()).await?;
    ensure!(backend.remove(&k).await?, "removing an entry reported none");
    expect_absent(&*backend, &k, "after remove").await?;
    ensure!(
        !backend.remove(&k).await?,
        "a second remove reported an entry"
    );
    Ok(())
}

async fn empty_entry_and_metadata(subject: Subject) -> Result<(), Failure> {
    let backend = subject.backend;
    let k = key("empty.tgz");
    let metadata = EntryMetadata::new()
        .content_type("application/x-tar")
        .etag("\"v1\"")
        .origin("https://registry.example/pkg/-/pkg-1.0.0.tgz")
        .user("x-upstream-status", "200");

    let summary = put(
        &*backend,
        &k,
        b"",
        WriteOptions::new()
            .expected_len(0)
            .metadata(metadata.clone()),
    )
    .await?;
    ensure!(
        summary.len == 0,
        "an empty fill reported {} bytes",
        summary.len
    );

    let Some((meta, data)) = read(&*backend, &k).await? else {
        return Err(Failure::Fail("an empty entry is not readable".into()));
    };
    ensure!(
        data.is_empty() && meta.is_empty(),
        "an empty entry has bytes"
    );
    ensure!(
        meta.summary.sha256 == sha256(b""),
        "an empty entry has a wrong digest"
    );
    ensure!(
        meta.metadata == metadata,
        "metadata changed: {:?}",
        meta.metadata
    );
    Ok(())
}
