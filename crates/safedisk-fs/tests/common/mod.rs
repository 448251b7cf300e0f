//! Helpers shared by the integration tests.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use futures::StreamExt;
use safedisk_core::{CacheBackend, CacheError, CacheKey, Entry, Fill, FillSummary, WriteOptions};

/// Deterministic bytes for `seed`, rebuilt by a test instead of kept.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    safedisk_testkit::payload::pseudo_random(seed, len)
}

pub fn key(name: &str) -> CacheKey {
    CacheKey::new("test", name).unwrap()
}

/// Writes `bytes` through a [`Fill`] in chunks of `chunk` bytes and commits.
pub async fn put(
    backend: &dyn CacheBackend,
    key: &CacheKey,
    bytes: &[u8],
    chunk: usize,
    options: WriteOptions,
) -> Result<FillSummary, CacheError> {
    let mut fill = Fill::begin(backend, key, options).await?;
    for part in bytes.chunks(chunk.max(1)) {
        fill.write(Bytes::copy_from_slice(part)).await?;
    }
    fill.commit().await
}

/// Reads a whole entry body; the first error ends it.
pub async fn read_all(entry: Entry) -> Result<Vec<u8>, CacheError> {
    let mut body = entry.body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// Reads the entry under `key`, or `None`.
pub async fn get_bytes(
    backend: &dyn CacheBackend,
    key: &CacheKey,
) -> Result<Option<Vec<u8>>, CacheError> {
    match backend.get(key).await? {
        Some(entry) => read_all(entry).await.map(Some),
        None => Ok(None),
    }
}

/// Files in the temp area, counted directly on disk.
pub fn temp_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("tmp")).unwrap().count()
}

/// Where the entry of `key` lives on disk.
pub fn entry_file(root: &Path, key: &CacheKey) -> PathBuf {
    let hex = key.digest_hex();
    root.join("entries").join(&hex[..2]).join(&hex)
}

/// Open descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Free bytes on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> u64 {
    let stat = rustix::fs::statvfs(path).unwrap();
    stat.f_bavail * stat.f_frsize
}

/// A size-limited tmpfs mounted on a fresh directory, unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount` takes it: `8m`), or prints why
    /// it cannot and returns `None`.
    pub fn mount(size: &str, test: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status();
        match status {
            Ok(status) if status.success() => Some(Self { dir }),
            other => {
                println!("SKIP {test}: cannot mount a tmpfs ({other:?}); needs root");
                eprintln!("SKIP {test}: cannot mount a tmpfs ({other:?}); needs root");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
