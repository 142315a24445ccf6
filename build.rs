//! Compiles `proto/cachecoord/v1/*.proto` into Rust (messages, servers, clients) and
//! writes the descriptor set that server reflection serves.
//!
//! protoc comes from the `protoc-bin-vendored` crate, so a fresh machine builds
//! with nothing installed beyond the Rust toolchain.

use std::{env, error::Error, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/cachecoord/v1/cache.proto",
    "proto/cachecoord/v1/session.proto",
    "proto/cachecoord/v1/rate_limit.proto",
    "proto/cachecoord/v1/lock.proto",
    "proto/cachecoord/v1/stats.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let well_known = protoc_bin_vendored::include_path()?;

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::ProtoCodec")
        .file_descriptor_set_path(out_dir.join("cachecoord_descriptor.bin"))
        .compile_with_config(config, PROTOS, &["proto", well_known.to_str().unwrap_or_default()])?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
