//! [`ObjectStoreBackend`] and its writer.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, MultipartUpload, ObjectStore, ObjectStoreExt, PutMode,
    PutMultipartOptions, PutOptions, PutPayload,
};
use safedisk_core::{
    CacheBackend, CacheError, CacheKey, CacheWriter, Entry, EntryMetadata, ErrorKind, FillSummary,
    Operation, RecoveryReport, WriteMode, WriteOptions,
};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio::task::JoinSet;

use crate::S3Options;
use crate::error::from_store;
use crate::manifest::{Manifest, is_fill_id};

const NAME: &str = "s3";

/// How many manifests [`get`](CacheBackend::get) follows when overwrites
/// keep deleting the data object it is about to read.
const MANIFEST_FOLLOWS: usize = 8;

/// How long an abandoned fill lets part uploads already sent finish before
/// it aborts the upload: 500 ms.
///
/// An abort that overtakes a part still being stored leaves that part
/// behind (S3 documents that an abort may need repeating for this reason),
/// so the abort waits for parts in flight first. Parts still running after
/// this are cancelled and, if the server stores them anyway, left to the
/// bucket's lifecycle rule. Kept short because a tee that holds its client
/// while the cache lags would hold it this long too.
pub const PART_SETTLE_GRACE: Duration = Duration::from_millis(500);

type Parts = JoinSet<object_store::Result<()>>;

/// Lets the part uploads in flight finish, for at most
/// [`PART_SETTLE_GRACE`]; cancels the rest. Their outcome does not matter:
/// the upload is about to be aborted.
async fn settle(mut parts: Parts) {
    let drained = async { while parts.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(PART_SETTLE_GRACE, drained).await;
}

/// A SafeDisk backend over any [`ObjectStore`].
///
/// See the [crate documentation](crate) for the layout under the prefix, what
/// publish means, and what is left to the bucket's lifecycle rules.
#[derive(Clone)]
pub struct ObjectStoreBackend {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    options: S3Options,
    /// Fills of this process that hold an upload or buffers now.
    pending: Arc<AtomicU64>,
}

impl fmt::Debug for ObjectStoreBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreBackend")
            .field("store", &self.shared.store.to_string())
            .field("prefix", &self.shared.prefix.as_ref())
            .field("options", &self.shared.options)
            .finish()
    }
}

impl ObjectStoreBackend {
    /// A backend keeping its objects under `prefix` in `store`.
    ///
    /// The prefix is trusted configuration; every name below it is derived
    /// from [`CacheKey::digest_hex`] and fill ids this crate generates, never
    /// from a key's text.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] when `options` are out of bounds (see
    /// [`S3Options::validate`]).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: impl Into<Path>,
        options: S3Options,
    ) -> Result<Self, CacheError> {
        options.validate(NAME)?;
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                prefix: prefix.into(),
                options,
                pending: Arc::new(AtomicU64::new(0)),
            }),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.shared.store
    }

    /// The prefix every object of this backend lives under.
    pub fn prefix(&self) -> &Path {
        &self.shared.prefix
    }

    /// The options.
    pub fn options(&self) -> &S3Options {
        &self.shared.options
    }

    /// Where the manifest of `key` lives: `PREFIX/entries/DIGEST`.
    pub fn manifest_path(&self, key: &CacheKey) -> Path {
        self.shared.manifest_path(&key.digest_hex())
    }

    /// The folder holding the data objects of `key`'s fills:
    /// `PREFIX/data/DIGEST`.
    pub fn data_folder(&self, key: &CacheKey) -> Path {
        self.shared.data_folder(&key.digest_hex())
    }
}

impl Shared {
    fn manifest_path(&self, digest: &str) -> Path {
        self.prefix.clone().join("entries").join(digest)
    }

    fn data_folder(&self, digest: &str) -> Path {
        self.prefix.clone().join("data").join(digest)
    }

    fn data_path(&self, digest: &str, fill_id: &str) -> Path {
        self.data_folder(digest).join(fill_id)
    }

    /// Reads the manifest at `path`; `None` when there is none.
    async fn read_manifest(
        &self,
        path: &Path,
        op: Operation,
        key: Option<&CacheKey>,
    ) -> Result<Option<Manifest>, CacheError> {
        let bytes = match self.store.get(path).await {
            Ok(found) => found.bytes().await,
            Err(err) => Err(err),
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(err) => return Err(from_store(err, op, NAME, key)),
        };
        Manifest::decode(&bytes).map(Some).map_err(|detail| {
            let err = CacheError::new(ErrorKind::IntegrityMismatch, op, NAME).with_detail(detail);
            match key {
                Some(key) => err.with_key(key),
                None => err,
            }
        })
    }

    /// Deletes `path`; a missing object counts as deleted.
    async fn delete(&self, path: &Path) -> Result<(), object_store::Error> {
        match self.store.delete(path).await {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    /// Removes a corrupt entry; the caller reports the corruption.
    ///
    /// With `fill_id`, the data object of that fill is removed, and the
    /// manifest only if it still names that fill (a newer entry published
    /// meanwhile stays). Without, the manifest itself is what is corrupt and
    /// is removed.
    async fn discard_entry(&self, key: &CacheKey, fill_id: Option<&str>) {
        let digest = key.digest_hex();
        let manifest_path = self.manifest_path(&digest);
        let mut doomed = Vec::new();
        match fill_id {
            Some(fill_id) => {
                let current = self
                    .read_manifest(&manifest_path, Operation::Get, Some(key))
                    .await;
                if let Ok(Some(current)) = current
                    && current.fill_id == fill_id
                {
                    doomed.push(manifest_path);
                }
                doomed.push(self.data_path(&digest, fill_id));
            }
            None => doomed.push(manifest_path),
        }

        for path in doomed {
            if let Err(err) = self.delete(&path).await {
                tracing::warn!(key = %key, backend = NAME, path = %path, error = %err,
                    "could not remove a corrupt entry");
            }
        }
    }
}

#[async_trait]
impl CacheBackend for ObjectStoreBackend {
    fn name(&self) -> &str {
        NAME
    }

    async fn begin(
        &self,
        key: &CacheKey,
        options: &WriteOptions,
    ) -> Result<Box<dyn CacheWriter>, CacheError> {
        let refuse = |kind: ErrorKind, detail: &str| {
            CacheError::new(kind, Operation::Begin, NAME)
                .with_key(key)
                .with_detail(detail.to_owned())
        };
        let runtime = Handle::try_current().map_err(|_| {
            refuse(
                ErrorKind::Unsupported,
                "a fill must begin inside a tokio runtime",
            )
        })?;

        let digest = key.digest_hex();
        let fill_id = new_fill_id();
        let data_path = self.shared.data_path(&digest, &fill_id);
        let pending = PendingFill::new(&self.shared.pending);

        Ok(Box::new(ObjectStoreWriter {
            shared: self.shared.clone(),
            key: key.clone(),
            mode: options.mode,
            metadata: options.metadata.clone(),
            manifest_path: self.shared.manifest_path(&digest),
            data_path,
            fill_id,
            runtime,
            buffer: VecDeque::new(),
            buffered: 0,
            upload: None,
            parts: JoinSet::new(),
            stage: Stage::Open,
            _pending: pending,
        }))
    }

    async fn get(&self, key: &CacheKey) -> Result<Option<Entry>, CacheError> {
        let shared = &self.shared;
        let digest = key.digest_hex();
        let manifest_path = shared.manifest_path(&digest);

        // A fill that overwrites the key deletes the data object the old
        // manifest named, so a missing data object means the entry is
        // broken only when a fresh read of the manifest names it again. A
        // manifest that changed is followed, however often it changed.
        let mut last: Option<Manifest> = None;
        for _ in 0..MANIFEST_FOLLOWS {
            let manifest = match shared
                .read_manifest(&manifest_path, Operation::Get, Some(key))
                .await
            {
                Ok(Some(manifest)) => manifest,
                Ok(None) => return Ok(None),
                Err(err) if err.kind() == ErrorKind::IntegrityMismatch => {
                    tracing::warn!(key = %key, backend = NAME, error = %err,
                        "removing an entry whose manifest is unreadable");
                    shared.discard_entry(key, None).await;
                    return Err(err);
                }
                Err(err) => return Err(err),
            };
            if last.as_ref() == Some(&manifest) {
                shared.discard_entry(key, Some(&manifest.fill_id)).await;
                return Err(
                    CacheError::new(ErrorKind::IntegrityMismatch, Operation::Get, NAME)
                        .with_key(key)
                        .with_detail("manifest names a missing data object"),
                );
            }

            let data_path = shared.data_path(&digest, &manifest.fill_id);
            match shared.store.get(&data_path).await {
                Ok(found) if found.meta.size == manifest.summary.len => {
                    let body = VerifiedBody::new(
                        found.into_stream(),
                        self.shared.clone(),
                        key.clone(),
                        &manifest,
                    );
                    return Ok(Some(Entry {
                        meta: manifest.entry_meta(),
                        body: Box::pin(body),
                    }));
                }
                Ok(found) => {
                    shared.discard_entry(key, Some(&manifest.fill_id)).await;
                    return Err(CacheError::new(
                        ErrorKind::IntegrityMismatch,
                        Operation::Get,
                        NAME,
                    )
                    .with_key(key)
                    .with_detail(format!(
                        "data object has {} bytes, manifest says {}",
                        found.meta.size, manifest.summary.len
                    )));
                }
                Err(object_store::Error::NotFound { .. }) => last = Some(manifest),
                Err(err) => return Err(from_store(err, Operation::Get, NAME, Some(key))),
            }
        }

        // Overwritten faster than it could be read: nothing is broken.
        Err(CacheError::new(ErrorKind::Backend, Operation::Get, NAME)
            .with_key(key)
            .with_transient(true)
            .with_detail(format!(
                "the entry was replaced {MANIFEST_FOLLOWS} times while it was being opened"
            )))
    }

    async fn remove(&self, key: &CacheKey) -> Result<bool, CacheError> {
        let shared = &self.shared;
        let digest = key.digest_hex();
        let manifest_path = shared.manifest_path(&digest);

        let manifest = match shared
            .read_manifest(&manifest_path, Operation::Remove, Some(key))
            .await
        {
            Ok(Some(manifest)) => Some(manifest),
            Ok(None) => return Ok(false),
            // An unreadable manifest is removed like any other.
            Err(err) if err.kind() == ErrorKind::IntegrityMismatch => None,
            Err(err) => return Err(err),
        };

        // The manifest goes first: once it is gone the entry is gone, and a
        // data object left by a failure below is an orphan for `recover`.
        shared
            .delete(&manifest_path)
            .await
            .map_err(|e| from_store(e, Operation::Remove, NAME, Some(key)))?;
        if let Some(manifest) = manifest {
            shared
                .delete(&shared.data_path(&digest, &manifest.fill_id))
                .await
                .map_err(|e| from_store(e, Operation::Remove, NAME, Some(key)))?;
        }
        Ok(true)
    }

    async fn recover(&self) -> Result<RecoveryReport, CacheError> {
        let shared = &self.shared;
        let data_root = shared.prefix.clone().join("data");
        let cutoff = sweep_cutoff(shared.options.orphan_grace);
        let fail = |e| from_store(e, Operation::Recover, NAME, None);

        // Every data object old enough, grouped by key digest.
        let mut candidates: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        let mut listing = shared.store.list(Some(&data_root));
        while let Some(meta) = listing.try_next().await.map_err(fail)? {
            let mut parts = meta.location.parts().skip(data_root.parts().count());
            let (Some(digest), Some(fill_id), None) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if meta.last_modified.timestamp() > cutoff || !is_fill_id(fill_id.as_ref()) {
                continue;
            }
            candidates
                .entry(digest.as_ref().to_owned())
                .or_default()
                .push((fill_id.as_ref().to_owned(), meta.size));
        }

        // Keep the one each manifest names; the rest were never published,
        // or were replaced and their removal failed.
        let mut report = RecoveryReport::default();
        for (digest, fills) in candidates {
            let published = match shared
                .read_manifest(&shared.manifest_path(&digest), Operation::Recover, None)
                .await
            {
                Ok(manifest) => manifest.map(|m| m.fill_id),
                // Not ours to judge: leave this key's objects for `get`,
                // which removes a corrupt entry as a whole.
                Err(err) if err.kind() == ErrorKind::IntegrityMismatch => continue,
                Err(err) => return Err(err),
            };
            for (fill_id, size) in fills {
                if published.as_deref() == Some(fill_id.as_str()) {
                    continue;
                }
                let path = shared.data_path(&digest, &fill_id);
                shared.delete(&path).await.map_err(fail)?;
                report.removed.push(path.to_string());
                report.bytes += size;
            }
        }

        if !report.removed.is_empty() {
            tracing::info!(
                backend = NAME,
                objects = report.removed.len(),
                bytes = report.bytes,
                "recover removed unpublished data objects"
            );
        }
        Ok(report)
    }

    async fn pending(&self) -> Result<u64, CacheError> {
        Ok(self.shared.pending.load(Ordering::SeqCst))
    }
}

/// The cut-off for [`S3Options::orphan_grace`], in Unix seconds: objects
/// last modified at or before it are old enough to sweep.
fn sweep_cutoff(grace: Duration) -> i64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    now.saturating_sub(grace.as_secs()) as i64
}

/// A fill id: unique per fill across processes and machines in practice
/// (wall clock in nanoseconds, process id, a per-process counter), and
/// lowercase hex so it is safe as an object name.
fn new_fill_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:016x}{:08x}{count:08x}", std::process::id())
}

/// Counts a fill in [`CacheBackend::pending`] from begin until it is
/// finished one way or another.
#[derive(Debug)]
struct PendingFill(Arc<AtomicU64>);

impl PendingFill {
    fn new(counter: &Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for PendingFill {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where a writer is in its life; decides what dropping it must undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Taking writes; a multipart upload may be open.
    Open,
    /// The data object is complete but no manifest names it yet.
    DataWritten,
    /// The manifest put was sent; whether it landed is unknown, so the data
    /// object must stay (at worst it is an orphan for `recover`).
    Publishing,
    /// Committed, aborted or crashed: nothing left to undo.
    Finished,
}

struct ObjectStoreWriter {
    shared: Arc<Shared>,
    key: CacheKey,
    mode: WriteMode,
    metadata: EntryMetadata,
    manifest_path: Path,
    data_path: Path,
    fill_id: String,
    /// The runtime the fill began on, for the abort a drop hands off.
    runtime: Handle,
    /// Bytes not yet handed to a part, at most one part's worth between
    /// writes.
    buffer: VecDeque<Bytes>,
    buffered: usize,
    upload: Option<Box<dyn MultipartUpload>>,
    /// Part uploads in flight; dropping the set cancels them.
    parts: JoinSet<object_store::Result<()>>,
    stage: Stage,
    _pending: PendingFill,
}

impl fmt::Debug for ObjectStoreWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreWriter")
            .field("key", &self.key)
            .field("data_path", &self.data_path.as_ref())
            .field("buffered", &self.buffered)
            .field("multipart", &self.upload.is_some())
            .field("parts_in_flight", &self.parts.len())
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreWriter {
    fn error(&self, err: object_store::Error, op: Operation) -> CacheError {
        from_store(err, op, NAME, Some(&self.key))
    }

    /// The data object's headers: its content type, when it can be a header
    /// value (visible ASCII). The manifest records it either way.
    fn data_attributes(&self) -> Attributes {
        let mut attributes = Attributes::new();
        if let Some(content_type) = &self.metadata.content_type
            && content_type.bytes().all(|b| (0x20..0x7f).contains(&b))
        {
            attributes.insert(Attribute::ContentType, content_type.clone().into());
        }
        attributes
    }

    /// Takes one part's worth of bytes off the front of the buffer, without
    /// copying.
    fn split_part(&mut self, size: usize) -> PutPayload {
        let mut part = Vec::new();
        let mut taken = 0;
        while taken < size {
            let Some(mut chunk) = self.buffer.pop_front() else {
                break;
            };
            if chunk.len() > size - taken {
                let rest = chunk.split_off(size - taken);
                self.buffer.push_front(rest);
            }
            taken += chunk.len();
            part.push(chunk);
        }
        self.buffered -= taken;
        part.into_iter().collect()
    }

    /// Waits until fewer than `limit` parts are in flight; the first part
    /// that failed fails the write.
    async fn wait_for_parts(&mut self, limit: usize, op: Operation) -> Result<(), CacheError> {
        while !self.parts.is_empty() && self.parts.len() >= limit {
            let Some(joined) = self.parts.join_next().await else {
                break;
            };
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(self.error(err, op)),
                Err(join) => {
                    return Err(CacheError::new(ErrorKind::Backend, op, NAME)
                        .with_key(&self.key)
                        .with_detail("part upload task failed")
                        .with_source(join));
                }
            }
        }
        Ok(())
    }

    /// Starts the next part: opens the upload first if this is the first.
    async fn start_part(&mut self, payload: PutPayload, op: Operation) -> Result<(), CacheError> {
        if self.upload.is_none() {
            let options = PutMultipartOptions {
                attributes: self.data_attributes(),
                ..Default::default()
            };
            let upload = self
                .shared
                .store
                .put_multipart_opts(&self.data_path, options)
                .await
                .map_err(|e| self.error(e, op))?;
            self.upload = Some(upload);
        }
        let upload = self.upload.as_mut().expect("opened above");
        self.parts.spawn_on(upload.put_part(payload), &self.runtime);
        Ok(())
    }

    /// Writes the buffered bytes as the data object: one put for a body
    /// shorter than a part, otherwise the last part and the completion.
    async fn finish_data(&mut self) -> Result<(), CacheError> {
        let op = Operation::Commit;
        if self.upload.is_none() {
            let payload: PutPayload = std::mem::take(&mut self.buffer).into_iter().collect();
            self.buffered = 0;
            let options = PutOptions {
                attributes: self.data_attributes(),
                ..Default::default()
            };
            self.shared
                .store
                .put_opts(&self.data_path, payload, options)
                .await
                .map_err(|e| self.error(e, op))?;
            self.stage = Stage::DataWritten;
            return Ok(());
        }

        if self.buffered > 0 {
            let payload = self.split_part(self.buffered);
            self.start_part(payload, op).await?;
        }
        self.wait_for_parts(0, op).await?;
        let upload = self.upload.as_mut().expect("multipart is open");
        let completed = upload.complete().await;
        // After a failed complete the data object may or may not exist, and
        // the upload may or may not be open: clean-up tries both (the upload
        // stays for `abort`, the stage says to delete the data object).
        // Neither is visible either way, since no manifest names them.
        self.stage = Stage::DataWritten;
        completed.map_err(|e| self.error(e, op))?;
        self.upload = None;
        Ok(())
    }

    /// In overwrite mode, the manifest this commit will replace: it names
    /// the data object to remove once the new manifest is in place. A
    /// failure to read it costs only that removal (`recover` sweeps).
    fn read_replaced(&self) -> impl Future<Output = Option<Manifest>> + Send + 'static {
        let shared = self.shared.clone();
        let path = self.manifest_path.clone();
        let key = self.key.clone();
        let mode = self.mode;
        async move {
            match mode {
                WriteMode::Overwrite => shared
                    .read_manifest(&path, Operation::Commit, Some(&key))
                    .await
                    .unwrap_or(None),
                WriteMode::CreateOnly => None,
            }
        }
    }

    /// Publishes the manifest; in overwrite mode then removes the data
    /// object of the entry it replaced.
    async fn publish(
        &mut self,
        summary: FillSummary,
        replaced: Option<Manifest>,
    ) -> Result<(), CacheError> {
        let op = Operation::Commit;
        let manifest = Manifest {
            summary,
            metadata: self.metadata.clone(),
            fill_id: self.fill_id.clone(),
        };
        let mode = match self.mode {
            WriteMode::Overwrite => PutMode::Overwrite,
            WriteMode::CreateOnly => PutMode::Create,
        };
        self.stage = Stage::Publishing;
        let put = self
            .shared
            .store
            .put_opts(
                &self.manifest_path,
                PutPayload::from(manifest.encode()),
                PutOptions::from(mode),
            )
            .await;
        if let Err(err) = put {
            let err = self.error(err, op);
            // A refusal (a lost create-only race, a 4xx) means no manifest
            // names this data object, so it is ours to remove. After a
            // transient failure (a timeout, a reset, a 5xx) the put may have
            // landed, and removing the data would leave a manifest naming
            // nothing: the data stays, for `recover` if it is an orphan.
            if !err.is_transient() {
                self.stage = Stage::DataWritten;
                self.remove_data_quietly().await;
            }
            self.stage = Stage::Finished;
            return Err(err);
        }
        self.stage = Stage::Finished;

        if let Some(old) = replaced.filter(|old| old.fill_id != self.fill_id) {
            let digest = self.key.digest_hex();
            let old_path = self.shared.data_path(&digest, &old.fill_id);
            if let Err(err) = self.shared.delete(&old_path).await {
                tracing::warn!(key = %self.key, backend = NAME, path = %old_path, error = %err,
                    "replaced data object not removed; recover will sweep it");
            }
        }
        Ok(())
    }

    async fn remove_data_quietly(&mut self) {
        if let Err(err) = self.shared.delete(&self.data_path).await {
            tracing::warn!(key = %self.key, backend = NAME, path = %self.data_path, error = %err,
                "unpublished data object not removed; recover will sweep it");
        }
        self.stage = Stage::Finished;
    }

    /// Releases buffered memory and hands back the part uploads in flight,
    /// for the caller to settle before aborting (or to drop, cancelling
    /// them).
    fn release(&mut self) -> Parts {
        self.buffer = VecDeque::new();
        self.buffered = 0;
        std::mem::take(&mut self.parts)
    }
}

#[async_trait]
impl CacheWriter for ObjectStoreWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.buffered += chunk.len();
        self.buffer.push_back(chunk);

        let part_size = self.shared.options.part_size;
        let in_flight = self.shared.options.parts_in_flight;
        while self.buffered >= part_size {
            self.wait_for_parts(in_flight, Operation::Write).await?;
            let payload = self.split_part(part_size);
            self.start_part(payload, Operation::Write).await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>, summary: FillSummary) -> Result<(), CacheError> {
        // The manifest being replaced is read while the data finishes, so
        // overwriting costs no extra round trip.
        let replaced = self.read_replaced();
        let (written, replaced) = futures::join!(self.finish_data(), replaced);

        if let Err(err) = written {
            settle(self.release()).await;
            if let Some(mut upload) = self.upload.take()
                && let Err(abort) = upload.abort().await
            {
                tracing::warn!(key = %self.key, backend = NAME, error = %abort,
                    "abort after a failed commit failed; the lifecycle rule will remove the upload");
            }
            if self.stage == Stage::DataWritten {
                self.remove_data_quietly().await;
            }
            self.stage = Stage::Finished;
            return Err(err);
        }
        self.publish(summary, replaced).await
    }

    async fn abort(mut self: Box<Self>) -> Result<(), CacheError> {
        settle(self.release()).await;
        let stage = std::mem::replace(&mut self.stage, Stage::Finished);

        if let Some(mut upload) = self.upload.take() {
            upload
                .abort()
                .await
                .map_err(|e| self.error(e, Operation::Abort))?;
        }
        if stage == Stage::DataWritten {
            self.shared
                .delete(&self.data_path)
                .await
                .map_err(|e| self.error(e, Operation::Abort))?;
        }
        Ok(())
    }

    fn crash(mut self: Box<Self>) {
        // A killed process leaves its multipart upload open and any
        // completed, unpublished data object in place; its requests die
        // with it.
        drop(self.release());
        self.upload = None;
        self.stage = Stage::Finished;
    }
}

impl Drop for ObjectStoreWriter {
    fn drop(&mut self) {
        let parts = self.release();
        let stage = std::mem::replace(&mut self.stage, Stage::Finished);
        let upload = self.upload.take();
        let delete_data = stage == Stage::DataWritten;
        if upload.is_none() && !delete_data {
            return;
        }

        // Hand the clean-up to the runtime the fill began on. If that runtime
        // has shut down the task never runs, and the upload is left to the
        // bucket's lifecycle rule (and a data object to `recover`).
        let shared = self.shared.clone();
        let key = self.key.clone();
        let data_path = self.data_path.clone();
        self.runtime.spawn(async move {
            settle(parts).await;
            if let Some(mut upload) = upload
                && let Err(err) = upload.abort().await
            {
                tracing::warn!(key = %key, backend = NAME, error = %err,
                    "abort of a dropped fill's upload failed; the lifecycle rule will remove it");
            }
            if delete_data && let Err(err) = shared.delete(&data_path).await {
                tracing::warn!(key = %key, backend = NAME, path = %data_path, error = %err,
                    "unpublished data object not removed; recover will sweep it");
            }
        });
    }
}

/// An entry's body: the data object's bytes, counted and hashed as they
/// pass, ending with [`ErrorKind::IntegrityMismatch`] instead of a clean end
/// when they differ from the manifest.
struct VerifiedBody {
    inner: Option<futures::stream::BoxStream<'static, object_store::Result<Bytes>>>,
    shared: Arc<Shared>,
    key: CacheKey,
    fill_id: String,
    expected: FillSummary,
    hasher: Sha256,
    seen: u64,
}

impl VerifiedBody {
    fn new(
        inner: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
        shared: Arc<Shared>,
        key: CacheKey,
        manifest: &Manifest,
    ) -> Self {
        Self {
            inner: Some(inner),
            shared,
            key,
            fill_id: manifest.fill_id.clone(),
            expected: manifest.summary,
            hasher: Sha256::new(),
            seen: 0,
        }
    }

    /// Ends the stream with an integrity error, and removes the entry in the
    /// background when a runtime is at hand (a stream is polled inside one
    /// in practice; without, the entry stays until the next removal).
    fn mismatch(&mut self, detail: String) -> Poll<Option<Result<Bytes, CacheError>>> {
        self.inner = None;
        tracing::warn!(key = %self.key, backend = NAME, detail = %detail,
            "removing an entry whose bytes do not match its manifest");
        if let Ok(runtime) = Handle::try_current() {
            let shared = self.shared.clone();
            let key = self.key.clone();
            let fill_id = self.fill_id.clone();
            runtime.spawn(async move { shared.discard_entry(&key, Some(&fill_id)).await });
        }
        Poll::Ready(Some(Err(CacheError::new(
            ErrorKind::IntegrityMismatch,
            Operation::Get,
            NAME,
        )
        .with_key(&self.key)
        .with_detail(detail))))
    }
}

impl Stream for VerifiedBody {
    type Item = Result<Bytes, CacheError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                self.seen += chunk.len() as u64;
                if self.seen > self.expected.len {
                    let detail = format!("more than the recorded {} bytes", self.expected.len);
                    return self.mismatch(detail);
                }
                self.hasher.update(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.inner = None;
                let err = from_store(err, Operation::Get, NAME, Some(&self.key));
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                if self.seen != self.expected.len {
                    let detail = format!("{} of {} bytes", self.seen, self.expected.len);
                    return self.mismatch(detail);
                }
                let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
                if digest != self.expected.sha256 {
                    let detail = format!("stored bytes have sha256 {}", hex::encode(digest));
                    return self.mismatch(detail);
                }
                self.inner = None;
                Poll::Ready(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_ids_are_unique_hex() {
        let a = new_fill_id();
        let b = new_fill_id();
        assert_ne!(a, b);
        assert!(is_fill_id(&a), "{a}");
    }
}
