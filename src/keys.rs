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

    /// Fixed-window state of rate-limit key `key` (hash: `w` window index,
    /// `n` count). No braces of ours: the caller's own `{tag}` in `key`, if
    /// any, is the hash tag, so the keys of one Check can share a slot.
    pub fn rate_limit_fixed(&self, key: &str) -> String {
        format!("{}:rl:f:{key}", self.prefix)
    }

    /// Sliding-window state of rate-limit key `key` (hash: `w` window
    /// index, `c` its count, `p` the previous window's count).
    pub fn rate_limit_sliding(&self, key: &str) -> String {
        format!("{}:rl:s:{key}", self.prefix)
    }

    /// Token-bucket (GCRA) state of rate-limit key `key` (hash: `t` time in
    /// Unix ms, `d` debt in unit-ms at that time).
    pub fn rate_limit_bucket(&self, key: &str) -> String {
        format!("{}:rl:t:{key}", self.prefix)
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
    }

    #[test]
    fn rate_limit_keys_leave_the_hash_tag_to_the_caller() {
        let keys = Keys::new("cc");
        assert_eq!(keys.rate_limit_fixed("{user:42}:api"), "cc:rl:f:{user:42}:api");
        assert_eq!(keys.rate_limit_sliding("api:{user:42}"), "cc:rl:s:api:{user:42}");
        assert_eq!(keys.rate_limit_bucket("plain"), "cc:rl:t:plain");
    }
}
