//! The testkit's fault fuzzer against the disk backend, with durability on
//! and off: interleaved fills, commits, aborts, drops, gets, removes and
//! recovers under seeded fault plans, checked against a model after every
//! step. `SAFEDISK_FUZZ_CASES` and `SAFEDISK_FUZZ_SEED` widen the search.

use std::sync::Arc;

use safedisk_fs::{Durability, FsBackend, FsOptions};
use safedisk_testkit::conformance::{Capabilities, Subject};

fn subject(durability: Durability) -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let options = FsOptions::new().durability(durability);
    let backend = FsBackend::open(dir.path(), options).unwrap();
    Subject::new(Arc::new(backend))
        .capabilities(Capabilities::all())
        .keep_alive(dir)
}

#[test]
fn fault_fuzzing_durable() {
    safedisk_testkit::fuzz::check_backend(|| async { subject(Durability::Durable) });
}

#[test]
fn fault_fuzzing_no_sync() {
    safedisk_testkit::fuzz::check_backend(|| async { subject(Durability::NoSync) });
}
