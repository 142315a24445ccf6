//! The connection layer: the one place that knows how the service reaches
//! Redis.
//!
//! Every RPC borrows nothing exclusively. The handle keeps a few long-lived
//! multiplexed connections ("slots") and hands each call a share of one, so
//! commands that concurrent RPCs issue together leave in one write and their
//! replies come back in one read (pipelining). Calls go to the first slot
//! that is making progress: normally all of them share the first connection,
//! which batches best (fewest writes and reads for Redis and for us); when a
//! connection has had calls pending without a reply for [`STALL`] (a large
//! reply, a slow script), new calls spill over to the next one, so one slow
//! reply holds up only the calls already queued behind it.
//!
//! deadpool creates the connections (bounded by the connect timeout), checks
//! a connection before it is handed out again and replaces the ones that fail
//! the check; the slots only hold what the pool lent them. A connection is
//! known to be dead as soon as redis-rs reports the socket closed (a RESP3
//! `Disconnection` push, which arrives even when no call is in flight) or a
//! call on it fails with a connection error: the slot then returns it and the
//! next call on that slot gets a fresh one, so a killed connection costs at
//! most the calls that were in flight on it.
//!
//! Commands in flight are bounded (`--redis-max-in-flight`): past the bound,
//! calls wait for a place within their time bound instead of queueing
//! without limit. A place is held until Redis has answered, not until the
//! caller stops waiting: a call given up before its reply keeps its place
//! until a PING sent behind it on the same connection comes back (or
//! [`FENCE_MAX`] passes), so a stalled Redis never accumulates more than the
//! bound of unanswered commands, however many callers time out meanwhile.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use deadpool::managed::{self, Metrics, Object, RecycleError, RecycleResult};
use deadpool_redis::{
    Runtime,
    redis::{
        self, AsyncConnectionConfig, Cmd, FromRedisValue, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind,
        RedisError, RedisResult, ScriptInvocation, aio::MultiplexedConnection,
    },
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    config::Config,
    error::{Error, Result},
};

/// A bounded-time handle on Redis, cheap to clone.
#[derive(Clone)]
pub struct Redis {
    /// Shared by every clone.
    shared: Arc<Shared>,
}

/// A connection with calls pending and no reply for this long counts as
/// stalled: new calls go to the next connection.
const STALL: Duration = Duration::from_millis(1);

/// Longest a call given up before its reply keeps its place in flight
/// (waiting for Redis to answer what was sent), so a connection that went
/// silent without closing cannot hold places forever.
const FENCE_MAX: Duration = Duration::from_secs(30);

struct Shared {
    /// Creates, checks and replaces the connections the slots hold.
    pool: managed::Pool<Manager>,
    /// The connections calls share, in order of preference.
    slots: Box<[Slot]>,
    /// Round-robin cursor, used only when every connection is stalled.
    next: AtomicUsize,
    /// The zero of the slots' progress clocks.
    epoch: Instant,
    /// Places for commands in flight (`--redis-max-in-flight`).
    in_flight: Arc<Semaphore>,
    /// A client for dedicated connections (pub/sub), which calls never share.
    client: redis::Client,
    /// Upper bound on one operation, connecting included.
    timeout: Duration,
}

/// One shared connection, or none until the first call (or after a failure).
#[derive(Default)]
struct Slot {
    /// The pooled connection this slot lends out.
    link: ArcSwapOption<Object<Manager>>,
    /// Held while replacing, so a dead connection is replaced once, not once
    /// per waiting call.
    replacing: tokio::sync::Mutex<()>,
    /// How busy the slot is, for choosing one.
    load: Arc<Load>,
}

/// Calls pending on a slot, and when it last made progress.
#[derive(Default)]
struct Load {
    /// Calls sent and not yet answered (or given up).
    pending: AtomicUsize,
    /// µs since the epoch of the last reply, or of the first call sent while
    /// none was pending.
    progress_us: AtomicU64,
}

/// One command in flight: its place under the bound and its count in the
/// slot's load. Dropped before [`InFlight::land`] (the caller gave up), it
/// keeps both until Redis has answered what was sent.
struct InFlight {
    /// The place under `--redis-max-in-flight`.
    permit: Option<OwnedSemaphorePermit>,
    /// The slot's load.
    load: Arc<Load>,
    /// The load clock's zero.
    epoch: Instant,
    /// The connection the command went out on, until it lands.
    fence: Option<MultiplexedConnection>,
}

/// What a call sends.
enum Call<'a> {
    Script(&'a ScriptInvocation<'a>),
    Cmd(&'a Cmd),
}

/// A connection as the pool holds it: the multiplexed connection and the flag
/// that says it is dead.
pub struct Link {
    /// The connection; clones share its socket.
    conn: MultiplexedConnection,
    /// Raised by redis-rs's disconnection push or by a call that saw the
    /// connection fail; never lowered.
    closed: Arc<AtomicBool>,
}

/// A call's share of one connection: commands sent on it (and on its clones)
/// reach Redis in the order they were sent.
#[derive(Clone)]
pub struct Conn {
    /// A clone of the slot's connection.
    conn: MultiplexedConnection,
    /// The connection's flag, raised when a call on it shows it dead.
    closed: Arc<AtomicBool>,
    /// The slot's load, counted while calls on this share are pending.
    load: Arc<Load>,
}

impl Redis {
    /// Builds the handle. No connection is opened yet: the service starts
    /// while Redis is down and reports it through health.
    pub fn new(config: &Config) -> Result<Self, String> {
        let info = config.redis_url.as_str().into_connection_info().map_err(|e| format!("--redis-url: {e}"))?;
        // RESP3, so redis-rs tells us at once when a connection closes.
        let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings)).map_err(|e| format!("--redis-url: {e}"))?;
        let connections = config.redis_connections;
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.redis_connect_timeout))
            .set_response_timeout(Some(config.redis_timeout))
            .set_pipeline_buffer_size(config.redis_max_in_flight);
        let manager = Manager { client: client.clone(), connection };
        let pool = managed::Pool::builder(manager)
            .max_size(connections)
            .wait_timeout(Some(config.redis_timeout))
            .create_timeout(Some(config.redis_connect_timeout))
            .recycle_timeout(Some(config.redis_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| format!("redis connections: {e}"))?;
        let slots = (0..connections).map(|_| Slot::default()).collect();
        let shared = Shared {
            pool,
            slots,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            in_flight: Arc::new(Semaphore::new(config.redis_max_in_flight)),
            client,
            timeout: config.redis_timeout,
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// Runs a script (EVALSHA, loading it on first use or after a restart).
    pub async fn invoke<T: FromRedisValue>(&self, script: &ScriptInvocation<'_>) -> Result<T> {
        self.bounded(async {
            let mut conn = self.pick().conn(&self.shared.pool).await?;
            self.send(&mut conn, Call::Script(script)).await
        })
        .await
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        self.bounded(async {
            let mut conn = self.pick().conn(&self.shared.pool).await?;
            self.send(&mut conn, Call::Cmd(cmd)).await
        })
        .await
    }

    /// A share of one connection, for calls that must reach Redis in the
    /// order they were sent: a follow-up to a call that may have been cut
    /// short goes out on the same connection as that call.
    pub async fn connection(&self) -> Result<Conn> {
        self.bounded(self.pick().conn(&self.shared.pool)).await
    }

    /// Runs a script on `conn` (from [`Redis::connection`]), bounded like
    /// [`Redis::invoke`].
    pub async fn invoke_on<T: FromRedisValue>(&self, conn: &mut Conn, script: &ScriptInvocation<'_>) -> Result<T> {
        self.bounded(self.send(conn, Call::Script(script))).await
    }

    /// Sends one call on `conn` once it has a place in flight.
    async fn send<T: FromRedisValue>(&self, conn: &mut Conn, call: Call<'_>) -> Result<T> {
        let permit = Arc::clone(&self.shared.in_flight)
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("in-flight places closed".into()))?;
        let load = &conn.load;
        if load.pending.fetch_add(1, Ordering::AcqRel) == 0 {
            load.progress_us.store(self.now_us(), Ordering::Release);
        }
        let flight = InFlight {
            permit: Some(permit),
            load: Arc::clone(load),
            epoch: self.shared.epoch,
            fence: Some(conn.conn.clone()),
        };
        let result = match call {
            Call::Script(script) => script.invoke_async(&mut conn.conn).await,
            Call::Cmd(cmd) => cmd.query_async(&mut conn.conn).await,
        };
        flight.land();
        Ok(conn.check(result)?)
    }

    /// True when Redis answers PING within `timeout` on any connection.
    ///
    /// Every slot is probed, so a connection that silently stopped answering
    /// (no close ever seen) is found and replaced even while calls are idle;
    /// health stays up while Redis answers on a fresh one.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let pool = &self.shared.pool;
        let probes = self.shared.slots.iter().map(|slot| async move {
            let probe = async {
                let mut conn = slot.conn(pool).await?;
                let result = redis::cmd("PING").query_async::<String>(&mut conn.conn).await;
                Ok::<_, Error>(conn.check(result)?)
            };
            match tokio::time::timeout(timeout, probe).await {
                Ok(Ok(_)) => true,
                _ => {
                    slot.retire();
                    false
                }
            }
        });
        futures::future::join_all(probes).await.into_iter().any(|up| up)
    }

    /// A dedicated pub/sub connection, opened within the timeout.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub> {
        self.bounded(async { Ok(self.shared.client.get_async_pubsub().await?) }).await
    }

    /// The first slot that is not stalled; round robin when all are.
    fn pick(&self) -> &Slot {
        let slots = &self.shared.slots;
        let now = self.now_us();
        let stall = u64::try_from(STALL.as_micros()).unwrap_or(u64::MAX);
        slots
            .iter()
            .find(|slot| !slot.load.stalled(now, stall))
            .unwrap_or_else(|| &slots[self.shared.next.fetch_add(1, Ordering::Relaxed) % slots.len()])
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.shared.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    async fn bounded<T>(&self, op: impl Future<Output = Result<T>>) -> Result<T> {
        let timeout = self.shared.timeout;
        tokio::time::timeout(timeout, op)
            .await
            .unwrap_or_else(|_| Err(Error::Unavailable(format!("no reply within {timeout:?}"))))
    }
}

impl Slot {
    /// A share of this slot's connection, opened first if there is none or
    /// the current one is dead.
    async fn conn(&self, pool: &managed::Pool<Manager>) -> Result<Conn> {
        if let Some(link) = self.link.load().as_deref()
            && link.is_open()
        {
            return Ok(link.share(&self.load));
        }
        let _one = self.replacing.lock().await;
        if let Some(link) = self.link.load().as_deref()
            && link.is_open()
        {
            return Ok(link.share(&self.load));
        }
        // Hand the dead connection back; the pool's check discards it.
        self.link.store(None);
        let link = pool.get().await?;
        let conn = link.share(&self.load);
        self.link.store(Some(Arc::new(link)));
        Ok(conn)
    }

    /// Marks the current connection dead, so the next call replaces it.
    fn retire(&self) {
        if let Some(link) = self.link.load().as_deref() {
            link.closed.store(true, Ordering::Release);
        }
    }
}

impl Link {
    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    fn share(&self, load: &Arc<Load>) -> Conn {
        Conn { conn: self.conn.clone(), closed: Arc::clone(&self.closed), load: Arc::clone(load) }
    }
}

impl Load {
    /// One pending call is answered (or its connection gone).
    fn answered(&self, epoch: Instant) {
        let now = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.progress_us.store(now, Ordering::Release);
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Calls are pending and none has been answered for `stall` µs.
    fn stalled(&self, now_us: u64, stall_us: u64) -> bool {
        self.pending.load(Ordering::Acquire) > 0
            && now_us.saturating_sub(self.progress_us.load(Ordering::Acquire)) >= stall_us
    }
}

impl InFlight {
    /// The reply is in: give the place back now.
    fn land(mut self) {
        self.fence = None;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let (Some(mut conn), Ok(runtime)) = (self.fence.take(), tokio::runtime::Handle::try_current()) else {
            self.load.answered(self.epoch);
            return;
        };
        // Given up before the reply: Redis still has the command. Hold the
        // place until a PING behind it is answered (replies come in order).
        let (permit, load, epoch) = (self.permit.take(), Arc::clone(&self.load), self.epoch);
        runtime.spawn(async move {
            conn.set_response_timeout(FENCE_MAX);
            let _ = redis::cmd("PING").query_async::<redis::Value>(&mut conn).await;
            load.answered(epoch);
            drop(permit);
        });
    }
}

impl Conn {
    /// Passes `result` through; if it shows the connection itself is broken
    /// (closed socket, protocol error), marks the connection dead so its slot
    /// replaces it.
    fn check<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(err) = &result
            && (err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error())
        {
            self.closed.store(true, Ordering::Release);
        }
        result
    }
}

/// Opens connections for the pool and checks them before reuse.
struct Manager {
    /// Where to connect (RESP3).
    client: redis::Client,
    /// Timeouts and the in-flight bound of each connection.
    connection: AsyncConnectionConfig,
}

impl managed::Manager for Manager {
    type Type = Link;
    type Error = RedisError;

    async fn create(&self) -> Result<Link, RedisError> {
        let closed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&closed);
        let config = self.connection.clone().set_push_sender(move |push: PushInfo| {
            if push.kind == PushKind::Disconnection {
                flag.store(true, Ordering::Release);
            }
            Ok::<_, std::convert::Infallible>(())
        });
        let conn = self.client.get_multiplexed_async_connection_with_config(&config).await?;
        Ok(Link { conn, closed })
    }

    async fn recycle(&self, link: &mut Link, _: &Metrics) -> RecycleResult<RedisError> {
        if link.is_open() { Ok(()) } else { Err(RecycleError::message("connection closed")) }
    }
}
