//! Near-cache invalidations: which cache entries changed, learnt from Redis
//! itself through client-side tracking, fanned out in-process to every
//! `WatchInvalidations` stream of this instance.
//!
//! One dedicated RESP3 connection per service instance, opened when the first
//! stream starts, runs `CLIENT TRACKING ON BCAST PREFIX <p>` for the entry
//! prefix `p` of each key space (tenant) that has had a watcher since. Redis
//! then pushes, after applying any command that changes a key under `p`, an
//! `invalidate` message naming it, whoever sent the command (any instance,
//! any script, `redis-cli`) and whatever the change (SET, DEL, PEXPIRE,
//! expiry, eviction); `FLUSHALL`/`FLUSHDB` push a null ("everything"). The
//! scripts therefore publish nothing for the near cache: every write path is
//! covered by construction, including ones added later.
//!
//! The pushes go to one [`broadcast`] channel; each stream holds only a
//! receiver and filters by its own space's prefix, so thousands of idle
//! streams cost a receiver each and no task, no wake-up and no Redis
//! traffic. A stream that falls [`BACKLOG`] batches behind, or any stream
//! when the tracking connection drops (Redis restarted, the connection
//! killed, a Sentinel fail-over), may have missed a change: it ends with
//! `Unavailable`, and its near cache must drop everything. The next watch
//! opens a fresh connection, re-tracking every prefix.
//!
//! Redis Cluster: tracking is per node, so a watch would need one tracking
//! connection per master, kept in step with slot migrations and fail-overs.
//! Not built: [`Invalidations::watch`] fails with `Unsupported` there.

use std::{
    collections::BTreeSet,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use deadpool_redis::redis::{self, PushInfo, PushKind, Value, aio::MultiplexedConnection};
use tokio::sync::{Mutex, broadcast};

use super::Redis;
use crate::{
    error::{Error, Result},
    keys::Keys,
};

/// Invalidation batches a stream may fall behind before it is ended.
pub const BACKLOG: usize = 4096;

/// One push of the tracking connection.
#[derive(Debug)]
enum Change {
    /// Redis entry names that changed (any space; streams filter).
    Names(Vec<String>),
    /// Every key may have changed (a flush).
    All,
    /// The tracking connection dropped: changes may have been missed.
    Lost,
}

/// What one watch learns next.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// These keys of the watch's space changed (caller's names, never empty).
    Keys(Vec<String>),
    /// Every key may have changed.
    All,
}

/// The instance's tracking connection and its fan-out.
pub struct Invalidations {
    redis: Redis,
    /// Every push, to every watch of this instance.
    events: broadcast::Sender<Arc<Change>>,
    /// The connection and the prefixes tracked on it; locked only while a
    /// watch starts.
    tracking: Mutex<Tracking>,
}

#[derive(Default)]
struct Tracking {
    /// The open tracking connection and its "closed" flag (raised by the
    /// `Disconnection` push before `Lost` is broadcast).
    conn: Option<(MultiplexedConnection, Arc<AtomicBool>)>,
    /// Entry prefixes tracked on `conn`; re-tracked on a new connection.
    prefixes: BTreeSet<String>,
}

/// One stream's view of the changes: its space's entries only.
pub struct Watch {
    events: broadcast::Receiver<Arc<Change>>,
    /// The space's [`Keys::cache_entry_prefix`].
    prefix: String,
}

impl Invalidations {
    /// No connection until the first watch.
    pub fn new(redis: Redis) -> Self {
        Self { redis, events: broadcast::channel(BACKLOG).0, tracking: Mutex::default() }
    }

    /// Starts watching `space`: every change Redis applies to one of its
    /// entries after this returns is reported by [`Watch::next`] (or the
    /// watch ends with `Unavailable`).
    pub async fn watch(&self, space: &Keys) -> Result<Watch> {
        let prefix = space.cache_entry_prefix();
        // Subscribed before tracking is checked: a connection lost after the
        // check broadcasts `Lost` to this receiver too.
        let events = self.events.subscribe();
        let mut tracking = self.tracking.lock().await;
        let open = tracking.conn.as_ref().is_some_and(|(_, closed)| !closed.load(Ordering::Acquire));
        let result = if open {
            if tracking.prefixes.contains(&prefix) {
                Ok(())
            } else {
                let (conn, _) = tracking.conn.as_mut().ok_or_else(|| Error::Internal("no tracking".into()))?;
                let tracked = self.track(conn, std::iter::once(&prefix)).await;
                if tracked.is_ok() {
                    tracking.prefixes.insert(prefix.clone());
                }
                tracked
            }
        } else {
            tracking.prefixes.insert(prefix.clone());
            self.connect(&mut tracking).await
        };
        if let Err(err) = result {
            // The connection's state is unknown: drop it, and with it every
            // watch that relied on it.
            if tracking.conn.take().is_some() {
                let _ = self.events.send(Arc::new(Change::Lost));
            }
            return Err(err);
        }
        Ok(Watch { events, prefix })
    }

    /// Opens a tracking connection for every prefix in `tracking`.
    async fn connect(&self, tracking: &mut Tracking) -> Result<()> {
        tracking.conn = None;
        let closed = Arc::new(AtomicBool::new(false));
        let (flag, events) = (Arc::clone(&closed), self.events.clone());
        // Runs in redis-rs's connection task, once per push: no task of ours.
        let pushes = move |push: PushInfo| {
            let change = match push.kind {
                PushKind::Invalidate => match push.data.into_iter().next() {
                    Some(Value::Array(names)) => Change::Names(names.into_iter().filter_map(name).collect()),
                    _ => Change::All,
                },
                PushKind::Disconnection => {
                    flag.store(true, Ordering::Release);
                    Change::Lost
                }
                _ => return Ok::<_, Infallible>(()),
            };
            // An error means no watch is listening.
            let _ = events.send(Arc::new(change));
            Ok(())
        };
        let mut conn = self
            .redis
            .push_connection(pushes)
            .await?
            .ok_or(Error::Unsupported("near-cache invalidations are not available on Redis Cluster"))?;
        self.track(&mut conn, tracking.prefixes.iter()).await?;
        tracking.conn = Some((conn, closed));
        Ok(())
    }

    /// Adds `prefixes` to the connection's broadcast tracking.
    async fn track(&self, conn: &mut MultiplexedConnection, prefixes: impl Iterator<Item = &String>) -> Result<()> {
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("TRACKING").arg("ON").arg("BCAST");
        for prefix in prefixes {
            cmd.arg("PREFIX").arg(prefix);
        }
        self.redis.query_on::<()>(conn, &cmd).await
    }
}

/// A pushed key name (ours are UTF-8; anything else is not ours).
fn name(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

impl Watch {
    /// The next change of this watch's space; `Unavailable` when changes
    /// may have been missed (the watch is then over).
    pub async fn next(&mut self) -> Result<Seen> {
        loop {
            match self.events.recv().await {
                Ok(change) => match &*change {
                    Change::Names(names) => {
                        let keys: Vec<String> = names
                            .iter()
                            .filter_map(|name| Keys::cache_key_of(name, &self.prefix))
                            .map(str::to_string)
                            .collect();
                        if !keys.is_empty() {
                            return Ok(Seen::Keys(keys));
                        }
                    }
                    Change::All => return Ok(Seen::All),
                    Change::Lost => return Err(Error::Unavailable("the tracking connection dropped".into())),
                },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Err(Error::Unavailable(format!("a watch fell {n} invalidation batches behind")));
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(Error::Unavailable("invalidations closed".into()));
                }
            }
        }
    }
}
