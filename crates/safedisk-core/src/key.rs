//! Cache keys: a namespace and a name, validated once, at construction.

use std::fmt;

use sha2::{Digest, Sha256};

/// Longest accepted namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 32;

/// Longest accepted name, in bytes.
///
/// Long enough for deep Maven coordinates and Go module paths, short enough
/// that a backend mapping names to paths never meets `ENAMETOOLONG` for the
/// whole path (most filesystems allow 4096 bytes).
pub const MAX_NAME_LEN: usize = 1024;

/// Longest accepted single `/`-separated segment of a name, in bytes.
///
/// Matches the 255-byte file name limit of ext4, XFS and tmpfs.
pub const MAX_SEGMENT_LEN: usize = 255;

/// The identity of one cache entry: a namespace (an ecosystem such as `npm`)
/// and a `/`-separated name inside it.
///
/// A key is checked when it is built and cannot be changed afterwards, so
/// every `CacheKey` in a program is one that no backend needs to distrust:
///
/// - the namespace is 1 to [`MAX_NAMESPACE_LEN`] bytes of `a-z`, `0-9`, `-`
///   and `_`;
/// - the name is 1 to [`MAX_NAME_LEN`] bytes of segments separated by `/`;
///   no segment is empty, `.` or `..`, or longer than [`MAX_SEGMENT_LEN`];
///   the name does not start with `/`; it holds no `\`, NUL or other control
///   character.
///
/// Together these mean that no accepted key, joined under a directory as a
/// relative path, can name anything outside `directory/namespace/`.
///
/// # Examples
///
/// ```
/// use safedisk_core::CacheKey;
///
/// let key = CacheKey::new("npm", "left-pad/-/left-pad-1.3.0.tgz")?;
/// assert_eq!(key.namespace(), "npm");
/// assert_eq!(key.to_string(), "npm:left-pad/-/left-pad-1.3.0.tgz");
///
/// assert!(CacheKey::new("npm", "../../etc/passwd").is_err());
/// # Ok::<(), safedisk_core::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    namespace: String,
    name: String,
}

/// Why a namespace or name was refused by [`CacheKey::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The namespace is empty.
    #[error("namespace is empty")]
    EmptyNamespace,
    /// The namespace is longer than [`MAX_NAMESPACE_LEN`].
    #[error("namespace is {len} bytes, more than {MAX_NAMESPACE_LEN}")]
    NamespaceTooLong {
        /// The length that was given.
        len: usize,
    },
    /// The namespace holds a character other than `a-z`, `0-9`, `-`, `_`.
    #[error("namespace has {found:?} at byte {at}; only a-z, 0-9, '-' and '_' are allowed")]
    BadNamespaceChar {
        /// The offending character.
        found: char,
        /// Its byte offset.
        at: usize,
    },
    /// The name is empty.
    #[error("name is empty")]
    EmptyName,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("name is {len} bytes, more than {MAX_NAME_LEN}")]
    NameTooLong {
        /// The length that was given.
        len: usize,
    },
    /// The name starts with `/`.
    #[error("name is an absolute path")]
    AbsoluteName,
    /// The name holds a backslash, NUL or other control character.
    #[error("name has forbidden character {found:?} at byte {at}")]
    BadNameChar {
        /// The offending character.
        found: char,
        /// Its byte offset.
        at: usize,
    },
    /// A segment of the name is empty, `.` or `..`.
    #[error("name has a {segment:?} segment at byte {at}")]
    BadSegment {
        /// The segment: `""`, `"."` or `".."`.
        segment: String,
        /// Byte offset of the segment's start.
        at: usize,
    },
    /// A segment of the name is longer than [`MAX_SEGMENT_LEN`].
    #[error("name has a segment of {len} bytes at byte {at}, more than {MAX_SEGMENT_LEN}")]
    SegmentTooLong {
        /// The segment's length.
        len: usize,
        /// Byte offset of the segment's start.
        at: usize,
    },
}

impl CacheKey {
    /// Builds a key, or says what is wrong with it.
    ///
    /// # Errors
    ///
    /// A [`KeyError`] naming the first rule that the namespace or the name
    /// breaks (see the type's docs for the rules).
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<Self, KeyError> {
        let namespace = namespace.into();
        let name = name.into();

        check_namespace(&namespace)?;
        check_name(&name)?;

        Ok(Self { namespace, name })
    }

    /// The namespace, such as `npm` or `pypi`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The name inside the namespace, such as `left-pad/-/left-pad-1.3.0.tgz`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A stable SHA-256 of the namespace and the name, for backends that
    /// want flat, fixed-length names.
    ///
    /// The value is part of the on-disk format and will not change between
    /// releases: it hashes the namespace, a NUL byte, then the name.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.namespace.as_bytes());
        hasher.update([0u8]);
        hasher.update(self.name.as_bytes());
        hasher.finalize().into()
    }

    /// [`digest`](Self::digest) as 64 lowercase hex characters.
    pub fn digest_hex(&self) -> String {
        hex::encode(self.digest())
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.namespace, self.name)
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

fn check_namespace(namespace: &str) -> Result<(), KeyError> {
    if namespace.is_empty() {
        return Err(KeyError::EmptyNamespace);
    }
    if namespace.len() > MAX_NAMESPACE_LEN {
        return Err(KeyError::NamespaceTooLong {
            len: namespace.len(),
        });
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    match namespace.char_indices().find(|&(_, c)| !allowed(c)) {
        Some((at, found)) => Err(KeyError::BadNamespaceChar { found, at }),
        None => Ok(()),
    }
}

fn check_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty() {
        return Err(KeyError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(KeyError::NameTooLong { len: name.len() });
    }
    if name.starts_with('/') {
        return Err(KeyError::AbsoluteName);
    }
    if let Some((at, found)) = name
        .char_indices()
        .find(|&(_, c)| c == '\\' || c.is_control())
    {
        return Err(KeyError::BadNameChar { found, at });
    }

    let mut at = 0;
    for segment in name.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(KeyError::BadSegment {
                segment: segment.to_owned(),
                at,
            });
        }
        if segment.len() > MAX_SEGMENT_LEN {
            return Err(KeyError::SegmentTooLong {
                len: segment.len(),
                at,
            });
        }
        at += segment.len() + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Component, Path};

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_artifact_names_of_every_ecosystem() {
        for (ns, name) in [
            ("npm", "@types/node/-/node-20.1.0.tgz"),
            ("pypi", "packages/ab/cd/requests-2.31.0-py3-none-any.whl"),
            ("crates", "serde/1.0.200/download"),
            ("maven", "org/apache/commons/commons-lang3/3.14.0/x.jar"),
            ("go", "github.com/!burnt!sushi/toml/@v/v1.3.2.zip"),
        ] {
            CacheKey::new(ns, name).unwrap();
        }
    }

    #[test]
    fn refusals_say_what_and_where() {
        let err = |ns: &str, name: &str| CacheKey::new(ns, name).unwrap_err();

        assert_eq!(err("", "a"), KeyError::EmptyNamespace);
        assert_eq!(
            err("N", "a"),
            KeyError::BadNamespaceChar { found: 'N', at: 0 }
        );
        assert_eq!(err("npm", ""), KeyError::EmptyName);
        assert_eq!(err("npm", "/etc/passwd"), KeyError::AbsoluteName);
        assert_eq!(
            err("npm", "a/../../b"),
            KeyError::BadSegment {
                segment: "..".into(),
                at: 2
            }
        );
        assert_eq!(
            err("npm", "a//b"),
            KeyError::BadSegment {
                segment: "".into(),
                at: 2
            }
        );
        assert_eq!(
            err("npm", "a\\b"),
            KeyError::BadNameChar { found: '\\', at: 1 }
        );
        assert_eq!(
            err("npm", "a\0b"),
            KeyError::BadNameChar { found: '\0', at: 1 }
        );
        assert_eq!(
            err("npm", &"x".repeat(MAX_NAME_LEN + 1)),
            KeyError::NameTooLong {
                len: MAX_NAME_LEN + 1
            }
        );
        assert_eq!(
            err("npm", &format!("a/{}", "x".repeat(256))),
            KeyError::SegmentTooLong { len: 256, at: 2 }
        );
        assert_eq!(
            err("npm", "a/../b").to_string(),
            "name has a \"..\" segment at byte 2"
        );
    }

    #[test]
    fn digest_is_stable_and_separates_namespace_from_name() {
        let a = CacheKey::new("npm", "x").unwrap();
        // sha256(b"npm\0x"), computed independently of this crate.
        assert_eq!(
            a.digest_hex(),
            "2793134cb36264070eea8fb54f58b95807d5fc50d66fce8098c3bee3705e1fc5"
        );
        let b = CacheKey::new("np", "mx").unwrap();
        assert_ne!(a.digest(), b.digest());
    }

    fn any_string() -> impl Strategy<Value = String> {
        // Mostly the characters that matter for paths, plus anything at all.
        prop_oneof![
            4 => proptest::collection::vec(
                prop_oneof![
                    Just("/".to_owned()),
                    Just(".".to_owned()),
                    Just("..".to_owned()),
                    Just("\\".to_owned()),
                    Just("\0".to_owned()),
                    Just("a".to_owned()),
                    Just("~".to_owned()),
                    Just(":".to_owned()),
                ],
                0..12,
            )
            .prop_map(|parts| parts.concat()),
            1 => any::<String>(),
        ]
    }

    proptest! {
        #[test]
        fn no_accepted_key_leaves_its_namespace(name in any_string()) {
            if let Ok(key) = CacheKey::new("npm", name) {
                let joined = Path::new("root").join(key.namespace()).join(key.name());
                for component in joined.components() {
                    prop_assert!(
                        matches!(component, Component::Normal(_)),
                        "{:?} has a non-normal component {:?}", joined, component
                    );
                }
                prop_assert!(joined.starts_with("root/npm"));
                prop_assert!(!joined.components().any(|c| c == Component::ParentDir));
                prop_assert!(!key.name().contains('\0'));
            }
        }
    }
}
