//! SIGKILL at many points during writes and commits: after reopening,
//! every key is absent or complete and verified, and no temp file remains.
//!
//! The child is this test binary run again; it fills a few keys in a loop
//! until killed. Each entry records the seed its bytes came from, so the
//! parent can rebuild exactly what a complete entry must hold.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{content, get_bytes, key, temp_files};
use safedisk_core::{CacheBackend, EntryMetadata, Fill, WriteMode, WriteOptions};
use safedisk_fs::{FsBackend, FsOptions};

const CHILD: &str = "SAFEDISK_FS_CRASH_ROOT";
const KEYS: u64 = 5;
const ROUNDS: u64 = 24;
const SIZES: [usize; 6] = [0, 1, 5_000, 200_000, 700_000, 2_500_000];

#[test]
fn killed_writers_leave_whole_entries_or_none() {
    if let Ok(root) = std::env::var(CHILD) {
        return child(root.as_ref());
    }

    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let mut mid_fill = 0;
    let mut seen = 0;

    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "killed_writers_leave_whole_entries_or_none",
                "--nocapture",
            ])
            .env(CHILD, dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // The test harness prints its own lines first.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while line.trim() != "ready" {
            line.clear();
            let n = stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "round {round}: child ended before it was ready");
        }

        // Spread the kills over the first 60 ms of the loop.
        std::thread::sleep(Duration::from_micros(round * 2_500 + 300));
        child.kill().unwrap();
        child.wait().unwrap();

        if temp_files(dir.path()) > 0 {
            mid_fill += 1;
        }
        let backend = FsBackend::open(dir.path(), FsOptions::new().verify_on_read(true)).unwrap();
        assert_eq!(
            temp_files(dir.path()),
            0,
            "round {round}: temp file survived open"
        );
        runtime.block_on(async {
            for k in 0..KEYS {
                let key = key(&format!("k{k}"));
                let Some(entry) = backend.get(&key).await.unwrap() else {
                    continue;
                };
                seen += 1;
                let seed: u64 = entry.meta.metadata.user["seed"].parse().unwrap();
                let expected = content(seed, size_of(seed));
                assert_eq!(
                    entry.meta.len(),
                    expected.len() as u64,
                    "round {round}, {key}"
                );
                let bytes = common::read_all(entry).await.unwrap();
                assert!(bytes == expected, "round {round}, {key}: wrong bytes");
                assert_eq!(
                    get_bytes(&backend, &key).await.unwrap().unwrap().len(),
                    bytes.len()
                );
            }
        });
    }

    println!("{mid_fill} of {ROUNDS} kills left a temp file; {seen} entries checked");
    assert!(mid_fill > 0, "no kill landed during a fill");
    assert!(seen > 0, "no kill came after a commit");
}

fn size_of(seed: u64) -> usize {
    SIZES[(seed % SIZES.len() as u64) as usize]
}

fn child(root: &std::path::Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let backend = FsBackend::open(root, FsOptions::new()).unwrap();
    let start: u64 = std::process::id().into();
    println!("ready");

    runtime.block_on(async {
        for i in 0..10_000u64 {
            let seed = start * 10_000 + i;
            let bytes = content(seed, size_of(seed));
            let mode = if i % 3 == 0 {
                WriteMode::CreateOnly
            } else {
                WriteMode::Overwrite
            };
            let options = WriteOptions::new()
                .expected_len(bytes.len() as u64)
                .mode(mode)
                .metadata(EntryMetadata::new().user("seed", seed.to_string()));
            let key = key(&format!("k{}", i % KEYS));
            let mut fill = Fill::begin(&backend, &key, options).await.unwrap();
            for part in bytes.chunks(64 * 1024) {
                fill.write(Bytes::copy_from_slice(part)).await.unwrap();
            }
            // Create-only loses to an existing entry; that is fine here.
            let _ = fill.commit().await;
        }
    });
}
