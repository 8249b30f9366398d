//! The jobd wire contract, shared by the server (`jobd`) and the client
//! (`jobd-client`).
//!
//! This crate exists so that both sides compile against one definition of the
//! protocol and one seam between wire types and domain types:
//!
//! - [`pb`]: the code `tonic`/`prost` generate from `proto/jobd/v1/jobd.proto`.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors (including the
//!   well-known types we import) that the server serves through gRPC
//!   reflection, so `grpcurl` works without .proto files.
//! - [`JobId`] and [`JobState`]: domain types with their one conversion to
//!   and from the wire.
//! - [`value`]: lossless-where-possible conversion between
//!   `google.protobuf.Value` and `serde_json::Value`.
//!
//! It does no I/O and starts no runtime.

mod id;
mod state;
pub mod value;

pub use id::{JobId, ParseJobIdError};
pub use state::JobState;

/// Generated protobuf messages and gRPC stubs for package `jobd.v1`.
///
/// Walled off in its own module so generated names never mix with ours.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("jobd.v1");
}

/// The encoded `FileDescriptorSet` of `jobd.v1` and every file it imports, for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/jobd_descriptor.bin"));

/// The fully qualified gRPC service name, as health checks and reflection
/// report it.
pub const SERVICE_NAME: &str = "jobd.v1.JobService";
