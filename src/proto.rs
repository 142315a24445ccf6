//! Code generated from `proto/cachecoord/v1/*.proto` by `build.rs`.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("cachecoord.v1");

/// The encoded descriptors of every cachecoord service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cachecoord_descriptor");
