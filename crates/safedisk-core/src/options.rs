//! What a fill promises and how long it may take.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{CacheError, ErrorKind, Operation};

/// Default total deadline of a fill: 20 s.
///
/// Below the 30 s write timeout that many HTTP servers and load balancers
/// use, so a fill given up for time never outlives the request it rides on.
pub const DEFAULT_TOTAL_DEADLINE: Duration = Duration::from_secs(20);

/// Default idle deadline of one backend operation: 5 s.
pub const DEFAULT_IDLE_DEADLINE: Duration = Duration::from_secs(5);

/// Largest total size of [`EntryMetadata`] (all keys and values), in bytes.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;

/// Which commit wins when several fills of one key race.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WriteMode {
    /// Each commit replaces what was there; the last commit wins. The default.
    #[default]
    Overwrite,
    /// A commit fails with [`ErrorKind::AlreadyExists`] when the key is
    /// already published; the first commit wins.
    CreateOnly,
}

/// Small string metadata published atomically with an entry's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct EntryMetadata {
    /// The `Content-Type` to serve the entry with. Default: none.
    pub content_type: Option<String>,
    /// The upstream's `ETag`. Default: none.
    pub etag: Option<String>,
    /// The URL the bytes came from. Default: none.
    pub origin: Option<String>,
    /// Anything else, as sorted key/value pairs. Default: empty.
    pub user: BTreeMap<String, String>,
}

impl EntryMetadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the content type.
    #[must_use]
    pub fn content_type(mut self, value: impl Into<String>) -> Self {
        self.content_type = Some(value.into());
        self
    }

    /// Sets the ETag.
    #[must_use]
    pub fn etag(mut self, value: impl Into<String>) -> Self {
        self.etag = Some(value.into());
        self
    }

    /// Sets the origin URL.
    #[must_use]
    pub fn origin(mut self, value: impl Into<String>) -> Self {
        self.origin = Some(value.into());
        self
    }

    /// Adds one user pair.
    #[must_use]
    pub fn user(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.user.insert(key.into(), value.into());
        self
    }

    /// Total bytes of every key and value.
    pub fn encoded_len(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        opt(&self.content_type)
            + opt(&self.etag)
            + opt(&self.origin)
            + self
                .user
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Checks the size limit and that no value holds a control character
    /// (metadata often ends up in HTTP headers).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] saying which rule was broken.
    pub fn validate(&self, backend: &str) -> Result<(), CacheError> {
        let invalid = |detail: String| {
            CacheError::new(ErrorKind::InvalidInput, Operation::Begin, backend).with_detail(detail)
        };
        if self.encoded_len() > MAX_METADATA_BYTES {
            return Err(invalid(format!(
                "metadata is {} bytes, more than {MAX_METADATA_BYTES}",
                self.encoded_len()
            )));
        }
        let fields = [&self.content_type, &self.etag, &self.origin];
        let values = fields.into_iter().flatten().map(String::as_str);
        let pairs = self.user.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]);
        if let Some(bad) = values
            .chain(pairs)
            .find(|s| s.chars().any(char::is_control))
        {
            return Err(invalid(format!(
                "metadata value {bad:?} has a control character"
            )));
        }
        Ok(())
    }
}

/// What a fill promises and how long it may take.
///
/// Build with [`WriteOptions::new`] and the setters; each setter states its
/// default.
///
/// ```
/// use std::time::Duration;
/// use safedisk_core::{WriteMode, WriteOptions};
///
/// let options = WriteOptions::new()
///     .expected_len(1024)
///     .mode(WriteMode::CreateOnly)
///     .idle_deadline(Duration::from_secs(2));
/// assert_eq!(options.total_deadline, safedisk_core::DEFAULT_TOTAL_DEADLINE);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteOptions {
    /// The exact number of bytes the entry will have. Commit fails with
    /// [`ErrorKind::LengthMismatch`] on any other count, and a write that
    /// would pass it fails at once. Backends may reserve this much space at
    /// begin. Default: unknown.
    pub expected_len: Option<u64>,
    /// The SHA-256 the bytes must have. Commit fails with
    /// [`ErrorKind::IntegrityMismatch`] otherwise. Default: none promised.
    pub expected_sha256: Option<[u8; 32]>,
    /// Which commit wins a race. Default: [`WriteMode::Overwrite`].
    pub mode: WriteMode,
    /// Time from begin to the end of commit. Default:
    /// [`DEFAULT_TOTAL_DEADLINE`] (20 s).
    pub total_deadline: Duration,
    /// Time one backend operation (begin, a write, commit, abort) may take
    /// without finishing. Default: [`DEFAULT_IDLE_DEADLINE`] (5 s).
    pub idle_deadline: Duration,
    /// Metadata published with the entry. Default: empty.
    pub metadata: EntryMetadata,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            expected_len: None,
            expected_sha256: None,
            mode: WriteMode::Overwrite,
            total_deadline: DEFAULT_TOTAL_DEADLINE,
            idle_deadline: DEFAULT_IDLE_DEADLINE,
            metadata: EntryMetadata::default(),
        }
    }
}

impl WriteOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`expected_len`](Self::expected_len).
    #[must_use]
    pub fn expected_len(mut self, len: u64) -> Self {
        self.expected_len = Some(len);
        self
    }

    /// Sets [`expected_sha256`](Self::expected_sha256).
    #[must_use]
    pub fn expected_sha256(mut self, digest: [u8; 32]) -> Self {
        self.expected_sha256 = Some(digest);
        self
    }

    /// Sets [`mode`](Self::mode).
    #[must_use]
    pub fn mode(mut self, mode: WriteMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets [`total_deadline`](Self::total_deadline).
    #[must_use]
    pub fn total_deadline(mut self, deadline: Duration) -> Self {
        self.total_deadline = deadline;
        self
    }

    /// Sets [`idle_deadline`](Self::idle_deadline).
    #[must_use]
    pub fn idle_deadline(mut self, deadline: Duration) -> Self {
        self.idle_deadline = deadline;
        self
    }

    /// Sets [`metadata`](Self::metadata).
    #[must_use]
    pub fn metadata(mut self, metadata: EntryMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Checks the options as a whole: deadlines are non-zero and metadata is
    /// valid.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] saying what is wrong.
    pub fn validate(&self, backend: &str) -> Result<(), CacheError> {
        if self.total_deadline.is_zero() || self.idle_deadline.is_zero() {
            return Err(
                CacheError::new(ErrorKind::InvalidInput, Operation::Begin, backend)
                    .with_detail("deadlines must be non-zero"),
            );
        }
        self.metadata.validate(backend)
    }
}
