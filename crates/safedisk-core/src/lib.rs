//! The cache-write contract of SafeDisk.
//!
//! A package proxy, artifact mirror or build cache streams an upstream
//! response to its client and, at the same time, into a cache. This crate
//! makes one promise about that path: **the cache never owns the request.**
//! A full disk, a quota, a failing or stalled store, or a slow cache may cost
//! a cache entry; it never blocks, truncates or fails the client's response,
//! and it never leaves a partial entry behind.
//!
//! # The pieces
//!
//! - [`CacheKey`]: a namespace and a name, validated at construction so no
//!   key can name a path outside its namespace.
//! - [`CacheBackend`] and [`CacheWriter`]: what a storage backend
//!   implements. [`MemoryBackend`] is the reference implementation; disk and
//!   object store backends live in their own crates.
//! - [`Fill`]: one write of one entry through any backend, with the rules
//!   every backend shares: length and digest checked before publish, idle
//!   and total deadlines on every backend call, abort on any failure.
//! - [`tee`] and [`TeeBody`]: stream to the client and into a fill at once;
//!   the fill detaches on failure, stall, panic or lag, and the client never
//!   notices.
//! - [`Health`] and [`Cache`]: a breaker fed by fill outcomes, so a cache
//!   that keeps failing is bypassed at no cost until a probe succeeds.
//!
//! # What every backend promises
//!
//! These hold for any backend that passes the conformance suite of
//! `safedisk-testkit`:
//!
//! 1. **Atomic publish.** A reader sees the old entry or the complete new
//!    one, never a prefix. Nothing is visible under a key until
//!    [`Fill::commit`] returns `Ok`.
//! 2. **No poison.** Failed, aborted and dropped fills leave nothing readable
//!    and, once finished, nothing pending ([`CacheBackend::pending`] is zero).
//!    [`CacheBackend::recover`] sweeps what a dead process left.
//! 3. **Drop aborts.** Dropping a writer aborts it without needing the
//!    caller's runtime.
//! 4. **One winner.** In [`WriteMode::Overwrite`] the last commit wins; in
//!    [`WriteMode::CreateOnly`] the first commit wins and the others fail
//!    with [`ErrorKind::AlreadyExists`]. Concurrent fills never mix bytes.
//! 5. **Typed errors.** Every failure is a [`CacheError`] with an
//!    [`ErrorKind`], the operation, the key and the backend, and a transient
//!    flag.
//!
//! # What each backend decides
//!
//! How durable "committed" is (the disk backend fsyncs file and directory by
//! default; memory lasts as long as the process), how it tells a live
//! writer's temp state from a dead process's in `recover`, whether it
//! reserves space at begin, and how long a reader may keep reading an entry
//! that was removed meanwhile.
//!
//! # Example: a miss in a proxy handler
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use futures::{StreamExt, stream};
//! use safedisk_core::{Cache, CacheKey, MemoryBackend, WriteOptions};
//!
//! let cache = Cache::new(Arc::new(MemoryBackend::with_capacity(4)));
//! let key = CacheKey::new("npm", "left-pad/-/left-pad-1.3.0.tgz")?;
//! let upstream = stream::iter([Ok::<_, std::io::Error>(Bytes::from("more than four bytes"))]);
//!
//! // The cache has room for 4 bytes; the fill fails, the client does not.
//! let (body, fill) = cache.tee(&key, WriteOptions::new(), upstream).await;
//! let sent: Vec<Bytes> = body.map(|chunk| chunk.unwrap()).collect().await;
//! assert_eq!(sent.concat(), b"more than four bytes");
//! assert!(!fill.await.is_committed());
//! assert!(cache.backend().get(&key).await?.is_none());
//! # Ok(())
//! # }
//! ```

mod backend;
mod cache;
mod error;
mod fill;
mod health;
mod key;
mod memory;
mod options;
mod tee;

pub use backend::{
    CacheBackend, CacheWriter, Entry, EntryMeta, FillSummary, RecoveryReport, Usage,
};
pub use cache::Cache;
pub use error::{CacheError, ErrorKind, Operation};
pub use fill::Fill;
pub use health::{
    BreakerConfig, BreakerState, DEFAULT_COOLDOWN, DEFAULT_FAILURE_THRESHOLD, Health,
    HealthSnapshot,
};
pub use key::{CacheKey, KeyError, MAX_NAME_LEN, MAX_NAMESPACE_LEN, MAX_SEGMENT_LEN};
pub use memory::MemoryBackend;
pub use options::{
    DEFAULT_IDLE_DEADLINE, DEFAULT_TOTAL_DEADLINE, EntryMetadata, MAX_METADATA_BYTES, WriteMode,
    WriteOptions,
};
pub use tee::{
    AbandonReason, BodyError, ClientGonePolicy, DEFAULT_BUFFER_BYTES, FillHandle, FillOutcome,
    LagPolicy, TeeBody, TeePolicy, tee,
};

/// The README's examples, compiled as doctests so they stay true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
