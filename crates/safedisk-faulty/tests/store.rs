//! `FaultyStore` around object_store's in-memory store: faults surface as
//! real `object_store` errors at the call they name.

use std::error::Error as _;
use std::time::Duration;

use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};
use safedisk_core::{CacheError, ErrorKind};
use safedisk_faulty::{FaultPoint, FaultyStore};

fn store(text: &str) -> FaultyStore<InMemory> {
    FaultyStore::new(InMemory::new(), text.parse().unwrap())
}

fn path(name: &str) -> Path {
    Path::from(name)
}

/// The injected kind and errno under an object store error.
fn injected(err: &object_store::Error) -> (ErrorKind, Option<i32>) {
    let cause = err
        .source()
        .and_then(|s| s.downcast_ref::<CacheError>())
        .unwrap_or_else(|| panic!("no injected cause under {err}"));
    (cause.kind(), cause.raw_os_error())
}

async fn exists(store: &FaultyStore<InMemory>, name: &str) -> bool {
    store.inner().head(&path(name)).await.is_ok()
}

/// Starts a multipart upload of `name` and sends `parts`, each of which
/// must go through.
async fn multipart(
    store: &FaultyStore<InMemory>,
    name: &str,
    parts: &[&'static str],
) -> Box<dyn MultipartUpload> {
    let mut upload = store.put_multipart(&path(name)).await.unwrap();
    for part in parts {
        upload
            .put_part(PutPayload::from_static(part.as_bytes()))
            .await
            .unwrap();
    }
    upload
}

#[tokio::test]
async fn a_failed_put_is_a_generic_error_and_stores_nothing() {
    let store = store("put:enospc/once");

    let err = store
        .put(&path("a"), PutPayload::from_static(b"abc"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            object_store::Error::Generic {
                store: "faulty",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(injected(&err), (ErrorKind::NoSpace, Some(28)));
    assert!(!exists(&store, "a").await);

    store
        .put(&path("a"), PutPayload::from_static(b"abc"))
        .await
        .unwrap();
    assert!(exists(&store, "a").await);
    assert_eq!(store.records()[0].point, FaultPoint::Put);
    assert_eq!(store.records()[0].key, "a");
}

#[tokio::test]
async fn a_put_that_fails_after_publish_is_stored() {
    let store = store("put@published:error=already_exists");
    let err = store
        .put(&path("a"), PutPayload::from_static(b"abc"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, object_store::Error::AlreadyExists { .. }),
        "{err:?}"
    );
    assert!(exists(&store, "a").await);
}

#[tokio::test]
async fn the_nth_part_fails_and_the_upload_can_still_be_aborted() {
    let store = store("part@nth=2:eio");

    let mut upload = multipart(&store, "big", &["one"]).await;
    let err = upload
        .put_part(PutPayload::from_static(b"two"))
        .await
        .unwrap_err();
    assert_eq!(injected(&err), (ErrorKind::Io, Some(5)));
    upload.abort().await.unwrap();
    assert!(!exists(&store, "big").await);

    let records = store.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].point, FaultPoint::PartNth(2));
    assert_eq!(records[0].bytes, 3);
}

#[tokio::test]
async fn complete_fails_before_or_after_publish() {
    let store = store("complete:error=backend/once; complete@published:eio/once");

    let mut upload = multipart(&store, "x", &["abc"]).await;
    let err = upload.complete().await.unwrap_err();
    assert_eq!(injected(&err), (ErrorKind::Backend, None));
    assert!(!exists(&store, "x").await);
    upload.abort().await.unwrap();

    let mut upload = multipart(&store, "x", &["abc"]).await;
    let err = upload.complete().await.unwrap_err();
    assert_eq!(injected(&err), (ErrorKind::Io, Some(5)));
    assert!(
        exists(&store, "x").await,
        "published although the caller saw an error"
    );

    let points: Vec<_> = store.records().iter().map(|r| r.point).collect();
    assert_eq!(
        points,
        [FaultPoint::Complete, FaultPoint::CompletePublished]
    );
}

#[tokio::test]
async fn a_failed_abort_is_recorded_and_not_sent() {
    let store = store("abort:eio");

    let mut upload = multipart(&store, "x", &["abc"]).await;
    let err = upload.abort().await.unwrap_err();
    assert_eq!(injected(&err), (ErrorKind::Io, Some(5)));

    let records = store.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].point, FaultPoint::Abort);
    assert_eq!(records[0].key, "x");
    assert_eq!(records[0].bytes, 3);

    // The upload was not aborted, so it can still complete.
    upload.complete().await.unwrap();
    assert!(exists(&store, "x").await);
}

#[tokio::test]
async fn a_crash_abandons_the_upload() {
    let store = store("part@nth=2:crash");

    let mut upload = multipart(&store, "x", &["one"]).await;
    let err = upload
        .put_part(PutPayload::from_static(b"two"))
        .await
        .unwrap_err();
    assert_eq!(injected(&err), (ErrorKind::Aborted, None));
    assert!(
        upload
            .put_part(PutPayload::from_static(b"3"))
            .await
            .is_err()
    );
    assert!(upload.complete().await.is_err());
    assert!(upload.abort().await.is_err());
    assert!(!exists(&store, "x").await);
    assert_eq!(store.records().len(), 1);
}

#[tokio::test]
async fn kinds_map_to_the_matching_object_store_errors() {
    let store = store("get:error=not_found/once; get:error=unsupported/nth=2");
    store
        .put(&path("a"), PutPayload::from_static(b"abc"))
        .await
        .unwrap();

    let err = store.get(&path("a")).await.unwrap_err();
    assert!(
        matches!(err, object_store::Error::NotFound { .. }),
        "{err:?}"
    );
    let err = store.get(&path("a")).await.unwrap_err();
    assert!(
        matches!(err, object_store::Error::NotSupported { .. }),
        "{err:?}"
    );
    assert_eq!(
        store.get(&path("a")).await.unwrap().bytes().await.unwrap(),
        "abc"
    );
}

#[tokio::test]
async fn get_corrupts_one_byte() {
    let store = store("get:corrupt");
    let original: Vec<u8> = (0..64).collect();
    store
        .put(&path("a"), original.clone().into())
        .await
        .unwrap();

    let read = store.get(&path("a")).await.unwrap().bytes().await.unwrap();
    assert_eq!(read.len(), original.len());
    let flipped = (0..64).filter(|&i| read[i] != original[i]).count();
    assert_eq!(flipped, 1);
}

#[tokio::test]
async fn list_and_delete_fail_as_injected() {
    let store = store("list:eio/once; remove:erofs/once");
    store
        .put(&path("d/a"), PutPayload::from_static(b"a"))
        .await
        .unwrap();

    let first = store.list(Some(&path("d"))).next().await.unwrap();
    assert_eq!(injected(&first.unwrap_err()), (ErrorKind::Io, Some(5)));
    assert_eq!(store.list(Some(&path("d"))).count().await, 1);

    let err = store.delete(&path("d/a")).await.unwrap_err();
    assert_eq!(injected(&err), (ErrorKind::ReadOnly, Some(30)));
    assert!(exists(&store, "d/a").await);
    store.delete(&path("d/a")).await.unwrap();
    assert!(!exists(&store, "d/a").await);
}

#[tokio::test]
async fn a_stalled_part_ends_when_dropped() {
    let store = store("part:stall");
    let mut upload = multipart(&store, "x", &[]).await;
    let part = upload.put_part(PutPayload::from_static(b"abc"));
    let timed = tokio::time::timeout(Duration::from_millis(50), part).await;
    assert!(timed.is_err(), "still pending at the timeout");
    upload.abort().await.unwrap();
}

#[tokio::test]
async fn a_short_part_sends_half() {
    let store = store("part:short");
    let mut upload = multipart(&store, "x", &[]).await;
    let err = upload
        .put_part(PutPayload::from_static(b"abcdef"))
        .await
        .unwrap_err();
    assert_eq!(injected(&err), (ErrorKind::ShortWrite, None));

    // Completing anyway shows what reached the store.
    upload.complete().await.unwrap();
    let stored = store
        .inner()
        .get(&path("x"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored, "abc");
}

#[tokio::test(start_paused = true)]
async fn delays_and_rate_limits_at_the_store_take_their_time() {
    let inner: std::sync::Arc<dyn ObjectStore> = std::sync::Arc::new(InMemory::new());
    let store = FaultyStore::new(inner, "put:rate=1KiB/s; list:delay=2s".parse().unwrap());

    let started = tokio::time::Instant::now();
    store.put(&path("a"), vec![0u8; 3072].into()).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(3));

    let started = tokio::time::Instant::now();
    assert_eq!(store.list(None).count().await, 1);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(store.to_string(), "faulty(InMemory)");
}
