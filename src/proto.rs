//! Code generated from `proto/cachecoord/v1/*.proto` by `build.rs`.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("cachecoord.v1");

/// The encoded descriptors of every cachecoord service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cachecoord_descriptor");

/// The encoded descriptors of `envoy.service.ratelimit.v3` and everything it
/// imports, for server reflection (see `build.rs`).
pub const ENVOY_RLS_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("envoy_rls_descriptor");
