//! What a SafeDisk backend or proxy runs in its own tests to hold itself to
//! the contract.
//!
//! - [`conformance`]: one check per point of the contract, over any
//!   backend; [`conformance_tests!`] turns them into tests in one line.
//! - [`fuzz`]: proptest strategies for keys, payloads, chunkings, fault
//!   plans and interleaved workloads, and a state-machine test that checks
//!   every invariant after every step against a model of what must be
//!   visible.
//! - [`probe`]: counts of open fds, live tasks, pending fills and
//!   established connections, and a check that they return to a baseline.
//! - [`payload`]: deterministic bytes to write and check.
//! - [`drill`]: many concurrent tees over a backend with a fault plan,
//!   reporting per request whether the client's bytes were intact, how long
//!   the fill took to detach after the fault, and what was still held.
//!
//! The checks of the suite are deliberately tested against broken backends
//! (in this crate's own tests), one per broken promise: a suite that passes
//! a broken backend is a bug.

pub mod conformance;
pub mod drill;
pub mod fuzz;
pub mod payload;
pub mod probe;
