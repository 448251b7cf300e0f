//! Round trips, abort, drop, crash and recovery, create-only, corruption
//! and the space floor, on a plain directory.

mod common;

use std::os::unix::fs::PermissionsExt;

use bytes::Bytes;
use common::{content, entry_file, get_bytes, key, put, read_all, temp_files};
use safedisk_core::{
    CacheBackend, EntryMetadata, ErrorKind, Fill, FillSummary, WriteMode, WriteOptions,
};
use safedisk_fs::{Durability, FsBackend, FsOptions, SpaceFloor};
use sha2::{Digest, Sha256};

fn both_durabilities() -> [FsOptions; 2] {
    [
        FsOptions::new(),
        FsOptions::new().durability(Durability::NoSync),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_bytes_and_metadata() {
    for options in both_durabilities() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FsBackend::open(dir.path(), options.clone()).unwrap();
        let metadata = EntryMetadata::new()
            .content_type("application/gzip")
            .etag("\"v1\"")
            .origin("https://registry.example/a.tgz")
            .user("x-layer", "base");

        for (i, (len, chunk)) in [
            (0, 1),
            (1, 1),
            (4096, 1000),
            (300_000, 7_000),
            (1 << 20, 300_000),
        ]
        .into_iter()
        .enumerate()
        {
            let key = key(&format!("obj-{i}"));
            let bytes = content(i as u64, len);
            let options = WriteOptions::new()
                .expected_len(len as u64)
                .expected_sha256(Sha256::digest(&bytes).into())
                .metadata(metadata.clone());
            let summary = put(&backend, &key, &bytes, chunk, options).await.unwrap();

            let entry = backend.get(&key).await.unwrap().expect("published");
            assert_eq!(entry.meta.summary, summary);
            assert_eq!(entry.meta.metadata, metadata);
            assert_eq!(read_all(entry).await.unwrap(), bytes, "len {len}");
        }
        assert_eq!(backend.pending().await.unwrap(), 0);
        assert_eq!(temp_files(dir.path()), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_length_and_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    let key = key("a");

    put(&backend, &key, b"first", 2, WriteOptions::new())
        .await
        .unwrap();
    let second = content(9, 700_000);
    put(&backend, &key, &second, 65_536, WriteOptions::new())
        .await
        .unwrap();
    assert_eq!(get_bytes(&backend, &key).await.unwrap().unwrap(), second);

    assert!(backend.remove(&key).await.unwrap());
    assert!(!backend.remove(&key).await.unwrap());
    assert!(backend.get(&key).await.unwrap().is_none());
    assert!(!backend.remove(&common::key("never")).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_and_drop_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new().write_buffer(0)).unwrap();
    let key = key("gone");

    let mut fill = Fill::begin(&backend, &key, WriteOptions::new())
        .await
        .unwrap();
    fill.write(Bytes::from(content(1, 100_000))).await.unwrap();
    assert_eq!(temp_files(dir.path()), 1);
    fill.abort().await.unwrap();
    assert_eq!(temp_files(dir.path()), 0);

    // Drop: the temp file is gone before drop returns, no await needed.
    let mut fill = Fill::begin(&backend, &key, WriteOptions::new().expected_len(10))
        .await
        .unwrap();
    fill.write(Bytes::from_static(b"12345")).await.unwrap();
    assert_eq!(temp_files(dir.path()), 1);
    drop(fill);
    assert_eq!(temp_files(dir.path()), 0);

    // A short body is refused by the fill, and nothing is published.
    let mut fill = Fill::begin(&backend, &key, WriteOptions::new().expected_len(10))
        .await
        .unwrap();
    fill.write(Bytes::from_static(b"12345")).await.unwrap();
    let err = fill.commit().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LengthMismatch);

    assert!(backend.get(&key).await.unwrap().is_none());
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    let fill = Fill::begin(&backend, &key("p"), WriteOptions::new())
        .await
        .unwrap();
    let temp = std::fs::read_dir(dir.path().join("tmp"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let mode = temp.metadata().unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(fill);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_leaves_a_temp_file_that_recover_sweeps() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    let key = key("crashed");

    let mut writer = backend.begin(&key, &WriteOptions::new()).await.unwrap();
    writer
        .write(Bytes::from(content(2, 600_000)))
        .await
        .unwrap();
    writer.crash();
    assert_eq!(backend.pending().await.unwrap(), 1);
    assert!(backend.get(&key).await.unwrap().is_none());

    let report = backend.recover().await.unwrap();
    assert_eq!(report.removed.len(), 1);
    assert!(report.bytes >= 600_000, "freed {}", report.bytes);
    assert_eq!(backend.pending().await.unwrap(), 0);
    assert!(backend.recover().await.unwrap().removed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_spares_live_writers_of_another_instance() {
    let dir = tempfile::tempdir().unwrap();
    let first = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    let key = key("live");
    let bytes = content(3, 400_000);

    let mut fill = Fill::begin(&first, &key, WriteOptions::new())
        .await
        .unwrap();
    fill.write(Bytes::copy_from_slice(&bytes[..300_000]))
        .await
        .unwrap();

    // A second process opening the same root runs the same sweep.
    let second = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    assert!(second.recover().await.unwrap().removed.is_empty());
    assert_eq!(second.pending().await.unwrap(), 1);

    fill.write(Bytes::copy_from_slice(&bytes[300_000..]))
        .await
        .unwrap();
    fill.commit().await.unwrap();
    assert_eq!(get_bytes(&second, &key).await.unwrap().unwrap(), bytes);
    assert_eq!(second.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_keeps_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    let key = key("once");
    let options = WriteOptions::new().mode(WriteMode::CreateOnly);

    put(&backend, &key, b"first", 5, options.clone())
        .await
        .unwrap();
    let err = put(&backend, &key, b"second", 6, options)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(get_bytes(&backend, &key).await.unwrap().unwrap(), b"first");
    assert_eq!(temp_files(dir.path()), 0);
}

/// Flips one byte of the stored file at `offset` from its end.
fn flip_from_end(path: &std::path::Path, back: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = file.metadata().unwrap().len() - back;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 1], at).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_on_read_removes_corrupt_entries() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new().verify_on_read(true)).unwrap();

    // Small: caught before any byte is handed out.
    let small = key("small");
    put(
        &backend,
        &small,
        &content(4, 1000),
        1000,
        WriteOptions::new(),
    )
    .await
    .unwrap();
    flip_from_end(&entry_file(dir.path(), &small), 1);
    let err = backend.get(&small).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IntegrityMismatch);
    assert!(!entry_file(dir.path(), &small).exists());

    // Large: the stream ends with the error in place of its last chunk.
    let large = key("large");
    let bytes = content(5, 3 << 20);
    put(&backend, &large, &bytes, 1 << 20, WriteOptions::new())
        .await
        .unwrap();
    flip_from_end(&entry_file(dir.path(), &large), 10);
    let entry = backend.get(&large).await.unwrap().unwrap();
    assert_eq!(entry.meta.len(), bytes.len() as u64);
    let mut body = entry.body;
    let mut received = 0usize;
    let mut failed = None;
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        match chunk {
            Ok(chunk) => received += chunk.len(),
            Err(err) => failed = Some(err),
        }
    }
    assert_eq!(failed.unwrap().kind(), ErrorKind::IntegrityMismatch);
    assert!(
        received < bytes.len(),
        "every byte of a corrupt entry was served"
    );
    assert!(backend.get(&large).await.unwrap().is_none());

    // A sound entry streams whole.
    put(&backend, &large, &bytes, 1 << 20, WriteOptions::new())
        .await
        .unwrap();
    assert_eq!(get_bytes(&backend, &large).await.unwrap().unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_headers_and_sizes_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    type Harm = fn(&std::path::Path);
    let damage: [(&str, Harm); 4] = [
        ("header byte", |p| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.write_all_at(b"X", 20).unwrap();
        }),
        ("truncated", |p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(f.metadata().unwrap().len() - 1).unwrap();
        }),
        ("extended", |p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(f.metadata().unwrap().len() + 1).unwrap();
        }),
        ("emptied", |p| {
            std::fs::File::create(p).unwrap();
        }),
    ];
    for (what, harm) in damage {
        let key = key(what);
        put(&backend, &key, &content(6, 5000), 5000, WriteOptions::new())
            .await
            .unwrap();
        harm(&entry_file(dir.path(), &key));
        let err = backend.get(&key).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::IntegrityMismatch, "{what}");
        assert!(
            backend.get(&key).await.unwrap().is_none(),
            "{what}: not removed"
        );
    }

    // An entry copied under another key's name is refused too.
    let (a, b) = (key("a"), key("b"));
    put(&backend, &a, b"aaa", 3, WriteOptions::new())
        .await
        .unwrap();
    put(&backend, &b, b"bbb", 3, WriteOptions::new())
        .await
        .unwrap();
    std::fs::copy(entry_file(dir.path(), &a), entry_file(dir.path(), &b)).unwrap();
    assert_eq!(
        backend.get(&b).await.unwrap_err().kind(),
        ErrorKind::IntegrityMismatch
    );
    assert_eq!(get_bytes(&backend, &a).await.unwrap().unwrap(), b"aaa");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn space_floor_refuses_at_begin() {
    let dir = tempfile::tempdir().unwrap();
    for floor in [SpaceFloor::Percent(100), SpaceFloor::Bytes(u64::MAX)] {
        let backend = FsBackend::open(dir.path(), FsOptions::new().space_floor(floor)).unwrap();
        for options in [WriteOptions::new(), WriteOptions::new().expected_len(1)] {
            let err = Fill::begin(&backend, &key("x"), options).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NoSpace, "{floor:?}");
            assert!(err.is_transient());
        }
        assert_eq!(temp_files(dir.path()), 0);
    }

    // No floor: an expected length larger than the disk is refused too.
    let backend = FsBackend::open(
        dir.path(),
        FsOptions::new().space_floor(SpaceFloor::Bytes(0)),
    )
    .unwrap();
    let huge = common::free_bytes(dir.path()) + (1 << 30);
    let err = Fill::begin(&backend, &key("x"), WriteOptions::new().expected_len(huge))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    assert_eq!(temp_files(dir.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_is_what_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    let bytes = content(8, 12345);
    let summary = put(&backend, &key("s"), &bytes, 1000, WriteOptions::new())
        .await
        .unwrap();
    assert_eq!(
        summary,
        FillSummary {
            len: 12345,
            sha256: Sha256::digest(&bytes).into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_stops_a_fill_of_unknown_length_before_the_disk_is_full() {
    let test = "floor_stops_a_fill_of_unknown_length_before_the_disk_is_full";
    let Some(fs) = common::Tmpfs::mount("16m", test) else {
        return;
    };
    let floor = 8 << 20;
    let backend = FsBackend::open(
        fs.path(),
        FsOptions::new().space_floor(SpaceFloor::Bytes(floor)),
    )
    .unwrap();
    let before = common::free_bytes(fs.path());

    let mut fill = Fill::begin(&backend, &key("stream"), WriteOptions::new())
        .await
        .unwrap();
    let mut failed = None;
    for _ in 0..256 {
        if let Err(err) = fill.write(Bytes::from(vec![1u8; 64 * 1024])).await {
            failed = Some(err);
            break;
        }
    }
    let err = match failed {
        Some(err) => err,
        None => fill.commit().await.unwrap_err(),
    };
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert_eq!(
        err.raw_os_error(),
        None,
        "the real limit was reached: {err}"
    );
    assert_eq!(temp_files(fs.path()), 0);
    assert_eq!(common::free_bytes(fs.path()), before);
}
