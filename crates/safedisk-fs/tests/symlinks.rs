//! Planted symlinks under the root are never followed, and nothing outside
//! the root is touched; keys never become paths.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;

use common::{entry_file, get_bytes, key, put, temp_files};
use safedisk_core::{CacheBackend, CacheKey, ErrorKind, WriteOptions};
use safedisk_fs::{FsBackend, FsOptions};

/// A directory outside the root with one file, and a snapshot of it.
struct Outside {
    dir: tempfile::TempDir,
}

impl Outside {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), b"keep me").unwrap();
        Self { dir }
    }

    fn secret(&self) -> std::path::PathBuf {
        self.dir.path().join("secret")
    }

    fn assert_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["secret"], "files appeared outside the root");
        assert_eq!(std::fs::read(self.secret()).unwrap(), b"keep me");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_in_the_temp_area_is_removed_not_followed() {
    let outside = Outside::new();
    let dir = tempfile::tempdir().unwrap();
    FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    symlink(outside.secret(), dir.path().join("tmp/1-0.tmp")).unwrap();
    symlink(outside.dir.path(), dir.path().join("tmp/dir.tmp")).unwrap();

    // Opening sweeps: the links go, their targets stay.
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    assert_eq!(temp_files(dir.path()), 0);
    outside.assert_untouched();

    // A FIFO is no temp file of ours: left alone, and the sweep does not
    // hang opening it.
    let fifo = dir.path().join("tmp/fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .unwrap();
    assert!(backend.recover().await.unwrap().removed.is_empty());
    assert!(fifo.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_shard_directory_is_refused() {
    let outside = Outside::new();
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    let key = key("victim");
    let hex = key.digest_hex();
    symlink(
        outside.dir.path(),
        dir.path().join("entries").join(&hex[..2]),
    )
    .unwrap();

    let err = put(&backend, &key, b"payload", 7, WriteOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Io | ErrorKind::InvalidInput),
        "{err}"
    );
    assert!(backend.get(&key).await.is_err());
    assert!(backend.remove(&key).await.is_err());
    assert_eq!(temp_files(dir.path()), 0);
    outside.assert_untouched();

    // A shard that is a link to a file is refused the same way.
    let other = key_with_shard_not(&hex[..2]);
    let shard = dir.path().join("entries").join(&other.digest_hex()[..2]);
    symlink(outside.secret(), shard).unwrap();
    assert!(
        put(&backend, &other, b"x", 1, WriteOptions::new())
            .await
            .is_err()
    );
    outside.assert_untouched();
}

fn key_with_shard_not(shard: &str) -> CacheKey {
    (0..)
        .map(|i| key(&format!("other-{i}")))
        .find(|k| &k.digest_hex()[..2] != shard)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_in_place_of_an_entry_is_never_read_through() {
    let outside = Outside::new();
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    let key = key("planted");
    let path = entry_file(dir.path(), &key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    symlink(outside.secret(), &path).unwrap();

    // Reading refuses it.
    assert!(backend.get(&key).await.is_err());
    outside.assert_untouched();

    // Publishing replaces the link itself; the target is not written.
    put(&backend, &key, b"real", 4, WriteOptions::new())
        .await
        .unwrap();
    assert_eq!(get_bytes(&backend, &key).await.unwrap().unwrap(), b"real");
    assert!(!path.is_symlink());
    outside.assert_untouched();

    // Removing a link removes the link.
    std::fs::remove_file(&path).unwrap();
    symlink(outside.secret(), &path).unwrap();
    assert!(backend.remove(&key).await.unwrap());
    assert!(!path.is_symlink());
    outside.assert_untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_layout_directories_refuse_to_open() {
    let outside = Outside::new();
    for sub in ["tmp", "entries"] {
        let dir = tempfile::tempdir().unwrap();
        symlink(outside.dir.path(), dir.path().join(sub)).unwrap();
        let err = FsBackend::open(dir.path(), FsOptions::new()).unwrap_err();
        assert!(!err.to_string().is_empty());
        outside.assert_untouched();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_become_paths() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();

    for bad in [
        "../../etc/passwd",
        "/etc/passwd",
        "a/../../b",
        "a\0b",
        "a\\b",
        "",
    ] {
        assert!(CacheKey::new("npm", bad).is_err(), "{bad:?} accepted");
    }
    let odd = [
        "...",
        "a/.../b",
        "-rf",
        "name with spaces/and:colons",
        &"deep/".repeat(200)[..999],
    ];
    for name in odd {
        let key = CacheKey::new("npm", name).unwrap();
        put(&backend, &key, name.as_bytes(), 64, WriteOptions::new())
            .await
            .unwrap();
        assert_eq!(
            get_bytes(&backend, &key).await.unwrap().unwrap(),
            name.as_bytes()
        );
    }

    // Every file under the root is entries/xx/<64 hex starting xx>.
    let mut files = Vec::new();
    walk(dir.path(), dir.path(), &mut files);
    assert_eq!(files.len(), odd.len());
    for file in files {
        let parts: Vec<_> = file.split('/').collect();
        assert_eq!(parts.len(), 3, "{file}");
        assert_eq!(parts[0], "entries");
        assert!(
            parts[2].len() == 64 && parts[2].starts_with(parts[1]),
            "{file}"
        );
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(root, &path, out);
        } else {
            out.push(
                path.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
}
