//! How `object_store` errors map onto SafeDisk's error kinds.

use std::error::Error as StdError;

use object_store::client::{HttpError, HttpErrorKind};
use safedisk_core::{CacheError, CacheKey, ErrorKind, Operation};

/// Classifies an `object_store` error: its kind and whether trying again
/// later, unchanged, may succeed.
///
/// | `object_store` error | kind | transient |
/// | --- | --- | --- |
/// | `NotFound` | `NotFound` | no |
/// | `AlreadyExists`, `Precondition`, `NotModified` | `AlreadyExists` | no |
/// | `NotSupported`, `NotImplemented` | `Unsupported` | no |
/// | `PermissionDenied`, `Unauthenticated` | `Backend` | no |
/// | `InvalidPath`, `UnknownConfigurationKey` | `InvalidInput` | no |
/// | 5xx, 429, 408, S3 `SlowDown`/`InternalError`, connect/request/timeout failures | `Backend` | yes |
/// | any other 4xx | `Backend` | no |
/// | anything else | `Backend` | yes |
///
/// `Precondition` and `NotModified` are what stores answer to a conditional
/// create that lost (`If-None-Match: *`), so they mean the key exists.
pub fn classify(err: &object_store::Error) -> (ErrorKind, bool) {
    use object_store::Error as E;

    let kind = match err {
        E::NotFound { .. } => ErrorKind::NotFound,
        E::AlreadyExists { .. } | E::Precondition { .. } | E::NotModified { .. } => {
            ErrorKind::AlreadyExists
        }
        E::NotSupported { .. } | E::NotImplemented { .. } => ErrorKind::Unsupported,
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => ErrorKind::InvalidInput,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            return (ErrorKind::Backend, false);
        }
        _ => return (ErrorKind::Backend, generic_is_transient(err)),
    };
    (kind, kind.default_transient())
}

/// A [`CacheError`] for a failed `object_store` call, with the error as its
/// source.
pub(crate) fn from_store(
    err: object_store::Error,
    op: Operation,
    backend: &str,
    key: Option<&CacheKey>,
) -> CacheError {
    let (kind, transient) = classify(&err);
    let mut out = CacheError::new(kind, op, backend).with_transient(transient);
    if let Some(key) = key {
        out = out.with_key(key);
    }
    out.with_source(err)
}

/// Whether an error without a more specific variant may pass: a status
/// found in the cause chain decides; failing that, a transport failure is
/// transient, and so is anything unrecognised (it is more often a hiccup
/// than a misconfiguration, and the breaker bounds the cost either way).
fn generic_is_transient(err: &object_store::Error) -> bool {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(current) = cause {
        if let Some(http) = current.downcast_ref::<HttpError>() {
            return !matches!(http.kind(), HttpErrorKind::Decode);
        }
        // The retry error that carries the status is private to
        // `object_store`; its message is the stable way to reach the code.
        let text = current.to_string();
        if text.contains("SlowDown") || text.contains("InternalError") {
            return true;
        }
        if let Some(status) = status_in(&text) {
            return status >= 500 || status == 429 || status == 408;
        }
        cause = current.source();
    }
    true
}

/// The status code in a message such as
/// `Server returned non-2xx status code: 503 Service Unavailable: ...`.
fn status_in(text: &str) -> Option<u16> {
    let rest = text.split("status code: ").nth(1)?;
    let digits = rest.get(..3)?;
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(message: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: message.to_owned().into(),
        }
    }

    #[test]
    fn statuses_decide_the_transient_flag() {
        let status = |code: &str| {
            classify(&generic(&format!(
                "Error performing PUT in 1ms - Server returned non-2xx status code: {code}: body"
            )))
        };
        assert_eq!(
            status("500 Internal Server Error"),
            (ErrorKind::Backend, true)
        );
        assert_eq!(
            status("503 Service Unavailable"),
            (ErrorKind::Backend, true)
        );
        assert_eq!(status("429 Too Many Requests"), (ErrorKind::Backend, true));
        assert_eq!(status("400 Bad Request"), (ErrorKind::Backend, false));
        assert_eq!(status("413 Payload Too Large"), (ErrorKind::Backend, false));
        assert_eq!(
            classify(&generic(
                "Server returned error response: <Code>SlowDown</Code>"
            )),
            (ErrorKind::Backend, true)
        );
    }

    #[test]
    fn variants_map_to_kinds() {
        let boxed = || -> Box<dyn StdError + Send + Sync> { "x".into() };
        let path = || "p".to_owned();
        use object_store::Error as E;
        let cases = [
            (
                E::NotFound {
                    path: path(),
                    source: boxed(),
                },
                ErrorKind::NotFound,
                false,
            ),
            (
                E::Precondition {
                    path: path(),
                    source: boxed(),
                },
                ErrorKind::AlreadyExists,
                false,
            ),
            (
                E::AlreadyExists {
                    path: path(),
                    source: boxed(),
                },
                ErrorKind::AlreadyExists,
                false,
            ),
            (
                E::NotImplemented {
                    operation: "put".into(),
                    implementer: "x".into(),
                },
                ErrorKind::Unsupported,
                false,
            ),
            (
                E::PermissionDenied {
                    path: path(),
                    source: boxed(),
                },
                ErrorKind::Backend,
                false,
            ),
            (
                E::Generic {
                    store: "S3",
                    source: Box::new(HttpError::new(HttpErrorKind::Timeout, generic("t"))),
                },
                ErrorKind::Backend,
                true,
            ),
        ];
        for (err, kind, transient) in cases {
            assert_eq!(classify(&err), (kind, transient), "{err}");
        }
    }
}
