//! Deterministic test bytes.

/// `len` bytes from a xorshift generator seeded with `seed`: they do not
/// compress, differ for every seed, and are the same on every run, so a
/// test can rebuild what it expects instead of keeping it.
///
/// ```
/// use safedisk_testkit::payload::pseudo_random;
///
/// assert_eq!(pseudo_random(7, 1000), pseudo_random(7, 1000));
/// assert_ne!(pseudo_random(7, 1000), pseudo_random(8, 1000));
/// assert_eq!(pseudo_random(7, 10)[..], pseudo_random(7, 1000)[..10]);
/// ```
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}
