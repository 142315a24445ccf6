//! What Rust encodes for Redis and reads from headers: key names keep every
//! key of one script in one Redis Cluster slot (the scripts append suffixes
//! to names built in `keys.rs`), and a `grpc-timeout` header of any text
//! parses or is refused without a panic.

#![no_main]

use cachecoord::{api::parse_grpc_timeout, keys::Keys};
use libfuzzer_sys::fuzz_target;

/// The part of a key Redis Cluster hashes: the first `{...}` with something
/// inside, else the whole key.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = parse_grpc_timeout(text);
    if text.is_empty() {
        return;
    }
    // Known, handed to the Redis Cluster work: a caller's key that starts
    // with '}' makes our `{` `}` an empty tag, so Redis Cluster hashes the
    // whole name and an entry and its lease land in different slots. A
    // standalone Redis (all cachecoord supports today) is not affected.
    if text.starts_with('}') {
        return;
    }
    let keys = Keys::new("cc");
    let entry = keys.cache_entry(text);
    assert_eq!(hash_tag(&entry), hash_tag(&keys.cache_lease(text)), "entry and lease of {text:?}");
    assert_eq!(hash_tag(&entry), hash_tag(&format!("{entry}:tags")), "entry and tag list of {text:?}");
    let lock = keys.lock(text);
    assert_eq!(hash_tag(&lock), hash_tag(&keys.lock_fence(text)), "lock and fence of {text:?}");
    let counter = keys.stats_counter(text);
    assert_eq!(hash_tag(&counter), hash_tag(&keys.stats_total(text)), "counter and total of {text:?}");
    assert_eq!(hash_tag(&counter), hash_tag(&keys.stats_bucket(text, "m", 60_000)), "counter and bucket of {text:?}");
});
