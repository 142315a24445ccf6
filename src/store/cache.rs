//! Cache operations: one script invocation (one round trip) per call.

use std::{sync::Arc, time::Duration};

use deadpool_redis::redis::{self, Script, Value};
use tokio::time::Instant;

use super::{Conn, Redis, millis, random_token, wake::Waiters};
use crate::{
    error::{Error, Result},
    keys::Keys,
};

macro_rules! write_script {
    ($file:literal) => {
        Script::new(concat!(include_str!("lua/cache_lib.lua"), include_str!(concat!("lua/", $file))))
    };
}

/// A cache read: the value and remaining TTL of a live entry, or a miss.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The stored bytes; `None` on a miss.
    pub value: Option<Vec<u8>>,
    /// Time left; `None` on a miss or when the entry has no expiry.
    pub ttl: Option<Duration>,
}

/// When a Set writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Always.
    Always,
    /// Only when the key has no live entry.
    IfAbsent,
    /// Only when the key has a live entry.
    IfPresent,
}

/// One validated entry to write.
#[derive(Clone, Debug)]
pub struct Write<'a> {
    /// The caller's key.
    pub key: &'a str,
    /// The bytes to store.
    pub value: &'a [u8],
    /// Lifetime, positive.
    pub ttl: Duration,
    /// Tags, replacing the entry's old ones.
    pub tags: &'a [String],
}

/// What a stampede-safe read decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The entry is live.
    Hit(Entry),
    /// The caller holds the fill lease with this token.
    Fill(String),
    /// Another caller's fill did not land in time.
    Timeout,
}

/// The Cache service's data in Redis.
pub struct CacheStore {
    redis: Redis,
    keys: Keys,
    /// Where lease ends are announced (the `<prefix>:fills` channel).
    channel: String,
    waiters: Arc<Waiters>,
    scripts: Scripts,
    /// Keeps the fill listener alive exactly as long as the store.
    listener: tokio::task::JoinHandle<()>,
}

/// Loaded once; EVALSHA'd per call.
struct Scripts {
    get: Script,
    set: Script,
    set_many: Script,
    delete: Script,
    touch: Script,
    fetch: Script,
    fill: Script,
    abandon_fill: Script,
    /// Records entries in tag indexes (before they are written).
    tag_index: Script,
    /// Deletes the entries of one slot still under the invalidated tags.
    invalidate_entries: Script,
    /// Drops index members an invalidation dealt with.
    tag_forget: Script,
}

impl Drop for CacheStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl CacheStore {
    /// A store under `keys`, listening for fill events.
    pub fn new(redis: Redis, keys: Keys) -> Self {
        let channel = keys.cache_fill_channel();
        let waiters = Arc::new(Waiters::default());
        let listener = Arc::clone(&waiters).listen(redis.clone(), channel.clone());
        let scripts = Scripts {
            get: Script::new(include_str!("lua/get.lua")),
            set: write_script!("set.lua"),
            set_many: write_script!("set_many.lua"),
            delete: write_script!("delete.lua"),
            touch: write_script!("touch.lua"),
            fetch: Script::new(include_str!("lua/fetch.lua")),
            fill: write_script!("fill.lua"),
            abandon_fill: write_script!("abandon_fill.lua"),
            tag_index: Script::new(include_str!("lua/tag_index.lua")),
            invalidate_entries: write_script!("invalidate_entries.lua"),
            tag_forget: Script::new(include_str!("lua/tag_forget.lua")),
        };
        Self { redis, keys, channel, waiters, scripts, listener }
    }

    /// Where the handlers record cache hits and fills.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        self.redis.metrics()
    }

    /// The key space without a tenant; `Keys::tenant` derives a tenant's.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Reads entries in order: one script call per hash slot (one in all on
    /// a single server), sent together.
    pub async fn get_many(&self, space: &Keys, keys: &[String]) -> Result<Vec<Entry>> {
        let entry_keys: Vec<String> = keys.iter().map(|key| space.cache_entry(key)).collect();
        let groups = self.redis.slot_groups(entry_keys.iter().map(String::as_str));
        let entry_keys = &entry_keys;
        let reads = groups.iter().map(|group| async move {
            let mut call = self.scripts.get.prepare_invoke();
            for &i in group {
                call.key(&entry_keys[i]);
            }
            let reply: Vec<Value> = self.redis.invoke(&call).await?;
            parse_entries(reply, group.len())
        });
        let mut entries = vec![Entry { value: None, ttl: None }; keys.len()];
        for (group, read) in groups.iter().zip(futures::future::try_join_all(reads).await?) {
            for (&i, entry) in group.iter().zip(read) {
                entries[i] = entry;
            }
        }
        Ok(entries)
    }

    /// Writes one entry; false when the condition did not hold. With tags,
    /// the entry is first recorded in its tag indexes (a second round trip,
    /// since the indexes live in other slots).
    pub async fn set(&self, space: &Keys, write: &Write<'_>, condition: Condition) -> Result<bool> {
        let recorded = self.record_tags(space, std::slice::from_ref(write)).await?;
        let mut call = self.scripts.set.prepare_invoke();
        call.key(space.cache_entry(write.key));
        call.arg(&self.channel).arg(write.value);
        expiry_args(&mut call, write, recorded);
        call.arg(match condition {
            Condition::Always => "",
            Condition::IfAbsent => "NX",
            Condition::IfPresent => "XX",
        });
        self.tag_args(space, &mut call, write.tags);
        let stored: i64 = self.redis.invoke(&call).await?;
        Ok(stored == 1)
    }

    /// Writes every entry (after recording their tags); one script call per
    /// hash slot, sent together. Returns how many.
    pub async fn set_many(&self, space: &Keys, writes: &[Write<'_>]) -> Result<u32> {
        let recorded = self.record_tags(space, writes).await?;
        let entry_keys: Vec<String> = writes.iter().map(|w| space.cache_entry(w.key)).collect();
        let groups = self.redis.slot_groups(entry_keys.iter().map(String::as_str));
        let entry_keys = &entry_keys;
        let calls = groups.iter().map(|group| async move {
            let mut call = self.scripts.set_many.prepare_invoke();
            call.arg(&self.channel);
            for &i in group {
                let write = &writes[i];
                call.key(&entry_keys[i]).arg(write.value);
                expiry_args(&mut call, write, recorded);
                call.arg(write.tags.len());
                self.tag_args(space, &mut call, write.tags);
            }
            self.redis.invoke::<u32>(&call).await
        });
        Ok(futures::future::try_join_all(calls).await?.into_iter().sum())
    }

    /// Deletes entries; returns how many existed. One script call per hash
    /// slot, sent together.
    pub async fn delete(&self, space: &Keys, keys: &[String]) -> Result<u32> {
        let entry_keys: Vec<String> = keys.iter().map(|key| space.cache_entry(key)).collect();
        self.delete_entries(&self.scripts.delete, &entry_keys, &[]).await
    }

    /// Sets a new TTL on a live entry; false when there is none. A tagged
    /// entry's indexes are extended first (two more round trips), so an index
    /// never expires before its entry.
    pub async fn touch(&self, space: &Keys, key: &str, ttl: Duration) -> Result<bool> {
        let entry_key = space.cache_entry(key);
        let mut call = self.scripts.touch.prepare_invoke();
        call.key(&entry_key).arg("PX").arg(millis(ttl));
        let reply: Vec<Value> = self.redis.invoke(&call).await?;
        let indexes = match reply.split_first() {
            Some((Value::Int(0 | 1), [])) => return Ok(reply[0] == Value::Int(1)),
            Some((Value::Int(2), tags)) => tags
                .iter()
                .map(|tag| match tag {
                    Value::BulkString(name) => Ok(String::from_utf8_lossy(name).into_owned()),
                    other => Err(Error::Internal(format!("touch returned tag {other:?}"))),
                })
                .collect::<Result<Vec<_>>>()?,
            _ => return Err(Error::Internal(format!("touch returned {reply:?}"))),
        };
        let entries = [(entry_key.as_str(), ttl)];
        let now = self.record(indexes.iter().map(|index| (index.as_str(), &entries[..])).collect()).await?;
        let mut call = self.scripts.touch.prepare_invoke();
        call.key(&entry_key).arg("PXAT").arg(now.saturating_add(millis(ttl)));
        let reply: Vec<Value> = self.redis.invoke(&call).await?;
        Ok(reply.first() == Some(&Value::Int(1)))
    }

    /// The stampede-safe read: a hit, the fill lease, or, after waiting up to
    /// `max_wait` for another caller's fill, whatever that produced.
    ///
    /// `max_wait` counts from the call: once it is over, the answer is
    /// `Timeout`, even if a read after the first is still waiting on a slow
    /// Redis (the first read is bounded only by the Redis timeout).
    pub async fn fetch(
        self: &Arc<Self>,
        space: &Keys,
        key: &str,
        fill_timeout: Duration,
        max_wait: Duration,
    ) -> Result<Fetched> {
        use crate::metrics::FetchOutcome;
        let started = Instant::now();
        let fetched = self.fetch_waiting(space, key, fill_timeout, max_wait).await?;
        let waited = fetched.1.then(|| started.elapsed());
        let outcome = match (&fetched.0, waited.is_some()) {
            (Fetched::Hit(_), false) => FetchOutcome::Hit,
            (Fetched::Fill(_), false) => FetchOutcome::Fill,
            (Fetched::Hit(_), true) => FetchOutcome::WaitedHit,
            (Fetched::Fill(_), true) => FetchOutcome::WaitedFill,
            (Fetched::Timeout, _) => FetchOutcome::Timeout,
        };
        self.redis.metrics().cache_fetch(outcome, waited);
        Ok(fetched.0)
    }

    /// [`CacheStore::fetch`], and whether it waited for another caller.
    async fn fetch_waiting(
        self: &Arc<Self>,
        space: &Keys,
        key: &str,
        fill_timeout: Duration,
        max_wait: Duration,
    ) -> Result<(Fetched, bool)> {
        let deadline = Instant::now() + max_wait;
        let entry_key = space.cache_entry(key);
        let lease_key = space.cache_lease(key);
        match self.try_fetch(&entry_key, &lease_key, fill_timeout).await? {
            Attempt::Done(fetched) => return Ok((fetched, false)),
            Attempt::Leased(_) if Instant::now() >= deadline => return Ok((Fetched::Timeout, true)),
            Attempt::Leased(_) => {}
        }
        // Register, then read again: a fill between the first read and the
        // registration would otherwise go unseen.
        let mut wait = self.waiters.register(&entry_key);
        loop {
            // A read cut short by the deadline hands back any lease it took
            // (the attempt's guard).
            let attempt = tokio::time::timeout_at(deadline, self.try_fetch(&entry_key, &lease_key, fill_timeout));
            let lease_ttl = match attempt.await {
                Err(_) => return Ok((Fetched::Timeout, true)),
                Ok(attempt) => match attempt? {
                    Attempt::Done(fetched) => return Ok((fetched, true)),
                    Attempt::Leased(ttl) => ttl,
                },
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok((Fetched::Timeout, true));
            }
            // Wake on a fill event, or when the lease runs out and passes on.
            let wake_at = deadline.min(now + lease_ttl + Duration::from_millis(1));
            tokio::select! {
                () = wait.changed() => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn try_fetch(self: &Arc<Self>, entry_key: &str, lease_key: &str, fill_timeout: Duration) -> Result<Attempt> {
        let token = random_token();
        // Should this call be cancelled while the script is under way, the
        // script may still grant the lease to a caller who will never fill:
        // the guard hands it back.
        // The hand-back goes over the same connection, so Redis runs it after
        // the fetch script, never before.
        let mut conn = self.redis.connection().await?;
        let mut guard = LeaseGuard {
            store: Some(Arc::clone(self)),
            conn: conn.clone(),
            entry_key: entry_key.to_string(),
            lease_key: lease_key.to_string(),
            token,
        };
        let mut call = self.scripts.fetch.prepare_invoke();
        call.key(entry_key).key(lease_key).arg(&guard.token).arg(millis(fill_timeout));
        let reply = self.redis.invoke_on::<Vec<Value>>(&mut conn, &call).await;
        guard.store = None;
        let reply = reply?;
        match reply.as_slice() {
            [Value::Int(1), Value::BulkString(value), Value::Int(pttl)] => {
                Ok(Attempt::Done(Fetched::Hit(entry(Some(value.clone()), *pttl))))
            }
            [Value::Int(2)] => Ok(Attempt::Done(Fetched::Fill(std::mem::take(&mut guard.token)))),
            [Value::Int(3), Value::Int(pttl)] => Ok(Attempt::Leased(Duration::from_millis((*pttl).max(0) as u64))),
            _ => Err(Error::Internal(format!("fetch returned {reply:?}"))),
        }
    }

    /// Stores a value under a fill lease; false when the lease is not current.
    pub async fn fill(&self, space: &Keys, write: &Write<'_>, token: &str) -> Result<bool> {
        let recorded = self.record_tags(space, std::slice::from_ref(write)).await?;
        let mut call = self.scripts.fill.prepare_invoke();
        call.key(space.cache_entry(write.key)).key(space.cache_lease(write.key));
        call.arg(&self.channel).arg(token).arg(write.value);
        expiry_args(&mut call, write, recorded);
        self.tag_args(space, &mut call, write.tags);
        let stored: i64 = self.redis.invoke(&call).await?;
        Ok(stored == 1)
    }

    /// Releases a fill lease without a value; false when it is not current.
    pub async fn abandon_fill(&self, space: &Keys, key: &str, token: &str) -> Result<bool> {
        let mut call = self.scripts.abandon_fill.prepare_invoke();
        call.key(space.cache_entry(key)).key(space.cache_lease(key)).arg(&self.channel).arg(token);
        let released: i64 = self.redis.invoke(&call).await?;
        Ok(released == 1)
    }

    /// Deletes every entry still tagged with any of the tags; returns how
    /// many. Three steps, each one call per hash slot sent together: read the
    /// tag indexes, delete their entries (each slot's entries in one script,
    /// only those whose tag list still names an invalidated tag), then drop
    /// the index members dealt with, keeping any a write re-recorded
    /// meanwhile. An entry whose write completed before this call began is
    /// in an index (writes record tags first), so it is gone when this
    /// returns; an interrupted invalidation leaves the indexes for the next.
    pub async fn invalidate_tags(&self, space: &Keys, tags: &[String]) -> Result<u32> {
        let indexes: Vec<String> = tags.iter().map(|tag| space.cache_tag(tag)).collect();
        let reads = indexes.iter().map(|index| async move {
            let members: Vec<(String, String)> =
                self.redis.query(redis::cmd("ZRANGE").arg(index).arg(0).arg(-1).arg("WITHSCORES")).await?;
            Ok::<_, Error>(members)
        });
        let members = futures::future::try_join_all(reads).await?;
        let mut entries: Vec<String> = members.iter().flatten().map(|(entry, _)| entry.clone()).collect();
        entries.sort_unstable();
        entries.dedup();
        let deleted = self.delete_entries(&self.scripts.invalidate_entries, &entries, &indexes).await?;
        let forgets = indexes.iter().zip(&members).filter(|(_, m)| !m.is_empty()).map(|(index, members)| async move {
            let mut call = self.scripts.tag_forget.prepare_invoke();
            call.key(index);
            for (entry, score) in members {
                call.arg(entry).arg(score);
            }
            self.redis.invoke::<()>(&call).await
        });
        futures::future::try_join_all(forgets).await?;
        Ok(deleted)
    }

    /// Runs `script` (delete.lua or invalidate_entries.lua) over the entry
    /// keys, one call per hash slot sent together, with the fill channel and
    /// `extra` as arguments; the sum of their counts.
    async fn delete_entries(&self, script: &Script, entry_keys: &[String], extra: &[String]) -> Result<u32> {
        let groups = self.redis.slot_groups(entry_keys.iter().map(String::as_str));
        let calls = groups.iter().map(|group| async move {
            let mut call = script.prepare_invoke();
            for &i in group {
                call.key(&entry_keys[i]);
            }
            call.arg(&self.channel);
            for arg in extra {
                call.arg(arg);
            }
            self.redis.invoke::<u32>(&call).await
        });
        Ok(futures::future::try_join_all(calls).await?.into_iter().sum())
    }

    /// Records each write's entry in the indexes of its tags, before the
    /// entries are written; `None` when no write has tags, else the Redis
    /// time from which the tagged entries' expiries are counted.
    async fn record_tags(&self, space: &Keys, writes: &[Write<'_>]) -> Result<Option<u64>> {
        if writes.iter().all(|w| w.tags.is_empty()) {
            return Ok(None);
        }
        let entry_keys: Vec<String> = writes.iter().map(|w| space.cache_entry(w.key)).collect();
        let mut by_index: Vec<(String, Vec<(&str, Duration)>)> = Vec::new();
        for (write, entry) in writes.iter().zip(&entry_keys) {
            for tag in write.tags {
                let index = space.cache_tag(tag);
                match by_index.iter_mut().find(|(i, _)| *i == index) {
                    Some((_, entries)) => entries.push((entry, write.ttl)),
                    None => by_index.push((index, vec![(entry, write.ttl)])),
                }
            }
        }
        let indexes = by_index.iter().map(|(index, entries)| (index.as_str(), &entries[..])).collect();
        Ok(Some(self.record(indexes).await?))
    }

    /// Runs tag_index.lua for `(index, entries with their ttl)`, one call
    /// per hash slot, sent together; the earliest Redis time the calls
    /// counted the scores from (an entry that expires at that time plus its
    /// ttl expires no later than any index member for it).
    async fn record(&self, indexes: Vec<(&str, &[(&str, Duration)])>) -> Result<u64> {
        let groups = self.redis.slot_groups(indexes.iter().map(|(index, _)| *index));
        let indexes = &indexes;
        let calls = groups.iter().map(|group| async move {
            let mut call = self.scripts.tag_index.prepare_invoke();
            for &i in group {
                let (index, entries) = indexes[i];
                call.key(index).arg(entries.len());
                for (entry, ttl) in entries {
                    call.arg(*entry).arg(millis(*ttl));
                }
            }
            self.redis.invoke::<u64>(&call).await
        });
        let times = futures::future::try_join_all(calls).await?;
        times.into_iter().min().ok_or_else(|| Error::Internal("no tag index recorded".into()))
    }

    /// Appends the tag-index key names of `tags` to a script's arguments.
    fn tag_args(&self, space: &Keys, call: &mut redis::ScriptInvocation<'_>, tags: &[String]) {
        for tag in tags {
            call.arg(space.cache_tag(tag));
        }
    }
}

/// Hands back the lease a cancelled Fetch attempt may have taken. Harmless
/// when it took none: the abandon script only deletes a lease holding `token`.
struct LeaseGuard {
    /// Set while the attempt's outcome is unknown to its caller.
    store: Option<Arc<CacheStore>>,
    /// The connection the fetch script went out on.
    conn: Conn,
    entry_key: String,
    lease_key: String,
    token: String,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let (Some(store), Ok(runtime)) = (self.store.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let (entry_key, lease_key) = (std::mem::take(&mut self.entry_key), std::mem::take(&mut self.lease_key));
        let token = std::mem::take(&mut self.token);
        let mut conn = self.conn.clone();
        runtime.spawn(async move {
            let mut call = store.scripts.abandon_fill.prepare_invoke();
            call.key(&entry_key).key(&lease_key).arg(&store.channel).arg(&token);
            if let Err(err) = store.redis.invoke_on::<i64>(&mut conn, &call).await {
                tracing::debug!(%err, "could not hand back the lease of a cancelled fetch");
            }
        });
    }
}

/// One Fetch attempt: decided, or someone else holds the lease for this long.
enum Attempt {
    Done(Fetched),
    Leased(Duration),
}

/// A write script's expiry arguments: in `ttl` for an untagged entry; for a
/// tagged one, at `recorded + ttl`, the instant its tag indexes were given.
fn expiry_args(call: &mut redis::ScriptInvocation<'_>, write: &Write<'_>, recorded: Option<u64>) {
    match recorded {
        Some(now) if !write.tags.is_empty() => call.arg("PXAT").arg(now.saturating_add(millis(write.ttl))),
        _ => call.arg("PX").arg(millis(write.ttl)),
    };
}

/// The entries of one get.lua reply (value and PTTL per key).
fn parse_entries(reply: Vec<Value>, keys: usize) -> Result<Vec<Entry>> {
    if reply.len() != 2 * keys {
        return Err(Error::Internal(format!("get returned {} items for {keys} keys", reply.len())));
    }
    let mut items = reply.into_iter();
    let mut entries = Vec::with_capacity(keys);
    while let (Some(value), Some(pttl)) = (items.next(), items.next()) {
        entries.push(match (value, pttl) {
            // PTTL -2: no such key.
            (_, Value::Int(-2)) => entry(None, -2),
            (Value::BulkString(value), Value::Int(pttl)) => entry(Some(value), pttl),
            other => return Err(Error::Internal(format!("get returned {other:?}"))),
        });
    }
    Ok(entries)
}

fn entry(value: Option<Vec<u8>>, pttl: i64) -> Entry {
    match value {
        None => Entry { value: None, ttl: None },
        // PTTL is -1 for an entry without expiry.
        Some(value) => Entry { value: Some(value), ttl: u64::try_from(pttl).ok().map(Duration::from_millis) },
    }
}
