//! Lock operations: leased, fenced, mutually exclusive locks.
//!
//! A lock is one hash that expires with its lease; its fencing counter is a
//! separate key without expiry. Every operation is one script call. A caller
//! that waits registers with [`Waiters`] and retries when the release script
//! announces the lock on the lock channel, or when the holder's lease runs
//! out: never on a polling interval.

use std::{sync::Arc, time::Duration};

use deadpool_redis::redis::{Script, Value};
use tokio::time::Instant;

use super::{Conn, Redis, millis, random_token, wake::Waiters};
use crate::{
    error::{Error, Result},
    keys::Keys,
};

/// A lease granted to a caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The secret that proves the lease.
    pub lease_id: String,
    /// This acquisition's fencing token.
    pub fencing_token: u64,
    /// On this process's clock, the lease cannot end before this instant
    /// (before allowing for clock drift; see [`valid_for`]).
    pub lease_floor: Instant,
}

/// Who holds a lock, as Inspect reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The holder's label.
    pub owner: String,
    /// The holder's fencing token.
    pub fencing_token: u64,
    /// Time left on the lease; `None` if the key has no expiry (only when
    /// written by hand).
    pub ttl_remaining: Option<Duration>,
}

/// The Lock service's data in Redis.
pub struct LockStore {
    /// The bounded-time Redis handle.
    redis: Redis,
    /// Key names under the prefix.
    keys: Keys,
    /// Where releases are announced (the `<prefix>:locks` channel).
    channel: String,
    /// Local waiters by lock key, woken from the lock channel.
    waiters: Arc<Waiters>,
    /// The lock scripts.
    scripts: Scripts,
    /// Replicas that must acknowledge a grant before it is answered (0: none).
    replicas: usize,
    /// Keeps the release listener alive exactly as long as the store.
    listener: tokio::task::JoinHandle<()>,
}

/// Loaded once; EVALSHA'd per call.
struct Scripts {
    /// `lock_acquire.lua`: take if free, with a fresh fencing token.
    acquire: Script,
    /// `lock_release.lua`: compare lease, delete, publish.
    release: Script,
    /// `lock_extend.lua`: compare lease, re-expire.
    extend: Script,
    /// `lock_inspect.lua`: the holder and its time left.
    inspect: Script,
}

impl Drop for LockStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// One acquire attempt: taken, or held by someone else for this long.
enum Attempt {
    /// The lock is the caller's now.
    Taken(Grant),
    /// Someone else holds it; its lease has this long left (`None`: no expiry).
    Held(Option<Duration>),
}

impl LockStore {
    /// A store under `keys`, listening for releases; grants wait for
    /// `replicas` acknowledgements.
    pub fn new(redis: Redis, keys: Keys, replicas: usize) -> Self {
        let channel = keys.lock_channel();
        let waiters = Arc::new(Waiters::default());
        let listener = Arc::clone(&waiters).listen(redis.clone(), channel.clone());
        let scripts = Scripts {
            acquire: super::script("lock_acquire.lua", include_str!("lua/lock_acquire.lua")),
            release: super::script("lock_release.lua", include_str!("lua/lock_release.lua")),
            extend: super::script("lock_extend.lua", include_str!("lua/lock_extend.lua")),
            inspect: super::script("lock_inspect.lua", include_str!("lua/lock_inspect.lua")),
        };
        Self { redis, keys, channel, waiters, scripts, replicas, listener }
    }

    /// Where the Hold task records renewals and losses.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        self.redis.metrics()
    }

    /// The key space without a tenant; `Keys::tenant` derives a tenant's.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Takes lock `name` for `ttl`, waiting for it until `deadline` (`None`:
    /// try once). `None` when it was still held by someone else.
    ///
    /// Cancel-safe: if this future is dropped while an attempt is in flight,
    /// that attempt's lease is released in the background, so a caller that
    /// gave up never ends up holding the lock.
    pub async fn acquire(
        self: &Arc<Self>,
        space: &Keys,
        name: &str,
        owner: &str,
        ttl: Duration,
        deadline: Option<Instant>,
    ) -> Result<Option<Grant>> {
        use crate::metrics::Acquired;
        let started = Instant::now();
        let (grant, waited) = self.acquire_waiting(space, name, owner, ttl, deadline).await?;
        let result = match (&grant, waited) {
            (Some(_), false) => Acquired::Immediate,
            (Some(_), true) => Acquired::AfterWait,
            (None, true) => Acquired::TimedOut,
            (None, false) => Acquired::Busy,
        };
        self.redis.metrics().lock_acquire(result, started.elapsed());
        Ok(grant)
    }

    /// [`LockStore::acquire`], and whether it waited for the lock.
    async fn acquire_waiting(
        self: &Arc<Self>,
        space: &Keys,
        name: &str,
        owner: &str,
        ttl: Duration,
        deadline: Option<Instant>,
    ) -> Result<(Option<Grant>, bool)> {
        let key = space.lock(name);
        let fence = space.lock_fence(name);
        let lease_id = random_token();
        let deadline = match self.attempt(&key, &fence, &lease_id, owner, ttl).await? {
            Attempt::Taken(grant) => return Ok((Some(grant), false)),
            Attempt::Held(_) => match deadline {
                Some(deadline) if deadline > Instant::now() => deadline,
                _ => return Ok((None, false)),
            },
        };
        // Register, then try again: a release between the first attempt and
        // the registration would otherwise go unseen.
        let mut wait = self.waiters.register(&key);
        loop {
            let held_for = match self.attempt(&key, &fence, &lease_id, owner, ttl).await? {
                Attempt::Taken(grant) => return Ok((Some(grant), true)),
                Attempt::Held(held_for) => held_for,
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok((None, true));
            }
            // Wake on a release, or just after the holder's lease runs out
            // (PTTL is truncated to whole ms, so one more ms is past it).
            let wake_at = held_for.map_or(deadline, |left| deadline.min(now + left + Duration::from_millis(1)));
            tokio::select! {
                () = wait.changed() => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// One run of the acquire script, guarded so that a dropped call releases
    /// what it may have taken; within one Redis timeout in all (taking a
    /// connection, the script, and any WAIT for replicas).
    async fn attempt(
        self: &Arc<Self>,
        key: &str,
        fence: &str,
        lease_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Attempt> {
        self.redis.within_timeout(self.attempt_on_a_connection(key, fence, lease_id, owner, ttl)).await
    }

    async fn attempt_on_a_connection(
        self: &Arc<Self>,
        key: &str,
        fence: &str,
        lease_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Attempt> {
        let mut call = self.scripts.acquire.prepare_invoke();
        call.key(key).key(fence).arg(lease_id).arg(owner).arg(millis(ttl));
        let mut conn = self.redis.connection().await?;
        let mut guard = ReleaseOnDrop { store: Arc::clone(self), key, lease_id, conn: Some(conn.clone()), armed: true };
        let sent = Instant::now();
        let reply: Vec<Value> = match self.redis.invoke_on(&mut conn, &call).await {
            Ok(reply) => reply,
            // The connection died with the script in flight: it ran or it
            // never will, so what it may have taken is given back now, on
            // another connection, before the call answers (and by the guard,
            // in the background, if the timeout cuts this short).
            Err(err) if conn.is_dropped() => {
                guard.conn = None;
                self.give_back(key, lease_id, None).await;
                guard.disarm();
                return Err(err);
            }
            // Otherwise (a timeout) the script may still run later: the
            // guard stays armed and releases it behind it, on its connection.
            Err(err) => return Err(err),
        };
        match reply.as_slice() {
            [Value::Int(1), Value::Int(token)] => {
                let fencing_token = u64::try_from(*token).map_err(|_| Error::Internal(format!("token {token}")))?;
                if self.replicas > 0 {
                    // Until the replicas have it, a fail-over could lose the
                    // grant: the guard stays armed and releases it unless
                    // they acknowledge.
                    let acked = self.redis.wait_replicas(&mut conn, key, self.replicas).await?;
                    if acked < self.replicas {
                        return Err(Error::Unavailable(format!(
                            "lock grant acknowledged by {acked} of {} replicas",
                            self.replicas
                        )));
                    }
                }
                guard.disarm();
                Ok(Attempt::Taken(Grant { lease_id: lease_id.to_string(), fencing_token, lease_floor: sent + ttl }))
            }
            [Value::Int(0), Value::Int(pttl)] => {
                guard.disarm();
                Ok(Attempt::Held(u64::try_from(*pttl).ok().map(Duration::from_millis)))
            }
            _ => Err(Error::Internal(format!("acquire returned {reply:?}"))),
        }
    }

    /// Releases the lease; false when it is not the holder's.
    ///
    /// If the connection dies with the release in flight, the release is
    /// sent again on another connection (it is idempotent, and the first
    /// either ran or never will): a lease that was still the holder's is
    /// then released (true); if it no longer was, the first may have
    /// released it, which cannot be told, so the error stands. Either way the
    /// lease no longer holds the lock.
    pub async fn release(&self, space: &Keys, name: &str, lease_id: &str) -> Result<bool> {
        let key = space.lock(name);
        // One --redis-timeout in all, the second sending included.
        self.redis
            .within_timeout(async {
                let mut conn = self.redis.connection().await?;
                match self.send_release(&key, lease_id, Some(&mut conn)).await? {
                    (released, None) => Ok(released == 1),
                    (1, Some(_)) => Ok(true),
                    (_, Some(first)) => Err(first),
                }
            })
            .await
    }

    /// Releases `lease_id` of lock `key` if it still holds it, for a lease
    /// whose taker gave up or failed: on `conn`, the connection the acquire
    /// went out on (so Redis runs it after the acquire, never before), or on
    /// any connection when there is none or it died (then the acquire ran
    /// or never will). Logs what could not be released.
    async fn give_back(&self, key: &str, lease_id: &str, conn: Option<&mut Conn>) {
        match self.send_release(key, lease_id, conn).await {
            Ok((1, _)) => tracing::debug!(%key, "released a lock its caller gave up on"),
            Ok(_) => {}
            // The lease then ends with its TTL.
            Err(err) => tracing::warn!(%err, %key, "could not release a lock its caller gave up on"),
        }
    }

    /// Runs lock_release.lua for `lease_id` of `key` on `conn` (any
    /// connection when `None`); if that connection dies with it in flight,
    /// runs it again on another (the first ran or never will, and a release
    /// is idempotent). The script's reply, with the first sending's error
    /// when the reply is the second's.
    async fn send_release(&self, key: &str, lease_id: &str, conn: Option<&mut Conn>) -> Result<(i64, Option<Error>)> {
        let mut call = self.scripts.release.prepare_invoke();
        call.key(key).arg(lease_id).arg(&self.channel);
        let first = match conn {
            Some(conn) => match self.redis.invoke_on::<i64>(conn, &call).await {
                Err(err) if conn.is_dropped() => err,
                result => return result.map(|reply| (reply, None)),
            },
            None => return self.redis.invoke::<i64>(&call).await.map(|reply| (reply, None)),
        };
        Ok((self.redis.invoke::<i64>(&call).await?, Some(first)))
    }

    /// Sets the lease to end `ttl` from now; the new lease floor (as in
    /// [`Grant`]), or `None` when the lease is not the holder's.
    pub async fn extend(&self, space: &Keys, name: &str, lease_id: &str, ttl: Duration) -> Result<Option<Instant>> {
        let mut call = self.scripts.extend.prepare_invoke();
        call.key(space.lock(name)).arg(lease_id).arg(millis(ttl)).arg(&self.channel);
        let sent = Instant::now();
        let extended: i64 = self.redis.invoke(&call).await?;
        Ok((extended == 1).then_some(sent + ttl))
    }

    /// Who holds lock `name`, if anyone.
    pub async fn inspect(&self, space: &Keys, name: &str) -> Result<Option<Holder>> {
        let mut call = self.scripts.inspect.prepare_invoke();
        call.key(space.lock(name));
        let reply: Vec<Value> = self.redis.invoke(&call).await?;
        match reply.as_slice() {
            [Value::Int(0)] => Ok(None),
            [Value::Int(1), Value::BulkString(owner), Value::Int(token), Value::Int(pttl)] => Ok(Some(Holder {
                owner: String::from_utf8_lossy(owner).into_owned(),
                fencing_token: u64::try_from(*token).unwrap_or(0),
                ttl_remaining: u64::try_from(*pttl).ok().map(Duration::from_millis),
            })),
            _ => Err(Error::Internal(format!("inspect returned {reply:?}"))),
        }
    }
}

/// Releases an attempt's lease if the attempt is dropped before its reply
/// arrived (the caller gave up while the script was in flight, or Redis did
/// not answer in time). The release goes out on the attempt's own connection,
/// so Redis runs it after the acquire script, never before; releasing a lease
/// that was never granted is a no-op.
struct ReleaseOnDrop<'a> {
    /// The store, kept alive for the background release.
    store: Arc<LockStore>,
    /// The lock key of the attempt.
    key: &'a str,
    /// The lease id the attempt asked for.
    lease_id: &'a str,
    /// The attempt's connection (a clone shares it); `None`: any connection
    /// will do (the attempt's died).
    conn: Option<Conn>,
    /// Whether a drop releases; lowered once the caller owns the outcome.
    armed: bool,
}

impl ReleaseOnDrop<'_> {
    /// The reply is in: from here on the caller owns the outcome.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, key, lease_id) = (Arc::clone(&self.store), self.key.to_string(), self.lease_id.to_string());
        let mut conn = self.conn.take();
        runtime.spawn(async move { store.give_back(&key, &lease_id, conn.as_mut()).await });
    }
}

/// How long from `from` a lease with this floor surely lasts, on any clock.
///
/// The script sets the expiry after the service sent it, so the lease ends
/// no earlier than `sent + ttl` (the floor). `from` is an instant no earlier
/// than the client's own reference point (its send, or its receipt of a
/// message), so the span `floor - from` holds on the client's clock too, up
/// to clock-rate drift between Redis, this process and the client: take off
/// 1% and 2 ms for that (Redlock's allowance). Zero once the floor is near.
pub fn valid_for(lease_floor: Instant, from: Instant) -> Duration {
    let span = lease_floor.saturating_duration_since(from);
    span.saturating_sub(span / 100 + Duration::from_millis(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_keeps_a_drift_margin_and_never_goes_negative() {
        let from = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(valid_for(from + ms(1_000), from), ms(988));
        assert_eq!(valid_for(from + ms(2), from), Duration::ZERO);
        assert_eq!(valid_for(from, from + ms(5)), Duration::ZERO);
    }

    #[test]
    fn lease_ids_are_128_bit_url_safe_and_fresh() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
