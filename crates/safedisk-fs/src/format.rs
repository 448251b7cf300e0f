//! The on-disk entry format: one file holding a header and the bytes.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "safedisk"
//! 8       4     format version (1), little-endian like every number here
//! 12      4     header length in bytes, this table included
//! 16      8     data length
//! 24      32    SHA-256 of the data
//! 56      ..    key: namespace and name, each a u16 length and UTF-8 bytes
//!         ..    content type, etag, origin: each a u8 presence flag, then
//!               a u32 length and UTF-8 bytes when present
//!         ..    user metadata: a u32 count, then per pair a u32 length and
//!               bytes for the key and the same for the value
//! end-8   8     first 8 bytes of the SHA-256 of every header byte before it
//! ```
//!
//! The data follows the header. Because the length, digest and metadata sit
//! in the same file as the bytes, and that file is published by one rename,
//! they can never disagree.

use safedisk_core::{CacheKey, EntryMetadata, FillSummary};
use sha2::{Digest, Sha256};

pub(crate) const MAGIC: [u8; 8] = *b"safedisk";
pub(crate) const VERSION: u32 = 1;

/// Length of the fixed part, up to and including the data digest.
pub(crate) const FIXED_LEN: usize = 56;
const CHECK_LEN: usize = 8;

/// Largest header accepted when reading: a key and metadata at their
/// limits need under 12 KiB.
pub(crate) const MAX_HEADER_LEN: usize = 64 * 1024;

/// Why a header could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// Not an entry of this format, or damaged.
    Corrupt(&'static str),
    /// An entry of a later format version.
    Version(u32),
}

/// A decoded header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub(crate) header_len: u64,
    pub(crate) summary: FillSummary,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) metadata: EntryMetadata,
}

/// Encodes the header for `key` and `metadata` with `summary`; the length
/// does not depend on `summary`, so a placeholder header written at begin
/// is overwritten in place at commit.
pub(crate) fn encode(key: &CacheKey, metadata: &EntryMetadata, summary: &FillSummary) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN + 64 + metadata.encoded_len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&summary.len.to_le_bytes());
    out.extend_from_slice(&summary.sha256);

    put_short(&mut out, key.namespace());
    put_short(&mut out, key.name());
    for field in [&metadata.content_type, &metadata.etag, &metadata.origin] {
        match field {
            Some(value) => {
                out.push(1);
                put_long(&mut out, value);
            }
            None => out.push(0),
        }
    }
    out.extend_from_slice(&(metadata.user.len() as u32).to_le_bytes());
    for (k, v) in &metadata.user {
        put_long(&mut out, k);
        put_long(&mut out, v);
    }

    let header_len = (out.len() + CHECK_LEN) as u32;
    out[12..16].copy_from_slice(&header_len.to_le_bytes());
    let check = Sha256::digest(&out);
    out.extend_from_slice(&check[..CHECK_LEN]);
    out
}

/// The header length a prefix of a file declares, once its fixed part is
/// there.
pub(crate) fn declared_len(prefix: &[u8]) -> Result<usize, HeaderError> {
    if prefix.len() < FIXED_LEN || prefix[..8] != MAGIC {
        return Err(HeaderError::Corrupt("no entry header"));
    }
    let version = u32::from_le_bytes(prefix[8..12].try_into().unwrap_or_default());
    if version != VERSION {
        return Err(HeaderError::Version(version));
    }
    let len = u32::from_le_bytes(prefix[12..16].try_into().unwrap_or_default()) as usize;
    if !(FIXED_LEN + CHECK_LEN..=MAX_HEADER_LEN).contains(&len) {
        return Err(HeaderError::Corrupt("header length out of range"));
    }
    Ok(len)
}

/// Decodes a whole header (exactly `declared_len` bytes).
pub(crate) fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
    let header_len = declared_len(bytes)?;
    if bytes.len() != header_len {
        return Err(HeaderError::Corrupt("header cut short"));
    }
    let (body, check) = bytes.split_at(header_len - CHECK_LEN);
    if Sha256::digest(body)[..CHECK_LEN] != *check {
        return Err(HeaderError::Corrupt("header checksum mismatch"));
    }

    let len = u64::from_le_bytes(body[16..24].try_into().unwrap_or_default());
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(&body[24..56]);

    let mut cursor = Cursor {
        rest: &body[FIXED_LEN..],
    };
    let namespace = cursor.short()?;
    let name = cursor.short()?;
    let mut metadata = EntryMetadata::new();
    if let Some(value) = cursor.optional()? {
        metadata = metadata.content_type(value);
    }
    if let Some(value) = cursor.optional()? {
        metadata = metadata.etag(value);
    }
    if let Some(value) = cursor.optional()? {
        metadata = metadata.origin(value);
    }
    let pairs = cursor.u32()?;
    for _ in 0..pairs {
        let k = cursor.long()?;
        let v = cursor.long()?;
        metadata = metadata.user(k, v);
    }
    if !cursor.rest.is_empty() {
        return Err(HeaderError::Corrupt("trailing bytes in header"));
    }

    Ok(Header {
        header_len: header_len as u64,
        summary: FillSummary { len, sha256 },
        namespace,
        name,
        metadata,
    })
}

fn put_short(out: &mut Vec<u8>, value: &str) {
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value.as_bytes());
}

fn put_long(out: &mut Vec<u8>, value: &str) {
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value.as_bytes());
}

struct Cursor<'a> {
    rest: &'a [u8],
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], HeaderError> {
        if self.rest.len() < n {
            return Err(HeaderError::Corrupt("header field runs past its end"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, HeaderError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().unwrap_or_default()))
    }

    fn text(&mut self, n: usize) -> Result<String, HeaderError> {
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| HeaderError::Corrupt("header text not utf-8"))
    }

    fn short(&mut self) -> Result<String, HeaderError> {
        let bytes = self.take(2)?;
        let n = u16::from_le_bytes(bytes.try_into().unwrap_or_default());
        self.text(n.into())
    }

    fn long(&mut self) -> Result<String, HeaderError> {
        let n = self.u32()?;
        self.text(n as usize)
    }

    fn optional(&mut self) -> Result<Option<String>, HeaderError> {
        match self.take(1)?[0] {
            0 => Ok(None),
            1 => self.long().map(Some),
            _ => Err(HeaderError::Corrupt("bad presence flag in header")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (CacheKey, EntryMetadata, FillSummary) {
        let key = CacheKey::new("npm", "left-pad/-/left-pad-1.3.0.tgz").unwrap();
        let metadata = EntryMetadata::new()
            .content_type("application/gzip")
            .etag("\"abc\"")
            .user("x-a", "1")
            .user("x-b", "");
        let summary = FillSummary {
            len: 12345,
            sha256: [7; 32],
        };
        (key, metadata, summary)
    }

    #[test]
    fn round_trip() {
        let (key, metadata, summary) = sample();
        let bytes = encode(&key, &metadata, &summary);
        assert_eq!(declared_len(&bytes).unwrap(), bytes.len());
        let header = decode(&bytes).unwrap();
        assert_eq!(header.summary, summary);
        assert_eq!(header.namespace, "npm");
        assert_eq!(header.name, key.name());
        assert_eq!(header.metadata, metadata);
        assert_eq!(header.header_len, bytes.len() as u64);
    }

    #[test]
    fn length_does_not_depend_on_the_summary() {
        let (key, metadata, summary) = sample();
        let placeholder = FillSummary {
            len: 0,
            sha256: [0; 32],
        };
        assert_eq!(
            encode(&key, &metadata, &summary).len(),
            encode(&key, &metadata, &placeholder).len()
        );
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let (key, metadata, summary) = sample();
        let good = encode(&key, &metadata, &summary);
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn later_versions_are_named() {
        let (key, metadata, summary) = sample();
        let mut bytes = encode(&key, &metadata, &summary);
        bytes[8] = 2;
        assert_eq!(decode(&bytes).unwrap_err(), HeaderError::Version(2));
    }
}
