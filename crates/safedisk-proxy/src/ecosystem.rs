//! Which paths of each ecosystem name immutable artifacts (cached) and which
//! name mutable metadata (passed through uncached).

use std::fmt;
use std::str::FromStr;

/// A package ecosystem the proxy serves, named by the first path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ecosystem {
    /// npm registry (`/npm/...`).
    Npm,
    /// PyPI (`/pypi/...`): the simple index and distribution files.
    Pypi,
    /// crates.io (`/crates/...`): downloads and the sparse index.
    Crates,
    /// A Maven repository (`/maven/...`).
    Maven,
    /// A Go module proxy (`/go/...`).
    Go,
}

impl Ecosystem {
    /// Every ecosystem.
    pub const ALL: [Ecosystem; 5] = [Self::Npm, Self::Pypi, Self::Crates, Self::Maven, Self::Go];

    /// The path segment and cache namespace: `npm`, `pypi`, `crates`,
    /// `maven`, `go`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Npm => "npm",
            Self::Pypi => "pypi",
            Self::Crates => "crates",
            Self::Maven => "maven",
            Self::Go => "go",
        }
    }

    /// Whether `path` (after `/NAME/`, without a query) names an immutable
    /// artifact, which is cached, rather than mutable metadata, which is
    /// passed through.
    pub fn is_artifact(self, path: &str) -> bool {
        let file = path.rsplit('/').next().unwrap_or("");
        match self {
            // Tarballs: `pkg/-/pkg-1.0.0.tgz`, `@scope/pkg/-/pkg-1.0.0.tgz`.
            // Package documents (`pkg`, `@scope%2fpkg`) change on publish.
            Self::Npm => path.contains("/-/") && file.ends_with(".tgz"),
            // Distribution files; `simple/...` is the mutable index.
            Self::Pypi => {
                !path.starts_with("simple/")
                    && [".whl", ".tar.gz", ".zip", ".tar.bz2", ".egg"]
                        .iter()
                        .any(|ext| file.ends_with(ext))
            }
            // `api/v1/crates/NAME/VERSION/download` or
            // `crates/NAME/NAME-VERSION.crate`; the sparse index is mutable.
            Self::Crates => file == "download" || file.ends_with(".crate"),
            // Release artifacts; metadata and snapshots change.
            Self::Maven => {
                !file.starts_with("maven-metadata.xml")
                    && !path.contains("SNAPSHOT")
                    && file.contains('.')
                    && !path.ends_with('/')
            }
            // `MODULE/@v/VERSION.{zip,mod,info}`; `@v/list` and `@latest`
            // change.
            Self::Go => {
                path.contains("/@v/")
                    && file != "list"
                    && [".zip", ".mod", ".info"]
                        .iter()
                        .any(|ext| file.ends_with(ext))
            }
        }
    }

    /// The content type to serve a cached artifact with when the upstream
    /// gave none.
    pub fn default_content_type(self, path: &str) -> &'static str {
        match self {
            Self::Go if path.ends_with(".info") => "application/json",
            Self::Go if path.ends_with(".mod") => "text/plain; charset=utf-8",
            Self::Go => "application/zip",
            Self::Maven if path.ends_with(".pom") => "application/xml",
            Self::Maven if path.ends_with(".jar") => "application/java-archive",
            Self::Npm => "application/octet-stream",
            _ => "application/octet-stream",
        }
    }
}

impl fmt::Display for Ecosystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An ecosystem name that is not one of the five.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown ecosystem {0:?}; expected npm, pypi, crates, maven or go")]
pub struct UnknownEcosystem(pub String);

impl FromStr for Ecosystem {
    type Err = UnknownEcosystem;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|e| e.as_str() == name)
            .ok_or_else(|| UnknownEcosystem(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::Ecosystem::*;

    #[test]
    fn artifacts_are_cached_and_metadata_passes_through() {
        let cases = [
            (Npm, "left-pad/-/left-pad-1.3.0.tgz", true),
            (Npm, "@types/node/-/node-20.1.0.tgz", true),
            (Npm, "left-pad", false),
            (Npm, "@types%2fnode", false),
            (
                Pypi,
                "packages/ab/cd/requests-2.31.0-py3-none-any.whl",
                true,
            ),
            (Pypi, "packages/ab/cd/requests-2.31.0.tar.gz", true),
            (Pypi, "simple/requests/", false),
            (Crates, "api/v1/crates/serde/1.0.200/download", true),
            (Crates, "crates/serde/serde-1.0.200.crate", true),
            (Crates, "se/rd/serde", false),
            (Crates, "config.json", false),
            (
                Maven,
                "org/apache/commons/commons-lang3/3.14.0/commons-lang3-3.14.0.jar",
                true,
            ),
            (
                Maven,
                "org/apache/commons/commons-lang3/3.14.0/commons-lang3-3.14.0.pom",
                true,
            ),
            (
                Maven,
                "org/apache/commons/commons-lang3/maven-metadata.xml",
                false,
            ),
            (
                Maven,
                "org/apache/commons/commons-lang3/maven-metadata.xml.sha1",
                false,
            ),
            (
                Maven,
                "com/acme/app/1.0-SNAPSHOT/app-1.0-20240101.jar",
                false,
            ),
            (Go, "golang.org/x/text/@v/v0.14.0.zip", true),
            (Go, "golang.org/x/text/@v/v0.14.0.mod", true),
            (Go, "golang.org/x/text/@v/v0.14.0.info", true),
            (Go, "golang.org/x/text/@v/list", false),
            (Go, "golang.org/x/text/@latest", false),
        ];
        for (eco, path, cached) in cases {
            assert_eq!(eco.is_artifact(path), cached, "{eco}/{path}");
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for eco in super::Ecosystem::ALL {
            assert_eq!(eco.as_str().parse::<super::Ecosystem>().unwrap(), eco);
        }
        let err = "rubygems".parse::<super::Ecosystem>().unwrap_err();
        assert!(err.to_string().contains("rubygems"));
    }
}
