//! The size limit: an index of published entries (space on disk, last
//! use), the space promised to fills in flight, and least-recently-used
//! eviction.
//!
//! Every byte counted is a byte the filesystem allocated (`st_blocks`),
//! and the sum of three amounts never passes the limit:
//!
//! - `used`: entries in the index;
//! - `reserved`: promised to fills in flight (their expected length, or
//!   what they wrote so far), rounded up to whole blocks;
//! - `freeing`: entries taken out of the index whose unlink has not run
//!   yet; their blocks are still allocated.
//! - `held`: entries unlinked (evicted, removed or overwritten) while a
//!   reader still has them open: their blocks stay allocated until the
//!   last reader closes, so they still count.
//!
//! A reservation that does not fit takes least-recently-used entries out
//! of the index, unlinks them on the calling thread (always a blocking-pool
//! thread) and tries again. When the entries left cannot make room (what
//! is in flight or held by readers already fills the limit), the
//! reservation is refused; when another thread's unlinks are about to
//! make room, it waits for them (never for a reader).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rustix::fs::{AtFlags, FileType};
use rustix::io::Errno;

use crate::NAME;
use crate::root::{EntryPath, Root, open_dir};

/// What the backend holds, for metrics. See [`FsBackend::usage`].
///
/// [`FsBackend::usage`]: crate::FsBackend::usage
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct FsUsage {
    /// Published entries in the index.
    pub entries: u64,
    /// Space the published entries take on disk (allocated blocks).
    pub bytes_used: u64,
    /// Space promised to fills in flight, whole blocks.
    pub bytes_reserved: u64,
    /// Space of evicted entries whose unlink has not finished yet.
    pub bytes_freeing: u64,
    /// Space of entries unlinked while readers still have them open; it
    /// is freed, and stops counting, when the last of them closes.
    pub bytes_held_by_readers: u64,
    /// Entries evicted since open.
    pub evictions: u64,
    /// Space of the entries evicted since open.
    pub bytes_evicted: u64,
    /// [`FsOptions::max_size`](crate::FsOptions::max_size), if any.
    pub limit: Option<u64>,
}

/// The index and the reservations. Lives in [`Root`].
#[derive(Debug)]
pub(crate) struct Capacity {
    limit: Option<u64>,
    /// Allocation unit of the filesystem; reservations are rounded up to it.
    block: u64,
    state: Mutex<State>,
    /// Signalled when an unlink finishes or a reservation is released.
    freed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Published entries by file name (the key digest in hex).
    entries: HashMap<String, Slot>,
    /// File names by last use, oldest first.
    order: BTreeMap<u64, String>,
    clock: u64,
    used: u64,
    reserved: u64,
    freeing: u64,
    held: u64,
    /// Open readers per inode, and the space counted in `held` for the
    /// inode once it is unlinked.
    readers: HashMap<(u64, u64), Readers>,
    evictions: u64,
    bytes_evicted: u64,
}

#[derive(Debug, Default)]
struct Readers {
    open: u64,
    held: u64,
}

/// One published entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) bytes: u64,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    used_at: u64,
}

impl Slot {
    pub(crate) fn of(stat: &rustix::fs::Stat) -> Self {
        Self {
            bytes: allocated(stat),
            dev: stat.st_dev,
            ino: stat.st_ino,
            used_at: 0,
        }
    }
}

/// Space a file takes on disk.
pub(crate) fn allocated(stat: &rustix::fs::Stat) -> u64 {
    (stat.st_blocks as u64).saturating_mul(512)
}

/// An entry taken out of the index to be unlinked.
struct Victim {
    file: String,
    slot: Slot,
}

/// The value of a fill's charge once its fill is gone: a reservation that
/// lands after that (a hand-off that outlived a cancelled write) is given
/// back at once.
pub(crate) const CLOSED: u64 = u64::MAX;

/// Adds `bytes`, just reserved, to a fill's `charge`, or gives them back
/// when the fill is gone.
pub(crate) fn add_to_charge(capacity: &Capacity, charge: &AtomicU64, bytes: u64) {
    let added = charge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
        (held != CLOSED).then_some(held + bytes)
    });
    if added.is_err() {
        capacity.release(bytes);
    }
}

/// Why a reservation was refused: the text of a `NoSpace` error's detail.
#[derive(Debug)]
pub(crate) struct Refused(pub(crate) String);

impl Capacity {
    /// Scans `entries/` and indexes every published entry, least recently
    /// used first by access time (modification time when later).
    pub(crate) fn open(entries: &OwnedFd, limit: Option<u64>, block: u64) -> io::Result<Self> {
        let mut found = Vec::new();
        for shard in names(entries)? {
            if !is_hex(&shard, 2) {
                continue;
            }
            let dir = match open_dir(entries, &shard) {
                Ok(dir) => dir,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for file in names(&dir)? {
                if !is_hex(&file, 64) || !file.starts_with(&shard) {
                    continue;
                }
                let stat = match rustix::fs::statat(&dir, file.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                {
                    Ok(stat) => stat,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                };
                if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
                    continue;
                }
                let last_use = (stat.st_atime.max(stat.st_mtime), file.clone());
                found.push((last_use, Slot::of(&stat)));
            }
        }
        found.sort_unstable_by(|a, b| a.0.cmp(&b.0));

        let mut state = State::default();
        for ((_, file), slot) in found {
            state.insert(file, slot);
        }
        Ok(Self {
            limit,
            block: block.max(1),
            state: Mutex::new(state),
            freed: Condvar::new(),
        })
    }

    /// `bytes` rounded up to whole blocks.
    pub(crate) fn round_up(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.block).saturating_mul(self.block)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters now.
    pub(crate) fn usage(&self) -> FsUsage {
        let state = self.lock();
        FsUsage {
            entries: state.entries.len() as u64,
            bytes_used: state.used,
            bytes_reserved: state.reserved,
            bytes_freeing: state.freeing,
            bytes_held_by_readers: state.held,
            evictions: state.evictions,
            bytes_evicted: state.bytes_evicted,
            limit: self.limit,
        }
    }

    /// Raises a fill's `charge` to `target` bytes when that fits without
    /// evicting or waiting; `false` when it does not (then nothing
    /// changed). Does no I/O, so it may run on an async worker thread.
    pub(crate) fn try_grow(&self, charge: &AtomicU64, target: u64) -> bool {
        let held = charge.load(Ordering::Relaxed);
        if held == CLOSED || target <= held {
            return true;
        }
        let bytes = target - held;
        let mut state = self.lock();
        let fits = self.limit.is_none_or(|limit| {
            state.used + state.reserved + state.freeing + state.held + bytes <= limit
        });
        if fits {
            state.reserved += bytes;
            drop(state);
            add_to_charge(self, charge, bytes);
        }
        fits
    }

    /// Gives back `bytes` of a reservation.
    pub(crate) fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut state = self.lock();
        state.reserved = state.reserved.saturating_sub(bytes);
        drop(state);
        self.freed.notify_all();
    }

    /// Turns a fill's reservation of `charged` bytes into the entry
    /// `file` just renamed into `dir`, replacing the entry of that name if
    /// indexed. The caller has made `charged` equal the file's allocated
    /// size.
    pub(crate) fn published(&self, dir: &OwnedFd, file: &str, charged: u64, slot: Slot) {
        let mut state = self.lock();
        state.reserved = state.reserved.saturating_sub(charged);

        // Checked under the lock: when two commits of one key race, the
        // one whose file holds the name is indexed, whatever the order
        // their calls arrive in.
        match rustix::fs::statat(dir, file, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(now) if (now.st_dev, now.st_ino) == (slot.dev, slot.ino) => {}
            _ => return,
        }
        if let Some(old) = state.forget(file, None) {
            // Replaced by the rename: unlinked, maybe still being read.
            state.unlinked(old, false);
        }
        state.insert(file.to_owned(), slot);
        drop(state);
        self.freed.notify_all();
    }

    /// Drops `file` from the index after it was unlinked, if it is still
    /// the inode `(dev, ino)`.
    pub(crate) fn forget(&self, file: &str, dev: u64, ino: u64) {
        let mut state = self.lock();
        if let Some(slot) = state.forget(file, Some((dev, ino))) {
            state.unlinked(slot, false);
        }
    }

    /// A reader opened `file`, the inode `(dev, ino)` (whose link count
    /// the caller checks after this call): it counts as just used, and its
    /// space counts until [`reader_closed`](Self::reader_closed) even if
    /// it is unlinked meanwhile.
    pub(crate) fn reader_opened(&self, file: &str, dev: u64, ino: u64) {
        let mut state = self.lock();
        state.readers.entry((dev, ino)).or_default().open += 1;
        state.clock += 1;
        let now = state.clock;
        if let Some(slot) = state.entries.get_mut(file)
            && (slot.dev, slot.ino) == (dev, ino)
        {
            let before = std::mem::replace(&mut slot.used_at, now);
            state.order.remove(&before);
            state.order.insert(now, file.to_owned());
        }
    }

    /// The reader of [`reader_opened`](Self::reader_opened) closed.
    pub(crate) fn reader_closed(&self, dev: u64, ino: u64) {
        let mut state = self.lock();
        let Some(readers) = state.readers.get_mut(&(dev, ino)) else {
            return;
        };
        readers.open -= 1;
        if readers.open > 0 {
            return;
        }
        let held = readers.held;
        state.readers.remove(&(dev, ino));
        state.held -= held;
        drop(state);
        if held > 0 {
            self.freed.notify_all();
        }
    }
}

/// Sixteenths of the limit above which a pass evicts ahead of need.
pub(crate) const AHEAD_HIGH: u64 = 15;

/// Sixteenths of the limit such a pass evicts down to.
pub(crate) const AHEAD_LOW: u64 = 14;

impl State {
    fn insert(&mut self, file: String, mut slot: Slot) {
        self.clock += 1;
        slot.used_at = self.clock;
        self.used += slot.bytes;
        self.order.insert(slot.used_at, file.clone());
        self.entries.insert(file, slot);
    }

    /// Removes `file` from the index; with `inode`, only if it matches.
    fn forget(&mut self, file: &str, inode: Option<(u64, u64)>) -> Option<Slot> {
        let slot = *self.entries.get(file)?;
        if inode.is_some_and(|inode| inode != (slot.dev, slot.ino)) {
            return None;
        }
        self.entries.remove(file);
        self.order.remove(&slot.used_at);
        self.used -= slot.bytes;
        Some(slot)
    }

    /// The file of `slot` was unlinked; its space, counted in `freeing`
    /// when `was_freeing`, now counts in `held` while readers have it
    /// open, else not at all.
    fn unlinked(&mut self, slot: Slot, was_freeing: bool) {
        if was_freeing {
            self.freeing -= slot.bytes;
        }
        if let Some(readers) = self.readers.get_mut(&(slot.dev, slot.ino)) {
            readers.held += slot.bytes;
            self.held += slot.bytes;
        }
    }

    /// Takes least-recently-used entries out of the index until `needed`
    /// bytes are picked (or the index is empty); their space moves to
    /// `freeing`.
    fn pick(&mut self, needed: u64) -> Vec<Victim> {
        let mut victims = Vec::new();
        let mut picked = 0;
        while picked < needed {
            let Some((_, file)) = self.order.pop_first() else {
                break;
            };
            let Some(slot) = self.entries.remove(&file) else {
                continue;
            };
            self.used -= slot.bytes;
            self.freeing += slot.bytes;
            picked += slot.bytes;
            victims.push(Victim { file, slot });
        }
        self.evictions += victims.len() as u64;
        self.bytes_evicted += picked;
        victims
    }
}

impl Root {
    /// Reserves `bytes` (whole blocks) for a fill, evicting
    /// least-recently-used entries when the limit needs it. Blocking: it
    /// unlinks what it evicts, and may wait for another thread's unlinks.
    pub(crate) fn reserve(&self, bytes: u64) -> Result<(), Refused> {
        let capacity = &self.capacity;
        let mut state = capacity.lock();
        let Some(limit) = capacity.limit else {
            state.reserved += bytes;
            return Ok(());
        };

        loop {
            let busy = state.reserved + state.freeing + state.held;
            if state.used + busy + bytes <= limit {
                state.reserved += bytes;
                return Ok(());
            }
            if busy + bytes > limit {
                // Even an empty index would not make room. Unlinks in
                // progress may; fills in flight and readers may take long.
                if state.freeing > 0 {
                    state = capacity
                        .freed
                        .wait_timeout(state, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    continue;
                }
                return Err(Refused(format!(
                    "{bytes} bytes wanted; limit {limit}, {} reserved by fills in flight, \
                     {} held by readers of removed entries",
                    state.reserved, state.held
                )));
            }

            let needed = state.used + busy + bytes - limit;
            let victims = state.pick(needed);
            drop(state);
            self.evict(&victims);
            state = capacity.lock();
            for victim in &victims {
                state.unlinked(victim.slot, true);
            }
            capacity.freed.notify_all();
        }
    }

    /// Evicts ahead of need, so that fills seldom have to evict, and
    /// wait, themselves: when entries, reservations and readers' space
    /// pass [`AHEAD_HIGH`] sixteenths of the limit, least-recently-used
    /// entries are taken out of the index at once (down to [`AHEAD_LOW`]
    /// sixteenths) and unlinked by a task on the blocking pool. Their space
    /// counts as `freeing` until then.
    pub(crate) fn evict_ahead(self: &Arc<Self>) {
        let capacity = &self.capacity;
        let Some(limit) = capacity.limit else {
            return;
        };
        let mut state = capacity.lock();
        // Space already being freed is left out: another pass has it.
        let kept = state.used + state.reserved + state.held;
        if kept <= limit / 16 * AHEAD_HIGH {
            return;
        }
        let victims = state.pick(kept - limit / 16 * AHEAD_LOW);
        drop(state);
        if victims.is_empty() {
            return;
        }

        let root = self.clone();
        let pass = move || {
            root.evict(&victims);
            let mut state = root.capacity.lock();
            for victim in &victims {
                state.unlinked(victim.slot, true);
            }
            drop(state);
            root.capacity.freed.notify_all();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(pass)),
            Err(_) => pass(),
        }
    }

    /// Unlinks evicted entries (each only if its name still holds the
    /// indexed inode).
    fn evict(&self, victims: &[Victim]) {
        let mut bytes = 0;
        let mut removed = 0;
        for victim in victims {
            bytes += victim.slot.bytes;
            match self.unlink_entry(&victim.file, victim.slot) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(backend = NAME, file = %victim.file, error = %err,
                        "evicted entry could not be unlinked");
                }
            }
        }
        tracing::info!(
            backend = NAME,
            entries = removed,
            bytes,
            "evicted least recently used entries to make room"
        );
    }

    fn unlink_entry(&self, file: &str, slot: Slot) -> io::Result<bool> {
        let path = EntryPath::of_file(file);
        let Some(dir) = self.entry_dir(&path, false)? else {
            return Ok(false);
        };
        match rustix::fs::statat(&dir, file, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(now) if now.st_dev == slot.dev && now.st_ino == slot.ino => {}
            Ok(_) | Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        match rustix::fs::unlinkat(&dir, file, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

fn names(dir: &OwnedFd) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        if let Ok(name) = entry.file_name().to_str()
            && name != "."
            && name != ".."
        {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

fn is_hex(name: &str, len: usize) -> bool {
    name.len() == len && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
