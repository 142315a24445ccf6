//! Cache operations: one script call per hash slot, split into bounded
//! chunks when a request is large (`SCRIPT_STEPS`, `SCRIPT_VALUE_BYTES`).

use std::{sync::Arc, time::Duration};

use deadpool_redis::redis::{self, Script, Value};
use tokio::time::Instant;

use super::{
    Conn, Redis,
    invalidation::{Invalidations, Watch},
    millis, random_token,
    wake::Waiters,
};
use crate::{
    error::{Error, Result},
    keys::Keys,
};

/// A tag index's name and the entries (with their expiries, Unix ms) to
/// record in it.
type IndexMembers<'a> = (&'a str, &'a [(&'a str, u64)]);

macro_rules! write_script {
    ($file:literal) => {
        super::script($file, concat!(include_str!("lua/cache_lib.lua"), include_str!(concat!("lua/", $file))))
    };
}

/// Most value and argument bytes one script copies through Lua (about
/// 3 ms of Redis time per MiB); a single larger item still goes alone.
pub const SCRIPT_VALUE_BYTES: usize = 512 << 10;

/// Most steps one script takes (an entry written or deleted, a tag, an index
/// member: a few µs of Redis time each); larger batches are split into
/// several scripts, each atomic on its own.
pub const SCRIPT_STEPS: usize = 1000;

/// Redis commands a tag_index.lua call runs per index besides its members
/// (the floor read and written, pruning, the index's expiry).
const INDEX_STEPS: usize = 6;

/// Redis commands a tag_index.lua call runs per member (its old score, then
/// the new one).
const MEMBER_STEPS: usize = 2;

/// Keys one get.lua call reads (about 1.2 µs of Redis each; the rest of a
/// slot's keys wait for the next round): it packs their TTLs through one Lua
/// `unpack`, which takes a few thousand values at most.
const READS_PER_SCRIPT: usize = 1000;

/// Entries one delete.lua or invalidate_entries.lua call deals with (about
/// five commands each).
const DELETES_PER_SCRIPT: usize = 200;

/// Index members an invalidation reads per ZSCAN (a hint to Redis).
const INVALIDATE_PAGE: usize = 200;

/// Tags one InvalidateTags works on at once.
const TAGS_AT_ONCE: usize = 8;

/// Scripts of one request in flight at once: a request split into many
/// scripts must not queue them all at once ahead of everyone else's calls
/// (and the health PING) on the shared connections.
const SCRIPTS_AT_ONCE: usize = 4;

/// Runs `calls` at most [`SCRIPTS_AT_ONCE`] at a time; their results in
/// order, or the first error.
async fn at_most_a_few<T>(mut calls: Vec<impl Future<Output = Result<T>>>) -> Result<Vec<T>> {
    use futures::{StreamExt, TryStreamExt};
    // One call (a single key, or a single server) is the common case: await
    // it in place rather than through a stream's task and wake-ups.
    if calls.len() == 1
        && let Some(call) = calls.pop()
    {
        return Ok(vec![call.await?]);
    }
    futures::stream::iter(calls).buffered(SCRIPTS_AT_ONCE).try_collect().await
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
    /// Changes of entries, for near caches (WatchInvalidations).
    invalidations: Invalidations,
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
    /// Records written entries in tag indexes.
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
            get: super::script("get.lua", include_str!("lua/get.lua")),
            set: write_script!("set.lua"),
            set_many: write_script!("set_many.lua"),
            delete: write_script!("delete.lua"),
            touch: write_script!("touch.lua"),
            fetch: super::script("fetch.lua", include_str!("lua/fetch.lua")),
            fill: write_script!("fill.lua"),
            abandon_fill: write_script!("abandon_fill.lua"),
            tag_index: super::script("tag_index.lua", include_str!("lua/tag_index.lua")),
            invalidate_entries: write_script!("invalidate_entries.lua"),
            tag_forget: super::script("tag_forget.lua", include_str!("lua/tag_forget.lua")),
        };
        let invalidations = Invalidations::new(redis.clone());
        Self { redis, keys, channel, waiters, scripts, listener, invalidations }
    }

    /// Where the handlers record cache hits and fills.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        self.redis.metrics()
    }

    /// The key space without a tenant; `Keys::tenant` derives a tenant's.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Starts reporting changes of `space`'s entries (see
    /// `store/invalidation.rs`).
    pub async fn watch(&self, space: &Keys) -> Result<Watch> {
        self.invalidations.watch(space).await
    }

    /// Reads entries in order: one script call per hash slot (one in all on
    /// a single server), a few at a time, each reading at most
    /// [`READS_PER_SCRIPT`] keys and copying at most [`SCRIPT_VALUE_BYTES`]
    /// of values (or one value); keys left over are read by further rounds.
    /// Each entry's value and TTL are read together; entries read by
    /// different calls are not one snapshot.
    pub async fn get_many(&self, space: &Keys, keys: &[String]) -> Result<Vec<Entry>> {
        let entry_keys: Vec<String> = keys.iter().map(|key| space.cache_entry(key)).collect();
        let mut entries = vec![Entry { value: None, ttl: None }; keys.len()];
        let mut pending = self.redis.slot_groups(entry_keys.iter().map(String::as_str));
        let entry_keys = &entry_keys;
        while !pending.is_empty() {
            let reads = pending.iter().map(|group| async move {
                let run = &group[..group.len().min(READS_PER_SCRIPT)];
                let mut call = self.scripts.get.prepare_invoke();
                for &i in run {
                    call.key(&entry_keys[i]);
                }
                call.arg(SCRIPT_VALUE_BYTES);
                let reply: Vec<Value> = self.redis.invoke(&call).await?;
                parse_entries(reply, run.len())
            });
            let mut next = Vec::new();
            for (group, read) in pending.iter().zip(at_most_a_few(reads.collect()).await?) {
                let mut left = Vec::new();
                // Keys past the script's run wait for the next round, as do
                // those past its byte budget.
                let past_run = group.get(read.len()..).unwrap_or_default();
                for (&i, entry) in group.iter().zip(read) {
                    match entry {
                        Some(entry) => entries[i] = entry,
                        None => left.push(i),
                    }
                }
                left.extend_from_slice(past_run);
                // The script always reads a group's first key: each round
                // makes progress.
                if left.len() == group.len() {
                    return Err(Error::Internal("get read none of its keys".into()));
                }
                if !left.is_empty() {
                    next.push(left);
                }
            }
            pending = next;
        }
        Ok(entries)
    }

    /// Writes one entry; false when the condition did not hold. A tagged
    /// entry is then recorded in its tag indexes (a second round trip, since
    /// the indexes live in other slots).
    pub async fn set(&self, space: &Keys, write: &Write<'_>, condition: Condition) -> Result<bool> {
        let entry_key = space.cache_entry(write.key);
        let mut call = self.scripts.set.prepare_invoke();
        call.key(&entry_key);
        call.arg(&self.channel).arg(write.value).arg(millis(write.ttl));
        call.arg(match condition {
            Condition::Always => "",
            Condition::IfAbsent => "NX",
            Condition::IfPresent => "XX",
        });
        self.tag_args(space, &mut call, write.tags);
        let expiry: u64 = self.redis.invoke(&call).await?;
        if expiry > 0 {
            self.record_tags(space, std::slice::from_ref(write), std::slice::from_ref(&entry_key), &[expiry]).await?;
        }
        Ok(expiry > 0)
    }

    /// Writes every entry, then records the tagged ones in their indexes;
    /// one script call per hash slot and bounded run of entries (at most
    /// [`SCRIPT_VALUE_BYTES`] of values and tag names, or one entry, and
    /// [`SCRIPT_STEPS`] entries and tags), a few at a time. Returns how many.
    pub async fn set_many(&self, space: &Keys, writes: &[Write<'_>]) -> Result<u32> {
        let entry_keys: Vec<String> = writes.iter().map(|w| space.cache_entry(w.key)).collect();
        let cost = |i: usize| {
            let write = &writes[i];
            // A tag goes as its index's key name: the tag plus the prefix.
            let tag_bytes: usize = write.tags.iter().map(|tag| tag.len() + 32).sum();
            (entry_keys[i].len() + write.value.len() + tag_bytes, 1 + write.tags.len())
        };
        let groups: Vec<Vec<usize>> = self
            .redis
            .slot_groups(entry_keys.iter().map(String::as_str))
            .iter()
            .flat_map(|group| bounded_runs(group, cost))
            .collect();
        let calls = groups.iter().map(|group| {
            let entry_keys = &entry_keys;
            async move {
                let mut call = self.scripts.set_many.prepare_invoke();
                call.arg(&self.channel);
                for &i in group {
                    let write = &writes[i];
                    call.key(&entry_keys[i]).arg(write.value).arg(millis(write.ttl));
                    call.arg(write.tags.len());
                    self.tag_args(space, &mut call, write.tags);
                }
                let expiries: Vec<u64> = self.redis.invoke(&call).await?;
                if expiries.len() != group.len() {
                    return Err(Error::Internal(format!("set_many wrote {} of {}", expiries.len(), group.len())));
                }
                Ok(expiries)
            }
        });
        let written = at_most_a_few(calls.collect()).await?;
        let mut expiries = vec![0; writes.len()];
        for (group, group_expiries) in groups.iter().zip(written) {
            for (&i, expiry) in group.iter().zip(group_expiries) {
                expiries[i] = expiry;
            }
        }
        self.record_tags(space, writes, &entry_keys, &expiries).await?;
        Ok(writes.len() as u32)
    }

    /// Deletes entries; returns how many existed. One script call per hash
    /// slot and run of at most 200 entries, a few at a time.
    pub async fn delete(&self, space: &Keys, keys: &[String]) -> Result<u32> {
        let entry_keys: Vec<String> = keys.iter().map(|key| space.cache_entry(key)).collect();
        self.delete_entries(&self.scripts.delete, &entry_keys, &[]).await
    }

    /// Sets a new TTL on a live entry; false when there is none. A tagged
    /// entry's new expiry is then recorded in its indexes (one more round
    /// trip), as after a write.
    pub async fn touch(&self, space: &Keys, key: &str, ttl: Duration) -> Result<bool> {
        let entry_key = space.cache_entry(key);
        let mut call = self.scripts.touch.prepare_invoke();
        call.key(&entry_key).arg(millis(ttl));
        let reply: Vec<Value> = self.redis.invoke(&call).await?;
        let (expiry, indexes) = match reply.split_first() {
            None => return Ok(false),
            Some((Value::Int(expiry), tags)) => {
                let indexes = tags
                    .iter()
                    .map(|tag| match tag {
                        Value::BulkString(name) => Ok(String::from_utf8_lossy(name).into_owned()),
                        other => Err(Error::Internal(format!("touch returned tag {other:?}"))),
                    })
                    .collect::<Result<Vec<_>>>()?;
                (u64::try_from(*expiry).unwrap_or(0), indexes)
            }
            _ => return Err(Error::Internal(format!("touch returned {reply:?}"))),
        };
        if !indexes.is_empty() {
            let entries = [(entry_key.as_str(), expiry)];
            self.record(indexes.iter().map(|index| (index.as_str(), &entries[..])).collect()).await?;
        }
        Ok(true)
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

    /// One attempt, within one Redis timeout in all (taking a connection
    /// and running the script on it).
    async fn try_fetch(self: &Arc<Self>, entry_key: &str, lease_key: &str, fill_timeout: Duration) -> Result<Attempt> {
        self.redis.within_timeout(self.try_fetch_on_a_connection(entry_key, lease_key, fill_timeout)).await
    }

    async fn try_fetch_on_a_connection(
        self: &Arc<Self>,
        entry_key: &str,
        lease_key: &str,
        fill_timeout: Duration,
    ) -> Result<Attempt> {
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

    /// Stores a value under a fill lease; false when the lease is not
    /// current. A tagged entry is then recorded in its indexes.
    pub async fn fill(&self, space: &Keys, write: &Write<'_>, token: &str) -> Result<bool> {
        let entry_key = space.cache_entry(write.key);
        let mut call = self.scripts.fill.prepare_invoke();
        call.key(&entry_key).key(space.cache_lease(write.key));
        call.arg(&self.channel).arg(token).arg(write.value).arg(millis(write.ttl));
        self.tag_args(space, &mut call, write.tags);
        let expiry: u64 = self.redis.invoke(&call).await?;
        if expiry > 0 {
            self.record_tags(space, std::slice::from_ref(write), std::slice::from_ref(&entry_key), &[expiry]).await?;
        }
        Ok(expiry > 0)
    }

    /// Releases a fill lease without a value; false when it is not current.
    pub async fn abandon_fill(&self, space: &Keys, key: &str, token: &str) -> Result<bool> {
        let mut call = self.scripts.abandon_fill.prepare_invoke();
        call.key(space.cache_entry(key)).key(space.cache_lease(key)).arg(&self.channel).arg(token);
        let released: i64 = self.redis.invoke(&call).await?;
        Ok(released == 1)
    }

    /// Deletes every entry still tagged with any of the tags; returns how
    /// many. Tags are worked on a few at a time, each in bounded steps:
    /// read a page of the tag's index (ZSCAN), delete its entries (one
    /// script per hash slot and run of at most 200 entries, only those whose
    /// tag list still names the tag), then drop the index members dealt
    /// with, keeping any a write re-recorded meanwhile; until the scan ends.
    ///
    /// The guarantee: an entry whose write completed before this call began
    /// is in the index (a write records its entry before it answers) and
    /// stays there until it expires or an invalidation that read the member
    /// after that record forgets it, having first deleted the entry (a forget
    /// drops only a member no record changed since it was read); a scan
    /// returns every member present from its start to its end; so the entry
    /// is gone when this returns. Entries written during the call may or may not survive. An
    /// interrupted invalidation may have deleted some entries and leaves the
    /// index members of the others for the next one: a retry completes it.
    pub async fn invalidate_tags(&self, space: &Keys, tags: &[String]) -> Result<u32> {
        use futures::{StreamExt, TryStreamExt};
        let indexes: Vec<String> = tags.iter().map(|tag| space.cache_tag(tag)).collect();
        // Collected first: a stream mapping references by a closure is not
        // `Send` for the handler (a higher-ranked lifetime limitation).
        let tags: Vec<_> = indexes.iter().map(|index| self.invalidate_tag(index)).collect();
        let counts: Vec<u32> = futures::stream::iter(tags).buffer_unordered(TAGS_AT_ONCE).try_collect().await?;
        Ok(counts.into_iter().sum())
    }

    /// One tag of [`CacheStore::invalidate_tags`], page by page.
    async fn invalidate_tag(&self, index: &str) -> Result<u32> {
        let extra = [index.to_string()];
        let mut cursor = String::from("0");
        let mut deleted = 0;
        loop {
            let mut scan = redis::cmd("ZSCAN");
            scan.arg(index).arg(&cursor).arg("COUNT").arg(INVALIDATE_PAGE);
            let (next, flat): (String, Vec<String>) = self.redis.query(&scan).await?;
            let members: Vec<(&String, &String)> = flat.chunks_exact(2).map(|pair| (&pair[0], &pair[1])).collect();
            if !members.is_empty() {
                let mut entries: Vec<String> = members.iter().map(|(entry, _)| (*entry).clone()).collect();
                entries.sort_unstable();
                entries.dedup();
                deleted += self.delete_entries(&self.scripts.invalidate_entries, &entries, &extra).await?;
                let forgets = members.chunks(SCRIPT_STEPS / 2).map(|members| async move {
                    let mut call = self.scripts.tag_forget.prepare_invoke();
                    call.key(index);
                    for (entry, score) in members {
                        call.arg(*entry).arg(*score);
                    }
                    self.redis.invoke::<()>(&call).await
                });
                at_most_a_few(forgets.collect()).await?;
            }
            if next == "0" {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// Runs `script` (delete.lua or invalidate_entries.lua) over the entry
    /// keys, one call per hash slot and run of at most 200 keys, a few at a
    /// time, with the fill channel and `extra` as arguments; the sum of
    /// their counts.
    async fn delete_entries(&self, script: &Script, entry_keys: &[String], extra: &[String]) -> Result<u32> {
        let groups: Vec<Vec<usize>> = self
            .redis
            .slot_groups(entry_keys.iter().map(String::as_str))
            .iter()
            .flat_map(|group| group.chunks(DELETES_PER_SCRIPT).map(<[usize]>::to_vec))
            .collect();
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
        Ok(at_most_a_few(calls.collect()).await?.into_iter().sum())
    }

    /// Records each written entry (`entry_keys[i]` for `writes[i]`) in the
    /// indexes of its tags, at its expiry (`expiries[i]`, as the write
    /// script returned it).
    ///
    /// After the write, not before: an invalidation that read the index
    /// before this record and deleted the entry's previous version may
    /// forget the member only if no record changed it since, and every
    /// record does (`tag_index.lua`). Recorded first, a member could be
    /// forgotten between the record and a write landing after the delete,
    /// leaving the new entry in no index.
    async fn record_tags(
        &self,
        space: &Keys,
        writes: &[Write<'_>],
        entry_keys: &[String],
        expiries: &[u64],
    ) -> Result<()> {
        if writes.iter().all(|w| w.tags.is_empty()) {
            return Ok(());
        }
        let mut by_index: Vec<(String, Vec<(&str, u64)>)> = Vec::new();
        let mut position: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for ((write, entry), &expiry) in writes.iter().zip(entry_keys).zip(expiries) {
            for tag in write.tags {
                let i = *position.entry(tag.as_str()).or_insert_with(|| {
                    by_index.push((space.cache_tag(tag), Vec::new()));
                    by_index.len() - 1
                });
                by_index[i].1.push((entry, expiry));
            }
        }
        let indexes = by_index.iter().map(|(index, entries)| (index.as_str(), &entries[..])).collect();
        self.record(indexes).await
    }

    /// Runs tag_index.lua for `(index, entries with their expiry)`, one call
    /// per hash slot and run of at most [`SCRIPT_STEPS`] commands (about 500
    /// members; an index of more entries is split over calls), a few at a
    /// time.
    async fn record(&self, indexes: Vec<IndexMembers<'_>>) -> Result<()> {
        let mut runs: Vec<Vec<IndexMembers<'_>>> = Vec::new();
        for group in self.redis.slot_groups(indexes.iter().map(|(index, _)| *index)) {
            let (mut run, mut steps) = (Vec::new(), 0);
            for i in group {
                let (index, mut entries) = indexes[i];
                loop {
                    let room = SCRIPT_STEPS.saturating_sub(steps + INDEX_STEPS);
                    if room < MEMBER_STEPS && !run.is_empty() {
                        runs.push(std::mem::take(&mut run));
                        steps = 0;
                        continue;
                    }
                    let (now, rest) = entries.split_at(entries.len().min((room / MEMBER_STEPS).max(1)));
                    run.push((index, now));
                    steps += INDEX_STEPS + MEMBER_STEPS * now.len();
                    entries = rest;
                    if entries.is_empty() {
                        break;
                    }
                    runs.push(std::mem::take(&mut run));
                    steps = 0;
                }
            }
            if !run.is_empty() {
                runs.push(run);
            }
        }
        let calls = runs.iter().map(|run| async move {
            let mut call = self.scripts.tag_index.prepare_invoke();
            for (index, entries) in run {
                call.key(*index).arg(entries.len());
                for (entry, expiry) in *entries {
                    call.arg(*entry).arg(*expiry);
                }
            }
            self.redis.invoke::<()>(&call).await
        });
        at_most_a_few(calls.collect()).await?;
        Ok(())
    }

    /// Appends the tag-index key names of `tags` to a script's arguments.
    fn tag_args(&self, space: &Keys, call: &mut redis::ScriptInvocation<'_>, tags: &[String]) {
        for tag in tags {
            call.arg(space.cache_tag(tag));
        }
    }
}

/// Splits `items` (indexes, in order) into runs within
/// [`SCRIPT_VALUE_BYTES`] and [`SCRIPT_STEPS`] by `cost` (bytes, steps) of
/// each; an item over them goes alone.
fn bounded_runs(items: &[usize], cost: impl Fn(usize) -> (usize, usize)) -> Vec<Vec<usize>> {
    let (mut runs, mut run) = (Vec::new(), Vec::new());
    let (mut bytes, mut steps) = (0, 0);
    for &i in items {
        let (b, s) = cost(i);
        if !run.is_empty() && (bytes + b > SCRIPT_VALUE_BYTES || steps + s > SCRIPT_STEPS) {
            runs.push(std::mem::take(&mut run));
            (bytes, steps) = (0, 0);
        }
        run.push(i);
        bytes += b;
        steps += s;
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
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

/// The entries of one get.lua reply (every key's PTTL packed in one string,
/// then every value); `None` for a key left for another call.
fn parse_entries(reply: Vec<Value>, keys: usize) -> Result<Vec<Option<Entry>>> {
    let mut items = reply.into_iter();
    let ttls = match items.next() {
        Some(Value::BulkString(ttls)) if items.len() == keys => ttls,
        other => return Err(Error::Internal(format!("get returned {other:?} first, for {keys} keys"))),
    };
    let ttls = super::unpack_integers(&ttls, keys)
        .ok_or_else(|| Error::Internal(format!("get returned {} bytes of TTLs for {keys} keys", ttls.len())))?;
    ttls.zip(items)
        .map(|(pttl, value)| match (pttl, value) {
            // PTTL -2: no such key.
            (-2, _) => Ok(Some(entry(None, -2))),
            // Over the script's byte budget.
            (-3, _) => Ok(None),
            (pttl, Value::BulkString(value)) => Ok(Some(entry(Some(value), pttl))),
            (pttl, other) => Err(Error::Internal(format!("get returned {other:?} with TTL {pttl}"))),
        })
        .collect()
}

fn entry(value: Option<Vec<u8>>, pttl: i64) -> Entry {
    match value {
        None => Entry { value: None, ttl: None },
        // PTTL is -1 for an entry without expiry.
        Some(value) => Entry { value: Some(value), ttl: u64::try_from(pttl).ok().map(Duration::from_millis) },
    }
}
