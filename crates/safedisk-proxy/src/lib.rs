//! An artifact proxy for npm, PyPI, Cargo, Maven and Go modules built on
//! SafeDisk, and the drill that proves, with numbers, that a failing cache
//! never owns a request.
//!
//! - [`ecosystem`]: which paths are immutable artifacts (cached) and which
//!   are mutable metadata (passed through).
//! - [`server`]: the HTTP server: hits from the backend, misses through the
//!   tee, at most one fill per key, health and metrics.
//! - [`cache_spec`]: the `--cache` argument: a directory or an object store
//!   URL.

pub mod cache_spec;
pub mod drill;
pub mod ecosystem;
pub mod metrics;
pub mod server;
