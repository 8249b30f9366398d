//! End-to-end tests: a real jobd server in this process on 127.0.0.1:0,
//! driven over gRPC by the real client library.
//!
//! One test binary (see `autotests = false` in the root Cargo.toml) so the
//! workspace links it once. Tests that run the `jobd` or `jobctl` binaries as
//! processes live in `server/tests/` and `client/tests/`, where Cargo
//! provides their paths.

mod aging;
mod attempts;
mod batch;
mod cancel;
mod durable;
mod errors;
mod futures;
mod harness;
mod lifecycle;
mod map;
mod options;
mod pools;
mod shutdown;
mod watch;
mod workers;
