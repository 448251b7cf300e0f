//! [`S3Options`] and the client settings that keep requests inside a fill's
//! deadlines.

use std::time::Duration;

use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use safedisk_core::{CacheError, ErrorKind, Operation};

/// Default part size of a multipart upload: 8 MiB.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;

/// Smallest part size S3 accepts for every part but the last: 5 MiB.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// Largest part size S3 accepts: 5 GiB.
pub const MAX_PART_SIZE: usize = 5 * 1024 * 1024 * 1024;

/// Default number of parts uploading at once per fill: 2.
pub const DEFAULT_PARTS_IN_FLIGHT: usize = 2;

/// Default age below which [`recover`](safedisk_core::CacheBackend::recover)
/// leaves an unpublished data object alone: 1 hour.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(60 * 60);

/// How an [`ObjectStoreBackend`](crate::ObjectStoreBackend) uploads.
///
/// A fill holds at most `part_size * (parts_in_flight + 1)` bytes, plus the
/// one chunk being written: `parts_in_flight` parts uploading and one part
/// filling. With the defaults that is 24 MiB.
///
/// ```
/// use safedisk_s3::S3Options;
///
/// let options = S3Options::new().part_size(16 << 20).parts_in_flight(4);
/// assert_eq!(options.max_fill_memory(), 80 << 20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct S3Options {
    /// Bytes per multipart part, and the threshold between the two upload
    /// paths: a body shorter than one part is buffered and written with a
    /// single put at commit; a longer one streams as a multipart upload.
    /// Between [`MIN_PART_SIZE`] and [`MAX_PART_SIZE`]. Default:
    /// [`DEFAULT_PART_SIZE`] (8 MiB).
    pub part_size: usize,
    /// Parts of one fill uploading at once; a write waits for a slot before
    /// it starts another part. At least 1. Default:
    /// [`DEFAULT_PARTS_IN_FLIGHT`] (2).
    pub parts_in_flight: usize,
    /// How old an unpublished data object must be before
    /// [`recover`](safedisk_core::CacheBackend::recover) removes it. Must be
    /// longer than any fill's total deadline, so that a live fill between
    /// completing its upload and publishing is never swept. Default:
    /// [`DEFAULT_ORPHAN_GRACE`] (1 hour).
    pub orphan_grace: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            part_size: DEFAULT_PART_SIZE,
            parts_in_flight: DEFAULT_PARTS_IN_FLIGHT,
            orphan_grace: DEFAULT_ORPHAN_GRACE,
        }
    }
}

impl S3Options {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`part_size`](Self::part_size).
    #[must_use]
    pub fn part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes;
        self
    }

    /// Sets [`parts_in_flight`](Self::parts_in_flight).
    #[must_use]
    pub fn parts_in_flight(mut self, parts: usize) -> Self {
        self.parts_in_flight = parts;
        self
    }

    /// Sets [`orphan_grace`](Self::orphan_grace).
    #[must_use]
    pub fn orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// Most bytes one fill holds in memory, not counting the chunk being
    /// written: `part_size * (parts_in_flight + 1)`.
    pub fn max_fill_memory(&self) -> usize {
        self.part_size
            .saturating_mul(self.parts_in_flight.saturating_add(1))
    }

    /// Checks every field against its bounds.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] naming the field and its bounds.
    pub fn validate(&self, backend: &str) -> Result<(), CacheError> {
        let invalid = |detail: String| {
            Err(
                CacheError::new(ErrorKind::InvalidInput, Operation::Open, backend)
                    .with_detail(detail),
            )
        };
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return invalid(format!(
                "part size {} is outside {MIN_PART_SIZE}..={MAX_PART_SIZE}",
                self.part_size
            ));
        }
        if self.parts_in_flight == 0 {
            return invalid("parts in flight must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// Client settings under which no request outlives a fill whose idle
/// deadline is `idle`: pass them to the store's builder (for S3,
/// `AmazonS3Builder::with_client_options` and `with_retry`).
///
/// - Each request may take at most `idle`, connecting at most
///   `min(idle, 2 s)`: a dead connection is given up by the client itself,
///   not only by the fill's deadline dropping the request.
/// - Idle pooled connections close after `idle` (at least 1 s), so an
///   abandoned fill's connections do not linger.
///
/// Use with [`retry_config_for`], which keeps retries inside the same
/// budget. The result is a fresh [`ClientOptions`]: set it on the builder
/// before other client settings such as `with_allow_http`, which it would
/// otherwise replace.
///
/// ```
/// use std::time::Duration;
/// use object_store::aws::AmazonS3Builder;
///
/// let idle = Duration::from_secs(5);
/// let builder = AmazonS3Builder::new()
///     .with_client_options(safedisk_s3::client_options_for(idle))
///     .with_retry(safedisk_s3::retry_config_for(idle));
/// # let _ = builder;
/// ```
pub fn client_options_for(idle: Duration) -> ClientOptions {
    ClientOptions::new()
        .with_timeout(idle)
        .with_connect_timeout(idle.min(Duration::from_secs(2)))
        .with_pool_idle_timeout(idle.max(Duration::from_secs(1)))
}

/// A retry policy that gives up within `idle`: at most 2 retries, backing
/// off from 50 ms up to 500 ms, and none started after `idle` has passed
/// since the first attempt.
///
/// `object_store`'s default (10 retries within 3 minutes, backoff up to
/// 15 s) would keep a failing part retrying long after the fill's deadline
/// gave up on it; the fill's deadline still cancels the call, but the
/// retries hold the upload and its buffers until then. 5xx answers, throttles
/// and dropped connections are retried; other failures are not.
pub fn retry_config_for(idle: Duration) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        assert!(S3Options::new().validate("s3").is_ok());
        for bad in [
            S3Options::new().part_size(MIN_PART_SIZE - 1),
            S3Options::new().part_size(MAX_PART_SIZE + 1),
            S3Options::new().parts_in_flight(0),
        ] {
            let err = bad.validate("s3").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert_eq!(err.operation(), Operation::Open);
        }
    }

    #[test]
    fn memory_bound_counts_the_filling_part() {
        assert_eq!(S3Options::new().max_fill_memory(), 24 << 20);
    }
}
