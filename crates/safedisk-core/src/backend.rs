//! The traits a storage backend implements.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::{CacheError, CacheKey, EntryMetadata, WriteOptions};

/// The length and SHA-256 of a fill's bytes, as counted and hashed by
/// [`Fill`](crate::Fill) while they streamed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FillSummary {
    /// Number of bytes.
    pub len: u64,
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
}

impl FillSummary {
    /// The digest as lowercase hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

impl fmt::Debug for FillSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FillSummary")
            .field("len", &self.len)
            .field("sha256", &self.sha256_hex())
            .finish()
    }
}

/// What is known about a published entry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryMeta {
    /// Length and digest of the bytes.
    pub summary: FillSummary,
    /// The metadata given at begin.
    pub metadata: EntryMetadata,
}

impl EntryMeta {
    /// An entry's metadata.
    pub fn new(summary: FillSummary, metadata: EntryMetadata) -> Self {
        Self { summary, metadata }
    }

    /// The entry's length in bytes.
    pub fn len(&self) -> u64 {
        self.summary.len
    }

    /// Whether the entry has no bytes.
    pub fn is_empty(&self) -> bool {
        self.summary.len == 0
    }
}

/// A published entry: its metadata and a stream of exactly `meta.len()`
/// bytes.
///
/// The stream reads the entry as it was when [`CacheBackend::get`] returned,
/// even if the key is overwritten or removed meanwhile. A stream that cannot
/// deliver every byte ends with an error, never early.
pub struct Entry {
    /// Length, digest and metadata.
    pub meta: EntryMeta,
    /// The bytes.
    pub body: BoxStream<'static, Result<Bytes, CacheError>>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

/// What [`CacheBackend::recover`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// One line per leftover removed: a temp file's path, an upload id.
    pub removed: Vec<String>,
    /// Bytes freed, where the backend can tell.
    pub bytes: u64,
}

/// How much a backend holds, as reported by [`CacheBackend::usage`] for
/// metrics.
///
/// Build one from [`Usage::default`] and set the fields the backend counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Usage {
    /// Published entries.
    pub entries: u64,
    /// Space the published entries take, in bytes. A disk backend counts
    /// allocated blocks, not lengths.
    pub bytes_used: u64,
    /// Space held by or promised to fills in flight, in bytes.
    pub bytes_reserved: u64,
    /// The most the backend will hold, if it has a limit.
    pub limit: Option<u64>,
    /// Entries evicted to stay under the limit since the backend opened.
    pub evictions: u64,
}

/// A place to keep cache entries: a directory, an object store bucket,
/// memory.
///
/// Backends implement the storage steps; the lifecycle rules that every
/// backend shares (length and digest checks, deadlines, poisoning after a
/// cancelled call) live in [`Fill`](crate::Fill), which callers use instead
/// of calling [`begin`](Self::begin) themselves.
///
/// The trait is object safe; it is used as `Arc<dyn CacheBackend>`.
#[async_trait]
pub trait CacheBackend: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and errors, such as `fs` or `s3`.
    fn name(&self) -> &str;

    /// Starts a fill of `key`, returning the backend's writer.
    ///
    /// Nothing is visible under `key` until the writer's
    /// [`commit`](CacheWriter::commit) returns `Ok`. A backend may refuse
    /// here, before any byte is streamed: no space for
    /// `options.expected_len`, an option it does not support.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves nothing behind: any temp state created so
    /// far is released.
    ///
    /// # Errors
    ///
    /// Any kind; [`NoSpace`](crate::ErrorKind::NoSpace) when the backend
    /// knows up front that the entry cannot fit.
    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError>;

    /// Opens the published entry under `key`, or `None` when there is none.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future has no effect on the entry.
    ///
    /// # Errors
    ///
    /// [`IntegrityMismatch`](crate::ErrorKind::IntegrityMismatch) for an
    /// entry found corrupt (which the backend then removes); storage errors.
    async fn get(&self, key: &CacheKey) -> Result<Option<Entry>, CacheError>;

    /// Removes the published entry under `key`; returns whether there was
    /// one. Readers that already opened it read it to the end.
    ///
    /// # Cancel safety
    ///
    /// The entry may or may not be removed when the future is dropped.
    ///
    /// # Errors
    ///
    /// Storage errors.
    async fn remove(&self, key: &CacheKey) -> Result<bool, CacheError>;

    /// Sweeps what a dead process left (temp files, incomplete uploads) and
    /// returns what it removed. Fills of live writers are never touched;
    /// each backend documents the rule it uses to tell them apart.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the sweep; a later call continues it.
    ///
    /// # Errors
    ///
    /// Storage errors.
    async fn recover(&self) -> Result<RecoveryReport, CacheError>;

    /// How many unpublished fills hold resources now: temp files, open
    /// uploads, buffers. After every writer is committed, aborted or dropped
    /// this must be zero; leak probes and tests check it.
    ///
    /// # Errors
    ///
    /// Storage errors.
    async fn pending(&self) -> Result<u64, CacheError>;

    /// What the backend holds now, for metrics; `None` when it keeps no
    /// such count (the default: an object store bucket cannot tell
    /// cheaply). Called on every metrics scrape, so it must be cheap and
    /// must not block on I/O. Wrappers pass it through.
    fn usage(&self) -> Option<Usage> {
        None
    }
}

/// A backend's writer for one fill.
///
/// Callers drive it through [`Fill`](crate::Fill). A backend implements only
/// the storage steps; it may trust that [`commit`](Self::commit) is called
/// with the count and digest of exactly the bytes passed to
/// [`write`](Self::write), already checked against the options.
///
/// # Drop
///
/// Dropping a writer that was neither committed nor aborted must abort it
/// synchronously, or hand the work to a runtime captured at begin; it must
/// never need the dropping thread's runtime and never panic. Nothing may
/// become visible under the key.
#[async_trait]
pub trait CacheWriter: Send + fmt::Debug {
    /// Stores the next chunk.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: when the future is dropped the chunk may be partly
    /// stored. [`Fill`](crate::Fill) never calls this again after such a drop
    /// and aborts the writer instead.
    ///
    /// # Errors
    ///
    /// Any kind; after an error the writer is only aborted or dropped.
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError>;

    /// Makes the bytes durable (as the backend promises) and publishes them
    /// under the key in one step, with `summary` and the metadata from begin.
    ///
    /// # Cancel safety
    ///
    /// When the future is dropped the writer is dropped too, which aborts
    /// the fill. A backend whose publish step cannot be stopped once started
    /// (a rename already issued) may still publish the complete entry; it
    /// never publishes a partial one.
    ///
    /// # Errors
    ///
    /// [`AlreadyExists`](crate::ErrorKind::AlreadyExists) in create-only
    /// mode when another commit won; storage errors, including a failed
    /// fsync, after which nothing is published.
    async fn commit(self: Box<Self>, summary: FillSummary) -> Result<(), CacheError>;

    /// Abandons the fill and releases everything it holds.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the writer, which aborts it.
    ///
    /// # Errors
    ///
    /// A failure to release something (reported, since it may leak); the
    /// fill is abandoned either way.
    async fn abort(self: Box<Self>) -> Result<(), CacheError>;

    /// Simulates the process dying at this point, for fault injection and
    /// crash tests: release what only a live process holds (memory, file
    /// descriptors, tasks) but leave on storage whatever a killed process
    /// would leave there (a temp file, an incomplete upload), for
    /// [`CacheBackend::recover`] to sweep.
    ///
    /// Nothing may become visible under the key. The default drops the
    /// writer, which aborts it: right for a backend whose fills leave
    /// nothing behind when the process dies, such as memory.
    fn crash(self: Box<Self>) {}
}
