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
//! Redis Cluster: tracking is per node, so there is one tracking connection
//! per master, all pushing into the same channel. A key moving between
//! masters (slot migration) stays tracked: every master tracks every
//! prefix. A change of the set of masters (a fail-over, a master added or
//! removed) is found by asking `CLUSTER SLOTS` every [`TOPOLOGY_POLL`]; it
//! ends every watch as a dropped connection does, and the next watch
//! connects to the masters of then. Until it is found, a write to a new
//! master is not reported: the near cache's staleness bound on a cluster is
//! that poll plus delivery.

use std::{
    collections::BTreeSet,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use deadpool_redis::redis::{self, PushInfo, PushKind, Value, aio::MultiplexedConnection};
use tokio::sync::{Mutex, broadcast};

use super::{Redis, topology::Node};
use crate::{
    error::{Error, Result},
    keys::Keys,
};

/// Invalidation batches a stream may fall behind before it is ended.
pub const BACKLOG: usize = 4096;

/// How often the masters of a cluster are compared with those tracked.
pub const TOPOLOGY_POLL: Duration = Duration::from_secs(1);

/// One push of the tracking connection.
#[derive(Debug)]
enum Change {
    /// Redis entry names that changed (any space; streams filter).
    Names(Vec<String>),
    /// Every key may have changed (a flush).
    All,
    /// A tracking connection dropped (or the cluster's masters changed):
    /// changes may have been missed.
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
    /// The open tracking connections (one, or one per cluster master) and
    /// their "closed" flag (raised once, by the first `Disconnection` push
    /// or a change of masters, before `Lost` is broadcast).
    conn: Option<(Vec<MultiplexedConnection>, Arc<AtomicBool>)>,
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
                let (conns, _) = tracking.conn.as_mut().ok_or_else(|| Error::Internal("no tracking".into()))?;
                let tracked = self.track(conns, std::slice::from_ref(&prefix)).await;
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
            if let Some((_, closed)) = tracking.conn.take()
                && !closed.swap(true, Ordering::AcqRel)
            {
                let _ = self.events.send(Arc::new(Change::Lost));
            }
            return Err(err);
        }
        Ok(Watch { events, prefix })
    }

    /// Opens the tracking connections for every prefix in `tracking` (and,
    /// on a cluster, starts comparing the masters with theirs).
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
                // Once per connection set: a late one of an old set must not
                // end the watches of the next.
                PushKind::Disconnection if !flag.swap(true, Ordering::AcqRel) => Change::Lost,
                _ => return Ok::<_, Infallible>(()),
            };
            // An error means no watch is listening.
            let _ = events.send(Arc::new(change));
            Ok(())
        };
        let (mut conns, masters) = self.redis.push_connections(pushes).await?;
        let prefixes: Vec<String> = tracking.prefixes.iter().cloned().collect();
        self.track(&mut conns, &prefixes).await?;
        if !masters.is_empty() {
            tokio::spawn(watch_masters(self.redis.clone(), masters, Arc::clone(&closed), self.events.clone()));
        }
        tracking.conn = Some((conns, closed));
        Ok(())
    }

    /// Adds `prefixes` to every connection's broadcast tracking.
    async fn track(&self, conns: &mut [MultiplexedConnection], prefixes: &[String]) -> Result<()> {
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("TRACKING").arg("ON").arg("BCAST");
        for prefix in prefixes {
            cmd.arg("PREFIX").arg(prefix);
        }
        let calls = conns.iter_mut().map(|conn| self.redis.query_on::<()>(conn, &cmd));
        futures::future::try_join_all(calls).await?;
        Ok(())
    }
}

/// Compares the cluster's masters with `tracked` every [`TOPOLOGY_POLL`]
/// until the connections close; on a difference, or when the masters cannot
/// be read, closes them: a master not tracked may be taking writes.
async fn watch_masters(
    redis: Redis,
    tracked: Vec<Node>,
    closed: Arc<AtomicBool>,
    events: broadcast::Sender<Arc<Change>>,
) {
    while !closed.load(Ordering::Acquire) {
        tokio::time::sleep(TOPOLOGY_POLL).await;
        let same = redis.cluster_masters().await.is_ok_and(|masters| masters == tracked);
        if !same && !closed.swap(true, Ordering::AcqRel) {
            tracing::info!("the cluster's masters changed: near-cache watches end and reconnect");
            let _ = events.send(Arc::new(Change::Lost));
        }
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
