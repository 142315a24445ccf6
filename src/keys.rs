//! Every Redis key and channel name the service uses, in one place.
//!
//! Keys that one script touches together share a `{hash tag}` (the caller's
//! key), so Redis Cluster would place them in one slot. The Lua scripts only
//! append the documented suffixes (`:lease`, `:tags`) to names built here.
//! ARCHITECTURE.md shows the same layout as a table.

/// Builds key names under the configured prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    /// The `--key-prefix`, validated to hold no `{` or `}` so that the hash
    /// tag of every key is the part we put in braces.
    prefix: String,
}

impl Keys {
    /// Key names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_string() }
    }

    /// A cache entry (string). Its fill lease is `<entry>:lease` (string, the
    /// lease token) and its tag list `<entry>:tags` (set of tag-index keys).
    pub fn cache_entry(&self, key: &str) -> String {
        format!("{}:c:{{{key}}}", self.prefix)
    }

    /// The fill lease of a cache entry.
    pub fn cache_lease(&self, key: &str) -> String {
        format!("{}:c:{{{key}}}:lease", self.prefix)
    }

    /// A tag index (sorted set: entry key → entry expiry in Unix ms).
    pub fn cache_tag(&self, tag: &str) -> String {
        format!("{}:tag:{{{tag}}}", self.prefix)
    }

    /// The pub/sub channel that announces fills and voided leases; the
    /// message is the entry key.
    pub fn cache_fill_channel(&self) -> String {
        format!("{}:fills", self.prefix)
    }

    /// A held lock (hash: `lease`, `owner`, `token`), expiring with its lease.
    /// Its fencing counter is `<lock>:fence`.
    pub fn lock(&self, name: &str) -> String {
        format!("{}:lock:{{{name}}}", self.prefix)
    }

    /// The fencing counter of a lock name (string, integer). Never expires:
    /// it must outlive every lease, so one such key stays per name ever used.
    pub fn lock_fence(&self, name: &str) -> String {
        format!("{}:lock:{{{name}}}:fence", self.prefix)
    }

    /// The pub/sub channel that announces released locks; the message is the
    /// lock key.
    pub fn lock_channel(&self) -> String {
        format!("{}:locks", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn related_keys_share_a_hash_tag() {
        let keys = Keys::new("cc");
        assert_eq!(keys.cache_entry("user:1"), "cc:c:{user:1}");
        assert_eq!(keys.cache_lease("user:1"), "cc:c:{user:1}:lease");
        assert_eq!(keys.cache_tag("users"), "cc:tag:{users}");
        assert_eq!(keys.cache_fill_channel(), "cc:fills");
        assert_eq!(keys.lock("job"), "cc:lock:{job}");
        assert_eq!(keys.lock_fence("job"), "cc:lock:{job}:fence");
        assert_eq!(keys.lock_channel(), "cc:locks");
    }
}
