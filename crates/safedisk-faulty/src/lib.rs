//! Seeded, replayable fault injection for SafeDisk backends and object
//! stores.
//!
//! A cache must survive a full disk, a quota, a failing fsync, a stalled
//! object store and a process killed half-way, and tests must be able to
//! produce each of these on demand, at an exact point, the same way every
//! run. This crate wraps:
//!
//! - any [`CacheBackend`](safedisk_core::CacheBackend) in [`Faulty`], and
//! - any [`ObjectStore`](object_store::ObjectStore) in [`FaultyStore`],
//!
//! and injects the faults of a [`FaultPlan`]: a seed and a list of rules,
//! each a [`FaultPoint`] (begin, the nth write, after N bytes, commit before
//! or after publish, abort, get, remove, recover, put, the nth part upload,
//! complete, list), a [`FaultAction`] (an error of any kind or errno, a
//! short write, a stall until cancelled, a delay, a throughput limit,
//! corruption on read, a simulated crash) and a [`Trigger`] (always, once,
//! the nth time, every kth time, with a seeded probability).
//!
//! Plans have a one-line text form, so a failing case replays from a line
//! in a test log:
//!
//! ```text
//! seed=42; write@after=1MiB:enospc; commit:stall; write@nth=3:eio/once; get:corrupt/p=0.25
//! ```
//!
//! Every injected fault is kept as a [`FaultRecord`]: the rule, the point,
//! the key, the bytes so far and the time since the wrapper was made.
//!
//! # Determinism
//!
//! Counts and random draws are per rule and per wrapper. The same plan,
//! over the same sequence of calls on a fresh wrapper, injects the same
//! faults; concurrent calls reach points in whatever order they run, so
//! replays need the calls made in the same order.
//!
//! # Example: a disk that fills after 4 bytes
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use bytes::Bytes;
//! use safedisk_core::{CacheBackend, CacheKey, ErrorKind, Fill, MemoryBackend, WriteOptions};
//! use safedisk_faulty::{FaultPlan, Faulty};
//!
//! let plan: FaultPlan = "seed=1; write@after=4:short".parse()?;
//! let backend = Faulty::new(MemoryBackend::new(), plan);
//! let key = CacheKey::new("pypi", "six-1.16.0.tar.gz")?;
//!
//! let mut fill = Fill::begin(&backend, &key, WriteOptions::new()).await?;
//! let err = fill.write(Bytes::from_static(b"abcdefgh")).await.unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::ShortWrite);
//! assert_eq!(backend.records()[0].to_string().split_once(' ').unwrap().1,
//!     "rule 0 write@after=4:short on pypi:six-1.16.0.tar.gz at 0 bytes");
//! assert_eq!(backend.pending().await?, 0);
//! # Ok(())
//! # }
//! ```

mod backend;
mod inject;
mod plan;
mod record;
mod store;

pub use backend::Faulty;
pub use plan::{FaultAction, FaultPlan, FaultPoint, FaultRule, InvalidRule, ParseError, Trigger};
pub use record::FaultRecord;
pub use store::FaultyStore;
