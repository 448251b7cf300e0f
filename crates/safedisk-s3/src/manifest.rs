//! The manifest: the small object whose presence publishes an entry.
//!
//! It names the data object and records what the data object's own headers
//! cannot carry reliably: the length and SHA-256 (unknown when a multipart
//! upload starts), and metadata that would not survive S3's header rules
//! (a 2 KiB limit, ASCII only, case-folded names).
//!
//! The format is UTF-8 text, one field per line, values percent-encoded so
//! that no value can contain a space, a newline or a `%` of its own:
//!
//! ```text
//! safedisk-s3 1
//! len 5
//! sha256 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824
//! data 0000018c2f1e3a7b00001f4e00000001
//! content-type text/plain
//! user build-id 42
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use safedisk_core::{EntryMeta, EntryMetadata, FillSummary};

const MAGIC: &str = "safedisk-s3 1";

/// A parsed manifest: the entry's summary and metadata, and the fill id
/// that names its data object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub(crate) summary: FillSummary,
    pub(crate) metadata: EntryMetadata,
    pub(crate) fill_id: String,
}

impl Manifest {
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        let mut line = |name: &str, value: &str| {
            let _ = writeln!(text, "{name} {}", escape(value));
        };

        line("len", &self.summary.len.to_string());
        line("sha256", &hex::encode(self.summary.sha256));
        line("data", &self.fill_id);
        let meta = &self.metadata;
        for (name, value) in [
            ("content-type", &meta.content_type),
            ("etag", &meta.etag),
            ("origin", &meta.origin),
        ] {
            if let Some(value) = value {
                line(name, value);
            }
        }
        for (key, value) in &meta.user {
            let _ = writeln!(text, "user {} {}", escape(key), escape(value));
        }

        format!("{MAGIC}\n{text}")
    }

    /// Parses a manifest, or says what is wrong with it.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "manifest is not utf-8".to_owned())?;
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err("manifest has an unknown format".to_owned());
        }

        let mut len = None;
        let mut sha256 = None;
        let mut fill_id = None;
        let mut metadata = EntryMetadata::new();
        let mut user = BTreeMap::new();
        for line in lines {
            let mut fields = line.split(' ');
            let name = fields.next().unwrap_or_default();
            let value = fields
                .next()
                .map(unescape)
                .transpose()?
                .ok_or_else(|| format!("manifest field {name:?} has no value"))?;
            match name {
                "len" => len = Some(value.parse::<u64>().map_err(|_| "bad manifest length")?),
                "sha256" => {
                    let mut digest = [0u8; 32];
                    hex::decode_to_slice(&value, &mut digest).map_err(|_| "bad manifest digest")?;
                    sha256 = Some(digest);
                }
                "data" => fill_id = Some(value),
                "content-type" => metadata.content_type = Some(value),
                "etag" => metadata.etag = Some(value),
                "origin" => metadata.origin = Some(value),
                "user" => {
                    let user_value = fields
                        .next()
                        .map(unescape)
                        .transpose()?
                        .ok_or("manifest user field has no value")?;
                    user.insert(value, user_value);
                }
                // Fields added by later versions are ignored, so older
                // readers keep reading newer manifests.
                _ => {}
            }
        }
        metadata.user = user;

        let fill_id = fill_id.ok_or("manifest names no data object")?;
        if !is_fill_id(&fill_id) {
            return Err("manifest names a malformed data object".to_owned());
        }
        Ok(Self {
            summary: FillSummary {
                len: len.ok_or("manifest has no length")?,
                sha256: sha256.ok_or("manifest has no digest")?,
            },
            metadata,
            fill_id,
        })
    }

    pub(crate) fn entry_meta(&self) -> EntryMeta {
        EntryMeta::new(self.summary, self.metadata.clone())
    }
}

/// Fill ids are lowercase hex; anything else in a manifest is refused, so a
/// tampered manifest cannot point outside the backend's `data/` prefix.
pub(crate) fn is_fill_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        let plain = byte.is_ascii_alphanumeric() || b"-._~/:@+=,;!*()".contains(&byte);
        if plain {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn unescape(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or("truncated escape in manifest")?;
            let mut byte = [0u8];
            hex::decode_to_slice(hex, &mut byte).map_err(|_| "bad escape in manifest")?;
            out.push(byte[0]);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "manifest value is not utf-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            summary: FillSummary {
                len: 5,
                sha256: [7; 32],
            },
            metadata: EntryMetadata::new()
                .content_type("application/octet-stream; charset=\"x\"")
                .etag("W/\"abc def\"")
                .origin("https://registry.example/a b%20c")
                .user("build id", "ünïcode value\twith tab")
                .user("empty", ""),
            fill_id: "00ff".to_owned(),
        }
    }

    #[test]
    fn round_trips_awkward_values() {
        let manifest = sample();
        let text = manifest.encode();
        assert_eq!(text.lines().count(), 9, "{text}");
        assert_eq!(Manifest::decode(text.as_bytes()).unwrap(), manifest);
    }

    #[test]
    fn refuses_damage() {
        let text = sample().encode();
        assert!(Manifest::decode(b"not a manifest").is_err());
        assert!(Manifest::decode(text.replace("len 5", "len x").as_bytes()).is_err());
        assert!(Manifest::decode(text.replace("data 00ff", "data ../x").as_bytes()).is_err());
        assert!(Manifest::decode(text.replace("sha256 07", "sha256 zz").as_bytes()).is_err());
        let without_data: String = text
            .lines()
            .filter(|l| !l.starts_with("data "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(Manifest::decode(without_data.as_bytes()).is_err());
    }

    #[test]
    fn ignores_unknown_fields() {
        let text = format!("{}future-field something\n", sample().encode());
        assert_eq!(Manifest::decode(text.as_bytes()).unwrap(), sample());
    }
}
