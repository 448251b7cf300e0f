//! [`FsWriter`]: one fill into one exclusive, locked temp file.

use std::fmt;
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use safedisk_core::{
    CacheError, CacheKey, CacheWriter, EntryMetadata, ErrorKind, FillSummary, Operation, WriteMode,
    WriteOptions,
};
use tokio::task::JoinHandle;

use crate::capacity::{CLOSED, Refused, Slot, add_to_charge, allocated};
use crate::root::{EntryPath, PLACEHOLDER, Root};
use crate::{NAME, blocking, format, io_error, joined};

/// How often, in bytes written, a fill of unknown length checks the free
/// space floor: 4 MiB.
const SPACE_CHECK_EVERY: u64 = 4 * 1024 * 1024;

/// With durability on, each full window of this many bytes is handed to
/// the disk's writeback as soon as it is written: 8 MiB.
const WRITE_BEHIND: u64 = 8 * 1024 * 1024;

/// A temp file under `tmp/`, unlinked when dropped unless disarmed.
///
/// The file is `flock`ed for as long as its descriptor is open: that lock
/// is what tells a recovery sweep this file has a live writer.
pub(crate) struct TempFile {
    root: Arc<Root>,
    name: String,
    file: Arc<File>,
    /// Unlink the name on drop.
    armed: bool,
    /// Bytes this fill holds in `Root::reserved`.
    reserved: u64,
    /// What this fill holds under the size limit.
    charge: Charge,
}

/// Space a fill holds in the size limit's reservations, given back on
/// drop. Shared with the hand-offs, which raise it as a fill of unknown
/// length grows.
pub(crate) struct Charge {
    root: Arc<Root>,
    bytes: Arc<AtomicU64>,
}

impl Charge {
    /// Reserves `bytes` for a new fill. Blocking (it may evict).
    fn take(root: &Arc<Root>, bytes: u64) -> Result<Self, Refused> {
        root.reserve(bytes)?;
        Ok(Self {
            root: root.clone(),
            bytes: Arc::new(AtomicU64::new(bytes)),
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let held = self.bytes.swap(CLOSED, Ordering::Relaxed);
        if held != CLOSED {
            self.root.capacity.release(held);
        }
    }
}

/// Raises a fill's charge to `target` bytes, reserving the difference.
/// Blocking (it may evict).
fn grow_charge(root: &Root, charge: &AtomicU64, target: u64) -> Result<(), Refused> {
    let held = charge.load(Ordering::Relaxed);
    if held == CLOSED || target <= held {
        return Ok(());
    }
    root.reserve(target - held)?;
    add_to_charge(&root.capacity, charge, target - held);
    Ok(())
}

/// The error of a reservation the size limit refused.
fn refused(refusal: Refused, op: Operation, key: &CacheKey) -> CacheError {
    CacheError::new(ErrorKind::NoSpace, op, NAME)
        .with_key(key)
        .with_detail(format!("size limit reached: {}", refusal.0))
}

impl TempFile {
    /// The name is gone from `tmp/`: nothing to unlink on drop.
    fn mark_published(&mut self) {
        self.armed = false;
    }

    /// Closes the descriptor (releasing the lock) but leaves the file
    /// where it is, as a killed process would.
    fn close_keeping_name(mut self) {
        self.armed = false;
        drop(self);
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed
            && let Err(err) = self.root.unlink_temp(&self.name)
        {
            tracing::warn!(backend = NAME, temp = %self.name, error = %err,
                "could not remove an abandoned temp file; recover() will sweep it");
        }
        if self.reserved > 0 {
            self.root
                .reserved
                .fetch_sub(self.reserved, Ordering::Relaxed);
        }
    }
}

/// The disk backend's writer.
///
/// Chunks gather (without copying) until [`FsOptions::write_buffer`] bytes
/// are waiting, then go to the file in one `writev` loop on tokio's
/// blocking pool. One hand-off runs while the next batch gathers, so the
/// fill's hashing and the disk overlap; a hand-off's error surfaces at the
/// next hand-off or at commit. No file I/O runs on an async worker thread.
///
/// [`FsOptions::write_buffer`]: crate::FsOptions::write_buffer
pub(crate) struct FsWriter {
    temp: Option<TempFile>,
    key: CacheKey,
    path: EntryPath,
    mode: WriteMode,
    metadata: EntryMetadata,
    /// Chunks waiting for the next hand-off, and their total length.
    gathered: Vec<Bytes>,
    gathered_len: usize,
    buffer_cap: usize,
    /// The hand-off running on the blocking pool; it gives back its
    /// emptied list for reuse.
    in_flight: Option<JoinHandle<Result<Vec<Bytes>, CacheError>>>,
    /// Header bytes before the data.
    header_len: u64,
    /// Data bytes handed to the file so far.
    on_disk: u64,
    /// Data bytes after which the next floor check runs.
    next_space_check: u64,
}

impl fmt::Debug for FsWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsWriter")
            .field("key", &self.key)
            .field("temp", &self.temp.as_ref().map(|t| &t.name))
            .field("on_disk", &self.on_disk)
            .field("gathered", &self.gathered_len)
            .finish_non_exhaustive()
    }
}

impl FsWriter {
    /// Checks space, creates the temp file, writes a placeholder header and
    /// reserves the expected length. Blocking.
    pub(crate) fn begin(
        root: Arc<Root>,
        key: CacheKey,
        options: &WriteOptions,
    ) -> Result<Self, CacheError> {
        let fail = |err| io_error(err, Operation::Begin, &key);
        let header = format::encode(&key, &options.metadata, &PLACEHOLDER);
        let needed = options.expected_len.map(|len| len + header.len() as u64);

        // Room under the size limit first: evicting frees disk space that
        // the floor check below then sees.
        let charged = root
            .capacity
            .round_up(needed.unwrap_or(header.len() as u64));
        let charge = Charge::take(&root, charged)
            .map_err(|refusal| refused(refusal, Operation::Begin, &key))?;

        let guard = root.space.lock().unwrap_or_else(|e| e.into_inner());
        let (free, floor) = root.free_and_floor().map_err(fail)?;
        let reserved = root.reserved.load(Ordering::Relaxed);
        let wanted = needed.unwrap_or(0);
        if free < floor.saturating_add(reserved).saturating_add(wanted) {
            return Err(CacheError::new(ErrorKind::NoSpace, Operation::Begin, NAME)
                .with_key(&key)
                .with_detail(format!(
                    "{wanted} bytes wanted, {free} free, floor {floor}, \
                     {reserved} reserved by fills in flight"
                )));
        }

        let (file, name) = root.create_temp().map_err(fail)?;
        let mut temp = TempFile {
            root: root.clone(),
            name,
            file: Arc::new(file),
            armed: true,
            reserved: 0,
            charge,
        };
        (&*temp.file).write_all(&header).map_err(fail)?;

        // Reserve the blocks now so a full disk is reported before the
        // first byte streams. Filesystems without fallocate get a
        // bookkeeping reservation instead, checked by later begins.
        if let Some(total) = needed.filter(|_| root.options.reserve_space) {
            match rustix::fs::fallocate(&*temp.file, FallocateFlags::KEEP_SIZE, 0, total) {
                Ok(()) => {}
                Err(Errno::OPNOTSUPP | Errno::NOSYS) => {
                    root.reserved.fetch_add(total, Ordering::Relaxed);
                    temp.reserved = total;
                }
                Err(err) => return Err(fail(err.into())),
            }
        }
        drop(guard);

        Ok(Self {
            temp: Some(temp),
            path: EntryPath::of(&key),
            key,
            mode: options.mode,
            metadata: options.metadata.clone(),
            gathered: Vec::new(),
            gathered_len: 0,
            buffer_cap: root.options.write_buffer,
            in_flight: None,
            header_len: header.len() as u64,
            on_disk: 0,
            next_space_check: match options.expected_len {
                Some(_) => u64::MAX,
                None => SPACE_CHECK_EVERY,
            },
        })
    }

    fn gone(&self, op: Operation) -> CacheError {
        CacheError::new(ErrorKind::Aborted, op, NAME)
            .with_key(&self.key)
            .with_detail("writer already finished")
    }

    /// Waits for the running hand-off, if any; returns its emptied list.
    async fn settle(&mut self, op: Operation) -> Result<Vec<Bytes>, CacheError> {
        match self.in_flight.take() {
            Some(handle) => joined(handle.await, op, &self.key),
            None => Ok(Vec::new()),
        }
    }

    /// Starts writing the gathered chunks, after the previous hand-off is
    /// done (so at most two batches are held at once).
    async fn hand_off(&mut self) -> Result<(), CacheError> {
        let spare = self.settle(Operation::Write).await?;
        let Some(temp) = &self.temp else {
            return Err(self.gone(Operation::Write));
        };

        // A fill of unknown length reserves as it grows, before the batch
        // goes to the disk: this write fails if the batch cannot fit. Room
        // that needs evicting is made on the blocking pool.
        let after = self.on_disk + self.gathered_len as u64;
        let target = temp.root.capacity.round_up(self.header_len + after);
        let charge = temp.charge.bytes.clone();
        if !temp.root.capacity.try_grow(&charge, target) {
            let root = temp.root.clone();
            let key = self.key.clone();
            blocking(Operation::Write, &self.key, move || {
                grow_charge(&root, &charge, target)
                    .map_err(|refusal| refused(refusal, Operation::Write, &key))
            })
            .await?;
        }
        let Some(temp) = &self.temp else {
            return Err(self.gone(Operation::Write));
        };

        let batch = std::mem::replace(&mut self.gathered, spare);
        let before = self.on_disk;
        self.gathered_len = 0;
        let check_space = after >= self.next_space_check;
        let write_behind = (temp.root.durable() && before / WRITE_BEHIND != after / WRITE_BEHIND)
            .then(|| self.header_len + (after / WRITE_BEHIND - 1) * WRITE_BEHIND);
        let file = temp.file.clone();
        let root = temp.root.clone();
        let key = self.key.clone();

        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let fail = |err| io_error(err, Operation::Write, &key);
            let mut batch = batch;
            write_all_chunks(&file, &batch).map_err(fail)?;
            if let Some(start) = write_behind {
                start_writeback(&file, start, WRITE_BEHIND);
            }
            if check_space {
                let (free, floor) = root.free_and_floor().map_err(fail)?;
                if free < floor {
                    return Err(CacheError::new(ErrorKind::NoSpace, Operation::Write, NAME)
                        .with_key(&key)
                        .with_detail(format!("{free} bytes free, under the floor of {floor}")));
                }
            }
            batch.clear();
            Ok(batch)
        }));

        self.on_disk = after;
        if check_space {
            self.next_space_check = after + SPACE_CHECK_EVERY;
        }
        Ok(())
    }
}

#[async_trait]
impl CacheWriter for FsWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        if self.temp.is_none() {
            return Err(self.gone(Operation::Write));
        }
        if chunk.is_empty() {
            return Ok(());
        }
        self.gathered_len += chunk.len();
        self.gathered.push(chunk);
        if self.gathered_len < self.buffer_cap {
            return Ok(());
        }
        self.hand_off().await
    }

    async fn commit(mut self: Box<Self>, summary: FillSummary) -> Result<(), CacheError> {
        let Some(mut temp) = self.temp.take() else {
            return Err(self.gone(Operation::Commit));
        };
        self.settle(Operation::Commit).await?;
        let header = format::encode(&self.key, &self.metadata, &summary);
        let batch = std::mem::take(&mut self.gathered);
        let key = self.key.clone();
        let path = self.path.clone();
        let create_only = self.mode == WriteMode::CreateOnly;

        blocking(Operation::Commit, &self.key, move || {
            let fail = |err| io_error(err, Operation::Commit, &key);
            let file = &*temp.file;
            let root = &temp.root;

            write_all_chunks(file, &batch).map_err(fail)?;
            file.write_all_at(&header, 0).map_err(fail)?;

            // A failed sync drops `temp`, which unlinks it: the bytes are
            // never published, and the sync is never retried.
            if root.durable() {
                rustix::fs::fdatasync(file).map_err(|e| {
                    fail(e.into()).with_detail("fdatasync failed; nothing published")
                })?;
            }

            // Charge what the file really takes before it counts as used.
            let stat = rustix::fs::fstat(file).map_err(|e| fail(e.into()))?;
            let size = allocated(&stat);
            let charge = &temp.charge.bytes;
            grow_charge(root, charge, size)
                .map_err(|refusal| refused(refusal, Operation::Commit, &key))?;
            root.capacity
                .release(charge.swap(size, Ordering::Relaxed) - size);

            root.publish(
                &temp.name,
                &path,
                create_only,
                file,
                charge,
                Slot::of(&stat),
            )
            .map_err(fail)?;
            root.evict_ahead();
            temp.mark_published();
            Ok(())
        })
        .await
    }

    async fn abort(mut self: Box<Self>) -> Result<(), CacheError> {
        // Let a running hand-off finish first, so its descriptor and the
        // blocks it wrote are released by the time abort returns; its
        // error no longer matters.
        let _ = self.settle(Operation::Abort).await;

        // Unlinking a large file frees its blocks, which can take a while;
        // that belongs on the blocking pool too.
        if let Some(temp) = self.temp.take() {
            blocking(Operation::Abort, &self.key, move || {
                drop(temp);
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    fn crash(mut self: Box<Self>) {
        // A killed process has no write in flight. Wait for a hand-off
        // already running (it shares the descriptor), so the descriptor and
        // its lock are really gone on return. It needs no runtime thread.
        if let Some(handle) = self.in_flight.take() {
            let _ = futures::executor::block_on(handle);
        }
        if let Some(temp) = self.temp.take() {
            temp.close_keeping_name();
        }
    }
}

/// Starts writing a range back to the disk without waiting for it, so the
/// disk works while the fill streams and the sync at commit has less left.
/// Advisory: an error of that writeback is reported by the sync at commit,
/// which then fails.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;

    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a system call on a descriptor that `file` keeps open for the
    // whole call; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Most slices passed to one `writev` (Linux's `IOV_MAX`).
const MAX_SLICES: usize = 1024;

/// Writes every byte of `chunks` at the file's position, looping over
/// short writes and `EINTR`.
fn write_all_chunks(file: &File, chunks: &[Bytes]) -> io::Result<()> {
    let (mut index, mut offset) = (0, 0);
    while index < chunks.len() {
        let end = chunks.len().min(index + MAX_SLICES);
        let mut slices = Vec::with_capacity(end - index);
        slices.push(IoSlice::new(&chunks[index][offset..]));
        slices.extend(chunks[index + 1..end].iter().map(|c| IoSlice::new(c)));

        let mut written = match (&*file).write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while written > 0 {
            let left = chunks[index].len() - offset;
            if written >= left {
                written -= left;
                index += 1;
                offset = 0;
            } else {
                offset += written;
                written = 0;
            }
        }
    }
    Ok(())
}
