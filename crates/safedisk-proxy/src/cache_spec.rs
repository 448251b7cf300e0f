//! The `--cache` argument: a local directory or an object store URL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use safedisk_core::CacheBackend;
use safedisk_fs::{FsBackend, FsOptions};
use safedisk_s3::{ObjectStoreBackend, S3Options};

/// Where entries are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheSpec {
    /// A directory for the disk backend.
    Dir(PathBuf),
    /// An S3 bucket and a key prefix: `s3://BUCKET/PREFIX`.
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix inside it (may be empty).
        prefix: String,
    },
}

/// Why a `--cache` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheSpecError {
    /// The value is empty.
    #[error("the cache is empty; give a directory or s3://bucket/prefix")]
    Empty,
    /// A URL of a scheme other than `s3`.
    #[error("unsupported cache url scheme {0:?}; use a directory or s3://bucket/prefix")]
    Scheme(String),
    /// `s3://` without a bucket.
    #[error("s3 cache url has no bucket; use s3://bucket/prefix")]
    NoBucket,
}

impl std::str::FromStr for CacheSpec {
    type Err = CacheSpecError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.is_empty() {
            return Err(CacheSpecError::Empty);
        }
        let Some((scheme, rest)) = value.split_once("://") else {
            return Ok(Self::Dir(PathBuf::from(value)));
        };
        if scheme != "s3" {
            return Err(CacheSpecError::Scheme(scheme.to_owned()));
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(CacheSpecError::NoBucket);
        }
        Ok(Self::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }
}

/// Settings for an S3 cache beyond the URL.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct S3Settings {
    /// Endpoint URL for S3-compatible servers (MinIO, Ceph). Default: the
    /// `AWS_ENDPOINT_URL` environment variable, else AWS.
    pub endpoint: Option<String>,
    /// Region. Default: `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Allow plain HTTP to the endpoint. Default: no.
    pub allow_http: bool,
}

impl CacheSpec {
    /// Opens the backend. Credentials for S3 come from the usual AWS
    /// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`).
    ///
    /// # Errors
    ///
    /// The backend's own error, as text, when it cannot be opened.
    ///
    /// `max_size` limits a directory cache, evicting least-recently-used
    /// entries to stay under it; an S3 cache refuses it (use a bucket
    /// lifecycle rule there).
    pub fn open(
        &self,
        s3: &S3Settings,
        idle: Duration,
        max_size: Option<u64>,
    ) -> Result<Arc<dyn CacheBackend>, String> {
        match self {
            Self::Dir(dir) => {
                let mut options = FsOptions::new();
                if let Some(bytes) = max_size {
                    options = options.max_size(bytes);
                }
                let backend = FsBackend::open(dir, options).map_err(|e| e.to_string())?;
                Ok(Arc::new(backend))
            }
            Self::S3 { .. } if max_size.is_some() => Err(
                "--max-size applies to a directory cache; limit an s3 cache with a bucket lifecycle rule"
                    .to_owned(),
            ),
            Self::S3 { bucket, prefix } => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(
                        safedisk_s3::client_options_for(idle).with_allow_http(s3.allow_http),
                    )
                    .with_retry(safedisk_s3::retry_config_for(idle));
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &s3.region {
                    builder = builder.with_region(region);
                }
                let store = builder.build().map_err(|e| e.to_string())?;
                let backend =
                    ObjectStoreBackend::new(Arc::new(store), prefix.as_str(), S3Options::new())
                        .map_err(|e| e.to_string())?;
                Ok(Arc::new(backend))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_and_s3_urls_parse() {
        assert_eq!(
            "/var/cache/sd".parse(),
            Ok(CacheSpec::Dir("/var/cache/sd".into()))
        );
        assert_eq!(
            "s3://artifacts/proxy/".parse(),
            Ok(CacheSpec::S3 {
                bucket: "artifacts".into(),
                prefix: "proxy".into()
            })
        );
        assert_eq!("s3://".parse::<CacheSpec>(), Err(CacheSpecError::NoBucket));
        assert_eq!(
            "gs://b/p".parse::<CacheSpec>(),
            Err(CacheSpecError::Scheme("gs".into()))
        );
        assert_eq!("".parse::<CacheSpec>(), Err(CacheSpecError::Empty));
    }
}
