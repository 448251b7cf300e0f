//! The fault matrix, the backends each fault runs on, and one scenario:
//! a fault, a concurrency and a set of ecosystems, through SafeDisk's proxy
//! or through the naive tee, with real clients over loopback TCP.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::ObjectStore;
use safedisk_core::{BreakerConfig, CacheBackend, CacheKey, WriteOptions};
use safedisk_faulty::{FaultPlan, FaultRecord, Faulty, FaultyStore};
use safedisk_fs::{FsBackend, FsOptions};
use safedisk_s3::testing::S3TestServer;
use safedisk_s3::{ObjectStoreBackend, S3Options};
use safedisk_testkit::probe;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use super::naive::NaiveServer;
use super::upstream::{Delivery, Size, Upstream, artifact_path};
use super::witness::Witness;
use crate::ecosystem::Ecosystem;
use crate::server::{self, ProxyConfig};

/// Interval between samples of connections held, for the timelines.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(25);

/// Idle deadline of SafeDisk's fills in the drill: 1 s (the library's
/// default is 5 s), so a stalled cache write is cancelled, and its temp
/// file released, within the grace period.
pub const FILL_IDLE_DEADLINE: Duration = Duration::from_secs(1);

/// Clients that connect at once; the next wave starts
/// [`CONNECT_WAVE_GAP`] later.
const CONNECT_WAVE: u32 = 16;

/// Time between waves of connecting clients.
const CONNECT_WAVE_GAP: Duration = Duration::from_millis(4);

/// Most clients per ecosystem for the object store faults: each fill of
/// theirs moves a 5 MiB part through the in-process S3 server, and more
/// than 16 per ecosystem at once would measure the machine, not the tee.
pub const S3_MAX_CLIENTS: usize = 16;

/// Size of the tmpfs for the real disk-full fault: smaller than the
/// artifacts of one scenario's concurrent fills together.
const TMPFS_SIZE: &str = "768k";

/// One fault of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// No space left after 192 KiB of each 256 KiB fill (injected ENOSPC).
    Enospc,
    /// Quota exceeded after 192 KiB of each fill (injected EDQUOT).
    Edquot,
    /// A short write at 192 KiB.
    ShortWrite,
    /// EIO after 192 KiB.
    Eio,
    /// EIO at commit before publish, where the disk backend fsyncs: a
    /// failed fsync.
    Fsync,
    /// A backend error at commit after the entry was published: the
    /// ambiguous acknowledgement of a lost reply.
    Commit,
    /// The second write stalls until cancelled.
    Stall,
    /// Every write limited to 1 MiB/s.
    Slow,
    /// The first part upload of each multipart upload fails (object store
    /// backend over the in-process S3 server).
    S3Part,
    /// The first part upload of each multipart upload stalls.
    S3Stall,
    /// Each client leaves after 64 KiB of a body the upstream paces.
    ClientAbort,
    /// The upstream declares the full length, sends half and closes.
    Truncation,
    /// A real full disk: the disk backend on a 768 KiB tmpfs, which
    /// refuses at begin the fills it knows cannot fit and meets a real
    /// ENOSPC where its estimate was wrong.
    TmpfsFull,
}

/// Where a fault's cache lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Disk,
    Tmpfs,
    S3,
}

impl Fault {
    /// Every fault, in the order the drill runs them.
    pub const ALL: [Fault; 13] = [
        Self::Enospc,
        Self::Edquot,
        Self::ShortWrite,
        Self::Eio,
        Self::Fsync,
        Self::Commit,
        Self::Stall,
        Self::Slow,
        Self::S3Part,
        Self::S3Stall,
        Self::ClientAbort,
        Self::Truncation,
        Self::TmpfsFull,
    ];

    /// The name used by `--fault` and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enospc => "enospc",
            Self::Edquot => "edquot",
            Self::ShortWrite => "short-write",
            Self::Eio => "eio",
            Self::Fsync => "fsync",
            Self::Commit => "commit",
            Self::Stall => "stall",
            Self::Slow => "slow",
            Self::S3Part => "s3-part",
            Self::S3Stall => "s3-stall",
            Self::ClientAbort => "client-abort",
            Self::Truncation => "truncation",
            Self::TmpfsFull => "tmpfs-enospc",
        }
    }

    /// How the fault is made: a fault plan's text, or what else does it.
    pub fn describe(self) -> &'static str {
        match self.plan_text() {
            Some(plan) => plan,
            None => match self {
                Self::ClientAbort => "client drops the body after 64 KiB",
                Self::Truncation => "upstream sends half its declared length, then closes",
                _ => "disk backend on a 768 KiB tmpfs",
            },
        }
    }

    fn plan_text(self) -> Option<&'static str> {
        Some(match self {
            Self::Enospc => "seed=1; write@after=192KiB:enospc",
            Self::Edquot => "seed=1; write@after=192KiB:edquot",
            Self::ShortWrite => "seed=1; write@after=192KiB:short",
            Self::Eio => "seed=1; write@after=192KiB:eio",
            Self::Fsync => "seed=1; commit:eio",
            Self::Commit => "seed=1; commit@published:error=backend",
            Self::Stall => "seed=1; write@nth=2:stall",
            Self::Slow => "seed=1; write:rate=1MiB/s",
            Self::S3Part => "seed=1; part@nth=1:eio",
            Self::S3Stall => "seed=1; part@nth=1:stall",
            Self::ClientAbort | Self::Truncation | Self::TmpfsFull => return None,
        })
    }

    fn plan(self) -> Option<FaultPlan> {
        self.plan_text()
            .map(|text| text.parse().expect("the drill's plans parse"))
    }

    /// The clients per ecosystem a scenario asked for `asked` runs with:
    /// at most [`S3_MAX_CLIENTS`] for the object store faults.
    pub fn clients(self, asked: usize) -> usize {
        if self.needs_s3() {
            asked.min(S3_MAX_CLIENTS)
        } else {
            asked
        }
    }

    fn store(self) -> Store {
        match self {
            Self::S3Part | Self::S3Stall => Store::S3,
            Self::TmpfsFull => Store::Tmpfs,
            _ => Store::Disk,
        }
    }

    /// Whether the fault needs the in-process S3 server.
    pub fn needs_s3(self) -> bool {
        self.store() == Store::S3
    }

    fn size(self) -> Size {
        match self.store() {
            Store::S3 => Size::Large,
            _ => Size::Small,
        }
    }

    fn delivery(self) -> Delivery {
        match self {
            Self::ClientAbort => Delivery::Paced,
            Self::Truncation => Delivery::Truncated,
            _ => Delivery::Whole,
        }
    }

    fn abort_after(self) -> Option<u64> {
        (self == Self::ClientAbort).then_some(64 * 1024)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|f| f.as_str()).collect();
                format!(
                    "unknown fault {name:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Which tee serves a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// SafeDisk's proxy ([`crate::server`]).
    SafeDisk,
    /// The naive inline tee ([`super::naive`]).
    Naive,
}

impl Side {
    /// `safedisk` or `naive`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SafeDisk => "safedisk",
            Self::Naive => "naive",
        }
    }
}

/// What the scenarios of one run share.
#[derive(Debug)]
pub struct Rig {
    /// The synthetic upstream.
    pub upstream: Upstream,
    /// The S3 server, when an object store fault was selected.
    pub s3: Option<S3TestServer>,
    /// Why a tmpfs cannot be mounted, when it cannot.
    pub tmpfs_refused: Option<String>,
    /// The naive server's write timeout.
    pub write_timeout: Duration,
    /// Longest wait for everything to be released after the clients end.
    pub grace: Duration,
}

/// One scenario to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// A number unique in the run; package names carry it, so no scenario
    /// meets another's cache entries.
    pub id: usize,
    /// The fault.
    pub fault: Fault,
    /// Concurrent clients per ecosystem.
    pub concurrency: usize,
    /// Ecosystems, all run at once.
    pub ecosystems: Vec<Ecosystem>,
    /// Which tee.
    pub side: Side,
}

/// What was still held after the grace period, above the baseline taken
/// before the clients started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Connections to the proxy's port and the upstream's.
    pub connections: usize,
    /// File descriptors of the process.
    pub fds: usize,
    /// Live tokio tasks.
    pub tasks: usize,
    /// The backend's unpublished fills (temp files, open uploads), plus
    /// multipart uploads the S3 server still keeps.
    pub temp_files: usize,
}

impl Held {
    /// Whether nothing is held.
    pub fn is_clear(&self) -> bool {
        *self == Self::default()
    }
}

/// One ecosystem's results in one scenario.
#[derive(Debug, Clone)]
pub struct Row {
    /// The ecosystem.
    pub ecosystem: Ecosystem,
    /// Whether every client got exactly the artifact's bytes; for a
    /// truncated upstream, whether every client saw an error rather than a
    /// complete-looking body; `None` where clients leave on purpose.
    pub client_bytes_ok: Option<bool>,
    /// Unblock times of the clients, in milliseconds, sorted.
    pub unblock_ms: Vec<f64>,
    /// Clients whose request ended in an error.
    pub client_errors: usize,
    /// Faults injected for this ecosystem's keys (on the tmpfs: fills
    /// that met a real error).
    pub faults_injected: usize,
    /// Entries readable afterwards whose bytes are not the artifact's.
    pub partial_entries: usize,
    /// Entries readable afterwards with the artifact's exact bytes.
    pub complete_entries: usize,
}

/// One scenario's results.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The scenario.
    pub scenario: Scenario,
    /// Why it did not run, when it did not.
    pub skipped: Option<String>,
    /// Per ecosystem.
    pub rows: Vec<Row>,
    /// Whether the connections to the upstream were back to the baseline
    /// at the end of the grace period.
    pub upstream_closed: bool,
    /// What was still held.
    pub held: Held,
    /// Time from the last client being done to every connection (proxy
    /// and upstream ports) being closed; the grace period when they were
    /// not.
    pub release: Duration,
    /// Connections held (proxy and upstream ports), every
    /// [`SAMPLE_INTERVAL`] from the start of the clients.
    pub timeline: Vec<u32>,
    /// Wall time of the scenario.
    pub elapsed: Duration,
}

/// Checks whether the process may mount a tmpfs, by mounting and
/// unmounting one; the error says why not.
pub fn probe_tmpfs() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("no temp dir: {e}"))?;
    let mounted = Tmpfs::mount(dir.path())?;
    drop(mounted);
    Ok(())
}

/// A size-limited tmpfs, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &FsPath) -> Result<Self, String> {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !status.status.success() {
            let why = String::from_utf8_lossy(&status.stderr).trim().to_owned();
            return Err(format!("mount -t tmpfs failed: {why}"));
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Where the injected faults were recorded.
enum Records {
    None,
    Witness(Arc<Witness>),
    Backend(Faulty<dyn CacheBackend>),
    Store(FaultyStore<dyn ObjectStore>),
}

impl Records {
    fn all(&self) -> Vec<FaultRecord> {
        match self {
            Self::None | Self::Witness(_) => Vec::new(),
            Self::Backend(faulty) => faulty.records(),
            Self::Store(store) => store.records(),
        }
    }
}

/// A scenario's cache and everything it must outlive.
struct Cache {
    backend: Arc<dyn CacheBackend>,
    records: Records,
    /// When the fault wrapper was made: records' `elapsed` counts from
    /// here.
    wrapped_at: Instant,
    _dir: tempfile::TempDir,
    _tmpfs: Option<Tmpfs>,
}

fn build_cache(rig: &Rig, scenario: &Scenario) -> Result<Cache, String> {
    let fault = scenario.fault;
    let dir = tempfile::tempdir().map_err(|e| format!("no temp dir: {e}"))?;
    let mut tmpfs = None;

    if fault.store() == Store::S3 {
        let server = rig.s3.as_ref().ok_or("no s3 server")?;
        // No idle pool: every connection to the S3 server is a request in
        // progress, so the leak counts see only those.
        let store = server
            .store_builder()
            .with_client_options(
                safedisk_s3::client_options_for(safedisk_s3::testing::TEST_REQUEST_TIMEOUT)
                    .with_pool_max_idle_per_host(0),
            )
            .with_allow_http(true)
            .build()
            .map_err(|e| format!("s3 store: {e}"))?;
        let store: Arc<dyn ObjectStore> = Arc::new(store);
        let wrapped_at = Instant::now();
        let faulty = FaultyStore::from_arc(store, fault.plan().unwrap_or_default());
        let backend = ObjectStoreBackend::new(
            Arc::new(faulty.clone()),
            format!("drill-{}", scenario.id),
            S3Options::new().part_size(safedisk_s3::MIN_PART_SIZE),
        )
        .map_err(|e| format!("s3 backend: {e}"))?;
        return Ok(Cache {
            backend: Arc::new(backend),
            records: Records::Store(faulty),
            wrapped_at,
            _dir: dir,
            _tmpfs: None,
        });
    }

    if fault.store() == Store::Tmpfs {
        tmpfs = Some(Tmpfs::mount(dir.path())?);
    }
    let disk = FsBackend::open(dir.path(), FsOptions::new()).map_err(|e| e.to_string())?;
    let disk: Arc<dyn CacheBackend> = Arc::new(disk);
    let wrapped_at = Instant::now();
    let (backend, records): (Arc<dyn CacheBackend>, _) = match (fault.plan(), &tmpfs) {
        (Some(plan), _) => {
            let faulty = Faulty::from_arc(disk, plan);
            (Arc::new(faulty.clone()), Records::Backend(faulty))
        }
        (None, Some(_)) => {
            let witness = Arc::new(Witness::new(disk));
            (witness.clone(), Records::Witness(witness))
        }
        (None, None) => (disk, Records::None),
    };
    Ok(Cache {
        backend,
        records,
        wrapped_at,
        _dir: dir,
        _tmpfs: tmpfs,
    })
}

/// The server a scenario's clients talk to.
enum Front {
    SafeDisk(server::RunningProxy),
    Naive(NaiveServer),
}

impl Front {
    fn port(&self) -> u16 {
        match self {
            Self::SafeDisk(proxy) => proxy.addr().port(),
            Self::Naive(naive) => naive.addr().port(),
        }
    }

    async fn shutdown(self) {
        match self {
            Self::SafeDisk(proxy) => proxy.shutdown(Duration::from_secs(1)).await,
            Self::Naive(naive) => naive.shutdown(Duration::from_secs(1)).await,
        }
    }
}

fn start_front(rig: &Rig, scenario: &Scenario, cache: &Cache) -> Result<Front, String> {
    let fault = scenario.fault;
    let upstreams: BTreeMap<Ecosystem, url::Url> = scenario
        .ecosystems
        .iter()
        .map(|&e| (e, rig.upstream.base(e, fault.size(), fault.delivery())))
        .collect();
    match scenario.side {
        Side::SafeDisk => {
            let mut config = ProxyConfig::new()
                // Every fill meets the fault: a breaker that opened would
                // bypass the cache and hide it.
                .breaker(BreakerConfig::new().failure_threshold(u32::MAX))
                .fill(WriteOptions::new().idle_deadline(FILL_IDLE_DEADLINE));
            for (ecosystem, base) in upstreams {
                config = config.upstream(ecosystem, base);
            }
            server::start(config, cache.backend.clone())
                .map(Front::SafeDisk)
                .map_err(|e| format!("proxy: {e}"))
        }
        Side::Naive => NaiveServer::start(cache.backend.clone(), upstreams, rig.write_timeout)
            .map(Front::Naive)
            .map_err(|e| format!("naive server: {e}")),
    }
}

/// Counts taken at one moment.
#[derive(Debug, Clone, Copy)]
struct Counts {
    proxy: usize,
    upstream: usize,
    fds: usize,
    tasks: usize,
    temp: usize,
}

async fn counts(rig: &Rig, cache: &Cache, proxy_port: u16) -> Counts {
    let mut temp = cache
        .backend
        .pending()
        .await
        .map_or(usize::MAX, |n| n as usize);
    if let (Records::Store(_), Some(s3)) = (&cache.records, &rig.s3) {
        // Upload records and parts the server still keeps count too: an
        // upload the backend forgot is storage held all the same.
        let uploads = s3.open_uploads().map_or(usize::MAX, |u| u.len());
        temp = temp.saturating_add(uploads);
    }
    let held = probe::connections(&[proxy_port, rig.upstream.port()]);
    Counts {
        proxy: held[0],
        upstream: held[1],
        fds: probe::open_fds().len(),
        tasks: probe::alive_tasks(),
        temp,
    }
}

fn held(now: Counts, base: Counts) -> Held {
    Held {
        connections: now.proxy.saturating_sub(base.proxy)
            + now.upstream.saturating_sub(base.upstream),
        fds: now.fds.saturating_sub(base.fds),
        tasks: now.tasks.saturating_sub(base.tasks),
        temp_files: now.temp.saturating_sub(base.temp),
    }
}

/// Samples connections held until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<u32>>,
}

impl Sampler {
    fn start(ports: [u16; 2]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !flag.load(Ordering::Relaxed) {
                tick.tick().await;
                let held: usize = probe::connections(&ports).iter().sum();
                samples.push(u32::try_from(held).unwrap_or(u32::MAX));
            }
            samples
        });
        Self { stop, task }
    }

    async fn finish(self) -> Vec<u32> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// How one client's request ended.
#[derive(Debug)]
struct ClientEnd {
    ecosystem: Ecosystem,
    path: String,
    started: Instant,
    finished: Instant,
    /// The whole body arrived and its digest is the artifact's.
    intact: bool,
    /// The request or its body failed.
    failed: bool,
    /// When the client left on purpose.
    left_at: Option<Instant>,
}

async fn download(
    client: reqwest::Client,
    url: String,
    ecosystem: Ecosystem,
    path: String,
    expected: (usize, [u8; 32]),
    abort_after: Option<u64>,
) -> ClientEnd {
    let started = Instant::now();
    let mut end = ClientEnd {
        ecosystem,
        path,
        started,
        finished: started,
        intact: false,
        failed: true,
        left_at: None,
    };
    let response = match client.get(url).send().await {
        Ok(response) if response.status().is_success() => response,
        _ => {
            end.finished = Instant::now();
            return end;
        }
    };

    let mut body = response.bytes_stream();
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    while let Some(item) = body.next().await {
        let Ok(chunk) = item else {
            end.finished = Instant::now();
            return end;
        };
        received += chunk.len() as u64;
        hasher.update(&chunk);
        if abort_after.is_some_and(|limit| received >= limit) {
            drop(body);
            end.failed = false;
            end.left_at = Some(Instant::now());
            end.finished = Instant::now();
            return end;
        }
    }
    end.finished = Instant::now();
    end.failed = false;
    let digest: [u8; 32] = hasher.finalize().into();
    end.intact = received == expected.0 as u64 && digest == expected.1;
    end
}

/// Runs one scenario.
///
/// Errors in setting it up (a port, a mount) come back as a skipped
/// outcome with the reason.
pub async fn run(rig: &Rig, scenario: Scenario) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        scenario: scenario.clone(),
        skipped: None,
        rows: Vec::new(),
        upstream_closed: true,
        held: Held::default(),
        release: Duration::ZERO,
        timeline: Vec::new(),
        elapsed: Duration::ZERO,
    };
    if scenario.fault.store() == Store::Tmpfs
        && let Some(why) = &rig.tmpfs_refused
    {
        outcome.skipped = Some(why.clone());
        return outcome;
    }

    // Set up the cache and the server, then take the baseline with the
    // sampler already running so its task is in it.
    let cache = match build_cache(rig, &scenario) {
        Ok(cache) => cache,
        Err(why) => {
            outcome.skipped = Some(why);
            return outcome;
        }
    };
    let front = match start_front(rig, &scenario, &cache) {
        Ok(front) => front,
        Err(why) => {
            outcome.skipped = Some(why);
            return outcome;
        }
    };
    let port = front.port();
    let sampler = Sampler::start([port, rig.upstream.port()]);
    let base = counts(rig, &cache, port).await;

    // The clients: `concurrency` per ecosystem, all at once, each for its
    // own package so each runs its own fill.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a plain http client builds");
    let fault = scenario.fault;
    let mut tasks = Vec::new();
    let mut launched = 0u32;
    for &ecosystem in &scenario.ecosystems {
        let artifact = rig.upstream.artifact(ecosystem, fault.size());
        let expected = (artifact.bytes.len(), artifact.sha256);
        for n in 0..scenario.concurrency {
            let path = artifact_path(ecosystem, &format!("d{}n{n}", scenario.id));
            let url = format!("http://127.0.0.1:{port}/{}/{path}", ecosystem.as_str());
            // Waves of clients a few milliseconds apart: a burst of
            // hundreds of connects overflows the proxy's accept queue, and
            // the SYNs the kernel drops are retried only a second later.
            let wave = CONNECT_WAVE_GAP * (launched / CONNECT_WAVE);
            launched += 1;
            let download = download(
                client.clone(),
                url,
                ecosystem,
                path,
                expected,
                fault.abort_after(),
            );
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(wave).await;
                download.await
            }));
        }
    }
    drop(client);
    let mut ends = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(end) = task.await {
            ends.push(end);
        }
    }

    // Wait for the process to let go of everything, up to the grace
    // period.
    let last_done = ends
        .iter()
        .map(|e| e.finished)
        .max()
        .unwrap_or_else(Instant::now);
    let deadline = Instant::now() + rig.grace;
    let mut now = counts(rig, &cache, port).await;
    let mut released = None;
    loop {
        let still = held(now, base);
        if still.connections == 0 && released.is_none() {
            released = Some(Instant::now());
        }
        if still.is_clear() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        now = counts(rig, &cache, port).await;
    }
    outcome.held = held(now, base);
    outcome.release = released.map_or(rig.grace, |at| at.saturating_duration_since(last_done));
    outcome.upstream_closed = now.upstream <= base.upstream;
    outcome.timeline = sampler.finish().await;

    // Score each ecosystem, and read back what the cache would serve.
    let records = cache.records.all();
    for &ecosystem in &scenario.ecosystems {
        let artifact = rig.upstream.artifact(ecosystem, fault.size());
        let mine: Vec<&ClientEnd> = ends.iter().filter(|e| e.ecosystem == ecosystem).collect();
        let mut row = Row {
            ecosystem,
            client_bytes_ok: match fault {
                Fault::ClientAbort => None,
                Fault::Truncation => Some(mine.iter().all(|e| e.failed && !e.intact)),
                _ => Some(mine.len() == scenario.concurrency && mine.iter().all(|e| e.intact)),
            },
            unblock_ms: Vec::new(),
            client_errors: mine.iter().filter(|e| e.failed).count(),
            faults_injected: 0,
            partial_entries: 0,
            complete_entries: 0,
        };
        for end in &mine {
            let key = CacheKey::new(ecosystem.as_str(), end.path.clone()).expect("a valid key");
            let fired: Vec<&FaultRecord> = records
                .iter()
                .filter(|r| r.key == key.to_string() || r.key.contains(&key.digest_hex()))
                .collect();
            row.faults_injected += fired.len();
            let (fault_at, finished) = match fault {
                Fault::ClientAbort => {
                    let left = end.left_at.unwrap_or(end.finished);
                    let released = rig.upstream.body_end(&end.path).map_or(deadline, |b| b.at);
                    (left, released.max(left))
                }
                Fault::Truncation => {
                    let cut = rig
                        .upstream
                        .body_end(&end.path)
                        .map_or(end.started, |b| b.at);
                    (cut, end.finished)
                }
                _ => {
                    let seen = match &cache.records {
                        Records::Witness(witness) => witness.first_error(&key),
                        _ => fired.first().map(|r| cache.wrapped_at + r.elapsed),
                    };
                    if seen.is_some() && fired.is_empty() {
                        row.faults_injected += 1;
                    }
                    (seen.unwrap_or(end.started), end.finished)
                }
            };
            let unblock = finished.saturating_duration_since(fault_at);
            row.unblock_ms.push(unblock.as_secs_f64() * 1000.0);

            match read_entry(&*cache.backend, &key).await {
                Some(digest) if digest == artifact.sha256 => row.complete_entries += 1,
                Some(_) => row.partial_entries += 1,
                None => {}
            }
        }
        row.unblock_ms.sort_by(f64::total_cmp);
        outcome.rows.push(row);
    }

    front.shutdown().await;
    drop(cache);
    outcome.elapsed = started.elapsed();
    outcome
}

/// The digest of the entry a reader would get for `key`, if any.
async fn read_entry(backend: &dyn CacheBackend, key: &CacheKey) -> Option<[u8; 32]> {
    let entry = backend.get(key).await.ok()??;
    let mut body = entry.body;
    let mut hasher = Sha256::new();
    while let Some(chunk) = body.next().await {
        // A read that fails part-way serves nothing whole.
        hasher.update(&chunk.ok()?);
    }
    Some(hasher.finalize().into())
}

/// The `p`th percentile (0 to 100) of sorted values; 0 for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).ceil() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
