//! Compiles `proto/cachecoord/v1/*.proto` into Rust (messages, servers, clients) and
//! writes the descriptor sets that server reflection serves: ours, and the part of
//! Envoy's that `envoy.service.ratelimit.v3` needs.
//!
//! protoc comes from the `protoc-bin-vendored` crate, so a fresh machine builds
//! with nothing installed beyond the Rust toolchain. Envoy's Rust types come
//! compiled from the `envoy-types` crate; its published package also carries the
//! descriptor set they were generated from (`src/generated/types.bin`), from which
//! we keep, byte for byte, the files `rls.proto` depends on.

use std::{
    collections::{BTreeSet, HashMap},
    env,
    error::Error,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/cachecoord/v1/cache.proto",
    "proto/cachecoord/v1/session.proto",
    "proto/cachecoord/v1/rate_limit.proto",
    "proto/cachecoord/v1/lock.proto",
    "proto/cachecoord/v1/stats.proto",
];

/// The Envoy file whose service we serve; reflection gets it and its imports.
const ENVOY_RLS: &str = "envoy/service/ratelimit/v3/rls.proto";

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

    let envoy_types = envoy_types_dir()?;
    let all = fs::read(envoy_types.join("src/generated/types.bin"))
        .map_err(|e| format!("{}: {e}", envoy_types.join("src/generated/types.bin").display()))?;
    fs::write(out_dir.join("envoy_rls_descriptor.bin"), closure(&all, ENVOY_RLS)?)?;

    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=Cargo.lock");
    Ok(())
}

/// The files of the encoded FileDescriptorSet `set` that `root` needs (itself
/// and its imports, transitively), as a FileDescriptorSet of their original
/// bytes: decoding and re-encoding would drop Envoy's custom options.
fn closure(set: &[u8], root: &str) -> Result<Vec<u8>, Box<dyn Error>> {
    let mut files = HashMap::new();
    let mut rest = set;
    while !rest.is_empty() {
        // Each entry is field 1, length-delimited: tag 0x0a, length, bytes.
        let tag = prost::encoding::decode_varint(&mut rest)?;
        if tag != 0x0a {
            return Err(format!("unexpected tag {tag} in Envoy's descriptor set").into());
        }
        let len = usize::try_from(prost::encoding::decode_varint(&mut rest)?)?;
        if len > rest.len() {
            return Err("truncated Envoy descriptor set".into());
        }
        let (raw, tail) = rest.split_at(len);
        rest = tail;
        let file = prost_types::FileDescriptorProto::decode(raw)?;
        files.insert(file.name().to_string(), (file.dependency, raw));
    }
    let mut wanted = vec![root.to_string()];
    let mut kept = BTreeSet::new();
    while let Some(name) = wanted.pop() {
        let (deps, _) = files.get(&name).ok_or_else(|| format!("{name} is missing from Envoy's descriptor set"))?;
        if kept.insert(name) {
            wanted.extend(deps.iter().cloned());
        }
    }
    let mut out = Vec::new();
    for name in kept {
        let raw = files[&name].1;
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(raw.len() as u64, &mut out);
        out.extend_from_slice(raw);
    }
    Ok(out)
}

/// Where cargo unpacked the `envoy-types` package: the registry source of the
/// version in Cargo.lock, or (vendored or unusual setups) what `cargo metadata`
/// says.
fn envoy_types_dir() -> Result<PathBuf, Box<dyn Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let lock = fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    let version = lock
        .split("[[package]]")
        .find(|package| package.contains("\nname = \"envoy-types\"\n"))
        .and_then(|package| package.lines().find_map(|line| line.strip_prefix("version = ")))
        .map(|v| v.trim_matches('"').to_string());
    if let Some(version) = version {
        let cargo_home = env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
        if let Some(sources) = cargo_home.map(|home| home.join("registry/src"))
            && let Ok(registries) = fs::read_dir(sources)
        {
            for registry in registries.flatten() {
                let dir = registry.path().join(format!("envoy-types-{version}"));
                if dir.join("src/generated/types.bin").is_file() {
                    return Ok(dir);
                }
            }
        }
    }
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = env::var("TARGET")?;
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &target])
        .current_dir(&root)
        .output()?;
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|_| format!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr)))?;
    metadata["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|p| p["name"] == "envoy-types"))
        .and_then(|p| p["manifest_path"].as_str())
        .and_then(|manifest| Path::new(manifest).parent().map(Path::to_path_buf))
        .ok_or_else(|| "cannot find the envoy-types package sources".into())
}
