//! Reading a published entry: header first, then the bytes as a stream.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, BoxStream};
use safedisk_core::{CacheError, CacheKey, Entry, EntryMeta, ErrorKind, Operation};
use sha2::{Digest, Sha256};

use crate::format::{self, Header, HeaderError};
use crate::root::{EntryPath, Root};
use crate::{NAME, blocking, io_error, joined};

/// Bytes read with the header in the first call: a header at its limit,
/// and small entries whole.
const PREFETCH: usize = 128 * 1024;

/// Bytes per read after the first.
const READ_CHUNK: usize = 256 * 1024;

type Read = tokio::task::JoinHandle<Result<Bytes, CacheError>>;

/// An entry opened and its header checked. Blocking.
pub(crate) struct Opened {
    file: Arc<File>,
    reading: Reading,
    header: Header,
    first: Bytes,
}

/// How many times [`open`] tries again when the file it opened was
/// replaced by an overwrite before its reader was registered.
const REPLACED_RETRIES: usize = 16;

/// Opens the entry of `key`; a corrupt one is removed and reported as
/// `IntegrityMismatch`. Blocking.
///
/// An overwrite can replace the file between its open and the reader's
/// registration. The old file is then unlinked and its space no longer
/// counted, so it is not served: the path is opened again and the newer
/// entry read instead. Readers thus see the old entry or the new one,
/// never a miss, while an entry is being overwritten.
pub(crate) fn open(root: &Arc<Root>, key: &CacheKey) -> Result<Option<Opened>, CacheError> {
    for _ in 0..REPLACED_RETRIES {
        match open_once(root, key)? {
            Attempt::Missing => return Ok(None),
            Attempt::Opened(opened) => return Ok(Some(*opened)),
            Attempt::Replaced => continue,
        }
    }
    Err(CacheError::new(ErrorKind::Backend, Operation::Get, NAME)
        .with_key(key)
        .with_transient(true)
        .with_detail(format!(
            "the entry was replaced {REPLACED_RETRIES} times while it was being opened"
        )))
}

/// What one try of [`open`] found.
enum Attempt {
    /// No entry at the path.
    Missing,
    /// The entry, opened and registered.
    Opened(Box<Opened>),
    /// The file opened was unlinked before its reader was registered.
    Replaced,
}

fn open_once(root: &Arc<Root>, key: &CacheKey) -> Result<Attempt, CacheError> {
    let fail = |err| io_error(err, Operation::Get, key);
    let path = EntryPath::of(key);
    let Some(file) = root.open_entry(&path).map_err(fail)? else {
        return Ok(Attempt::Missing);
    };

    let size = file.metadata().map_err(fail)?.len();
    let mut prefix = vec![0u8; size.min(PREFETCH as u64) as usize];
    file.read_exact_at(&mut prefix, 0).map_err(fail)?;

    let header = match check(&prefix, size, key) {
        Ok(header) => header,
        Err(HeaderError::Version(version)) => {
            return Err(
                CacheError::new(ErrorKind::Unsupported, Operation::Get, NAME)
                    .with_key(key)
                    .with_detail(format!("entry format version {version} is not known")),
            );
        }
        Err(HeaderError::Corrupt(why)) => return Err(corrupt(root, &path, &file, key, why)),
    };

    let Some(reading) = Reading::start(root, &path, &file).map_err(fail)? else {
        return Ok(Attempt::Replaced);
    };

    let start = header.header_len as usize;
    let end = (start as u64 + header.summary.len).min(prefix.len() as u64) as usize;
    let first = Bytes::from(prefix).slice(start..end);
    Ok(Attempt::Opened(Box::new(Opened {
        file: Arc::new(file),
        reading,
        header,
        first,
    })))
}

/// A reader of an entry, as the size limit sees it: while it lives, the
/// entry's space counts even if the entry is evicted or removed, since
/// its blocks stay allocated until the descriptor closes.
pub(crate) struct Reading {
    root: Arc<Root>,
    dev: u64,
    ino: u64,
}

impl Reading {
    /// Registers a reader of `file` and marks the entry as just used.
    /// `None` when the file was unlinked already (removed, evicted or
    /// replaced by an overwrite): its space may no longer be counted.
    fn start(root: &Arc<Root>, path: &EntryPath, file: &File) -> io::Result<Option<Self>> {
        let stat = rustix::fs::fstat(file)?;
        root.capacity
            .reader_opened(&path.file, stat.st_dev, stat.st_ino);
        let reading = Self {
            root: root.clone(),
            dev: stat.st_dev,
            ino: stat.st_ino,
        };
        // Checked after registering: a file still linked now is unlinked
        // later, by someone who then sees this reader.
        if rustix::fs::fstat(file)?.st_nlink == 0 {
            return Ok(None);
        }
        Ok(Some(reading))
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.root.capacity.reader_closed(self.dev, self.ino);
    }
}

fn check(prefix: &[u8], size: u64, key: &CacheKey) -> Result<Header, HeaderError> {
    let header_len = format::declared_len(prefix)?;
    if header_len > prefix.len() {
        return Err(HeaderError::Corrupt("file shorter than its header"));
    }
    let header = format::decode(&prefix[..header_len])?;
    if header.namespace != key.namespace() || header.name != key.name() {
        return Err(HeaderError::Corrupt("entry belongs to another key"));
    }
    if header.header_len.checked_add(header.summary.len) != Some(size) {
        return Err(HeaderError::Corrupt("file size differs from its header"));
    }
    Ok(header)
}

/// Removes a corrupt entry (if it is still the one that was read) and
/// returns the error that reports it.
fn corrupt(root: &Root, path: &EntryPath, file: &File, key: &CacheKey, why: &str) -> CacheError {
    let removed = root.remove_if_same(path, file).unwrap_or(false);
    tracing::warn!(backend = NAME, key = %key, reason = why, removed,
        "corrupt cache entry found on read");
    CacheError::new(ErrorKind::IntegrityMismatch, Operation::Get, NAME)
        .with_key(key)
        .with_detail(format!("corrupt entry removed: {why}"))
}

/// Turns an opened entry into an [`Entry`] whose body reads the rest on
/// the blocking pool. With `verify`, a digest mismatch ends the body with
/// an error in place of its last chunk.
pub(crate) async fn into_entry(
    root: Arc<Root>,
    key: CacheKey,
    opened: Opened,
    verify: bool,
) -> Result<Entry, CacheError> {
    let Opened {
        file,
        reading,
        header,
        first,
    } = opened;
    let summary = header.summary;
    let in_first = first.len() as u64;

    // A small entry is whole in `first`: check it before handing it out.
    if verify && in_first == summary.len && Sha256::digest(&first)[..] != summary.sha256 {
        let path = EntryPath::of(&key);
        let key2 = key.clone();
        return Err(blocking(Operation::Get, &key, move || {
            Ok(corrupt(&root, &path, &file, &key2, "data digest mismatch"))
        })
        .await
        .unwrap_or_else(|e| e));
    }

    let body = Body {
        _reading: reading,
        root,
        key,
        file,
        offset: header.header_len + in_first,
        remaining: summary.len - in_first,
        undelivered: summary.len,
        ahead: None,
        first: (!first.is_empty()).then_some(first),
        hasher: (verify && in_first < summary.len).then(Sha256::new),
        expected: summary.sha256,
        done: false,
    };
    Ok(Entry {
        meta: EntryMeta::new(summary, header.metadata),
        body: body.into_stream(),
    })
}

struct Body {
    _reading: Reading,
    root: Arc<Root>,
    key: CacheKey,
    file: Arc<File>,
    /// Where the next read starts, and how many bytes no read has asked
    /// for yet.
    offset: u64,
    remaining: u64,
    /// Bytes not yet handed to the reader.
    undelivered: u64,
    /// The next chunk, being read while the reader sends the last one.
    ahead: Option<Read>,
    first: Option<Bytes>,
    hasher: Option<Sha256>,
    expected: [u8; 32],
    done: bool,
}

impl Body {
    fn into_stream(self) -> BoxStream<'static, Result<Bytes, CacheError>> {
        Box::pin(stream::unfold(self, |mut body| async move {
            if body.done {
                return None;
            }
            let result = body.next_chunk().await;
            if result.is_err() {
                body.done = true;
            }
            match result {
                Ok(Some(chunk)) => Some((Ok(chunk), body)),
                Ok(None) => None,
                Err(err) => Some((Err(err), body)),
            }
        }))
    }

    /// Starts reading the next chunk on the blocking pool, if any is left.
    fn read_ahead(&mut self) -> Option<Read> {
        if self.remaining == 0 {
            return None;
        }
        let n = self.remaining.min(READ_CHUNK as u64) as usize;
        let (file, offset, key) = (self.file.clone(), self.offset, self.key.clone());
        self.offset += n as u64;
        self.remaining -= n as u64;
        Some(tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, offset).map_err(|e| {
                CacheError::from_io(e, Operation::Get, NAME)
                    .with_key(&key)
                    .with_detail("entry shorter than its header says")
            })?;
            Ok(Bytes::from(buf))
        }))
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, CacheError> {
        // One read stays in flight ahead of the reader, so the disk and the
        // reader's socket work at the same time.
        let chunk = if let Some(first) = self.first.take() {
            first
        } else {
            let read = match self.ahead.take() {
                Some(read) => read,
                None => match self.read_ahead() {
                    Some(read) => read,
                    None => return Ok(None),
                },
            };
            joined(read.await, Operation::Get, &self.key)?
        };
        if self.ahead.is_none() {
            self.ahead = self.read_ahead();
        }
        self.undelivered -= chunk.len() as u64;

        if let Some(hasher) = &mut self.hasher {
            hasher.update(&chunk);
            if self.undelivered == 0 {
                let digest: [u8; 32] = std::mem::take(hasher).finalize().into();
                if digest != self.expected {
                    return Err(self.corrupt().await);
                }
            }
        }
        Ok(Some(chunk))
    }

    async fn corrupt(&self) -> CacheError {
        let root = self.root.clone();
        let file = self.file.clone();
        let key = self.key.clone();
        blocking(Operation::Get, &self.key, move || {
            let path = EntryPath::of(&key);
            Ok(corrupt(&root, &path, &file, &key, "data digest mismatch"))
        })
        .await
        .unwrap_or_else(|e| e)
    }
}
