//! The log of injected faults.

use std::fmt;
use std::time::Duration;

use crate::{FaultAction, FaultPoint};

/// One injected fault: which rule fired, where, on what, and when.
///
/// [`Faulty::records`](crate::Faulty::records) and
/// [`FaultyStore::records`](crate::FaultyStore::records) return these in
/// the order the faults were injected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultRecord {
    /// Index of the rule in the plan.
    pub rule: usize,
    /// The rule's point.
    pub point: FaultPoint,
    /// The rule's action.
    pub action: FaultAction,
    /// The cache key or object path, as text; empty for calls without one
    /// (`recover`, `list` without a prefix).
    pub key: String,
    /// Bytes the fill or upload had accepted before this call; 0 where
    /// that means nothing (begin, get, remove).
    pub bytes: u64,
    /// Time since the wrapper was created, by tokio's clock.
    pub elapsed: Duration,
}

impl fmt::Display for FaultRecord {
    /// One line: `+12ms rule 0 write@after=1MiB:enospc on npm:a at 1048576 bytes`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{:?} rule {} {}:{}",
            self.elapsed, self.rule, self.point, self.action
        )?;
        if !self.key.is_empty() {
            write!(f, " on {}", self.key)?;
        }
        write!(f, " at {} bytes", self.bytes)
    }
}
