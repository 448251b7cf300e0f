//! How an [`FsBackend`](crate::FsBackend) syncs, how much room it leaves
//! free, and whether it checks entries as it reads them.

/// Default size of a writer's in-memory write buffer: 256 KiB.
pub const DEFAULT_WRITE_BUFFER: usize = 256 * 1024;

/// What a successful commit promises about power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Durability {
    /// When commit returns `Ok`, the entry survives power loss: the temp
    /// file is `fdatasync`ed before the rename, and the entry's directory
    /// (and, when a shard directory had to be created for it, the
    /// parent of that directory) is `fsync`ed after
    /// it. A failed sync fails the commit; the fill is then never published
    /// or retried. The default.
    #[default]
    Durable,
    /// Nothing is synced. A commit is atomic for readers and survives the
    /// process being killed (the bytes are in the page cache), but after a
    /// power loss or kernel crash an entry committed in the last seconds may
    /// be missing, or present with wrong bytes; with
    /// [`FsOptions::verify_on_read`] such an entry is found and removed on
    /// its first read. For throwaway caches and benchmarks.
    NoSync,
}

/// Free space the backend never fills, checked when a fill begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SpaceFloor {
    /// Keep at least this many bytes free.
    Bytes(u64),
    /// Keep at least this percentage (0 to 100) of the filesystem's size
    /// free.
    Percent(u8),
}

impl Default for SpaceFloor {
    /// One percent of the filesystem.
    fn default() -> Self {
        Self::Percent(1)
    }
}

impl SpaceFloor {
    /// The floor in bytes on a filesystem of `total` bytes.
    pub fn bytes_of(self, total: u64) -> u64 {
        match self {
            Self::Bytes(bytes) => bytes,
            Self::Percent(percent) => {
                let percent = u128::from(percent.min(100));
                (u128::from(total) * percent / 100) as u64
            }
        }
    }
}

/// Options of an [`FsBackend`](crate::FsBackend).
///
/// ```
/// use safedisk_fs::{Durability, FsOptions, SpaceFloor};
///
/// let options = FsOptions::new()
///     .durability(Durability::NoSync)
///     .space_floor(SpaceFloor::Bytes(64 << 20))
///     .verify_on_read(true)
///     .max_size(20 << 30);
/// assert_eq!(options.write_buffer, 256 * 1024);
/// assert_eq!(options.max_size, Some(20 << 30));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FsOptions {
    /// What a commit promises. Default: [`Durability::Durable`].
    pub durability: Durability,
    /// Free space a new fill may not eat into. A fill whose expected length
    /// (plus what fills in flight have reserved) would go below it is
    /// refused at begin with `NoSpace`; a fill of unknown length is refused
    /// at begin when the floor is already reached, and fails with `NoSpace`
    /// when a periodic check during its writes finds the floor reached.
    /// Default: [`SpaceFloor::Percent(1)`](SpaceFloor::Percent).
    pub space_floor: SpaceFloor,
    /// Hash every entry while it is read and compare with the digest stored
    /// at commit. A mismatch removes the entry and ends the stream with an
    /// `IntegrityMismatch` error in place of its last chunk, so a reader
    /// never receives every byte of a corrupt entry (it may have received a
    /// prefix; an HTTP server must then reset the response). Costs one
    /// SHA-256 pass per read. Default: off.
    pub verify_on_read: bool,
    /// Reserve a fill's whole expected length with `fallocate` at begin,
    /// so a disk that cannot hold it fails the fill before the first byte
    /// streams, even when other processes fill the disk meanwhile. The
    /// reserved blocks start as unwritten extents that are converted as the
    /// data lands, which can cost throughput on synced writes; the `write`
    /// bench measures it (`safedisk, reserve_space off`). Without it, the
    /// free-space check at begin still refuses fills that do not fit at
    /// that moment. Default: on.
    pub reserve_space: bool,
    /// Bytes a writer gathers in memory before handing them to the disk in
    /// one blocking call; 0 writes every chunk as it comes. Larger buffers
    /// mean fewer hops to the blocking thread pool, at that much memory per
    /// fill in flight. Default: [`DEFAULT_WRITE_BUFFER`] (256 KiB).
    pub write_buffer: usize,
    /// Most space, in bytes allocated on disk, that published entries and
    /// fills in flight may take together. A fill reserves its expected
    /// length (or, of unknown length, what it has written, batch by batch)
    /// in whole blocks; when a reservation would pass the limit, the least
    /// recently used entries are evicted first, and when that cannot make
    /// room the fill fails with `NoSpace` before its bytes reach the disk.
    /// Eviction also runs ahead of need, on the blocking pool, once more
    /// than 15/16 of the limit is taken (down to 14/16).
    /// Temp files left by dead writers are not counted. The
    /// [`space_floor`](Self::space_floor) applies on top. Default: `None`,
    /// no limit (entries are still indexed, for
    /// [`FsBackend::usage`](crate::FsBackend::usage)).
    pub max_size: Option<u64>,
}

impl Default for FsOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Durable,
            space_floor: SpaceFloor::default(),
            verify_on_read: false,
            reserve_space: true,
            write_buffer: DEFAULT_WRITE_BUFFER,
            max_size: None,
        }
    }
}

impl FsOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`durability`](Self::durability).
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Sets [`space_floor`](Self::space_floor).
    #[must_use]
    pub fn space_floor(mut self, floor: SpaceFloor) -> Self {
        self.space_floor = floor;
        self
    }

    /// Sets [`verify_on_read`](Self::verify_on_read).
    #[must_use]
    pub fn verify_on_read(mut self, verify: bool) -> Self {
        self.verify_on_read = verify;
        self
    }

    /// Sets [`reserve_space`](Self::reserve_space).
    #[must_use]
    pub fn reserve_space(mut self, reserve: bool) -> Self {
        self.reserve_space = reserve;
        self
    }

    /// Sets [`write_buffer`](Self::write_buffer).
    #[must_use]
    pub fn write_buffer(mut self, bytes: usize) -> Self {
        self.write_buffer = bytes;
        self
    }

    /// Sets [`max_size`](Self::max_size) to `Some(bytes)`.
    #[must_use]
    pub fn max_size(mut self, bytes: u64) -> Self {
        self.max_size = Some(bytes);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_in_bytes() {
        assert_eq!(SpaceFloor::Bytes(7).bytes_of(1000), 7);
        assert_eq!(SpaceFloor::Percent(1).bytes_of(1000), 10);
        assert_eq!(SpaceFloor::Percent(200).bytes_of(1000), 1000);
        assert_eq!(SpaceFloor::Percent(100).bytes_of(u64::MAX), u64::MAX);
    }
}
