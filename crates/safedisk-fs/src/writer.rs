//! [`FsWriter`]: one fill into one exclusive, locked temp file.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use bytes::Bytes;
use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use safedisk_core::{
    CacheError, CacheKey, CacheWriter, EntryMetadata, ErrorKind, FillSummary, Operation, WriteMode,
    WriteOptions,
};

use crate::root::{EntryPath, PLACEHOLDER, Root};
use crate::{NAME, blocking, format, io_error};

/// How often, in bytes written, a fill of unknown length checks the free
/// space floor: 4 MiB.
const SPACE_CHECK_EVERY: u64 = 4 * 1024 * 1024;

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
/// Small chunks gather in a buffer of [`FsOptions::write_buffer`] bytes;
/// full buffers and large chunks go to the file on tokio's blocking thread
/// pool, one `spawn_blocking` per hand-off, so no file I/O runs on an async
/// worker thread.
///
/// [`FsOptions::write_buffer`]: crate::FsOptions::write_buffer
pub(crate) struct FsWriter {
    temp: Option<TempFile>,
    key: CacheKey,
    path: EntryPath,
    mode: WriteMode,
    metadata: EntryMetadata,
    buffer: Vec<u8>,
    buffer_cap: usize,
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
            .field("buffered", &self.buffer.len())
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

        let guard = root.space.lock().unwrap_or_else(|e| e.into_inner());
        let (free, floor) = root.free_and_floor().map_err(fail)?;
        let reserved = root.reserved.load(Ordering::Relaxed);
        let wanted = needed.unwrap_or(0);
        if free < floor.saturating_add(reserved).saturating_add(wanted) {
            return Err(CacheError::new(ErrorKind::NoSpace, Operation::Begin, NAME)
                .with_key(&key)
                .with_detail(format!(
                    "{wanted} bytes wanted, {free} free, floor {floor}, {reserved} reserved by fills in flight"
                )));
        }

        let (file, name) = root.create_temp().map_err(fail)?;
        let mut temp = TempFile {
            root: root.clone(),
            name,
            file: Arc::new(file),
            armed: true,
            reserved: 0,
        };
        (&*temp.file).write_all(&header).map_err(fail)?;

        // Reserve the blocks now so a full disk is reported before the
        // first byte streams. Filesystems without fallocate get a
        // bookkeeping reservation instead, checked by later begins.
        if let Some(total) = needed {
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
            buffer: Vec::new(),
            buffer_cap: root.options.write_buffer,
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
}

#[async_trait]
impl CacheWriter for FsWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        let Some(temp) = &self.temp else {
            return Err(self.gone(Operation::Write));
        };
        if self.buffer.len() + chunk.len() <= self.buffer_cap {
            if self.buffer.capacity() == 0 {
                self.buffer.reserve_exact(self.buffer_cap);
            }
            self.buffer.extend_from_slice(&chunk);
            return Ok(());
        }

        // Hand the buffer and the chunk to the file in one blocking call; a
        // chunk smaller than the buffer starts the next buffer instead.
        let mut buffer = std::mem::take(&mut self.buffer);
        let direct = chunk.len() >= self.buffer_cap;
        let after =
            self.on_disk + buffer.len() as u64 + if direct { chunk.len() as u64 } else { 0 };
        let check_space = after >= self.next_space_check;
        let file = temp.file.clone();
        let root = temp.root.clone();
        let key = self.key.clone();

        let mut buffer = blocking(Operation::Write, &self.key, move || {
            let fail = |err| io_error(err, Operation::Write, &key);
            (&*file).write_all(&buffer).map_err(fail)?;
            if direct {
                (&*file).write_all(&chunk).map_err(fail)?;
            }
            if check_space {
                let (free, floor) = root.free_and_floor().map_err(fail)?;
                if free < floor {
                    return Err(CacheError::new(ErrorKind::NoSpace, Operation::Write, NAME)
                        .with_key(&key)
                        .with_detail(format!("{free} bytes free, under the floor of {floor}")));
                }
            }
            buffer.clear();
            if !direct {
                buffer.extend_from_slice(&chunk);
            }
            Ok(buffer)
        })
        .await?;

        self.on_disk = after;
        if check_space {
            self.next_space_check = after + SPACE_CHECK_EVERY;
        }
        std::mem::swap(&mut self.buffer, &mut buffer);
        Ok(())
    }

    async fn commit(mut self: Box<Self>, summary: FillSummary) -> Result<(), CacheError> {
        let Some(mut temp) = self.temp.take() else {
            return Err(self.gone(Operation::Commit));
        };
        let header = format::encode(&self.key, &self.metadata, &summary);
        let buffer = std::mem::take(&mut self.buffer);
        let key = self.key.clone();
        let path = self.path.clone();
        let create_only = self.mode == WriteMode::CreateOnly;

        blocking(Operation::Commit, &self.key, move || {
            let fail = |err| io_error(err, Operation::Commit, &key);
            let file = &*temp.file;
            let root = &temp.root;

            (&*file).write_all(&buffer).map_err(fail)?;
            file.write_all_at(&header, 0).map_err(fail)?;

            // A failed sync drops `temp`, which unlinks it: the bytes are
            // never published, and the sync is never retried.
            if root.durable() {
                rustix::fs::fdatasync(file).map_err(|e| {
                    fail(e.into()).with_detail("fdatasync failed; nothing published")
                })?;
            }

            root.publish(&temp.name, &path, create_only, file)
                .map_err(fail)?;
            temp.mark_published();
            Ok(())
        })
        .await
    }

    async fn abort(mut self: Box<Self>) -> Result<(), CacheError> {
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
        if let Some(temp) = self.temp.take() {
            temp.close_keeping_name();
        }
    }
}
