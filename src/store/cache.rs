//! Cache operations: one script invocation (one round trip) per call.

use std::{sync::Arc, time::Duration};

use deadpool_redis::redis::{Script, Value, aio::MultiplexedConnection};
use tokio::time::Instant;

use super::{Redis, millis, random_token, wake::Waiters};
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
    invalidate_tags: Script,
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
            invalidate_tags: write_script!("invalidate_tags.lua"),
        };
        Self { redis, keys, channel, waiters, scripts, listener }
    }

    /// Reads entries in order, in one round trip.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Entry>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.scripts.get.prepare_invoke();
        for key in keys {
            call.key(self.keys.cache_entry(key));
        }
        let rows: Vec<(Option<Vec<u8>>, i64)> = self.redis.invoke(&call).await?;
        if rows.len() != keys.len() {
            return Err(Error::Internal(format!("get returned {} rows for {} keys", rows.len(), keys.len())));
        }
        Ok(rows.into_iter().map(|(value, pttl)| entry(value, pttl)).collect())
    }

    /// Writes one entry; false when the condition did not hold.
    pub async fn set(&self, write: &Write<'_>, condition: Condition) -> Result<bool> {
        let mut call = self.scripts.set.prepare_invoke();
        call.key(self.keys.cache_entry(write.key));
        self.tag_keys(&mut call, write.tags);
        call.arg(&self.channel).arg(write.value).arg(millis(write.ttl)).arg(match condition {
            Condition::Always => "",
            Condition::IfAbsent => "NX",
            Condition::IfPresent => "XX",
        });
        let stored: i64 = self.redis.invoke(&call).await?;
        Ok(stored == 1)
    }

    /// Writes every entry, in one round trip; returns how many.
    pub async fn set_many(&self, writes: &[Write<'_>]) -> Result<u32> {
        if writes.is_empty() {
            return Ok(0);
        }
        let mut call = self.scripts.set_many.prepare_invoke();
        call.arg(&self.channel);
        for write in writes {
            call.key(self.keys.cache_entry(write.key));
            self.tag_keys(&mut call, write.tags);
            call.arg(write.value).arg(millis(write.ttl)).arg(write.tags.len());
        }
        self.redis.invoke(&call).await
    }

    /// Deletes entries; returns how many existed.
    pub async fn delete(&self, keys: &[String]) -> Result<u32> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut call = self.scripts.delete.prepare_invoke();
        for key in keys {
            call.key(self.keys.cache_entry(key));
        }
        call.arg(&self.channel);
        self.redis.invoke(&call).await
    }

    /// Sets a new TTL on a live entry; false when there is none.
    pub async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        let mut call = self.scripts.touch.prepare_invoke();
        call.key(self.keys.cache_entry(key)).arg(millis(ttl));
        let found: i64 = self.redis.invoke(&call).await?;
        Ok(found == 1)
    }

    /// The stampede-safe read: a hit, the fill lease, or, after waiting up to
    /// `max_wait` for another caller's fill, whatever that produced.
    ///
    /// `max_wait` counts from the call: once it is over, the answer is
    /// `Timeout`, even if a read after the first is still waiting on a slow
    /// Redis (the first read is bounded only by the Redis timeout).
    pub async fn fetch(self: &Arc<Self>, key: &str, fill_timeout: Duration, max_wait: Duration) -> Result<Fetched> {
        let deadline = Instant::now() + max_wait;
        let entry_key = self.keys.cache_entry(key);
        let lease_key = self.keys.cache_lease(key);
        match self.try_fetch(&entry_key, &lease_key, fill_timeout).await? {
            Attempt::Done(fetched) => return Ok(fetched),
            Attempt::Leased(_) if Instant::now() >= deadline => return Ok(Fetched::Timeout),
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
                Err(_) => return Ok(Fetched::Timeout),
                Ok(attempt) => match attempt? {
                    Attempt::Done(fetched) => return Ok(fetched),
                    Attempt::Leased(ttl) => ttl,
                },
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(Fetched::Timeout);
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
    pub async fn fill(&self, write: &Write<'_>, token: &str) -> Result<bool> {
        let mut call = self.scripts.fill.prepare_invoke();
        call.key(self.keys.cache_entry(write.key)).key(self.keys.cache_lease(write.key));
        self.tag_keys(&mut call, write.tags);
        call.arg(&self.channel).arg(token).arg(write.value).arg(millis(write.ttl));
        let stored: i64 = self.redis.invoke(&call).await?;
        Ok(stored == 1)
    }

    /// Releases a fill lease without a value; false when it is not current.
    pub async fn abandon_fill(&self, key: &str, token: &str) -> Result<bool> {
        let mut call = self.scripts.abandon_fill.prepare_invoke();
        call.key(self.keys.cache_entry(key)).key(self.keys.cache_lease(key)).arg(&self.channel).arg(token);
        let released: i64 = self.redis.invoke(&call).await?;
        Ok(released == 1)
    }

    /// Deletes every entry with any of the tags; returns how many.
    pub async fn invalidate_tags(&self, tags: &[String]) -> Result<u32> {
        if tags.is_empty() {
            return Ok(0);
        }
        let mut call = self.scripts.invalidate_tags.prepare_invoke();
        self.tag_keys(&mut call, tags);
        call.arg(&self.channel);
        self.redis.invoke(&call).await
    }

    fn tag_keys(&self, call: &mut deadpool_redis::redis::ScriptInvocation<'_>, tags: &[String]) {
        for tag in tags {
            call.key(self.keys.cache_tag(tag));
        }
    }
}

/// Hands back the lease a cancelled Fetch attempt may have taken. Harmless
/// when it took none: the abandon script only deletes a lease holding `token`.
struct LeaseGuard {
    /// Set while the attempt's outcome is unknown to its caller.
    store: Option<Arc<CacheStore>>,
    /// The connection the fetch script went out on.
    conn: MultiplexedConnection,
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

fn entry(value: Option<Vec<u8>>, pttl: i64) -> Entry {
    match value {
        None => Entry { value: None, ttl: None },
        // PTTL is -1 for an entry without expiry.
        Some(value) => Entry { value: Some(value), ttl: u64::try_from(pttl).ok().map(Duration::from_millis) },
    }
}
