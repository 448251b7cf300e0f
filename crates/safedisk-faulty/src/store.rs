//! [`FaultyStore`]: an object store that injects a plan's faults into
//! another.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::{self, BoxFuture};
use futures::stream::{self, BoxStream};
use futures::{FutureExt, StreamExt};
use object_store::path::Path;
use object_store::{
    Attributes, CopyOptions, Extensions, GetOptions, GetResult, GetResultPayload, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, RenameOptions, UploadPart,
};
use safedisk_core::{ErrorKind, Operation};

use crate::backend::injected_error;
use crate::inject::{Fired, Injector, Site, Verdict};
use crate::{FaultAction, FaultPlan, FaultRecord};

/// The store name in errors this wrapper makes.
const STORE: &str = "faulty";

/// An object store that passes every call to an inner store and injects
/// the faults of a [`FaultPlan`] on the way, so that code written against
/// [`ObjectStore`] meets real `object_store` types and errors.
///
/// The points it reaches: `put` and `put@published` (a single-request
/// put, before it is sent and after the store stored it), `begin`
/// (creating a multipart upload), `part` and `part@nth=N` (each part
/// upload, counted per upload), `complete` and `complete@published`,
/// `abort` (of a multipart upload), `get` (each `get_opts`, so each `head`
/// and each range of `get_ranges` too), `remove` (each path given to `delete_stream`, so
/// `delete` too) and `list` (`list`, `list_with_offset`,
/// `list_with_delimiter`). Copies and renames pass through untouched.
///
/// Injected errors are `object_store` errors: kind
/// [`NotFound`](ErrorKind::NotFound) gives [`object_store::Error::NotFound`],
/// [`AlreadyExists`](ErrorKind::AlreadyExists) gives
/// [`object_store::Error::AlreadyExists`],
/// [`Unsupported`](ErrorKind::Unsupported) gives
/// [`object_store::Error::NotSupported`], and every other kind
/// [`object_store::Error::Generic`] with store `faulty`, as a 5xx or a
/// reset connection would. The source is always a
/// [`CacheError`](safedisk_core::CacheError) of the injected kind (for an
/// errno, with the `io::Error` under it), so a caller can tell what was
/// injected by walking the sources.
///
/// Actions at the store:
///
/// - an **error** fails the call without sending it; at `abort` the upload
///   stays open in the inner store, as after a failed abort request;
/// - **short** at a part sends half the part, then fails;
/// - **stall**, **delay**, **rate** and **corrupt** as for [`Faulty`](crate::Faulty);
///   a part's delay starts when its future is first polled;
/// - **crash** abandons the upload: nothing more is sent for it, not even
///   an abort, and every later call on it fails. At `begin` the upload is
///   created, then abandoned.
///
/// Cloning shares the counts, generators and record.
pub struct FaultyStore<S: ?Sized> {
    injector: Arc<Injector>,
    inner: Arc<S>,
}

impl<S: ObjectStore> FaultyStore<S> {
    /// Wraps `inner` with `plan`.
    pub fn new(inner: S, plan: FaultPlan) -> Self {
        Self::from_arc(Arc::new(inner), plan)
    }
}

impl<S: ObjectStore + ?Sized> FaultyStore<S> {
    /// Wraps a shared store, such as an `Arc<dyn ObjectStore>`, with `plan`.
    pub fn from_arc(inner: Arc<S>, plan: FaultPlan) -> Self {
        Self {
            injector: Arc::new(Injector::new(plan)),
            inner,
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// The plan.
    pub fn plan(&self) -> &FaultPlan {
        self.injector.plan()
    }

    /// Every fault injected so far, oldest first.
    pub fn records(&self) -> Vec<FaultRecord> {
        self.injector.records()
    }
}

impl<S: ?Sized> Clone for FaultyStore<S> {
    fn clone(&self) -> Self {
        Self {
            injector: self.injector.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S: ObjectStore + ?Sized> fmt::Debug for FaultyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore")
            .field("plan", &self.plan().to_string())
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S: ObjectStore + ?Sized> fmt::Display for FaultyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "faulty({})", self.inner)
    }
}

#[async_trait]
impl<S: ObjectStore + ?Sized> ObjectStore for FaultyStore<S> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let len = payload.content_length() as u64;
        let verdict = self.injector.decide(Site::Put, location, 0);
        if let Some(fired) = verdict.wait(Some(len)).await {
            return Err(store_error(fired, Operation::Commit, location));
        }

        let result = self.inner.put_opts(location, payload, opts).await?;

        let verdict = self.injector.decide(Site::PutPublished, location, len);
        match verdict.wait(None).await {
            Some(fired) => Err(store_error(fired, Operation::Commit, location)),
            None => Ok(result),
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let verdict = self.injector.decide(Site::Begin, location, 0);
        if let Some(fired) = verdict.wait(None).await {
            if fired.action == FaultAction::Crash {
                // Created, then dropped without an abort, as by a dead
                // process: the store keeps the upload.
                drop(self.inner.put_multipart_opts(location, opts).await?);
            }
            return Err(store_error(fired, Operation::Begin, location));
        }

        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner: upload,
            injector: self.injector.clone(),
            path: location.clone(),
            parts: 0,
            bytes: 0,
            crashed: false,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let verdict = self.injector.decide(Site::Get, location, 0);
        if let Some(fired) = verdict.wait(None).await {
            return Err(store_error(fired, Operation::Get, location));
        }

        let head = options.head;
        let result = self.inner.get_opts(location, options).await?;
        if head || !verdict.changes_reads() {
            return Ok(result);
        }
        Ok(read_through(result, &verdict))
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let injector = self.injector.clone();
        let inner = self.inner.clone();

        // One path at a time, so a fault hits exactly the path it names.
        locations
            .then(move |location| {
                let injector = injector.clone();
                let inner = inner.clone();
                async move {
                    let location = location?;
                    let verdict = injector.decide(Site::Remove, &location, 0);
                    if let Some(fired) = verdict.wait(None).await {
                        return Err(store_error(fired, Operation::Remove, &location));
                    }
                    let one = stream::once(future::ready(Ok(location.clone()))).boxed();
                    let mut deleted = inner.delete_stream(one);
                    deleted.next().await.unwrap_or(Ok(location))
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let listing = self.inner.list(prefix);
        self.faulty_listing(prefix, listing)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let listing = self.inner.list_with_offset(prefix, offset);
        self.faulty_listing(prefix, listing)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let place = prefix.cloned().unwrap_or_default();
        let verdict = self.injector.decide(Site::List, &place, 0);
        if let Some(fired) = verdict.wait(None).await {
            return Err(store_error(fired, Operation::Get, &place));
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

impl<S: ObjectStore + ?Sized> FaultyStore<S> {
    /// A listing that first applies the faults of the `list` point; the
    /// point is reached when the listing is asked for, not when polled.
    fn faulty_listing(
        &self,
        prefix: Option<&Path>,
        listing: BoxStream<'static, object_store::Result<ObjectMeta>>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let place = prefix.cloned().unwrap_or_default();
        let verdict = self.injector.decide(Site::List, &place, 0);
        async move {
            match verdict.wait(None).await {
                Some(fired) => {
                    let err = store_error(fired, Operation::Get, &place);
                    stream::once(future::ready(Err(err))).boxed()
                }
                None => listing,
            }
        }
        .flatten_stream()
        .boxed()
    }
}

/// A get result whose body goes through the rate limits and corruption
/// that fired.
fn read_through(result: GetResult, verdict: &Verdict) -> GetResult {
    let GetResult {
        payload,
        meta,
        range,
        attributes,
        extensions,
    } = result;
    let body = match payload {
        GetResultPayload::Stream(body) => body,
        #[allow(unreachable_patterns)]
        payload => GetResult {
            payload,
            meta: meta.clone(),
            range: range.clone(),
            attributes: Attributes::new(),
            extensions: Extensions::new(),
        }
        .into_stream(),
    };
    let body = verdict.read_stream(range.end - range.start, body);
    GetResult {
        payload: GetResultPayload::Stream(body),
        meta,
        range,
        attributes,
        extensions,
    }
}

/// The object store error for an injected fault.
fn store_error(fired: Fired, op: Operation, path: &Path) -> object_store::Error {
    let cause = injected_error(fired, op, STORE, None);
    let path = path.to_string();
    match cause.kind() {
        ErrorKind::NotFound => object_store::Error::NotFound {
            path,
            source: Box::new(cause),
        },
        ErrorKind::AlreadyExists => object_store::Error::AlreadyExists {
            path,
            source: Box::new(cause),
        },
        ErrorKind::Unsupported => object_store::Error::NotSupported {
            source: Box::new(cause),
        },
        _ => object_store::Error::Generic {
            store: STORE,
            source: Box::new(cause),
        },
    }
}

/// A multipart upload of a [`FaultyStore`].
#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    injector: Arc<Injector>,
    path: Path,
    /// Parts asked for so far, including the current one.
    parts: u64,
    /// Bytes of the parts asked for before the current one.
    bytes: u64,
    /// Set by a crash: nothing more reaches the inner upload.
    crashed: bool,
}

impl FaultyUpload {
    fn crashed_error(&self) -> object_store::Error {
        let cause = safedisk_core::CacheError::new(ErrorKind::Aborted, Operation::Write, STORE)
            .with_detail(format!(
                "upload of {} crashed by an injected fault",
                self.path
            ));
        object_store::Error::Generic {
            store: STORE,
            source: Box::new(cause),
        }
    }
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        if self.crashed {
            return future::ready(Err(self.crashed_error())).boxed();
        }

        self.parts += 1;
        let len = data.content_length() as u64;
        let site = Site::Part { nth: self.parts };
        let verdict = self.injector.decide(site, &self.path, self.bytes);
        self.bytes += len;

        // The decision is made now, in call order; the waiting happens
        // when the part's future is polled, as the upload itself would.
        let path = self.path.clone();
        let part: Option<BoxFuture<'static, object_store::Result<()>>> = match verdict.failure() {
            None => Some(self.inner.put_part(data)),
            Some(fired) if fired.action == FaultAction::ShortWrite => {
                let prefix = Bytes::from(data).slice(..(len / 2) as usize);
                Some(self.inner.put_part(PutPayload::from(prefix)))
            }
            Some(fired) => {
                self.crashed |= fired.action == FaultAction::Crash;
                None
            }
        };
        async move {
            let failure = verdict.wait(Some(len)).await;
            if let Some(part) = part {
                part.await?;
            }
            match failure {
                Some(fired) => Err(store_error(fired, Operation::Write, &path)),
                None => Ok(()),
            }
        }
        .boxed()
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        if self.crashed {
            return Err(self.crashed_error());
        }

        let verdict = self.injector.decide(Site::Complete, &self.path, self.bytes);
        if let Some(fired) = verdict.wait(None).await {
            self.crashed |= fired.action == FaultAction::Crash;
            return Err(store_error(fired, Operation::Commit, &self.path));
        }

        let result = self.inner.complete().await?;

        let verdict = self
            .injector
            .decide(Site::CompletePublished, &self.path, self.bytes);
        match verdict.wait(None).await {
            Some(fired) => Err(store_error(fired, Operation::Commit, &self.path)),
            None => Ok(result),
        }
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        if self.crashed {
            return Err(self.crashed_error());
        }

        let verdict = self.injector.decide(Site::Abort, &self.path, self.bytes);
        if let Some(fired) = verdict.wait(None).await {
            self.crashed |= fired.action == FaultAction::Crash;
            return Err(store_error(fired, Operation::Abort, &self.path));
        }
        self.inner.abort().await
    }
}
