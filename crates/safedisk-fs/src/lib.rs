//! A local disk backend for SafeDisk.
//!
//! [`FsBackend`] keeps each cache entry in one file under a root directory
//! and implements [`CacheBackend`], so it plugs into
//! [`safedisk_core::Cache`] and [`safedisk_core::Fill`] like any backend.
//!
//! # Layout
//!
//! ```text
//! root/
//!   tmp/                         temp files of fills in flight
//!     <pid>-<n>.tmp
//!   entries/                     published entries
//!     ab/ab12…(64 hex)           named by the key's digest, never its text
//! ```
//!
//! Both directories live on one filesystem, so publishing is a `rename`.
//! The root path itself is trusted as given (it may be a symlink, followed
//! once at open); nothing under it is.
//! Every operation is done relative to directory handles opened once, with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (or, where the kernel
//! lacks it, `openat(O_NOFOLLOW)` one component at a time): a symlink
//! planted anywhere under the root is refused, never followed, so nothing
//! outside the root is read, written or removed.
//!
//! # One fill
//!
//! 1. **Begin** reserves room under the size limit, evicting if needed
//!    ([`FsOptions::max_size`], see [Size limit](#size-limit)), checks the
//!    free-space floor ([`FsOptions::space_floor`]),
//!    creates `tmp/<pid>-<n>.tmp` with `O_CREAT | O_EXCL | O_NOFOLLOW |
//!    O_CLOEXEC` and mode 0600, takes an exclusive `flock` on it, writes a
//!    placeholder header, and when the expected length is known reserves
//!    the whole file with `fallocate` ([`FsOptions::reserve_space`]), so a
//!    full disk is a [`NoSpace`](ErrorKind::NoSpace) error before the first
//!    byte streams.
//!    On a filesystem without `fallocate` the reservation is kept in
//!    memory instead, and only fills of this backend value see it.
//! 2. **Write** gathers chunks, without copying, until
//!    [`FsOptions::write_buffer`] bytes wait, then writes them with `writev`
//!    in a loop that resumes after short writes and `EINTR`. With
//!    durability on, each full 8 MiB window is handed to the disk's
//!    writeback at once (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the
//!    disk works while the fill streams and the sync at commit has less
//!    left to do.
//! 3. **Commit** writes the rest and the final header (length, SHA-256 and
//!    metadata), `fdatasync`s the file, renames it into place (create-only
//!    mode uses `RENAME_NOREPLACE`, or `link` where that is missing, so the
//!    first commit wins), then `fsync`s the entry's directory. With
//!    [`Durability::NoSync`] both syncs are skipped.
//! 4. **Abort** and drop unlink the temp file and close its descriptor,
//!    right away on the calling thread (drop) or on the blocking pool
//!    (abort); neither needs a runtime to have been kept.
//! 5. **Remove** unlinks the entry, then `fsync`s its directory when
//!    durable, so a removed entry stays removed after power loss. Eviction
//!    does not sync: an evicted entry that survives a crash is still a
//!    whole, valid entry, and is counted again at the next open.
//!
//! Length and digest checks and deadlines are not here: [`Fill`] does them
//! for every backend before this backend's commit is called.
//!
//! # Blocking I/O
//!
//! File I/O never runs on an async worker thread. Each blocking step
//! (begin, a batch of writes, commit, abort, a read) is one
//! `tokio::task::spawn_blocking` call. While one batch is written on the
//! blocking pool, the next gathers and is hashed by [`Fill`], so hashing
//! and disk overlap; at most two batches are held per fill, and an error
//! of a batch surfaces at the next write or at commit.
//!
//! This was chosen by measurement (the `write` bench, 64 MiB objects, no
//! syncs, back-to-back runs): awaiting each batch before returning, so that
//! SHA-256 and the disk take turns, reached 0.29 of a plain write loop's
//! throughput; overlapping them reached 0.44. A dedicated thread per
//! fill fed by a channel would overlap the same way, plus a thread start
//! per fill; `spawn_blocking` gets the overlap from pooled threads, and
//! with batching a small entry needs only the begin and commit hand-offs.
//! Early writeback was measured too (synced 64 MiB writes, interleaved in
//! one run): started after every 256 KiB batch it cost throughput (0.72 of
//! none at all); started per 8 MiB window it gained (1.39 times none).
//!
//! The exception is dropping a writer, which unlinks its temp file on the
//! dropping thread because drop cannot wait. [`FsBackend::open`] is
//! blocking too; call it at startup or inside `spawn_blocking`.
//!
//! # One file per entry
//!
//! The header (format version, data length, SHA-256, the key, content
//! type, ETag, origin and user metadata, and a checksum of the header)
//! and the bytes are one file, published by one rename: data and metadata
//! can never disagree. [`get`](CacheBackend::get) checks the header, that
//! it names the key asked for, and that the file size matches; an entry
//! failing any check is removed and reported as
//! [`IntegrityMismatch`](ErrorKind::IntegrityMismatch). With
//! [`FsOptions::verify_on_read`] the bytes are hashed as they stream too.
//!
//! # Size limit
//!
//! The backend keeps an index of its published entries in memory: the
//! space each takes on disk (allocated blocks, `st_blocks * 512`, so the
//! limit holds on a real filesystem whatever the block size) and when it
//! was last used. [`FsBackend::open`] rebuilds it by scanning `entries/`
//! (one `stat` per entry, no header read), oldest access or modification
//! time first; temp files are not counted. The index is not persisted:
//! the scan is always right, even after a crash, and takes well under a
//! second for 100 000 entries (the `capacity` bench). A
//! [`get`](CacheBackend::get) marks its entry as just used.
//!
//! With [`FsOptions::max_size`] set, the space of published entries, of
//! fills in flight and of entries removed while still read never passes
//! the limit:
//!
//! 1. A fill that declares its expected length reserves it (header
//!    included, rounded up to whole blocks) at begin, before the
//!    free-space floor is checked; a fill of unknown length reserves what
//!    each batch of writes adds, before that batch reaches the disk. At
//!    commit the reservation becomes the file's real allocated size.
//! 2. Eviction runs ahead of need: when a commit leaves entries,
//!    reservations and readers' space above 15/16 of the limit, the least
//!    recently used entries are taken out of the index (down to 14/16)
//!    and a task on the blocking pool unlinks them; their space counts
//!    until it has. A reservation that still does not fit evicts
//!    least-recently-used entries itself, unlinking them on the blocking
//!    pool in the step that needed the room (never on an async worker
//!    thread). Each pass logs one `tracing` event with the entries and
//!    bytes removed. So a full cache holds between 14/16 and all of the
//!    limit.
//! 3. When eviction cannot make room, because what is left is reserved
//!    by fills in flight or held by readers, the fill fails with
//!    [`NoSpace`](ErrorKind::NoSpace) and no OS error code: at begin
//!    before a byte streams, or for a fill of unknown length at the write
//!    whose batch would pass the limit (that batch is never written).
//!    Room that fits without evicting is taken on the calling thread with
//!    no I/O; evicting for a batch costs that write one blocking hand-off.
//! 4. A reader holds its entry's descriptor, so an entry evicted (or
//!    removed, or overwritten) while it streams is read to the end. Its
//!    blocks stay allocated until the reader closes, and they stay
//!    counted until then ([`FsUsage::bytes_held_by_readers`]).
//!
//! [`FsBackend::usage`] returns the counters (entries, bytes used and
//! reserved, evictions) for metrics.
//!
//! # Crash recovery
//!
//! [`FsBackend::open`] runs [`recover`](CacheBackend::recover) before
//! serving. A writer holds its temp file's `flock` until it finishes; the
//! kernel releases it when the process dies. The sweep removes exactly the
//! temp files whose lock it can take without waiting, so a second live
//! process sharing the root loses nothing, however long its fills take.
//! `flock` must work between the processes sharing the root: any local
//! filesystem; not some network filesystems.
//!
//! # Known limits
//!
//! - A reader holding an entry open keeps reading the old bytes after a
//!   remove or an overwrite; the space is freed when it finishes.
//! - [`remove`](CacheBackend::remove) does not sync the directory: after
//!   a power loss a removed entry may come back (complete and valid).
//! - The space floor is checked at begin, and every 4 MiB of a fill of
//!   unknown length; between checks a fill can use space down to the
//!   filesystem's real limit, where writes fail with `NoSpace`.
//! - [`Fill`] hashes every fill with SHA-256 (about 1.1 GB/s on one core
//!   of the bench machine). On entries of a megabyte and more that, not the
//!   disk, sets the pace: a plain write loop that skips the hash is faster,
//!   one that hashes too is not.
//! - A small entry costs two hand-offs to the blocking pool (begin and
//!   commit) where a plain loop in one blocking task costs one.
//! - The index belongs to one [`FsBackend`] value (and its clones). Two
//!   processes, or two `open`s, sharing a root each count only what they
//!   saw at open and what they wrote since; each holds its own limit.
//! - Eviction picks by last use alone: an entry being read is evicted
//!   like any other when it is the least recently used, and then frees
//!   nothing until its reader closes, so a fill may evict more entries,
//!   or be refused, while long reads of old entries run.
//! - The order of last use is restored at open from access times, which
//!   `relatime` mounts update at most once a day; entries read since the
//!   last such update look older than they are.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use futures::{StreamExt, stream};
//! use safedisk_core::{Cache, CacheKey, WriteOptions};
//! use safedisk_fs::{FsBackend, FsOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let cache = Cache::new(Arc::new(FsBackend::open(dir.path(), FsOptions::new())?));
//! let key = CacheKey::new("pypi", "six-1.16.0-py2.py3-none-any.whl")?;
//! let upstream = stream::iter([Ok::<_, std::io::Error>(Bytes::from("wheel bytes"))]);
//!
//! let (body, fill) = cache.tee(&key, WriteOptions::new(), upstream).await;
//! let sent: Vec<_> = body.collect().await;
//! assert_eq!(sent.len(), 1);
//! assert!(fill.await.is_committed());
//!
//! let entry = cache.backend().get(&key).await?.expect("published");
//! assert_eq!(entry.meta.len(), 11);
//! # Ok(())
//! # }
//! ```

mod capacity;
mod format;
mod options;
mod read;
mod recover;
mod root;
mod writer;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use rustix::fs::AtFlags;
use rustix::io::Errno;
use safedisk_core::{
    CacheBackend, CacheError, CacheKey, CacheWriter, Entry, ErrorKind, Operation, RecoveryReport,
    Usage, WriteOptions,
};

#[cfg(doc)]
use safedisk_core::Fill;

pub use capacity::FsUsage;
pub use options::{DEFAULT_WRITE_BUFFER, Durability, FsOptions, SpaceFloor};

use root::{EntryPath, Root};
use writer::FsWriter;

/// The backend's name in errors and logs.
const NAME: &str = "fs";

/// A cache backend over a local directory. Cheap to clone; clones share
/// the open directory handles.
///
/// See the [crate docs](crate) for the layout, the write path and what
/// each setting promises.
#[derive(Debug, Clone)]
pub struct FsBackend {
    root: Arc<Root>,
}

impl FsBackend {
    /// Opens the cache at `root`, creating it and its layout if needed,
    /// sweeps temp files left by dead writers, and indexes the published
    /// entries (one `stat` each) before returning.
    ///
    /// Blocking: run it at startup or inside `spawn_blocking`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] and the other I/O kinds when the directories
    /// cannot be created or opened, including when `tmp/` or `entries/` is
    /// a symlink (refused, never followed), or when the sweep fails.
    pub fn open(root: impl AsRef<Path>, options: FsOptions) -> Result<Self, CacheError> {
        let root = root.as_ref();
        let open_err = |err: std::io::Error| {
            CacheError::from_io(err, Operation::Open, NAME)
                .with_detail(format!("cannot open cache root {}", root.display()))
        };

        let root = Arc::new(Root::open(root, options).map_err(open_err)?);
        recover::sweep(&root).map_err(|e| CacheError::from_io(e, Operation::Recover, NAME))?;
        Ok(Self { root })
    }

    /// The root directory, as given to [`open`](Self::open).
    pub fn root(&self) -> &Path {
        &self.root.path
    }

    /// The options in force.
    pub fn options(&self) -> &FsOptions {
        &self.root.options
    }

    /// The counters of the index and the size limit: entries, space used
    /// and reserved, evictions. Cheap (one short lock); for metrics.
    pub fn usage(&self) -> FsUsage {
        self.root.capacity.usage()
    }
}

#[async_trait]
impl CacheBackend for FsBackend {
    fn name(&self) -> &str {
        NAME
    }

    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        let root = self.root.clone();
        let owned_key = key.clone();
        let options = options.clone();
        let writer = blocking(Operation::Begin, key, move || {
            FsWriter::begin(root, owned_key, &options)
        })
        .await?;
        Ok(Box::new(writer))
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Entry>, CacheError> {
        let root = self.root.clone();
        let owned_key = key.clone();
        let opened = blocking(Operation::Get, key, move || read::open(&root, &owned_key)).await?;
        let Some(opened) = opened else {
            return Ok(None);
        };
        let verify = self.root.options.verify_on_read;
        read::into_entry(self.root.clone(), key.clone(), opened, verify)
            .await
            .map(Some)
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool, CacheError> {
        let root = self.root.clone();
        let owned_key = key.clone();
        blocking(Operation::Remove, key, move || {
            let fail = |err| io_error(err, Operation::Remove, &owned_key);
            let path = EntryPath::of(&owned_key);
            let Some(dir) = root.entry_dir(&path, false).map_err(fail)? else {
                return Ok(false);
            };
            let stat = match rustix::fs::statat(&dir, path.file.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            {
                Ok(stat) => stat,
                Err(Errno::NOENT) => return Ok(false),
                Err(e) => return Err(fail(e.into())),
            };
            match rustix::fs::unlinkat(&dir, path.file.as_str(), AtFlags::empty()) {
                Ok(()) => {
                    root.capacity.forget(&path.file, stat.st_dev, stat.st_ino);
                    // A removed entry must not come back after power loss:
                    // the caller may be purging something it must not serve.
                    if root.durable() {
                        rustix::fs::fsync(&dir).map_err(|e| fail(e.into()))?;
                    }
                    Ok(true)
                }
                Err(Errno::NOENT) => Ok(false),
                Err(e) => Err(fail(e.into())),
            }
        })
        .await
    }

    async fn recover(&self) -> Result<RecoveryReport, CacheError> {
        let root = self.root.clone();
        match tokio::task::spawn_blocking(move || recover::sweep(&root)).await {
            Ok(result) => result.map_err(|e| CacheError::from_io(e, Operation::Recover, NAME)),
            Err(_) => Err(
                CacheError::new(ErrorKind::Backend, Operation::Recover, NAME)
                    .with_detail("recovery sweep did not finish"),
            ),
        }
    }

    async fn pending(&self) -> Result<u64, CacheError> {
        let root = self.root.clone();
        match tokio::task::spawn_blocking(move || root.temp_names()).await {
            Ok(result) => result
                .map(|names| names.len() as u64)
                .map_err(|e| CacheError::from_io(e, Operation::Open, NAME)),
            Err(_) => Err(CacheError::new(ErrorKind::Backend, Operation::Open, NAME)
                .with_detail("temp area listing did not finish")),
        }
    }

    /// The index's counts, from [`usage`](FsBackend::usage): space of
    /// evicted entries not yet unlinked, or held open by readers, is left
    /// out here.
    fn usage(&self) -> Option<Usage> {
        let fs = self.root.capacity.usage();
        let mut usage = Usage::default();
        usage.entries = fs.entries;
        usage.bytes_used = fs.bytes_used;
        usage.bytes_reserved = fs.bytes_reserved;
        usage.limit = fs.limit;
        usage.evictions = fs.evictions;
        Some(usage)
    }
}

/// An I/O error as a cache error; a symlink met under the root (refused by
/// `RESOLVE_NO_SYMLINKS` or `O_NOFOLLOW`) is said so, and logged, since
/// someone planted it.
fn io_error(err: std::io::Error, op: Operation, key: &CacheKey) -> CacheError {
    let planted = matches!(
        err.raw_os_error(),
        Some(code) if code == Errno::LOOP.raw_os_error() || code == Errno::XDEV.raw_os_error()
    );
    let error = CacheError::from_io(err, op, NAME).with_key(key);
    if planted {
        tracing::warn!(backend = NAME, key = %key, operation = %op,
            "symlink found under the cache root; refused");
        error
            .with_detail("symlink under the cache root refused")
            .with_transient(false)
    } else {
        error
    }
}

/// Runs a blocking step on tokio's blocking pool.
async fn blocking<T, F>(op: Operation, key: &CacheKey, step: F) -> Result<T, CacheError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CacheError> + Send + 'static,
{
    joined(tokio::task::spawn_blocking(step).await, op, key)
}

/// The result of a finished blocking step.
fn joined<T>(
    result: Result<Result<T, CacheError>, tokio::task::JoinError>,
    op: Operation,
    key: &CacheKey,
) -> Result<T, CacheError> {
    match result {
        Ok(result) => result,
        Err(err) => {
            let detail = if err.is_panic() {
                "blocking step panicked"
            } else {
                "blocking step cancelled by runtime shutdown"
            };
            Err(CacheError::new(ErrorKind::Backend, op, NAME)
                .with_key(key)
                .with_detail(detail))
        }
    }
}
