//! The memory backend, the reference, passes the whole suite and the
//! fuzzer.

use std::sync::Arc;

use safedisk_core::MemoryBackend;
use safedisk_testkit::conformance::{Capabilities, Subject};

fn subject() -> Subject {
    Subject::new(Arc::new(MemoryBackend::new())).capabilities(Capabilities::memory())
}

safedisk_testkit::conformance_tests!(|| async { subject() });

#[test]
fn fault_fuzzing() {
    safedisk_testkit::fuzz::check_backend(|| async { subject() });
}
