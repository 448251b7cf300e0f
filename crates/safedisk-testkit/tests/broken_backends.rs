//! The suite against backends that each break one promise. A suite that
//! passes a broken backend is a bug, so each flaw must fail its check, and
//! the same backend without a flaw must pass everything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream;
use safedisk_core::{
    CacheBackend, CacheError, CacheKey, CacheWriter, Entry, EntryMeta, EntryMetadata, ErrorKind,
    FillSummary, Operation, RecoveryReport, WriteMode, WriteOptions,
};
use safedisk_testkit::conformance::{self, Capabilities, Subject, Verdict};
use sha2::{Digest, Sha256};

/// The one promise a backend breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    None,
    /// Writes land in the visible entry as they arrive.
    PublishesEarly,
    /// Abort and drop forget to release the fill.
    LeaksOnAbort,
    /// A write blocks its runtime thread, so no deadline can fire.
    BlocksThread,
    /// Fills of one key share one staging buffer.
    MixesWriters,
    /// Abort and drop publish what was written so far.
    PublishesOnAbort,
    /// Recover publishes what crashed fills left, instead of removing it.
    SalvagesCrashes,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<CacheKey, (EntryMeta, Bytes)>,
    staging: HashMap<CacheKey, Vec<u8>>,
    pending: u64,
    residue: Vec<(CacheKey, Vec<u8>)>,
}

#[derive(Debug, Clone)]
struct Flawed {
    flaw: Flaw,
    state: Arc<Mutex<State>>,
}

impl Flawed {
    fn new(flaw: Flaw) -> Self {
        Self {
            flaw,
            state: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, key: &CacheKey, data: Vec<u8>, metadata: EntryMetadata) {
        let summary = FillSummary {
            len: data.len() as u64,
            sha256: Sha256::digest(&data).into(),
        };
        let entry = (EntryMeta::new(summary, metadata), Bytes::from(data));
        self.lock().entries.insert(key.clone(), entry);
    }
}

#[async_trait]
impl CacheBackend for Flawed {
    fn name(&self) -> &str {
        "flawed"
    }

    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        self.lock().pending += 1;
        Ok(Box::new(FlawedWriter {
            backend: self.clone(),
            key: key.clone(),
            mode: options.mode,
            metadata: options.metadata.clone(),
            data: Vec::new(),
            done: false,
        }))
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Entry>, CacheError> {
        let Some((meta, data)) = self.lock().entries.get(key).cloned() else {
            return Ok(None);
        };
        let chunks: Vec<Result<Bytes, CacheError>> = data
            .chunks(64 * 1024)
            .map(|c| Ok(data.slice_ref(c)))
            .collect();
        Ok(Some(Entry {
            meta,
            body: Box::pin(stream::iter(chunks)),
        }))
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool, CacheError> {
        Ok(self.lock().entries.remove(key).is_some())
    }

    async fn recover(&self) -> Result<RecoveryReport, CacheError> {
        let residue = std::mem::take(&mut self.lock().residue);
        let mut report = RecoveryReport::default();
        for (key, data) in residue {
            self.lock().pending -= 1;
            if self.flaw == Flaw::SalvagesCrashes {
                self.publish(&key, data, EntryMetadata::new());
            }
            report.removed.push(key.to_string());
        }
        Ok(report)
    }

    async fn pending(&self) -> Result<u64, CacheError> {
        Ok(self.lock().pending)
    }
}

#[derive(Debug)]
struct FlawedWriter {
    backend: Flawed,
    key: CacheKey,
    mode: WriteMode,
    metadata: EntryMetadata,
    data: Vec<u8>,
    done: bool,
}

impl FlawedWriter {
    fn buffer(&self) -> Vec<u8> {
        match self.backend.flaw {
            Flaw::MixesWriters => self
                .backend
                .lock()
                .staging
                .get(&self.key)
                .cloned()
                .unwrap_or_default(),
            _ => self.data.clone(),
        }
    }

    fn finish(&mut self, abandoned: bool) {
        if self.done {
            return;
        }
        self.done = true;
        match self.backend.flaw {
            Flaw::LeaksOnAbort if abandoned => return,
            Flaw::PublishesOnAbort if abandoned => {
                self.backend
                    .publish(&self.key, self.data.clone(), self.metadata.clone());
            }
            _ => {}
        }
        self.backend.lock().pending -= 1;
    }
}

#[async_trait]
impl CacheWriter for FlawedWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        let before = self.data.len();
        self.data.extend_from_slice(&chunk);
        match self.backend.flaw {
            Flaw::PublishesEarly => {
                self.backend
                    .publish(&self.key, self.data.clone(), self.metadata.clone());
            }
            Flaw::MixesWriters => {
                let mut state = self.backend.lock();
                state
                    .staging
                    .entry(self.key.clone())
                    .or_default()
                    .extend_from_slice(&chunk);
            }
            Flaw::BlocksThread if before < 8 << 20 && self.data.len() >= 8 << 20 => {
                std::thread::sleep(Duration::from_millis(1500));
            }
            _ => {}
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>, _summary: FillSummary) -> Result<(), CacheError> {
        let exists = self.backend.lock().entries.contains_key(&self.key);
        if self.mode == WriteMode::CreateOnly && exists && self.backend.flaw != Flaw::PublishesEarly
        {
            self.finish(false);
            return Err(
                CacheError::new(ErrorKind::AlreadyExists, Operation::Commit, "flawed")
                    .with_key(&self.key),
            );
        }
        let data = self.buffer();
        self.backend.lock().staging.remove(&self.key);
        self.backend.publish(&self.key, data, self.metadata.clone());
        self.finish(false);
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<(), CacheError> {
        self.finish(true);
        Ok(())
    }

    fn crash(mut self: Box<Self>) {
        self.done = true;
        let residue = (self.key.clone(), std::mem::take(&mut self.data));
        self.backend.lock().residue.push(residue);
    }
}

impl Drop for FlawedWriter {
    fn drop(&mut self) {
        self.finish(true);
    }
}

async fn report(flaw: Flaw) -> conformance::Report {
    conformance::run_all(|| async move {
        Subject::new(Arc::new(Flawed::new(flaw))).capabilities(Capabilities::all())
    })
    .await
}

fn assert_caught(report: &conformance::Report, flaw: Flaw, checks: &[&str]) {
    for check in checks {
        assert!(
            matches!(report.verdict(check), Some(Verdict::Failed(_))),
            "{flaw:?} was not caught by {check}:\n{report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unflawed_backend_passes() {
    let report = report(Flaw::None).await;
    assert!(report.failed().is_empty(), "{report}");
    assert_eq!(
        report.verdict("durable_on_ok"),
        Some(&Verdict::Skipped("the subject has no reopen".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_before_checks_is_caught() {
    let report = report(Flaw::PublishesEarly).await;
    assert_caught(
        &report,
        Flaw::PublishesEarly,
        &[
            "atomic_publish",
            "length_and_digest_enforced",
            "no_poison_after_abort",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temp_left_on_abort_is_caught() {
    let report = report(Flaw::LeaksOnAbort).await;
    assert_caught(
        &report,
        Flaw::LeaksOnAbort,
        &["no_poison_after_abort", "no_poison_after_drop"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_defeats_deadlines_is_caught() {
    let report = report(Flaw::BlocksThread).await;
    assert_caught(&report, Flaw::BlocksThread, &["deadlines_enforced"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_concurrent_writers_are_caught() {
    let report = report(Flaw::MixesWriters).await;
    assert_caught(
        &report,
        Flaw::MixesWriters,
        &["one_winner_overwrite", "one_winner_create_only"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committing_after_an_upstream_error_is_caught() {
    let report = report(Flaw::PublishesOnAbort).await;
    assert_caught(
        &report,
        Flaw::PublishesOnAbort,
        &[
            "upstream_error_never_committed",
            "no_poison_after_abort",
            "detach_on_cache_error",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_a_partial_entry_after_a_crash_is_caught() {
    let report = report(Flaw::SalvagesCrashes).await;
    assert_caught(&report, Flaw::SalvagesCrashes, &["recover_sweeps"]);
}

#[test]
fn the_fuzzer_catches_a_partial_entry_after_a_crash() {
    let found = std::panic::catch_unwind(|| {
        safedisk_testkit::fuzz::replay(
            || async { Subject::new(Arc::new(Flawed::new(Flaw::SalvagesCrashes))) },
            "replay: seed=1; write@nth=2:crash | b0:0:o:- w0:100 w0:100 R g0",
        );
    });
    let message = found.expect_err("the fuzzer passed a backend that salvages crashes");
    let text = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(text.contains("replay:"), "{text}");
}

#[test]
fn the_fuzzer_finds_mixed_writers_on_its_own() {
    let found = std::panic::catch_unwind(|| {
        // Fixed seed and case count: this test is about the fuzzer's
        // power, not about exploring.
        let config = safedisk_testkit::fuzz::FuzzConfig::new().cases(64).seed(1);
        safedisk_testkit::fuzz::check_backend_with(config, || async {
            Subject::new(Arc::new(Flawed::new(Flaw::MixesWriters)))
        });
    });
    assert!(
        found.is_err(),
        "the fuzzer passed a backend that mixes writers"
    );
}
