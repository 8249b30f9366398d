//! Generates the gRPC code for `proto/` into `OUT_DIR` and writes the encoded
//! file descriptor set that the server hands to gRPC reflection.
//!
//! `protox` parses the .proto files in pure Rust, so a bare machine without a
//! system `protoc` can build the workspace.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

const PROTOS: &[&str] = &["proto/jobd/v1/jobd.proto", "proto/jobd/v1/worker.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    // `include_imports` (set by `protox::compile`) puts the well-known types we
    // import into the set, so reflection clients can resolve them too.
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("jobd_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
