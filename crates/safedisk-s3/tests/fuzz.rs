//! The testkit's fault fuzzer against the backend on a real S3 server
//! (s3s-fs on loopback), a fresh server per case. `SAFEDISK_FUZZ_CASES` and
//! `SAFEDISK_FUZZ_SEED` widen the search.

use std::sync::Arc;

use safedisk_s3::testing::S3TestServer;
use safedisk_s3::{MIN_PART_SIZE, ObjectStoreBackend, S3Options};
use safedisk_testkit::conformance::{Capabilities, Subject};

async fn subject() -> Subject {
    let server = S3TestServer::start().await.expect("s3 test server");
    let options = S3Options::new().part_size(MIN_PART_SIZE);
    let backend = ObjectStoreBackend::new(server.store(), "fuzz", options).unwrap();
    Subject::new(Arc::new(backend))
        .capabilities(Capabilities::all().crash_leaves_residue(false))
        .keep_alive(server)
}

#[test]
fn fault_fuzzing() {
    safedisk_testkit::fuzz::check_backend(subject);
}
