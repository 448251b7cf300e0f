//! The backend against a real S3 server (s3s-fs) on loopback.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::S3ConditionalPut;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use safedisk_core::{
    CacheBackend, CacheError, CacheKey, EntryMetadata, ErrorKind, Fill, WriteMode, WriteOptions,
};
use safedisk_faulty::FaultyStore;
use safedisk_s3::testing::{BUCKET, S3TestServer};
use safedisk_s3::{MIN_PART_SIZE, ObjectStoreBackend, S3Options};
use support::body;

const MIB: usize = 1024 * 1024;

fn key(name: &str) -> CacheKey {
    CacheKey::new("npm", name).unwrap()
}

fn backend(store: Arc<dyn ObjectStore>) -> ObjectStoreBackend {
    let options = S3Options::new().part_size(MIN_PART_SIZE);
    ObjectStoreBackend::new(store, "cache", options).unwrap()
}

async fn setup() -> (S3TestServer, ObjectStoreBackend) {
    let server = S3TestServer::start().await.unwrap();
    let backend = backend(server.store());
    (server, backend)
}

/// Streams `bytes` into a fill in chunks of uneven sizes, so part
/// boundaries fall inside chunks.
async fn write_all(fill: &mut Fill, bytes: &Bytes) -> Result<(), CacheError> {
    let mut offset = 0;
    let mut step = 0;
    while offset < bytes.len() {
        let len = [777_777, 1 << 20, 65_536, 3 * MIB + 5][step % 4].min(bytes.len() - offset);
        fill.write(bytes.slice(offset..offset + len)).await?;
        offset += len;
        step += 1;
    }
    Ok(())
}

async fn fill(
    backend: &ObjectStoreBackend,
    key: &CacheKey,
    options: WriteOptions,
    bytes: &Bytes,
) -> Result<(), CacheError> {
    begun(backend, key, options, bytes)
        .await?
        .commit()
        .await
        .map(|_| ())
}

/// A fill of `key` that has streamed `bytes`, not yet committed.
async fn begun(
    backend: &ObjectStoreBackend,
    key: &CacheKey,
    options: WriteOptions,
    bytes: &Bytes,
) -> Result<Fill, CacheError> {
    let mut fill = Fill::begin(backend, key, options).await?;
    write_all(&mut fill, bytes).await?;
    Ok(fill)
}

async fn read(backend: &ObjectStoreBackend, key: &CacheKey) -> Result<Option<Bytes>, CacheError> {
    let Some(entry) = backend.get(key).await? else {
        return Ok(None);
    };
    let len = entry.meta.len();
    let mut out = Vec::with_capacity(len as usize);
    let mut body = entry.body;
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    assert_eq!(out.len() as u64, len);
    Ok(Some(Bytes::from(out)))
}

/// Waits up to 2 s for the server to have no open multipart uploads.
async fn uploads_drained(server: &S3TestServer) -> Vec<String> {
    for _ in 0..40 {
        let open = server.open_uploads().unwrap();
        if open.is_empty() {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.open_uploads().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_body_round_trips_with_metadata_in_one_put() {
    let (server, backend) = setup().await;
    let key = key("left-pad/-/left-pad-1.3.0.tgz");
    let bytes = body(100_000, 1);
    let metadata = EntryMetadata::new()
        .content_type("application/gzip")
        .etag("\"abc\"")
        .origin("https://registry.npmjs.org/left-pad")
        .user("integrity", "sha512-ünïcode and spaces");

    let options = WriteOptions::new()
        .expected_len(bytes.len() as u64)
        .metadata(metadata.clone());
    fill(&backend, &key, options, &bytes).await.unwrap();

    let entry = backend.get(&key).await.unwrap().expect("published");
    assert_eq!(entry.meta.metadata, metadata);
    assert_eq!(entry.meta.len(), bytes.len() as u64);
    assert_eq!(read(&backend, &key).await.unwrap().unwrap(), bytes);

    // One data object, written by a single put (no multipart ETag), carrying
    // the content type; and one manifest.
    let data = backend.store().list(Some(&backend.data_folder(&key)));
    let data: Vec<_> = data.map(|m| m.unwrap()).collect().await;
    assert_eq!(data.len(), 1);
    let head = backend.store().head(&data[0].location).await.unwrap();
    assert!(!head.e_tag.as_deref().unwrap().contains('-'), "{head:?}");
    let got = backend.store().get(&data[0].location).await.unwrap();
    let content_type = got.attributes.get(&object_store::Attribute::ContentType);
    assert_eq!(content_type.map(|v| v.as_ref()), Some("application/gzip"));
    assert_eq!(server.objects().unwrap().len(), 2);
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_body_streams_as_multipart_and_round_trips_byte_exact() {
    let (server, backend) = setup().await;
    let key = key("big/-/big-1.0.0.tgz");
    let bytes = body(20 * MIB + 12_345, 2);

    let options = WriteOptions::new().expected_len(bytes.len() as u64);
    fill(&backend, &key, options, &bytes).await.unwrap();

    assert_eq!(read(&backend, &key).await.unwrap().unwrap(), bytes);
    let data = backend.store().list(Some(&backend.data_folder(&key)));
    let data: Vec<_> = data.map(|m| m.unwrap()).collect().await;
    // 20 MiB and a bit in 5 MiB parts: five parts, S3's multipart ETag says so.
    let head = backend.store().head(&data[0].location).await.unwrap();
    assert!(head.e_tag.as_deref().unwrap().ends_with("-5\""), "{head:?}");
    assert!(server.open_uploads().unwrap().is_empty());
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_body_round_trips() {
    let (_server, backend) = setup().await;
    let key = key("empty");
    fill(&backend, &key, WriteOptions::new(), &Bytes::new())
        .await
        .unwrap();
    assert_eq!(read(&backend, &key).await.unwrap().unwrap(), Bytes::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_of_a_multipart_fill_leaves_nothing() {
    let (server, backend) = setup().await;
    let key = key("aborted");

    let fill = begun(&backend, &key, WriteOptions::new(), &body(11 * MIB, 3))
        .await
        .unwrap();
    assert!(!server.open_uploads().unwrap().is_empty(), "upload started");
    assert_eq!(backend.pending().await.unwrap(), 1);

    fill.abort().await.unwrap();

    assert_eq!(server.open_uploads().unwrap(), Vec::<String>::new());
    assert_eq!(server.objects().unwrap(), Vec::<String>::new());
    assert!(backend.get(&key).await.unwrap().is_none());
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_without_commit_aborts_the_upload() {
    let (server, backend) = setup().await;
    let key = key("dropped");

    let fill = begun(&backend, &key, WriteOptions::new(), &body(6 * MIB, 4))
        .await
        .unwrap();
    assert!(!server.open_uploads().unwrap().is_empty(), "upload started");
    drop(fill);

    assert_eq!(backend.pending().await.unwrap(), 0);
    assert_eq!(uploads_drained(&server).await, Vec::<String>::new());
    assert_eq!(server.objects().unwrap(), Vec::<String>::new());
}

#[test]
fn drop_after_the_runtime_is_gone_leaves_the_upload_to_the_lifecycle_rule() {
    let host = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = host.block_on(S3TestServer::start()).unwrap();
    let store = host.block_on(async { server.store() });
    let backend = backend(store);
    let key = key("orphaned");

    let fill_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fill = fill_runtime
        .block_on(begun(
            &backend,
            &key,
            WriteOptions::new(),
            &body(6 * MIB, 5),
        ))
        .unwrap();
    drop(fill_runtime);

    // No runtime here at all: the drop must neither panic nor block.
    drop(fill);

    assert_eq!(host.block_on(backend.pending()).unwrap(), 0);
    assert!(
        !server.open_uploads().unwrap().is_empty(),
        "with its runtime gone the abort cannot run; the upload stays open"
    );
    assert!(host.block_on(backend.get(&key)).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_leaves_the_upload_open_and_nothing_visible() {
    let (server, backend) = setup().await;
    let key = key("crashed");
    let mut writer = backend.begin(&key, &WriteOptions::new()).await.unwrap();
    writer.write(body(6 * MIB, 6)).await.unwrap();

    writer.crash();

    assert_eq!(backend.pending().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!server.open_uploads().unwrap().is_empty());
    assert!(backend.get(&key).await.unwrap().is_none());
    // Incomplete uploads are the lifecycle rule's; recover cannot list them.
    assert!(backend.recover().await.unwrap().removed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_first_commit_wins_small_and_multipart() {
    let (server, backend) = setup().await;
    for (name, len) in [("small", 1000), ("large", 6 * MIB)] {
        let key = key(name);
        let first = body(len, 7);
        let second = body(len, 8);
        let options = WriteOptions::new().mode(WriteMode::CreateOnly);

        // Both fills are open before either commits.
        let mut a = Fill::begin(&backend, &key, options.clone()).await.unwrap();
        let mut b = Fill::begin(&backend, &key, options.clone()).await.unwrap();
        write_all(&mut a, &first).await.unwrap();
        write_all(&mut b, &second).await.unwrap();
        a.commit().await.unwrap();
        let err = b.commit().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{name}: {err}");
        assert!(!err.is_transient());

        assert_eq!(
            read(&backend, &key).await.unwrap().unwrap(),
            first,
            "{name}"
        );
        // The loser's data object is gone: one manifest, one data object.
        let data = backend.store().list(Some(&backend.data_folder(&key)));
        assert_eq!(data.count().await, 1, "{name}");
    }
    assert!(server.open_uploads().unwrap().is_empty());
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_without_conditional_put_is_unsupported() {
    let server = S3TestServer::start().await.unwrap();
    let store = server
        .store_builder()
        .with_conditional_put(S3ConditionalPut::Disabled)
        .build()
        .unwrap();
    let backend = backend(Arc::new(store));
    let key = key("unconditional");

    let options = WriteOptions::new().mode(WriteMode::CreateOnly);
    let err = fill(&backend, &key, options, &body(10, 9))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert_eq!(server.objects().unwrap(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_replaces_and_removes_the_old_data() {
    let (server, backend) = setup().await;
    let key = key("replaced");
    let old = body(6 * MIB, 10);
    let new = body(1000, 11);

    fill(&backend, &key, WriteOptions::new(), &old)
        .await
        .unwrap();
    fill(&backend, &key, WriteOptions::new(), &new)
        .await
        .unwrap();

    assert_eq!(read(&backend, &key).await.unwrap().unwrap(), new);
    assert_eq!(server.objects().unwrap().len(), 2, "manifest and new data");
}

/// Overwrites that delete the data a reader is about to open, twice in a
/// row, never make the entry look corrupt: `get` follows the newer
/// manifest each time. The reader's store delays every request by `STEP`,
/// and the overwrites land in the middle of its data requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_follows_manifests_through_repeated_overwrites() {
    const STEP: Duration = Duration::from_millis(800);
    let server = S3TestServer::start().await.unwrap();
    let writer = backend(server.store());
    let plan = format!("get:delay={}ms", STEP.as_millis()).parse().unwrap();
    let slow: Arc<dyn ObjectStore> = Arc::new(FaultyStore::from_arc(server.store(), plan));
    let reader = Arc::new(backend(slow));
    let key = key("churning");
    let bodies: Vec<Bytes> = (0..3).map(|n| body(1000 + n, 20 + n as u64)).collect();
    fill(&writer, &key, WriteOptions::new(), &bodies[0])
        .await
        .unwrap();

    // The reader's requests start at 0, STEP, 2 STEP, ... and reach the
    // server one STEP later: manifest 0 at STEP, its data at 2 STEP,
    // manifest 1 at 3 STEP, its data at 4 STEP, manifest 2 at 5 STEP.
    let started = tokio::time::Instant::now();
    let read = tokio::spawn({
        let (reader, key) = (reader.clone(), key.clone());
        async move { read(&reader, &key).await }
    });
    for (n, at) in [(1, 3), (2, 7)] {
        // Half way between a manifest read and its data read.
        tokio::time::sleep_until(started + STEP * at / 2).await;
        fill(&writer, &key, WriteOptions::new(), &bodies[n])
            .await
            .unwrap();
    }
    let got = read.await.unwrap().expect("a get through two overwrites");
    let got = got.expect("the entry never looks missing");
    assert!(bodies.contains(&got), "a whole entry");
    // On a machine too loaded to keep to the schedule the reader may have
    // got through with fewer overwrites in its way; it must never fail.
    if got != bodies[2] {
        eprintln!("the overwrites missed the reader's windows");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_never_published() {
    let (server, backend) = setup().await;
    let key = key("bad");
    let bytes = body(6 * MIB, 12);

    let short = WriteOptions::new().expected_len(bytes.len() as u64 + 1);
    let err = fill(&backend, &key, short, &bytes).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LengthMismatch);

    let wrong_digest = WriteOptions::new().expected_sha256([0; 32]);
    let err = fill(&backend, &key, wrong_digest, &bytes)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IntegrityMismatch);

    assert!(backend.get(&key).await.unwrap().is_none());
    assert_eq!(server.objects().unwrap(), Vec::<String>::new());
    assert!(server.open_uploads().unwrap().is_empty());
    assert_eq!(backend.pending().await.unwrap(), 0);
}

/// The data object of `key`'s published entry, as a file of the server.
fn data_file(
    server: &S3TestServer,
    backend: &ObjectStoreBackend,
    key: &CacheKey,
) -> std::path::PathBuf {
    let folder = backend.data_folder(key);
    let dir = server.data_dir().join(BUCKET).join(folder.as_ref());
    let entry = std::fs::read_dir(dir).unwrap().next().unwrap().unwrap();
    entry.path()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_detects_corruption_and_truncation() {
    let (server, backend) = setup().await;

    let flipped = key("flipped");
    let bytes = body(50_000, 13);
    fill(&backend, &flipped, WriteOptions::new(), &bytes)
        .await
        .unwrap();
    let path = data_file(&server, &backend, &flipped);
    let mut stored = std::fs::read(&path).unwrap();
    stored[12_345] ^= 1;
    std::fs::write(&path, &stored).unwrap();
    let err = read(&backend, &flipped).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IntegrityMismatch, "{err}");
    // Found while streaming, the corrupt entry is removed in the background.
    let mut gone = false;
    for _ in 0..40 {
        if backend.get(&flipped).await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "corrupt entry removed");

    let truncated = key("truncated");
    fill(&backend, &truncated, WriteOptions::new(), &bytes)
        .await
        .unwrap();
    let path = data_file(&server, &backend, &truncated);
    std::fs::write(&path, &bytes[..1000]).unwrap();
    let err = backend.get(&truncated).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IntegrityMismatch, "{err}");
    // A corrupt entry found at open is removed.
    assert!(backend.get(&truncated).await.unwrap().is_none());

    let garbled = key("garbled");
    fill(&backend, &garbled, WriteOptions::new(), &bytes)
        .await
        .unwrap();
    let manifest = backend.manifest_path(&garbled);
    backend
        .store()
        .put(&manifest, PutPayload::from_static(b"not a manifest"))
        .await
        .unwrap();
    let err = backend.get(&garbled).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IntegrityMismatch, "{err}");
    assert!(backend.get(&garbled).await.unwrap().is_none());

    // A manifest that still names a data object someone deleted.
    let orphaned = key("orphaned");
    fill(&backend, &orphaned, WriteOptions::new(), &bytes)
        .await
        .unwrap();
    std::fs::remove_file(data_file(&server, &backend, &orphaned)).unwrap();
    let err = backend.get(&orphaned).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IntegrityMismatch, "{err}");
    assert!(!err.is_transient(), "{err}");
    assert!(backend.get(&orphaned).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_deletes_manifest_and_data() {
    let (server, backend) = setup().await;
    let key = key("removed");
    fill(&backend, &key, WriteOptions::new(), &body(6 * MIB, 14))
        .await
        .unwrap();

    assert!(backend.remove(&key).await.unwrap());
    assert!(!backend.remove(&key).await.unwrap());
    assert!(backend.get(&key).await.unwrap().is_none());
    assert_eq!(server.objects().unwrap(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_sweeps_unpublished_data_past_the_grace() {
    let (server, backend) = setup().await;
    let published = key("published");
    fill(&backend, &published, WriteOptions::new(), &body(1000, 15))
        .await
        .unwrap();
    // What a process that died between completing and publishing leaves.
    let orphans = [
        backend.data_folder(&published).join("00000000000000aa"),
        backend
            .data_folder(&key("never-published"))
            .join("00000000000000bb"),
    ];
    for orphan in &orphans {
        let payload = PutPayload::from_static(b"orphan");
        backend.store().put(orphan, payload).await.unwrap();
    }

    let report = backend.recover().await.unwrap();
    assert!(report.removed.is_empty(), "within the grace: {report:?}");

    let eager = ObjectStoreBackend::new(
        backend.store().clone(),
        "cache",
        S3Options::new().orphan_grace(Duration::ZERO),
    )
    .unwrap();
    let report = eager.recover().await.unwrap();
    let mut removed = report.removed.clone();
    removed.sort();
    let mut expected: Vec<_> = orphans.iter().map(Path::to_string).collect();
    expected.sort();
    assert_eq!(removed, expected);
    assert_eq!(report.bytes, 12);

    assert_eq!(
        read(&backend, &published).await.unwrap().unwrap().len(),
        1000
    );
    assert_eq!(server.objects().unwrap().len(), 2);
}

#[test]
fn options_out_of_bounds_are_refused() {
    let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let err = ObjectStoreBackend::new(store, "p", S3Options::new().part_size(4 * MIB)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("part size"), "{err}");
}

/// CPU time this thread has used; unlike wall time it does not grow while
/// the thread is preempted by other processes on a busy machine.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the
    // call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0);
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[test]
fn a_fill_and_a_read_never_hold_their_runtime_thread() {
    // The server runs on a runtime of its own; the fill and the read share
    // one thread with a ticker that records the most CPU time the thread
    // spent elsewhere between two of its 5 ms ticks. (Wall-clock gaps would
    // also count time the thread was preempted by other processes.)
    let host = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = host.block_on(S3TestServer::start()).unwrap();
    let store = host.block_on(async { server.store() });
    let backend = backend(store);
    let bytes = body(16 * MIB, 16);
    let key = key("scheduling");

    let fill_thread = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let largest = fill_thread.block_on(async {
        let largest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let ticker = tokio::spawn({
            let largest = largest.clone();
            async move {
                let mut last = thread_cpu_time();
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let now = thread_cpu_time();
                    let mut largest = largest.lock().unwrap();
                    *largest = (*largest).max(now - last);
                    last = now;
                }
            }
        });
        tokio::task::yield_now().await;

        // Chunks of 64 KiB, as from a network: the fill hashes each chunk
        // on this thread, and in debug builds a large one takes long.
        let mut fill = Fill::begin(&backend, &key, WriteOptions::new())
            .await
            .unwrap();
        for at in (0..bytes.len()).step_by(64 * 1024) {
            fill.write(bytes.slice(at..at + 64 * 1024)).await.unwrap();
        }
        fill.commit().await.unwrap();
        let entry = backend.get(&key).await.unwrap().unwrap();
        let read: Vec<Bytes> = entry.body.map(|c| c.unwrap()).collect().await;
        assert_eq!(Bytes::from(read.concat()), bytes);

        tokio::time::sleep(Duration::from_millis(20)).await;
        ticker.abort();
        *largest.lock().unwrap()
    });
    println!("most cpu time between ticks: {largest:?}");
    assert!(largest < Duration::from_millis(200), "{largest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_that_cannot_reach_the_store_reports_and_releases() {
    let (server, backend) = setup().await;
    let key = key("unreachable");
    let fill = begun(&backend, &key, WriteOptions::new(), &body(6 * MIB, 17))
        .await
        .unwrap();

    drop(server);
    let err = fill.abort().await.unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
    assert!(err.is_transient());
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_that_cannot_be_a_header_still_round_trips() {
    let (_server, backend) = setup().await;
    let key = key("unicode-type");
    let metadata = EntryMetadata::new().content_type("text/plain; name=\"ünï\"");
    let options = WriteOptions::new().metadata(metadata.clone());

    fill(&backend, &key, options, &body(6 * MIB, 18))
        .await
        .unwrap();

    let entry = backend.get(&key).await.unwrap().expect("published");
    assert_eq!(entry.meta.metadata, metadata);
}
