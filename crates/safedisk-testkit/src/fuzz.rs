//! Fault fuzzing: proptest strategies, and a state-machine test that runs
//! interleaved workloads on a backend wrapped in [`Faulty`] and checks
//! every invariant after every step against a model of what must be
//! visible.
//!
//! A failure shrinks to a minimal workload and plan and panics with one
//! line that replays it:
//!
//! ```text
//! replay: seed=7; commit:eio/once | b0:1:o:- w0:4096 c0 g1
//! ```
//!
//! which [`replay`] runs again. The number of cases is 24 by default and
//! `SAFEDISK_FUZZ_CASES` raises it for long runs; `SAFEDISK_FUZZ_SEED`
//! changes the otherwise fixed seed (see [`FuzzConfig`]).
//!
//! ```
//! use std::sync::Arc;
//! use safedisk_core::MemoryBackend;
//! use safedisk_testkit::conformance::{Capabilities, Subject};
//!
//! safedisk_testkit::fuzz::check_backend(|| async {
//!     Subject::new(Arc::new(MemoryBackend::new())).capabilities(Capabilities::memory())
//! });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use safedisk_core::{CacheKey, ErrorKind, Fill, WriteMode, WriteOptions};
use safedisk_faulty::{FaultAction, FaultPlan, FaultPoint, FaultRule, Faulty, Trigger};

use crate::conformance::{Subject, read};

/// Fills open at once in a workload.
pub const SLOTS: u8 = 3;

/// Keys a workload touches.
pub const KEYS: u8 = 3;

/// One step of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Begin a fill in a slot (dropping the slot's fill, if any), of a key,
    /// in a mode, declaring a length or not.
    Begin {
        /// Slot, below [`SLOTS`].
        slot: u8,
        /// Key index, below [`KEYS`].
        key: u8,
        /// Write mode.
        mode: WriteMode,
        /// Declared length.
        len: Option<u32>,
    },
    /// Write this many bytes to a slot's fill.
    Write {
        /// Slot.
        slot: u8,
        /// Bytes.
        bytes: u32,
    },
    /// Commit a slot's fill.
    Commit {
        /// Slot.
        slot: u8,
    },
    /// Abort a slot's fill.
    Abort {
        /// Slot.
        slot: u8,
    },
    /// Drop a slot's fill.
    Drop {
        /// Slot.
        slot: u8,
    },
    /// Read a key and compare with the model.
    Get {
        /// Key index.
        key: u8,
    },
    /// Remove a key.
    Remove {
        /// Key index.
        key: u8,
    },
    /// Sweep leftovers.
    Recover,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::Begin {
                slot,
                key,
                mode,
                len,
            } => {
                let mode = if mode == WriteMode::CreateOnly {
                    "c"
                } else {
                    "o"
                };
                match len {
                    Some(len) => write!(f, "b{slot}:{key}:{mode}:{len}"),
                    None => write!(f, "b{slot}:{key}:{mode}:-"),
                }
            }
            Op::Write { slot, bytes } => write!(f, "w{slot}:{bytes}"),
            Op::Commit { slot } => write!(f, "c{slot}"),
            Op::Abort { slot } => write!(f, "a{slot}"),
            Op::Drop { slot } => write!(f, "d{slot}"),
            Op::Get { key } => write!(f, "g{key}"),
            Op::Remove { key } => write!(f, "r{key}"),
            Op::Recover => f.write_str("R"),
        }
    }
}

/// A step of a workload's text form that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadOp(String);

impl fmt::Display for BadOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad workload step {:?}", self.0)
    }
}

impl std::error::Error for BadOp {}

impl FromStr for Op {
    type Err = BadOp;

    fn from_str(text: &str) -> Result<Self, BadOp> {
        let bad = || BadOp(text.to_owned());
        let (tag, rest) = text.split_at_checked(1).ok_or_else(bad)?;
        let fields: Vec<&str> = rest.split(':').collect();
        let num = |i: usize| -> Result<u32, BadOp> {
            fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(bad)
        };
        let small = |i: usize, below: u8| -> Result<u8, BadOp> {
            let n = num(i)?;
            if n < u32::from(below) {
                Ok(n as u8)
            } else {
                Err(bad())
            }
        };
        let op = match tag {
            "b" => Op::Begin {
                slot: small(0, SLOTS)?,
                key: small(1, KEYS)?,
                mode: match fields.get(2) {
                    Some(&"o") => WriteMode::Overwrite,
                    Some(&"c") => WriteMode::CreateOnly,
                    _ => return Err(bad()),
                },
                len: match fields.get(3) {
                    Some(&"-") => None,
                    Some(_) => Some(num(3)?),
                    None => return Err(bad()),
                },
            },
            "w" => Op::Write {
                slot: small(0, SLOTS)?,
                bytes: num(1)?,
            },
            "c" => Op::Commit {
                slot: small(0, SLOTS)?,
            },
            "a" => Op::Abort {
                slot: small(0, SLOTS)?,
            },
            "d" => Op::Drop {
                slot: small(0, SLOTS)?,
            },
            "g" => Op::Get {
                key: small(0, KEYS)?,
            },
            "r" => Op::Remove {
                key: small(0, KEYS)?,
            },
            "R" if rest.is_empty() => Op::Recover,
            _ => return Err(bad()),
        };
        Ok(op)
    }
}

/// A workload and the faults it runs under.
#[derive(Debug, Clone)]
pub struct Case {
    /// Faults injected into the backend.
    pub plan: FaultPlan,
    /// The steps.
    pub ops: Vec<Op>,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} |", self.plan)?;
        for op in &self.ops {
            write!(f, " {op}")?;
        }
        Ok(())
    }
}

impl FromStr for Case {
    type Err = Box<dyn std::error::Error + Send + Sync>;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (plan, ops) = text.split_once('|').ok_or("expected PLAN | OPS")?;
        let plan = plan.trim().parse::<FaultPlan>()?;
        let ops = ops
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<Vec<Op>, _>>()?;
        Ok(Case { plan, ops })
    }
}

/// Key names: one to three segments of path-like characters.
pub fn key_name() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-z0-9_-][a-z0-9._-]{0,11}", 1..=3)
        .prop_map(|segments| segments.join("/"))
        .prop_filter("no dot segments", |name| {
            name.split('/').all(|s| s != "." && s != "..")
        })
}

/// Payload sizes: mostly small, some around chunk boundaries, a few large.
pub fn payload_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..4096,
        2 => prop_oneof![Just(65_535usize), Just(65_536), Just(65_537)],
        1 => 4096usize..(512 * 1024),
    ]
}

/// How a payload of `len` bytes is cut into chunks.
pub fn chunking(len: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..=(len.max(1)), 0..8).prop_map(move |mut cuts| {
        cuts.push(0);
        cuts.push(len);
        cuts.sort_unstable();
        cuts.dedup();
        cuts.windows(2).map(|w| w[1] - w[0]).collect()
    })
}

/// One fault rule at a write-path point. Stalls are left out: they cost an
/// idle deadline each and the conformance suite covers them.
pub fn fault_rule() -> impl Strategy<Value = FaultRule> {
    let errno = prop_oneof![Just(28), Just(122), Just(5), Just(30), Just(27)];
    let action = prop_oneof![
        4 => errno.prop_map(FaultAction::Errno),
        1 => Just(FaultAction::ShortWrite),
        1 => Just(FaultAction::Crash),
        1 => Just(FaultAction::Delay(Duration::from_millis(1))),
    ];
    let point = prop_oneof![
        Just(FaultPoint::Begin),
        Just(FaultPoint::Write),
        (1u64..5).prop_map(FaultPoint::WriteNth),
        (1u64..200_000).prop_map(FaultPoint::WriteAfter),
        Just(FaultPoint::Commit),
        Just(FaultPoint::CommitPublished),
        Just(FaultPoint::Abort),
    ];
    let trigger = prop_oneof![
        Just(Trigger::Once),
        (1u64..4).prop_map(Trigger::Nth),
        (2u64..4).prop_map(Trigger::Every),
        Just(Trigger::Probability(0.3)),
    ];
    (point, action, trigger).prop_filter_map("the action applies at the point", |(p, a, t)| {
        FaultRule::new(p, a, t).ok()
    })
}

/// A plan of up to three rules.
pub fn fault_plan() -> impl Strategy<Value = FaultPlan> {
    (any::<u64>(), proptest::collection::vec(fault_rule(), 0..=3)).prop_map(|(seed, rules)| {
        rules
            .into_iter()
            .fold(FaultPlan::new(seed), FaultPlan::rule)
    })
}

/// One step.
pub fn op() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    let key = 0..KEYS;
    let mode = prop_oneof![3 => Just(WriteMode::Overwrite), 1 => Just(WriteMode::CreateOnly)];
    prop_oneof![
        3 => (slot.clone(), key.clone(), mode, proptest::option::weighted(0.3, 0u32..300_000))
            .prop_map(|(slot, key, mode, len)| Op::Begin { slot, key, mode, len }),
        5 => (slot.clone(), 0u32..100_000).prop_map(|(slot, bytes)| Op::Write { slot, bytes }),
        3 => slot.clone().prop_map(|slot| Op::Commit { slot }),
        1 => slot.clone().prop_map(|slot| Op::Abort { slot }),
        1 => slot.prop_map(|slot| Op::Drop { slot }),
        2 => key.clone().prop_map(|key| Op::Get { key }),
        1 => key.prop_map(|key| Op::Remove { key }),
        1 => Just(Op::Recover),
    ]
}

/// A workload of up to 40 steps under a plan.
pub fn case() -> impl Strategy<Value = Case> {
    (fault_plan(), proptest::collection::vec(op(), 1..40))
        .prop_map(|(plan, ops)| Case { plan, ops })
}

/// How many cases a fuzzing run makes, and from which seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FuzzConfig {
    /// Cases to run. Default: `SAFEDISK_FUZZ_CASES`, else 24.
    pub cases: u32,
    /// Seed of the case generator; the same seed makes the same cases.
    /// Default: `SAFEDISK_FUZZ_SEED`, else a fixed seed, so CI runs are
    /// repeatable; set the variable to explore.
    pub seed: u64,
}

impl Default for FuzzConfig {
    fn default() -> Self {
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        Self {
            cases: env("SAFEDISK_FUZZ_CASES").map_or(24, |n: u64| n as u32),
            seed: env("SAFEDISK_FUZZ_SEED").unwrap_or(0x5afe_d15c),
        }
    }
}

impl FuzzConfig {
    /// The defaults (from the environment where set).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`cases`](Self::cases).
    #[must_use]
    pub fn cases(mut self, cases: u32) -> Self {
        self.cases = cases;
        self
    }

    /// Sets [`seed`](Self::seed).
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// Runs the state-machine test on fresh subjects from `factory` with
/// [`FuzzConfig::default`]: each case gets a new backend wrapped in the
/// case's fault plan.
///
/// # Panics
///
/// On the first case that breaks an invariant, after shrinking it, with a
/// `replay:` line that [`replay`] accepts.
pub fn check_backend<F, Fut>(factory: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Subject>,
{
    check_backend_with(FuzzConfig::default(), factory);
}

/// [`check_backend`] with explicit case count and seed.
///
/// # Panics
///
/// As [`check_backend`].
pub fn check_backend_with<F, Fut>(config: FuzzConfig, factory: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Subject>,
{
    use proptest::test_runner::{RngAlgorithm, TestRng};

    let runtime = runtime();
    let proptest_config = Config {
        cases: config.cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&config.seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
    let mut runner = TestRunner::new_with_rng(proptest_config, rng);
    let result = runner.run(&case(), |case| {
        runtime
            .block_on(async { run_case(factory().await, &case).await })
            .map_err(|message| TestCaseError::fail(format!("{message}\nreplay: {case}")))
    });
    if let Err(err) = result {
        panic!(
            "fault fuzzing (seed {}) found a broken invariant: {err}",
            config.seed
        );
    }
}

/// Runs one case from its `replay:` line.
///
/// # Panics
///
/// When the line does not parse, or the case breaks an invariant.
pub fn replay<F, Fut>(factory: F, line: &str)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Subject>,
{
    let case: Case = line
        .trim()
        .trim_start_matches("replay:")
        .trim()
        .parse()
        .expect("replay line");
    let result = runtime().block_on(async { run_case(factory().await, &case).await });
    if let Err(message) = result {
        panic!("{message}\nreplay: {case}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// What a key may read as.
#[derive(Debug, Clone)]
enum Expect {
    /// Exactly this (None: absent).
    Known(Option<Vec<u8>>),
    /// Any of these: a commit failed in a way that may or may not have
    /// published (a fault after publish, a deadline during publish).
    OneOf(Vec<Option<Vec<u8>>>),
}

impl Expect {
    fn allows(&self, found: &Option<Vec<u8>>) -> bool {
        match self {
            Expect::Known(known) => known == found,
            Expect::OneOf(options) => options.contains(found),
        }
    }

    fn is_surely_present(&self) -> Option<bool> {
        match self {
            Expect::Known(known) => Some(known.is_some()),
            Expect::OneOf(options) => {
                let present = options.iter().filter(|o| o.is_some()).count();
                if present == options.len() {
                    Some(true)
                } else if present == 0 {
                    Some(false)
                } else {
                    None
                }
            }
        }
    }
}

struct Slot {
    fill: Fill,
    key: u8,
    mode: WriteMode,
    data: Vec<u8>,
}

/// Runs `case` on `subject`; `Err` names the first broken invariant.
pub async fn run_case(subject: Subject, case: &Case) -> Result<(), String> {
    let inner = subject.backend().clone();
    let backend = Faulty::from_arc(inner.clone(), case.plan.clone());
    let keys: Vec<CacheKey> = (0..KEYS)
        .map(|i| CacheKey::new("fuzz", format!("key-{i}.tgz")).expect("key"))
        .collect();
    let mut model: HashMap<u8, Expect> = (0..KEYS).map(|k| (k, Expect::Known(None))).collect();
    let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
    let options = |mode, len: Option<u32>| {
        let options = WriteOptions::new()
            .mode(mode)
            .idle_deadline(Duration::from_secs(2));
        match len {
            Some(len) => options.expected_len(u64::from(len)),
            None => options,
        }
    };

    for (step, op) in case.ops.iter().enumerate() {
        let at = |what: String| format!("step {step} ({op}): {what}");
        match *op {
            Op::Begin {
                slot,
                key,
                mode,
                len,
            } => {
                slots[slot as usize] = None;
                if let Ok(fill) =
                    Fill::begin(&backend, &keys[key as usize], options(mode, len)).await
                {
                    slots[slot as usize] = Some(Slot {
                        fill,
                        key,
                        mode,
                        data: Vec::new(),
                    });
                }
            }
            Op::Write { slot, bytes } => {
                if let Some(open) = slots[slot as usize].as_mut() {
                    let seed = step as u8;
                    let chunk: Vec<u8> = (0..bytes).map(|i| (i as u8) ^ seed).collect();
                    match open.fill.write(Bytes::from(chunk.clone())).await {
                        Ok(()) => open.data.extend_from_slice(&chunk),
                        Err(_) => slots[slot as usize] = None,
                    }
                }
            }
            Op::Commit { slot } => {
                if let Some(open) = slots[slot as usize].take() {
                    let expect = model.get_mut(&open.key).expect("key in model");
                    let before = expect.is_surely_present();
                    match open.fill.commit().await {
                        Ok(summary) => {
                            if summary.len != open.data.len() as u64 {
                                return Err(at(format!(
                                    "commit reported {} bytes, {} were written",
                                    summary.len,
                                    open.data.len()
                                )));
                            }
                            if open.mode == WriteMode::CreateOnly && before == Some(true) {
                                return Err(at("a create-only commit replaced an entry".into()));
                            }
                            *expect = Expect::Known(Some(open.data));
                        }
                        Err(err) if err.kind() == ErrorKind::AlreadyExists => {
                            if before == Some(false) {
                                return Err(at("create-only refused a key that is absent".into()));
                            }
                        }
                        Err(err) => {
                            // A failure after publish leaves either state.
                            let mut options = match expect.clone() {
                                Expect::Known(known) => vec![known],
                                Expect::OneOf(options) => options,
                            };
                            let may_have_published = !matches!(
                                err.kind(),
                                ErrorKind::LengthMismatch | ErrorKind::IntegrityMismatch
                            );
                            if may_have_published {
                                options.push(Some(open.data));
                                *expect = Expect::OneOf(options);
                            }
                        }
                    }
                }
            }
            Op::Abort { slot } => {
                if let Some(open) = slots[slot as usize].take() {
                    // An abort error is reported but the fill is gone
                    // either way.
                    let _ = open.fill.abort().await;
                }
            }
            Op::Drop { slot } => slots[slot as usize] = None,
            Op::Get { key } => {
                let found = read(&*inner, &keys[key as usize])
                    .await
                    .map_err(|e| at(format!("get failed: {e}")))?
                    .map(|(meta, data)| (meta.summary.len, data));
                if let Some((len, data)) = &found
                    && *len != data.len() as u64
                {
                    return Err(at(format!(
                        "metadata says {len} bytes, body has {}",
                        data.len()
                    )));
                }
                let found = found.map(|(_, data)| data);
                let expect = model.get_mut(&key).expect("key in model");
                if !expect.allows(&found) {
                    return Err(at(format!(
                        "read {} where the model allows {}",
                        describe(&found),
                        describe_expect(expect)
                    )));
                }
                *expect = Expect::Known(found);
            }
            Op::Remove { key } => {
                inner
                    .remove(&keys[key as usize])
                    .await
                    .map_err(|e| at(format!("remove failed: {e}")))?;
                model.insert(key, Expect::Known(None));
            }
            Op::Recover => {
                inner
                    .recover()
                    .await
                    .map_err(|e| at(format!("recover failed: {e}")))?;
                let open = slots.iter().flatten().count() as u64;
                let pending = inner.pending().await.map_err(|e| at(e.to_string()))?;
                if pending != open {
                    return Err(at(format!(
                        "after recover {pending} fills are pending, {open} are open"
                    )));
                }
            }
        }

        // After every step: every key reads as the model allows.
        for key in 0..KEYS {
            let found = read(&*inner, &keys[key as usize])
                .await
                .map_err(|e| at(format!("get failed: {e}")))?
                .map(|(_, data)| data);
            let expect = &model[&key];
            if !expect.allows(&found) {
                return Err(at(format!(
                    "key {key} reads {} where the model allows {}",
                    describe(&found),
                    describe_expect(expect)
                )));
            }
        }
    }

    // At the end nothing may be left once the fills are gone and leftovers
    // swept.
    drop(slots);
    inner
        .recover()
        .await
        .map_err(|e| format!("final recover failed: {e}"))?;
    let pending = inner.pending().await.map_err(|e| e.to_string())?;
    if pending != 0 {
        return Err(format!(
            "{pending} fills pending after every fill ended and recover ran"
        ));
    }
    Ok(())
}

fn describe(found: &Option<Vec<u8>>) -> String {
    match found {
        Some(data) => format!("{} bytes", data.len()),
        None => "nothing".into(),
    }
}

fn describe_expect(expect: &Expect) -> String {
    match expect {
        Expect::Known(known) => describe(known),
        Expect::OneOf(options) => options
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join(" or "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest! {
        #[test]
        fn the_workload_text_form_round_trips(case in case()) {
            let text = case.to_string();
            let parsed: Case = text.parse().unwrap();
            prop_assert_eq!(parsed.to_string(), text);
            prop_assert_eq!(parsed.ops, case.ops);
        }

        #[test]
        fn chunkings_cover_the_payload(
            (len, cuts) in payload_len().prop_flat_map(|len| (Just(len), chunking(len)))
        ) {
            prop_assert_eq!(cuts.iter().sum::<usize>(), len);
            prop_assert!(cuts.iter().all(|&c| c > 0));
        }

        #[test]
        fn generated_key_names_are_valid(name in key_name()) {
            prop_assert!(CacheKey::new("fuzz", name).is_ok());
        }
    }

    #[test]
    fn bad_steps_are_refused() {
        for text in ["", "x1", "b9:0:o:-", "w0", "b0:0:z:-", "R1"] {
            assert!(text.parse::<Op>().is_err(), "{text:?} parsed");
        }
    }
}
