//! What the disk backend's bench binaries share: their settings from the
//! environment, a scratch directory and a runtime.

#![allow(dead_code)]

use std::path::PathBuf;

/// A bench run's settings and scratch space.
pub(crate) struct BenchEnv {
    /// A fresh directory under `SAFEDISK_BENCH_DIR` (default: the system
    /// temp directory), removed when dropped.
    pub(crate) dir: tempfile::TempDir,
    /// `SAFEDISK_BENCH_ROUNDS`.
    pub(crate) rounds: usize,
    /// `SAFEDISK_BENCH_SIZES`, comma-separated bytes.
    pub(crate) sizes: Vec<usize>,
    /// A two-worker runtime, as on the machines the figures come from.
    pub(crate) runtime: tokio::runtime::Runtime,
}

impl BenchEnv {
    /// Reads the environment, with these defaults for rounds and sizes.
    pub(crate) fn new(rounds: &str, sizes: &str) -> Self {
        let base = std::env::var_os("SAFEDISK_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let rounds = env_or("SAFEDISK_BENCH_ROUNDS", rounds)
            .parse()
            .expect("SAFEDISK_BENCH_ROUNDS is a count");
        let sizes = env_or("SAFEDISK_BENCH_SIZES", sizes)
            .split(',')
            .map(|s| s.trim().parse().expect("SAFEDISK_BENCH_SIZES is bytes"))
            .collect();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = tempfile::tempdir_in(&base).expect("a scratch directory");
        println!("directory: {} ({rounds} rounds)", dir.path().display());
        Self {
            dir,
            rounds,
            sizes,
            runtime,
        }
    }
}

/// The variable `name`, or `default` when it is not set.
pub(crate) fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}
