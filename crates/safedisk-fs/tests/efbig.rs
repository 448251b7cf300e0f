//! EFBIG from `RLIMIT_FSIZE`, in a child process (this test binary run
//! again) that ignores SIGXFSZ, surfaces as the file-too-large kind.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::{key, temp_files};
use safedisk_core::{CacheBackend, ErrorKind, Fill, WriteOptions};
use safedisk_fs::{FsBackend, FsOptions, SpaceFloor};

const CHILD: &str = "SAFEDISK_FS_EFBIG_ROOT";
const LIMIT: u64 = 1 << 20;

#[test]
fn file_size_limit_is_file_too_large() {
    if let Ok(root) = std::env::var(CHILD) {
        return child(root.as_ref());
    }

    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "file_size_limit_is_file_too_large",
            "--nocapture",
        ])
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed:\n{stdout}\n{stderr}");
    for case in ["unknown length", "known length"] {
        assert!(
            stdout.contains(&format!("{case}: file_too_large")),
            "child did not report {case}:\n{stdout}"
        );
    }

    // The child left nothing: no temp file (checked before open sweeps)
    // and no entry.
    assert_eq!(temp_files(dir.path()), 0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let backend = FsBackend::open(dir.path(), FsOptions::new()).unwrap();
    runtime.block_on(async {
        for name in ["unknown", "known"] {
            assert!(backend.get(&key(name)).await.unwrap().is_none());
        }
    });
}

fn child(root: &std::path::Path) {
    use rustix::process::{Resource, Rlimit, setrlimit};

    let limit = Rlimit {
        current: Some(LIMIT),
        maximum: Some(LIMIT),
    };
    setrlimit(Resource::Fsize, limit).unwrap();
    // SAFETY: setting a signal's disposition to SIG_IGN runs no handler
    // code; the process then gets EFBIG from write instead of dying.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let backend =
        FsBackend::open(root, FsOptions::new().space_floor(SpaceFloor::Bytes(0))).unwrap();
    runtime.block_on(async {
        for (case, name, expected_len) in [
            ("unknown length", "unknown", None),
            ("known length", "known", Some(4 * LIMIT)),
        ] {
            let mut options = WriteOptions::new();
            if let Some(len) = expected_len {
                options = options.expected_len(len);
            }
            let kind = fill(&backend, name, options).await;
            assert_eq!(kind, ErrorKind::FileTooLarge, "{case}");
            assert_eq!(backend.pending().await.unwrap(), 0, "{case}");
            assert!(backend.get(&key(name)).await.unwrap().is_none(), "{case}");
            println!("{case}: {}", kind.as_str());
        }
    });
}

/// Streams 4 MiB into a fill and returns the kind it failed with.
async fn fill(backend: &FsBackend, name: &str, options: WriteOptions) -> ErrorKind {
    let mut fill = match Fill::begin(backend, &key(name), options).await {
        Ok(fill) => fill,
        Err(err) => return err.kind(),
    };
    for _ in 0..64 {
        if let Err(err) = fill.write(Bytes::from(vec![7u8; 64 * 1024])).await {
            return err.kind();
        }
    }
    match fill.commit().await {
        Ok(_) => panic!("a fill past the file size limit was committed"),
        Err(err) => err.kind(),
    }
}
