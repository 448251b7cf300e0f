//! Helpers shared by this crate's integration tests.

use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `len` bytes: a 64 KiB random tile repeated, each copy stamped with its
/// index, so a misplaced or repeated part changes the bytes. (Random bytes
/// throughout cost seconds per test in debug builds.)
pub(crate) fn body(len: usize, seed: u64) -> Bytes {
    const TILE: usize = 64 * 1024;
    let mut tile = vec![0u8; TILE];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut tile);
    let mut bytes = Vec::with_capacity(len);
    let mut index = 0u64;
    while bytes.len() < len {
        tile[..8].copy_from_slice(&index.to_le_bytes());
        let take = TILE.min(len - bytes.len());
        bytes.extend_from_slice(&tile[..take]);
        index += 1;
    }
    Bytes::from(bytes)
}
