//! The directory tree under the root, and every path operation on it.
//!
//! Every file is reached relative to a directory handle opened once, never
//! through a path string from the root of the filesystem, and never
//! through a symlink: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`
//! where the kernel has it, else one `openat(O_NOFOLLOW)` per component.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use safedisk_core::{CacheKey, FillSummary};

use crate::capacity::{Capacity, Slot};
use crate::{Durability, FsOptions};

pub(crate) const TMP_DIR: &str = "tmp";
pub(crate) const ENTRIES_DIR: &str = "entries";

/// Whether `openat2` is missing (old kernel, or refused by a seccomp
/// filter); then paths are walked one component at a time.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Where an entry lives under `entries/`: a shard directory named by the
/// first two hex digits of the key digest, then the digest itself. No part
/// comes from the key's text.
///
/// One level of 256 shards keeps directories small (4 096 entries each at
/// a million entries) while a commit almost never creates a directory,
/// which would cost extra syncs.
#[derive(Debug, Clone)]
pub(crate) struct EntryPath {
    pub(crate) shard: String,
    pub(crate) file: String,
}

impl EntryPath {
    pub(crate) fn of(key: &CacheKey) -> Self {
        let hex = key.digest_hex();
        Self {
            shard: hex[..2].to_owned(),
            file: hex,
        }
    }

    /// The path of the entry file named `file` (a key digest in hex).
    pub(crate) fn of_file(file: &str) -> Self {
        Self {
            shard: file[..2].to_owned(),
            file: file.to_owned(),
        }
    }

    pub(crate) fn relative(&self) -> String {
        format!("{}/{}", self.shard, self.file)
    }
}

/// The open root: handles on the root, `tmp/` and `entries/`, the options,
/// and space reserved by fills in flight.
#[derive(Debug)]
pub(crate) struct Root {
    pub(crate) path: PathBuf,
    pub(crate) dir: OwnedFd,
    pub(crate) tmp: OwnedFd,
    pub(crate) entries: OwnedFd,
    pub(crate) options: FsOptions,
    /// Bytes promised to fills in flight that the filesystem has not set
    /// aside itself (no `fallocate`).
    pub(crate) reserved: AtomicU64,
    /// Serialises the space check and the reservation that follows it, so
    /// two fills cannot both pass a check that only one of them fits.
    pub(crate) space: Mutex<()>,
    /// Makes temp file names unique within this process.
    pub(crate) counter: AtomicU64,
    /// The index of published entries and the size limit.
    pub(crate) capacity: Capacity,
}

impl Root {
    /// Opens (creating if needed) the root and its two directories.
    pub(crate) fn open(path: &Path, options: FsOptions) -> io::Result<Self> {
        std::fs::create_dir_all(path)?;
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;

        let mut created = false;
        for name in [TMP_DIR, ENTRIES_DIR] {
            created |= make_dir(&dir, name)?;
        }
        if created && options.durability == Durability::Durable {
            rustix::fs::fsync(&dir)?;
        }
        let tmp = open_dir(&dir, TMP_DIR)?;
        let entries = open_dir(&dir, ENTRIES_DIR)?;
        let block = rustix::fs::fstatvfs(&dir)?.f_frsize;
        let capacity = Capacity::open(&entries, options.max_size, block)?;

        Ok(Self {
            path: path.to_owned(),
            dir,
            tmp,
            entries,
            options,
            reserved: AtomicU64::new(0),
            space: Mutex::new(()),
            counter: AtomicU64::new(0),
            capacity,
        })
    }

    pub(crate) fn durable(&self) -> bool {
        self.options.durability == Durability::Durable
    }

    /// Free bytes for unprivileged writers, and the floor in bytes.
    pub(crate) fn free_and_floor(&self) -> io::Result<(u64, u64)> {
        let stat = rustix::fs::fstatvfs(&self.dir)?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        let total = stat.f_blocks.saturating_mul(stat.f_frsize);
        Ok((free, self.options.space_floor.bytes_of(total)))
    }

    /// Opens the shard directory of `path`'s entry, creating it when
    /// `create` is set. `Ok(None)` when it does not exist and `create` is
    /// not set.
    pub(crate) fn entry_dir(&self, path: &EntryPath, create: bool) -> io::Result<Option<OwnedFd>> {
        match open_dir(&self.entries, &path.shard) {
            Ok(fd) => return Ok(Some(fd)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }

        // A new directory's own name is durable only once its parent is
        // synced.
        if make_dir(&self.entries, &path.shard)? && self.durable() {
            rustix::fs::fsync(&self.entries)?;
        }
        open_dir(&self.entries, &path.shard).map(Some)
    }

    /// Opens a published entry for reading.
    pub(crate) fn open_entry(&self, path: &EntryPath) -> io::Result<Option<File>> {
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        match open_beneath(&self.entries, &path.relative(), flags) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the entry at `path` if it is still the file `file` (an
    /// overwrite may have replaced it meanwhile; the newer entry stays).
    pub(crate) fn remove_if_same(&self, path: &EntryPath, file: &File) -> io::Result<bool> {
        let Some(dir) = self.entry_dir(path, false)? else {
            return Ok(false);
        };
        let ours = rustix::fs::fstat(file)?;
        match rustix::fs::statat(&dir, path.file.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(now) if now.st_dev == ours.st_dev && now.st_ino == ours.st_ino => {}
            Ok(_) => return Ok(false),
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        match rustix::fs::unlinkat(&dir, path.file.as_str(), AtFlags::empty()) {
            Ok(()) => {
                self.capacity.forget(&path.file, ours.st_dev, ours.st_ino);
                Ok(true)
            }
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a temp file exclusively under `tmp/`, locked, and returns it
    /// with its name.
    pub(crate) fn create_temp(&self) -> io::Result<(File, String)> {
        let pid = rustix::process::getpid().as_raw_nonzero();
        let flags =
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let mode = Mode::RUSR | Mode::WUSR;

        // A name can be taken by a leftover of a dead process with the same
        // pid, or lost to a recovery sweep that locked it in the instant
        // between create and lock; either way, take the next name.
        let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
        for _ in 0..16 {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let name = format!("{pid}-{n}.tmp");
            let fd = match rustix::fs::openat(&self.tmp, name.as_str(), flags, mode) {
                Ok(fd) => fd,
                Err(Errno::EXIST) => {
                    last = Errno::EXIST.into();
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(Errno::WOULDBLOCK) => continue,
                Err(e) => {
                    let _ = rustix::fs::unlinkat(&self.tmp, name.as_str(), AtFlags::empty());
                    return Err(e.into());
                }
            }
            // Locked now, so no sweep can remove it from here on; but one
            // may have removed it before the lock was taken.
            if rustix::fs::fstat(&fd)?.st_nlink == 0 {
                continue;
            }
            return Ok((File::from(fd), name));
        }
        Err(last)
    }

    /// Unlinks a temp file by name; a name already gone is fine.
    pub(crate) fn unlink_temp(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.tmp, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Publishes temp file `name` as the entry at `path`, turns the fill's
    /// `charge` into the indexed entry `slot`, then syncs the entry's
    /// directory when durable. Returns `AlreadyExists` in create-only mode
    /// when an entry is there (the charge is then left as it was).
    pub(crate) fn publish(
        &self,
        name: &str,
        path: &EntryPath,
        create_only: bool,
        file: &File,
        charge: &AtomicU64,
        slot: Slot,
    ) -> io::Result<()> {
        let dir = self
            .entry_dir(path, true)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let target = path.file.as_str();

        if create_only {
            let flags = rustix::fs::RenameFlags::NOREPLACE;
            match rustix::fs::renameat_with(&self.tmp, name, &dir, target, flags) {
                Ok(()) => {}
                // No `RENAME_NOREPLACE` on this filesystem: a hard link
                // refuses an existing name the same way.
                Err(Errno::INVAL | Errno::NOSYS) => {
                    rustix::fs::linkat(&self.tmp, name, &dir, target, AtFlags::empty())?;
                    // Published now. A temp name left behind is only a
                    // second link to the entry; a sweep removes that name.
                    if let Err(err) = self.unlink_temp(name) {
                        tracing::warn!(backend = crate::NAME, temp = name, error = %err,
                            "temp name of a published entry not removed");
                    }
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            rustix::fs::renameat(&self.tmp, name, &dir, target)?;
        }
        self.capacity
            .published(&dir, target, charge.swap(0, Ordering::Relaxed), slot);

        if self.durable()
            && let Err(err) = rustix::fs::fsync(&dir)
        {
            // The entry is complete and verified, but its name may not
            // survive a power loss; take it back so commit can fail.
            let _ = self.remove_if_same(path, file);
            return Err(err.into());
        }
        Ok(())
    }

    /// Names in `tmp/`.
    pub(crate) fn temp_names(&self) -> io::Result<Vec<std::ffi::CString>> {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.tmp)? {
            let entry = entry?;
            let name = entry.file_name();
            if name != c"." && name != c".." {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    pub(crate) fn tmp_fd(&self) -> BorrowedFd<'_> {
        self.tmp.as_fd()
    }
}

/// The summary a placeholder header is written with at begin.
pub(crate) const PLACEHOLDER: FillSummary = FillSummary {
    len: 0,
    sha256: [0; 32],
};

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW
}

/// Creates directory `name` under `dir`; returns whether it was created.
fn make_dir(dir: &OwnedFd, name: &str) -> io::Result<bool> {
    match rustix::fs::mkdirat(dir, name, Mode::RWXU) {
        Ok(()) => Ok(true),
        Err(Errno::EXIST) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn open_dir(dir: &OwnedFd, name: &str) -> io::Result<OwnedFd> {
    open_beneath(dir, name, dir_flags())
}

/// Opens `path` (relative, `/`-separated) under `dir` without following any
/// symlink and without leaving `dir`. A symlink anywhere on the way fails
/// with `ELOOP` (or `ENOTDIR`).
pub(crate) fn open_beneath(dir: &OwnedFd, path: &str, flags: OFlags) -> io::Result<OwnedFd> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
        match rustix::fs::openat2(dir, path, flags, Mode::empty(), resolve) {
            Err(Errno::NOSYS | Errno::PERM) => NO_OPENAT2.store(true, Ordering::Relaxed),
            other => return other.map_err(Into::into),
        }
    }

    let mut parts = path.split('/').peekable();
    let mut current: Option<OwnedFd> = None;
    while let Some(part) = parts.next() {
        if part.is_empty() || part == "." || part == ".." {
            return Err(Errno::INVAL.into());
        }
        let base = current.as_ref().unwrap_or(dir);
        let step_flags = if parts.peek().is_some() {
            dir_flags()
        } else {
            flags | OFlags::NOFOLLOW
        };
        current = Some(rustix::fs::openat(base, part, step_flags, Mode::empty())?);
    }
    current.ok_or_else(|| Errno::INVAL.into())
}

/// A name from `tmp/` as text for reports.
pub(crate) fn display_name(name: &CStr) -> String {
    format!("{TMP_DIR}/{}", name.to_string_lossy())
}
