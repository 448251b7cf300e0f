//! The testkit's conformance suite against the backend on a real S3 server
//! (s3s-fs on loopback), one server per check.

use std::sync::Arc;

use safedisk_core::CacheBackend;
use safedisk_s3::testing::S3TestServer;
use safedisk_s3::{MIN_PART_SIZE, ObjectStoreBackend, S3Options};
use safedisk_testkit::conformance::{Capabilities, Subject};

async fn subject() -> Subject {
    let server = S3TestServer::start().await.expect("s3 test server");
    let store = server.store();
    let open = move || -> Arc<dyn CacheBackend> {
        let options = S3Options::new().part_size(MIN_PART_SIZE);
        Arc::new(ObjectStoreBackend::new(store.clone(), "conformance", options).unwrap())
    };
    let backend = open();
    // A crash leaves an incomplete multipart upload, which only the
    // bucket's lifecycle rule removes: `recover` cannot list uploads, so the
    // suite's crash-residue check does not apply.
    let capabilities = Capabilities::all().crash_leaves_residue(false);
    Subject::new(backend)
        .capabilities(capabilities)
        .reopen(move || {
            let backend = open();
            async move { backend }
        })
        .keep_alive(server)
}

safedisk_testkit::conformance_tests!(subject);
