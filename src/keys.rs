//! Every Redis key and channel name the service uses, in one place.
//!
//! Keys that one script touches together share a `{hash tag}` (the caller's
//! key), so Redis Cluster would place them in one slot. The Lua scripts only
//! append the documented suffixes (`:lease`, `:tags`) to names built here.
//! ARCHITECTURE.md shows the same layout as a table.

/// Characters of a user's tag at the start of each of its session ids.
pub const USER_TAG_LEN: usize = 8;

/// A user's tag: the first 32 bits of the SHA-256 of the user id, as hex.
/// The hash tag of the user's session index and of every session of the
/// user, so one script may touch them together on Redis Cluster.
pub fn user_tag(user_id: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(user_id.as_bytes()).iter().take(USER_TAG_LEN / 2).map(|b| format!("{b:02x}")).collect()
}

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

    /// Tenant `tenant`'s key space: every key (`P:t:<tenant>:...`) is
    /// distinct from every other tenant's and from the tenant-less space
    /// (whose second segment is never `t`). Tenant names are checked where
    /// they are configured: 1..64 of `A-Z a-z 0-9 _ -`.
    pub fn tenant(&self, tenant: &str) -> Self {
        Self { prefix: format!("{}:t:{tenant}", self.prefix) }
    }

    /// The prefix followed by `parts`, in one allocation of the right size:
    /// names are built for every key of every request, and `format!` took
    /// 7% of the service's CPU in a GetMany of 100 keys.
    fn name(&self, parts: &[&str]) -> String {
        let mut name = String::with_capacity(self.prefix.len() + parts.iter().map(|part| part.len()).sum::<usize>());
        name.push_str(&self.prefix);
        for part in parts {
            name.push_str(part);
        }
        name
    }

    /// A cache entry (string). Its fill lease is `<entry>:lease` (string, the
    /// lease token) and its tag list `<entry>:tags` (set of tag-index keys).
    pub fn cache_entry(&self, key: &str) -> String {
        self.name(&[":c:{", key, "}"])
    }

    /// What every cache entry name of this key space starts with (and
    /// nothing else of the service's does): the prefix a watch on this space
    /// tracks (`store/invalidation.rs`).
    pub fn cache_entry_prefix(&self) -> String {
        format!("{}:c:{{", self.prefix)
    }

    /// The caller's key of cache entry `name`, if it is one of the space
    /// whose [`Keys::cache_entry_prefix`] is `entry_prefix`: `None` for a
    /// lease or tag list (which end in `:lease`, `:tags`; an entry name
    /// always ends with `}`) and for other spaces' names.
    pub fn cache_key_of<'a>(name: &'a str, entry_prefix: &str) -> Option<&'a str> {
        name.strip_prefix(entry_prefix)?.strip_suffix('}').filter(|key| !key.is_empty())
    }

    /// The fill lease of a cache entry.
    pub fn cache_lease(&self, key: &str) -> String {
        self.name(&[":c:{", key, "}:lease"])
    }

    /// A tag index (sorted set: entry key → entry expiry in Unix ms).
    pub fn cache_tag(&self, tag: &str) -> String {
        self.name(&[":tag:{", tag, "}"])
    }

    /// The base of counter `name`'s keys, never itself written. The Increment
    /// script appends `:total` (string, the all-time total, no expiry) and
    /// `:m:<ms>`, `:h:<ms>`, `:d:<ms>` (string, the bucket starting at Unix
    /// ms `<ms>`), so every key of one counter shares the hash tag `{name}`.
    pub fn stats_counter(&self, name: &str) -> String {
        self.name(&[":st:{", name, "}"])
    }

    /// Counter `name`'s all-time total.
    pub fn stats_total(&self, name: &str) -> String {
        self.name(&[":st:{", name, "}:total"])
    }

    /// Counter `name`'s bucket of granularity `tag` (`m`, `h`, `d`) starting at
    /// Unix ms `start`.
    pub fn stats_bucket(&self, name: &str, tag: &str, start: i64) -> String {
        format!("{}:st:{{{name}}}:{tag}:{start}", self.prefix)
    }

    /// The base of unique set `name`'s keys; the AddUnique script appends
    /// `:d:<ms>` (HyperLogLog of the local day starting at Unix ms `<ms>`).
    pub fn stats_unique(&self, name: &str) -> String {
        self.name(&[":su:{", name, "}"])
    }

    /// Unique set `name`'s HyperLogLog for the day starting at Unix ms `start`.
    pub fn stats_unique_day(&self, name: &str, start: i64) -> String {
        format!("{}:su:{{{name}}}:d:{start}", self.prefix)
    }

    /// A scratch HyperLogLog merging some of unique set `name`'s days for one
    /// CountUnique call (`token` is the call's); in their slot.
    pub fn stats_unique_merge(&self, name: &str, token: &str) -> String {
        self.name(&[":su:{", name, "}:m:", token])
    }

    /// Activity group `group` (sorted set: member → last seen, Unix ms).
    pub fn stats_active(&self, group: &str) -> String {
        self.name(&[":sa:{", group, "}"])
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
        self.name(&[":rl:f:", key])
    }

    /// Sliding-window state of rate-limit key `key` (hash: `w` window
    /// index, `c` its count, `p` the previous window's count).
    pub fn rate_limit_sliding(&self, key: &str) -> String {
        self.name(&[":rl:s:", key])
    }

    /// Token-bucket (GCRA) state of rate-limit key `key` (hash: `t` time in
    /// Unix ms, `d` debt in unit-ms at that time).
    pub fn rate_limit_bucket(&self, key: &str) -> String {
        self.name(&[":rl:t:", key])
    }

    /// A session (hash: `id`, `user`, `data` as a JSON object, `created` Unix
    /// ms, `idle` timeout ms, `index` = its user's index key); expires when
    /// its idle timeout runs out. A session id starts with its user's tag
    /// ([`user_tag`], [`USER_TAG_LEN`] characters), which is the key's hash
    /// tag: a session and its user's index share a slot.
    pub fn session(&self, session_id: &str) -> String {
        let split = session_id.char_indices().nth(USER_TAG_LEN).map_or(session_id.len(), |(i, _)| i);
        let (tag, rest) = session_id.split_at(split);
        self.name(&[":s:{", tag, "}", rest])
    }

    /// A user's session index (sorted set: session key → creation time in
    /// µs); expires with the user's longest-lived session. Tagged like the
    /// user's sessions.
    pub fn user_sessions(&self, user_id: &str) -> String {
        format!("{}:u:{{{}}}{user_id}", self.prefix, user_tag(user_id))
    }

    /// A token revocation (string `1`), named by the hex SHA-256 of the
    /// token, never the token; expires when the token does.
    pub fn revoked_token(&self, sha256_hex: &str) -> String {
        self.name(&[":rt:{", sha256_hex, "}"])
    }

    /// A held lock (hash: `lease`, `owner`, `token`), expiring with its lease.
    /// Its fencing counter is `<lock>:fence`.
    pub fn lock(&self, name: &str) -> String {
        self.name(&[":lock:{", name, "}"])
    }

    /// The fencing counter of a lock name (string, integer). Never expires:
    /// it must outlive every lease, so one such key stays per name ever used.
    pub fn lock_fence(&self, name: &str) -> String {
        self.name(&[":lock:{", name, "}:fence"])
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
        assert_eq!(keys.stats_counter("api:/users"), "cc:st:{api:/users}");
        assert_eq!(keys.stats_total("api:/users"), "cc:st:{api:/users}:total");
        assert_eq!(keys.stats_bucket("api:/users", "d", 1_700_000_000_000), "cc:st:{api:/users}:d:1700000000000");
        assert_eq!(keys.stats_unique_day("dau", 5), "cc:su:{dau}:d:5");
        assert_eq!(keys.stats_active("online"), "cc:sa:{online}");
    }

    #[test]
    fn entry_names_map_back_to_keys_of_their_space_only() {
        let (base, tenant) = (Keys::new("cc"), Keys::new("cc").tenant("a"));
        let (bp, tp) = (base.cache_entry_prefix(), tenant.cache_entry_prefix());
        for key in ["k", "a}:lease", "x{y}z", "}"] {
            assert_eq!(Keys::cache_key_of(&base.cache_entry(key), &bp), Some(key));
            assert_eq!(Keys::cache_key_of(&tenant.cache_entry(key), &tp), Some(key));
            assert_eq!(Keys::cache_key_of(&tenant.cache_entry(key), &bp), None);
            assert_eq!(Keys::cache_key_of(&base.cache_entry(key), &tp), None);
            assert_eq!(Keys::cache_key_of(&base.cache_lease(key), &bp), None);
            assert_eq!(Keys::cache_key_of(&format!("{}:tags", base.cache_entry(key)), &bp), None);
        }
        assert_eq!(Keys::cache_key_of(&Keys::new("cc").tenant("ab").cache_entry("k"), &tp), None);
    }

    #[test]
    fn rate_limit_keys_leave_the_hash_tag_to_the_caller() {
        let keys = Keys::new("cc");
        assert_eq!(keys.rate_limit_fixed("{user:42}:api"), "cc:rl:f:{user:42}:api");
        assert_eq!(keys.rate_limit_sliding("api:{user:42}"), "cc:rl:s:api:{user:42}");
        assert_eq!(keys.rate_limit_bucket("plain"), "cc:rl:t:plain");
    }

    #[test]
    fn a_session_and_its_user_index_share_the_user_tag() {
        let keys = Keys::new("cc");
        let tag = super::user_tag("u1");
        assert_eq!(tag.len(), super::USER_TAG_LEN);
        assert_eq!(keys.user_sessions("u1"), format!("cc:u:{{{tag}}}u1"));
        assert_eq!(keys.session(&format!("{tag}Zm9vYmFy")), format!("cc:s:{{{tag}}}Zm9vYmFy"));
        // Ids too short to carry a tag still name one key (that never exists).
        assert_eq!(keys.session("abc"), "cc:s:{abc}");
        assert_eq!(keys.revoked_token("00ff"), "cc:rt:{00ff}");
    }

    #[test]
    fn lock_keys_share_the_name_tag() {
        let keys = Keys::new("cc");
        assert_eq!(keys.lock("job"), "cc:lock:{job}");
        assert_eq!(keys.lock_fence("job"), "cc:lock:{job}:fence");
        assert_eq!(keys.lock_channel(), "cc:locks");
    }
}
