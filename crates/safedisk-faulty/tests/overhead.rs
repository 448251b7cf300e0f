//! What the wrapper costs when no rule fires, against the bare backend.
//! Timing only; run with `SAFEDISK_MEASURE=1 cargo test --release -p
//! safedisk-faulty --test overhead -- --nocapture`.

mod support;

use std::time::{Duration, Instant};

use safedisk_core::{CacheBackend, MemoryBackend};
use support::{faulty, fill, key};

const FILLS: usize = 20_000;
const CHUNKS: usize = 16;

async fn time_fills(backend: &dyn CacheBackend) -> Duration {
    let chunk = [7u8; 4096];
    let chunks = [&chunk[..]; CHUNKS];
    let started = Instant::now();
    for i in 0..FILLS {
        fill(backend, &key(&format!("k{}", i % 64)), &chunks)
            .await
            .unwrap();
    }
    started.elapsed()
}

#[tokio::test]
async fn overhead_of_a_plan_that_never_fires() {
    if std::env::var_os("SAFEDISK_MEASURE").is_none() {
        eprintln!("SKIP: timing run; set SAFEDISK_MEASURE=1 to measure");
        return;
    }

    // Five rules, all reached on every write and commit, none firing.
    let plan = "seed=1; write:eio/p=0; write@after=1TiB:enospc; write@nth=99:eio; \
                commit:stall/nth=999999999; commit@published:eio/p=0";
    for round in 0..3 {
        let bare = time_fills(&MemoryBackend::new()).await;
        let wrapped = time_fills(&faulty(plan)).await;
        let empty = time_fills(&faulty("seed=1")).await;
        eprintln!(
            "round {round}: {FILLS} fills of {CHUNKS}x4KiB: bare {bare:?}, \
             empty plan {:.2}x, five idle rules {:.2}x",
            empty.as_secs_f64() / bare.as_secs_f64(),
            wrapped.as_secs_f64() / bare.as_secs_f64(),
        );
    }
}
