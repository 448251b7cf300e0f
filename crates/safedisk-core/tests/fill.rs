//! `Fill` and the memory backend: checks before publish, deadlines,
//! poisoning, one winner, capacity.

mod support;

use std::time::Duration;

use bytes::Bytes;
use safedisk_core::{
    CacheBackend, EntryMetadata, ErrorKind, Fill, MAX_METADATA_BYTES, MemoryBackend, WriteMode,
    WriteOptions,
};
use sha2::{Digest, Sha256};
use support::{Script, ScriptedBackend, key, read_entry};

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

#[tokio::test]
async fn commit_returns_the_length_and_digest_and_publishes_metadata() {
    let backend = MemoryBackend::new();
    let k = key("a.tgz");
    let metadata = EntryMetadata::new()
        .content_type("application/gzip")
        .etag("\"abc\"")
        .user("origin-status", "200");
    let options = WriteOptions::new()
        .expected_len(11)
        .expected_sha256(sha256(b"hello world"))
        .metadata(metadata.clone());

    let mut fill = Fill::begin(&backend, &k, options).await.unwrap();
    fill.write(Bytes::from_static(b"hello ")).await.unwrap();
    assert!(
        backend.get(&k).await.unwrap().is_none(),
        "visible before commit"
    );
    fill.write(Bytes::from_static(b"world")).await.unwrap();
    let summary = fill.commit().await.unwrap();

    assert_eq!(summary.len, 11);
    assert_eq!(summary.sha256, sha256(b"hello world"));
    let entry = backend.get(&k).await.unwrap().unwrap();
    assert_eq!(entry.meta.summary, summary);
    assert_eq!(entry.meta.metadata, metadata);
    assert_eq!(read_entry(&backend, &k).await.unwrap(), b"hello world");
}

#[tokio::test]
async fn a_wrong_length_or_digest_is_never_published() {
    let backend = MemoryBackend::new();
    let k = key("bad.tgz");
    let cases = [
        (
            WriteOptions::new().expected_len(12),
            ErrorKind::LengthMismatch,
        ),
        (
            WriteOptions::new().expected_len(5),
            ErrorKind::LengthMismatch,
        ),
        (
            WriteOptions::new().expected_sha256(sha256(b"other")),
            ErrorKind::IntegrityMismatch,
        ),
    ];
    for (options, kind) in cases {
        let mut fill = Fill::begin(&backend, &k, options).await.unwrap();
        let written = fill.write(Bytes::from_static(b"hello world")).await;
        let result = match written {
            Ok(()) => fill.commit().await.map(|_| ()),
            Err(err) => Err(err),
        };
        let err = result.unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
        assert_eq!(err.key(), Some(&k));
        assert!(backend.get(&k).await.unwrap().is_none());
        assert_eq!(backend.pending().await.unwrap(), 0);
    }
}

#[tokio::test]
async fn a_fill_is_unusable_after_a_cancelled_write() {
    let backend = ScriptedBackend::always(Script {
        stall_after: Some(0),
        ..Script::default()
    });
    let k = key("cancelled.tgz");
    let mut fill = Fill::begin(&*backend, &k, WriteOptions::new())
        .await
        .unwrap();

    let write = fill.write(Bytes::from_static(b"x"));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), write)
            .await
            .is_err()
    );

    assert!(!fill.is_open());
    let err = fill.write(Bytes::from_static(b"y")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Aborted);
    assert_eq!(fill.commit().await.unwrap_err().kind(), ErrorKind::Aborted);
    assert_eq!(backend.pending().await.unwrap(), 0);
    assert!(backend.get(&k).await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn the_total_deadline_ends_a_fill_that_keeps_trickling() {
    let backend = MemoryBackend::new();
    let k = key("trickle.tgz");
    let options = WriteOptions::new()
        .total_deadline(Duration::from_secs(1))
        .idle_deadline(Duration::from_secs(5));
    let mut fill = Fill::begin(&backend, &k, options).await.unwrap();

    fill.write(Bytes::from_static(b"a")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = fill.write(Bytes::from_static(b"b")).await.unwrap_err();

    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert!(err.is_transient());
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn a_stalled_commit_is_cancelled_and_nothing_is_published() {
    let backend = ScriptedBackend::always(Script {
        stall_after: Some(3),
        ..Script::default()
    });
    let k = key("stalled-write.tgz");
    let options = WriteOptions::new().idle_deadline(Duration::from_millis(100));
    let mut fill = Fill::begin(&*backend, &k, options).await.unwrap();
    fill.write(Bytes::from_static(b"abc")).await.unwrap();

    let started = std::time::Instant::now();
    let err = fill.write(Bytes::from_static(b"d")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Stalled);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn create_only_has_one_winner_and_overwrite_the_last() {
    let backend = MemoryBackend::new();
    let k = key("race.tgz");

    let mut fills = Vec::new();
    for body in ["first", "second"] {
        let options = WriteOptions::new().mode(WriteMode::CreateOnly);
        let mut fill = Fill::begin(&backend, &k, options).await.unwrap();
        fill.write(Bytes::from(body)).await.unwrap();
        fills.push(fill);
    }
    let mut results = Vec::new();
    for fill in fills {
        results.push(fill.commit().await.map_err(|e| e.kind()));
    }
    assert!(results[0].is_ok());
    assert_eq!(results[1], Err(ErrorKind::AlreadyExists));
    assert_eq!(read_entry(&backend, &k).await.unwrap(), b"first");

    let mut fills = Vec::new();
    for body in ["third", "fourth"] {
        let mut fill = Fill::begin(&backend, &k, WriteOptions::new())
            .await
            .unwrap();
        fill.write(Bytes::from(body)).await.unwrap();
        fills.push(fill);
    }
    for fill in fills {
        fill.commit().await.unwrap();
    }
    assert_eq!(read_entry(&backend, &k).await.unwrap(), b"fourth");
    assert_eq!(backend.used_bytes(), 6);
}

#[tokio::test]
async fn a_reader_keeps_the_entry_it_opened() {
    let backend = MemoryBackend::new();
    let k = key("reader.tgz");
    let mut fill = Fill::begin(&backend, &k, WriteOptions::new())
        .await
        .unwrap();
    fill.write(Bytes::from_static(b"old")).await.unwrap();
    fill.commit().await.unwrap();

    let opened = backend.get(&k).await.unwrap().unwrap();
    assert!(backend.remove(&k).await.unwrap());
    let mut fill = Fill::begin(&backend, &k, WriteOptions::new())
        .await
        .unwrap();
    fill.write(Bytes::from_static(b"new!")).await.unwrap();
    fill.commit().await.unwrap();

    use futures::StreamExt;
    let bytes: Vec<Bytes> = opened.body.map(|c| c.unwrap()).collect().await;
    assert_eq!(bytes.concat(), b"old");
}

#[tokio::test]
async fn capacity_gives_a_real_no_space_error_and_drop_frees_it() {
    let backend = MemoryBackend::with_capacity(10);
    let k = key("big.tgz");

    let err = Fill::begin(&backend, &k, WriteOptions::new().expected_len(11))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);

    let mut fill = Fill::begin(&backend, &k, WriteOptions::new())
        .await
        .unwrap();
    fill.write(Bytes::from_static(b"12345678")).await.unwrap();
    assert_eq!(backend.used_bytes(), 8);
    let err = fill.write(Bytes::from_static(b"abc")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    assert_eq!(backend.used_bytes(), 0, "failed fill released its bytes");

    let mut fill = Fill::begin(&backend, &k, WriteOptions::new())
        .await
        .unwrap();
    fill.write(Bytes::from_static(b"12345")).await.unwrap();
    drop(fill);
    assert_eq!(backend.used_bytes(), 0, "dropped fill released its bytes");
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn memory_usage_counts_published_and_in_flight_bytes_apart() {
    let backend = MemoryBackend::with_capacity(100);
    let mut fill = Fill::begin(&backend, &key("a.tgz"), WriteOptions::new())
        .await
        .unwrap();
    fill.write(Bytes::from_static(b"1234567")).await.unwrap();
    fill.commit().await.unwrap();

    let mut open = Fill::begin(&backend, &key("b.tgz"), WriteOptions::new())
        .await
        .unwrap();
    open.write(Bytes::from_static(b"abc")).await.unwrap();
    let usage = backend.usage().expect("memory keeps counts");
    assert_eq!(
        (usage.entries, usage.bytes_used, usage.bytes_reserved),
        (1, 7, 3)
    );
    assert_eq!(usage.limit, Some(100));
    assert_eq!(usage.evictions, 0);

    drop(open);
    let usage = backend.usage().unwrap();
    assert_eq!((usage.bytes_used, usage.bytes_reserved), (7, 0));
}

#[tokio::test]
async fn bad_options_are_refused_before_the_backend_is_asked() {
    let backend = ScriptedBackend::always(Script::default());
    let k = key("opts.tgz");

    let huge = EntryMetadata::new().user("k", "v".repeat(MAX_METADATA_BYTES));
    let newline = EntryMetadata::new().etag("a\r\nSet-Cookie: x");
    for options in [
        WriteOptions::new().metadata(huge),
        WriteOptions::new().metadata(newline),
        WriteOptions::new().idle_deadline(Duration::ZERO),
    ] {
        let err = Fill::begin(&*backend, &k, options).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }
    assert_eq!(backend.begins.load(std::sync::atomic::Ordering::SeqCst), 0);
}
