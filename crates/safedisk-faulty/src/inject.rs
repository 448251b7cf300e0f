//! Deciding which rules fire, and the waiting actions they share across
//! layers.

use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

use crate::{FaultAction, FaultPlan, FaultPoint, FaultRecord, Trigger};

/// A point reached by a call, with what the rules need to match it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Site {
    Begin,
    /// The `nth` write of a fill (from 1), of `len` bytes.
    Write {
        nth: u64,
        len: u64,
    },
    Commit,
    CommitPublished,
    Abort,
    Get,
    Remove,
    Recover,
    Put,
    PutPublished,
    /// The `nth` part of an upload (from 1).
    Part {
        nth: u64,
    },
    Complete,
    CompletePublished,
    List,
}

impl Site {
    /// Whether `point` is reached here, `bytes` having been accepted
    /// before this call.
    fn reaches(self, point: FaultPoint, bytes: u64) -> bool {
        use FaultPoint as P;
        match (point, self) {
            (P::Write, Self::Write { .. }) | (P::Part, Self::Part { .. }) => true,
            (P::WriteNth(n), Self::Write { nth, .. }) | (P::PartNth(n), Self::Part { nth }) => {
                n == nth
            }
            (P::WriteAfter(limit), Self::Write { len, .. }) => bytes.saturating_add(len) > limit,
            (P::Begin, Self::Begin)
            | (P::Commit, Self::Commit)
            | (P::CommitPublished, Self::CommitPublished)
            | (P::Abort, Self::Abort)
            | (P::Get, Self::Get)
            | (P::Remove, Self::Remove)
            | (P::Recover, Self::Recover)
            | (P::Put, Self::Put)
            | (P::PutPublished, Self::PutPublished)
            | (P::Complete, Self::Complete)
            | (P::CompletePublished, Self::CompletePublished)
            | (P::List, Self::List) => true,
            _ => false,
        }
    }
}

/// A rule that fired and is to be applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fired {
    pub(crate) rule: usize,
    pub(crate) point: FaultPoint,
    pub(crate) action: FaultAction,
    /// A seeded draw for corruption: the flipped offset is this modulo the
    /// entry's length.
    pub(crate) draw: u64,
}

impl Fired {
    /// A short lowercase detail for the error this fault produces.
    pub(crate) fn detail(&self) -> String {
        format!(
            "injected by fault rule {}, {}:{}",
            self.rule, self.point, self.action
        )
    }
}

/// The rules that fired at one call, in plan order, ending at the first
/// failing action.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    fired: Vec<Fired>,
}

impl Verdict {
    /// The failing action that ends the call, if any.
    pub(crate) fn failure(&self) -> Option<Fired> {
        self.fired
            .last()
            .copied()
            .filter(|fired| is_failure(fired.action))
    }

    /// Sleeps the delays (and the rate limits, for a call moving `len`
    /// bytes at once); never returns on a stall. Then returns the failure
    /// that ends the call, if any.
    ///
    /// A stall is a future that stays pending: dropping it, as a deadline
    /// does, is all it takes to end it.
    pub(crate) async fn wait(&self, len: Option<u64>) -> Option<Fired> {
        for fired in &self.fired {
            match fired.action {
                FaultAction::Delay(delay) => tokio::time::sleep(delay).await,
                FaultAction::Throughput(rate) => {
                    if let Some(len) = len {
                        tokio::time::sleep(transfer_time(len, rate)).await;
                    }
                }
                FaultAction::Stall => std::future::pending::<()>().await,
                _ => {}
            }
        }
        self.failure()
    }

    /// Whether a read's body must go through [`read_stream`](Self::read_stream).
    pub(crate) fn changes_reads(&self) -> bool {
        self.fired.iter().any(|fired| {
            matches!(
                fired.action,
                FaultAction::Throughput(_) | FaultAction::Corrupt
            )
        })
    }

    /// Applies the rate limits and corruption that fired to a stream of
    /// `len` bytes read back.
    pub(crate) fn read_stream<E: Send + 'static>(
        &self,
        len: u64,
        body: BoxStream<'static, Result<Bytes, E>>,
    ) -> BoxStream<'static, Result<Bytes, E>> {
        let mut body = body;
        for fired in &self.fired {
            body = match fired.action {
                FaultAction::Throughput(rate) => throttle(body, rate),
                FaultAction::Corrupt if len > 0 => corrupt(body, fired.draw % len),
                _ => body,
            };
        }
        body
    }
}

fn is_failure(action: FaultAction) -> bool {
    !matches!(
        action,
        FaultAction::Delay(_) | FaultAction::Throughput(_) | FaultAction::Corrupt
    )
}

/// How long `len` bytes take at `rate` bytes per second.
fn transfer_time(len: u64, rate: u64) -> Duration {
    let nanos = u128::from(len) * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

fn throttle<E: Send + 'static>(
    body: BoxStream<'static, Result<Bytes, E>>,
    rate: u64,
) -> BoxStream<'static, Result<Bytes, E>> {
    body.then(move |item| async move {
        if let Ok(chunk) = &item {
            tokio::time::sleep(transfer_time(chunk.len() as u64, rate)).await;
        }
        item
    })
    .boxed()
}

fn corrupt<E: Send + 'static>(
    body: BoxStream<'static, Result<Bytes, E>>,
    offset: u64,
) -> BoxStream<'static, Result<Bytes, E>> {
    let mut start = 0u64;
    body.map(move |item| {
        let chunk = item?;
        let end = start + chunk.len() as u64;
        let chunk = if (start..end).contains(&offset) {
            let mut flipped = BytesMut::from(&chunk[..]);
            flipped[(offset - start) as usize] ^= 0xff;
            flipped.freeze()
        } else {
            chunk
        };
        start = end;
        Ok(chunk)
    })
    .boxed()
}

/// The state behind one wrapper: per-rule counts and generators, and the
/// record of what was injected.
#[derive(Debug)]
pub(crate) struct Injector {
    plan: FaultPlan,
    created: Instant,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rules: Vec<RuleState>,
    records: Vec<FaultRecord>,
}

#[derive(Debug)]
struct RuleState {
    arrivals: u64,
    rng: ChaCha8Rng,
}

impl Injector {
    pub(crate) fn new(plan: FaultPlan) -> Self {
        // One stream per rule, so a rule added at the end never shifts the
        // draws of the others.
        let rules = (0..plan.rules().len())
            .map(|index| {
                let mut rng = ChaCha8Rng::seed_from_u64(plan.seed());
                rng.set_stream(index as u64);
                RuleState { arrivals: 0, rng }
            })
            .collect();
        Self {
            plan,
            created: Instant::now(),
            state: Mutex::new(State {
                rules,
                records: Vec::new(),
            }),
        }
    }

    pub(crate) fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    pub(crate) fn records(&self) -> Vec<FaultRecord> {
        self.lock().records.clone()
    }

    /// Counts the arrival at `site` for every rule whose point it is, asks
    /// their triggers, and records the rules that fired up to the first
    /// failing one.
    pub(crate) fn decide(&self, site: Site, key: &dyn fmt::Display, bytes: u64) -> Verdict {
        let mut state = self.lock();
        let mut fired = Vec::new();

        for (index, rule) in self.plan.rules().iter().enumerate() {
            if !site.reaches(rule.point(), bytes) {
                continue;
            }
            let rule_state = &mut state.rules[index];
            rule_state.arrivals += 1;
            let fires = match rule.trigger() {
                Trigger::Always => true,
                Trigger::Once => rule_state.arrivals == 1,
                Trigger::Nth(n) => rule_state.arrivals == n,
                Trigger::Every(k) => rule_state.arrivals.is_multiple_of(k),
                Trigger::Probability(p) => rule_state.rng.random_bool(p),
            };
            if !fires {
                continue;
            }
            let draw = match rule.action() {
                FaultAction::Corrupt => rule_state.rng.random(),
                _ => 0,
            };
            fired.push(Fired {
                rule: index,
                point: rule.point(),
                action: rule.action(),
                draw,
            });
        }

        // Arrivals are counted for every rule above, so triggers do not
        // depend on each other; only the rules up to the first failure act.
        if let Some(end) = fired.iter().position(|f| is_failure(f.action)) {
            fired.truncate(end + 1);
        }

        if fired.is_empty() {
            return Verdict { fired };
        }
        let elapsed = self.created.elapsed();
        let key = key.to_string();
        for f in &fired {
            tracing::debug!(rule = f.rule, point = %f.point, action = %f.action,
                key = %key, bytes, "fault injected");
            state.records.push(FaultRecord {
                rule: f.rule,
                point: f.point,
                action: f.action,
                key: key.clone(),
                bytes,
                elapsed,
            });
        }
        Verdict { fired }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few infallible steps; a panic inside
        // one cannot leave the counts half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
