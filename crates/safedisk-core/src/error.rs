//! One error type for every backend: a kind, the operation, the key, the
//! backend, and the underlying cause.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::time::Duration;

use crate::CacheKey;

/// The class of a cache failure. Callers decide on this, not on messages.
///
/// New kinds may be added in minor releases, so matches need a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The device or the backend's configured limit has no room (`ENOSPC`).
    NoSpace,
    /// A user or project quota was exceeded (`EDQUOT`).
    QuotaExceeded,
    /// The entry is larger than a file may be (`EFBIG`, `RLIMIT_FSIZE`).
    FileTooLarge,
    /// A low-level I/O error (`EIO`), including a failed fsync.
    Io,
    /// The storage is read-only (`EROFS`).
    ReadOnly,
    /// A write stored fewer bytes than it was given and could not continue.
    ShortWrite,
    /// The fill's total deadline passed.
    DeadlineExceeded,
    /// One backend operation made no progress within the idle deadline.
    Stalled,
    /// The bytes do not have the SHA-256 that was promised, or a stored
    /// entry no longer matches its recorded digest.
    IntegrityMismatch,
    /// The number of bytes differs from the length that was promised.
    LengthMismatch,
    /// A create-only commit found the key already published.
    AlreadyExists,
    /// There is no entry under the key.
    NotFound,
    /// The writer was aborted or is unusable after an earlier failure or a
    /// cancelled call.
    Aborted,
    /// The backend does not support the operation or the option.
    Unsupported,
    /// The caller passed something the backend cannot accept (metadata too
    /// large, a bad option value).
    InvalidInput,
    /// A failure specific to the backend that fits no other kind: an object
    /// store's 5xx, a throttle, a connection reset.
    Backend,
}

impl ErrorKind {
    /// A short lowercase name, stable for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSpace => "no_space",
            Self::QuotaExceeded => "quota_exceeded",
            Self::FileTooLarge => "file_too_large",
            Self::Io => "io",
            Self::ReadOnly => "read_only",
            Self::ShortWrite => "short_write",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Stalled => "stalled",
            Self::IntegrityMismatch => "integrity_mismatch",
            Self::LengthMismatch => "length_mismatch",
            Self::AlreadyExists => "already_exists",
            Self::NotFound => "not_found",
            Self::Aborted => "aborted",
            Self::Unsupported => "unsupported",
            Self::InvalidInput => "invalid_input",
            Self::Backend => "backend",
        }
    }

    /// Every kind, in declaration order; for tests and metrics.
    pub const ALL: [ErrorKind; 16] = [
        Self::NoSpace,
        Self::QuotaExceeded,
        Self::FileTooLarge,
        Self::Io,
        Self::ReadOnly,
        Self::ShortWrite,
        Self::DeadlineExceeded,
        Self::Stalled,
        Self::IntegrityMismatch,
        Self::LengthMismatch,
        Self::AlreadyExists,
        Self::NotFound,
        Self::Aborted,
        Self::Unsupported,
        Self::InvalidInput,
        Self::Backend,
    ];

    /// Whether the same operation may succeed if tried again later without
    /// any change by the caller: space may be freed, a stall may clear, a
    /// 5xx may pass. The default for each kind; an error may override it
    /// (see [`CacheError::with_transient`]).
    pub fn default_transient(self) -> bool {
        matches!(
            self,
            Self::NoSpace
                | Self::QuotaExceeded
                | Self::Io
                | Self::ShortWrite
                | Self::DeadlineExceeded
                | Self::Stalled
                | Self::Backend
        )
    }

    /// Whether this kind says the storage itself is in trouble (full,
    /// failing or stalled), as opposed to a problem with one request's bytes
    /// or arguments. The cache breaker counts these.
    pub fn is_storage_failure(self) -> bool {
        matches!(
            self,
            Self::NoSpace
                | Self::QuotaExceeded
                | Self::Io
                | Self::ReadOnly
                | Self::ShortWrite
                | Self::DeadlineExceeded
                | Self::Stalled
                | Self::Backend
        )
    }

    /// The kind for a raw OS error number, where one fits.
    pub fn from_raw_os_error(errno: i32) -> Option<Self> {
        Some(match errno {
            28 => Self::NoSpace,        // ENOSPC
            122 => Self::QuotaExceeded, // EDQUOT
            27 => Self::FileTooLarge,   // EFBIG
            5 => Self::Io,              // EIO
            30 => Self::ReadOnly,       // EROFS
            17 => Self::AlreadyExists,  // EEXIST
            2 => Self::NotFound,        // ENOENT
            95 => Self::Unsupported,    // EOPNOTSUPP
            22 => Self::InvalidInput,   // EINVAL
            _ => return None,
        })
    }

    /// The kind for an I/O error: by its raw OS error number first, then by
    /// its [`io::ErrorKind`]; [`Io`](Self::Io) when nothing more specific fits.
    pub fn from_io(err: &io::Error) -> Self {
        if let Some(kind) = err.raw_os_error().and_then(Self::from_raw_os_error) {
            return kind;
        }
        match err.kind() {
            io::ErrorKind::StorageFull => Self::NoSpace,
            io::ErrorKind::QuotaExceeded => Self::QuotaExceeded,
            io::ErrorKind::FileTooLarge => Self::FileTooLarge,
            io::ErrorKind::ReadOnlyFilesystem => Self::ReadOnly,
            io::ErrorKind::AlreadyExists => Self::AlreadyExists,
            io::ErrorKind::NotFound => Self::NotFound,
            io::ErrorKind::Unsupported => Self::Unsupported,
            io::ErrorKind::InvalidInput => Self::InvalidInput,
            io::ErrorKind::WriteZero => Self::ShortWrite,
            io::ErrorKind::TimedOut => Self::Stalled,
            _ => Self::Io,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::NoSpace => "no space left",
            Self::QuotaExceeded => "quota exceeded",
            Self::FileTooLarge => "file too large",
            Self::Io => "i/o error",
            Self::ReadOnly => "read-only storage",
            Self::ShortWrite => "short write",
            Self::DeadlineExceeded => "deadline exceeded",
            Self::Stalled => "stalled past the idle deadline",
            Self::IntegrityMismatch => "integrity mismatch",
            Self::LengthMismatch => "length mismatch",
            Self::AlreadyExists => "already exists",
            Self::NotFound => "not found",
            Self::Aborted => "aborted",
            Self::Unsupported => "unsupported",
            Self::InvalidInput => "invalid input",
            Self::Backend => "backend failure",
        };
        f.write_str(text)
    }
}

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Starting a fill ([`CacheBackend::begin`](crate::CacheBackend::begin)).
    Begin,
    /// Writing a chunk.
    Write,
    /// Checking and publishing a fill.
    Commit,
    /// Abandoning a fill.
    Abort,
    /// Reading an entry.
    Get,
    /// Removing an entry.
    Remove,
    /// Sweeping leftovers of a dead process.
    Recover,
    /// Opening or configuring the backend.
    Open,
}

impl Operation {
    /// A short lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Begin => "begin",
            Self::Write => "write",
            Self::Commit => "commit",
            Self::Abort => "abort",
            Self::Get => "get",
            Self::Remove => "remove",
            Self::Recover => "recover",
            Self::Open => "open",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cache failure: what kind, during which operation, on which key and
/// backend, and the underlying cause as [`source`](StdError::source).
///
/// `Display` prints this level only, for example
/// `commit of npm:a.tgz on fs failed: no space left`; walk `source()` for
/// the cause.
pub struct CacheError {
    kind: ErrorKind,
    op: Operation,
    backend: String,
    key: Option<CacheKey>,
    detail: Option<String>,
    transient: bool,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl CacheError {
    /// A new error of `kind` during `op` on `backend`. Its transient flag is
    /// the kind's default.
    pub fn new(kind: ErrorKind, op: Operation, backend: impl Into<String>) -> Self {
        Self {
            kind,
            op,
            backend: backend.into(),
            key: None,
            detail: None,
            transient: kind.default_transient(),
            source: None,
        }
    }

    /// An error classified from an I/O error, which becomes the source.
    pub fn from_io(err: io::Error, op: Operation, backend: impl Into<String>) -> Self {
        Self::new(ErrorKind::from_io(&err), op, backend).with_source(err)
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: &CacheKey) -> Self {
        self.key = Some(key.clone());
        self
    }

    /// Adds a short lowercase detail, printed after the kind.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Sets the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Overrides the transient flag given by the kind.
    #[must_use]
    pub fn with_transient(mut self, transient: bool) -> Self {
        self.transient = transient;
        self
    }

    /// Replaces the operation, keeping everything else.
    #[must_use]
    pub fn with_operation(mut self, op: Operation) -> Self {
        self.op = op;
        self
    }

    /// The class of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The operation that failed.
    pub fn operation(&self) -> Operation {
        self.op
    }

    /// The backend's name, as given by
    /// [`CacheBackend::name`](crate::CacheBackend::name).
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The key, when the operation had one.
    pub fn key(&self) -> Option<&CacheKey> {
        self.key.as_ref()
    }

    /// Whether trying again later, unchanged, may succeed.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// The raw OS error number of the underlying I/O error, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        let mut cause: Option<&(dyn StdError + 'static)> = self.source.as_deref().map(|e| e as _);
        while let Some(err) = cause {
            if let Some(io) = err.downcast_ref::<io::Error>() {
                return io.raw_os_error();
            }
            cause = err.source();
        }
        None
    }

    pub(crate) fn stalled(op: Operation, backend: &str, key: &CacheKey, idle: Duration) -> Self {
        Self::new(ErrorKind::Stalled, op, backend)
            .with_key(key)
            .with_detail(format!("no progress for {idle:?}"))
    }

    pub(crate) fn deadline(op: Operation, backend: &str, key: &CacheKey, total: Duration) -> Self {
        Self::new(ErrorKind::DeadlineExceeded, op, backend)
            .with_key(key)
            .with_detail(format!("fill not done within {total:?}"))
    }
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op)?;
        if let Some(key) = &self.key {
            write!(f, " of {key}")?;
        }
        write!(f, " on {} failed: {}", self.backend, self.kind)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheError")
            .field("kind", &self.kind)
            .field("op", &self.op)
            .field("backend", &self.backend)
            .field("key", &self.key)
            .field("detail", &self.detail)
            .field("transient", &self.transient)
            .field("source", &self.source)
            .finish()
    }
}

impl StdError for CacheError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified_by_errno() {
        for (errno, kind) in [
            (28, ErrorKind::NoSpace),
            (122, ErrorKind::QuotaExceeded),
            (27, ErrorKind::FileTooLarge),
            (5, ErrorKind::Io),
            (30, ErrorKind::ReadOnly),
        ] {
            let err =
                CacheError::from_io(io::Error::from_raw_os_error(errno), Operation::Write, "t");
            assert_eq!(err.kind(), kind, "errno {errno}");
            assert_eq!(err.raw_os_error(), Some(errno));
        }
        let other = io::Error::other("boom");
        assert_eq!(ErrorKind::from_io(&other), ErrorKind::Io);
    }

    #[test]
    fn display_is_one_level_and_carries_context() {
        let key = CacheKey::new("npm", "a.tgz").unwrap();
        let err = CacheError::from_io(io::Error::from_raw_os_error(28), Operation::Commit, "fs")
            .with_key(&key);
        assert_eq!(
            err.to_string(),
            "commit of npm:a.tgz on fs failed: no space left"
        );
        assert!(err.source().is_some());
        assert!(err.is_transient());
        assert!(
            !CacheError::new(ErrorKind::IntegrityMismatch, Operation::Commit, "fs").is_transient()
        );
    }

    #[test]
    fn kind_names_are_unique() {
        let mut names: Vec<_> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }
}
