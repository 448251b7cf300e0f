//! A SafeDisk cache backend over any [`object_store::ObjectStore`]: S3,
//! MinIO, Ceph, R2, GCS, Azure, a local directory.
//!
//! [`ObjectStoreBackend`] implements [`safedisk_core::CacheBackend`]; use it
//! through [`safedisk_core::Fill`], [`safedisk_core::tee`] or
//! [`safedisk_core::Cache`], which add length and digest checks, deadlines
//! and the breaker. This crate does only the storage steps.
//!
//! # Layout
//!
//! Under the configured prefix, for a key whose
//! [`digest_hex`](safedisk_core::CacheKey::digest_hex) is `D`:
//!
//! - `PREFIX/data/D/FILL`: the bytes of one fill, `FILL` being a hex id
//!   unique to that fill. Its `Content-Type` is the entry's content type.
//! - `PREFIX/entries/D`: the **manifest**, a small text object naming the
//!   published fill, with the entry's length, SHA-256 and metadata.
//!
//! No name depends on a key's text, so no key can reach outside the prefix.
//!
//! # Publish
//!
//! An entry exists when its manifest does. A fill first writes its data
//! object (unseen by readers: nothing names it), then puts the manifest in
//! one request, which every object store makes atomic. So:
//!
//! - **Atomic publish.** A reader sees the old manifest or the new one; each
//!   names a complete data object.
//! - **Small and large bodies.** A body shorter than
//!   [`S3Options::part_size`] is buffered and written with a single put at
//!   commit. A longer one streams as a multipart upload, at most
//!   [`S3Options::parts_in_flight`] parts at once; memory per fill is bounded
//!   by [`S3Options::max_fill_memory`]. [`Fill`](safedisk_core::Fill) checks
//!   length and digest before the backend's commit runs, so a bad body is
//!   never completed, let alone published.
//! - **Create-only.** In [`WriteMode::CreateOnly`](safedisk_core::WriteMode)
//!   the manifest put is conditional ([`PutMode::Create`](object_store::PutMode),
//!   `If-None-Match: *` on S3), for small and multipart bodies alike: first
//!   commit wins, the others fail with
//!   [`AlreadyExists`](safedisk_core::ErrorKind::AlreadyExists) and remove
//!   their data object. `object_store` 0.14 completes a multipart upload
//!   unconditionally, which is why the condition sits on the manifest and
//!   not on the data. A store without conditional puts (an S3 builder with
//!   `S3ConditionalPut::Disabled`) fails create-only commits with
//!   [`Unsupported`](safedisk_core::ErrorKind::Unsupported).
//! - **Failed publish.** When the manifest put is refused (a lost
//!   create-only race, a 4xx) the fill removes its data object. When it
//!   fails in a way that leaves open whether it landed (a timeout, a reset, a
//!   5xx) the data object stays: removing it could leave a manifest naming
//!   nothing. If the put did not land, `recover` sweeps it later.
//! - **Overwrite.** Last manifest put wins. The winner then deletes the data
//!   object the old manifest named. A reader still streaming it may see its
//!   stream end with an error (never early and silently); one that read the
//!   old manifest but had not opened the data yet reads the manifest again
//!   and follows the newer one. Only a manifest that names a missing data
//!   object twice in a row counts as broken; one overwritten more than
//!   8 times while `get` follows it gives a transient
//!   [`Backend`](safedisk_core::ErrorKind::Backend) error.
//! - **Verified reads.** [`get`](safedisk_core::CacheBackend::get) checks the
//!   data object's size against the manifest before returning, and hashes
//!   the bytes as they stream: a body that differs from the recorded SHA-256
//!   ends with [`IntegrityMismatch`](safedisk_core::ErrorKind::IntegrityMismatch)
//!   instead of a clean end.
//!
//! The manifest carries the digest and metadata because the data object's
//! own headers cannot: a multipart upload's headers are fixed when it
//! starts, before the digest is known, and S3 limits user metadata to 2 KiB
//! of ASCII headers with case-folded names.
//!
//! # Abort, drop and crashes
//!
//! - [`abort`](safedisk_core::CacheWriter::abort) frees the buffers, lets
//!   part uploads already in flight finish for at most
//!   [`PART_SETTLE_GRACE`] (an abort that overtakes a part being stored
//!   would leave that part behind), then aborts the multipart upload (or
//!   deletes a completed, unpublished data object), reporting any failure.
//!   An abort that [`Fill`](safedisk_core::Fill) cuts off at its idle
//!   deadline (the store has stopped answering) is not retried in the
//!   background: the connection is released at once and the upload is left
//!   to the lifecycle rule.
//! - **Drop** without commit or abort frees buffers at once and hands the
//!   rest to a task on the tokio runtime the fill began on: it lets parts
//!   in flight settle the same way, then aborts. If that runtime has shut
//!   down, the task never runs, the parts are cancelled, and the incomplete
//!   upload stays in the bucket until its lifecycle rule removes it.
//! - [`crash`](safedisk_core::CacheWriter::crash) frees memory and cancels
//!   part uploads but leaves the upload open, as a killed process would.
//! - [`pending`](safedisk_core::CacheBackend::pending) counts this process's
//!   fills between begin and commit, abort or drop.
//!
//! # What `recover` can and cannot do
//!
//! `object_store` cannot list incomplete multipart uploads, so
//! [`recover`](safedisk_core::CacheBackend::recover) cannot abort the ones a
//! dead process left. Configure the bucket to do it, for example with this
//! S3 lifecycle rule (MinIO, Ceph and R2 accept the same rule):
//!
//! ```json
//! {"Rules": [{"ID": "abort-incomplete-uploads", "Status": "Enabled",
//!   "Filter": {"Prefix": "PREFIX/data/"},
//!   "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}]}
//! ```
//!
//! What `recover` does remove is **complete data objects that no manifest
//! names**: left by a process that died between completing an upload and
//! publishing, by a create-only loser or failed publish whose clean-up
//! failed, or by an overwrite whose removal of the old data failed. It only
//! touches data objects older than [`S3Options::orphan_grace`], so a live
//! fill in its last milliseconds before publishing is never swept.
//!
//! # Deadlines and the client
//!
//! [`Fill`](safedisk_core::Fill) cancels a stalled part upload, complete or
//! put at its idle deadline and aborts the fill. The client must not work
//! against that: with `object_store`'s default retry policy a failing part
//! is retried for up to 3 minutes, and without a request timeout a dead
//! connection lingers until the OS gives up. Build the store with
//! [`client_options_for`] and [`retry_config_for`] at the fills' idle
//! deadline, so every request and its retries give up within it on their
//! own, and idle connections are closed promptly:
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use object_store::aws::AmazonS3Builder;
//! use safedisk_s3::{ObjectStoreBackend, S3Options};
//!
//! let idle = safedisk_core::DEFAULT_IDLE_DEADLINE;
//! let store = AmazonS3Builder::from_env()
//!     .with_bucket_name("artifacts")
//!     .with_client_options(safedisk_s3::client_options_for(idle))
//!     .with_retry(safedisk_s3::retry_config_for(idle))
//!     .build()?;
//! let backend = ObjectStoreBackend::new(Arc::new(store), "cache", S3Options::new())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Errors
//!
//! `object_store` errors become [`CacheError`](safedisk_core::CacheError)s
//! with the original as source; [`classify`] gives the table.
//!
//! # Testing
//!
//! With the `testing` feature, the `testing` module serves a real S3 server
//! (`s3s-fs`) in-process on loopback, with helpers for fault tests.

mod backend;
mod error;
mod manifest;
mod options;
#[cfg(feature = "testing")]
pub mod testing;

pub use backend::{ObjectStoreBackend, PART_SETTLE_GRACE};
pub use error::classify;
pub use options::{
    DEFAULT_ORPHAN_GRACE, DEFAULT_PART_SIZE, DEFAULT_PARTS_IN_FLIGHT, MAX_PART_SIZE, MIN_PART_SIZE,
    S3Options, client_options_for, retry_config_for,
};
