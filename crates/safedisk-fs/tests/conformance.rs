//! The testkit's conformance suite against the disk backend, with
//! durability on and off. Each check gets a fresh root; its reopen opens a
//! second instance on the same root, as a restarted process would.

use std::path::PathBuf;
use std::sync::Arc;

use safedisk_core::CacheBackend;
use safedisk_fs::{Durability, FsBackend, FsOptions};
use safedisk_testkit::conformance::{Capabilities, Subject};

fn subject(durability: Durability) -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let root: PathBuf = dir.path().to_owned();
    let options = FsOptions::new().durability(durability);
    let backend = FsBackend::open(&root, options.clone()).unwrap();
    Subject::new(Arc::new(backend))
        .capabilities(Capabilities::all())
        .reopen(move || {
            let (root, options) = (root.clone(), options.clone());
            async move {
                let backend = tokio::task::spawn_blocking(move || FsBackend::open(root, options))
                    .await
                    .unwrap()
                    .unwrap();
                Arc::new(backend) as Arc<dyn CacheBackend>
            }
        })
        .keep_alive(dir)
}

mod durable {
    use super::*;

    safedisk_testkit::conformance_tests!(|| async { subject(Durability::Durable) });
}

mod no_sync {
    use super::*;

    safedisk_testkit::conformance_tests!(|| async { subject(Durability::NoSync) });
}
