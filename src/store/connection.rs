//! The connection layer: the one place that knows how the service reaches
//! Redis, whether one server, a Redis Cluster or a master found through
//! Sentinel (`--redis-url`, see `topology.rs`).
//!
//! Every RPC borrows nothing exclusively. The handle keeps a few long-lived
//! connections ("slots") and hands each call a share of one, so commands that
//! concurrent RPCs issue together leave in one write and their replies come
//! back in one read (pipelining). On one server or a Sentinel master a slot is
//! one multiplexed connection; on a cluster it is a redis-rs cluster
//! connection (one multiplexed connection per node, MOVED/ASK followed).
//! Calls go to the first slot that is making progress: normally all of them
//! share the first, which batches best (fewest writes and reads for Redis and
//! for us); when a slot has had calls pending without a reply for [`STALL`]
//! (a large reply, a slow script), new calls spill over to the next one, so
//! one slow reply holds up only the calls already queued behind it.
//!
//! deadpool creates the connections (bounded by the connect timeout; on
//! Sentinel, asking the sentinels where the master is each time), checks a
//! connection before it is handed out again and replaces the ones that fail
//! the check; the slots only hold what the pool lent them. A connection is
//! known to be dead as soon as redis-rs reports the socket closed (a RESP3
//! `Disconnection` push, which arrives even when no call is in flight), a
//! call on it fails with a connection error, or a write is refused with
//! `READONLY` (a demoted Sentinel master): the slot then returns it and the
//! next call on that slot gets a fresh one, so a killed connection costs at
//! most the calls that were in flight on it. A cluster connection repairs its
//! node connections itself.
//!
//! Commands in flight are bounded (`--redis-max-in-flight`): past the bound,
//! calls wait for a place within their time bound instead of queueing
//! without limit. A place is held until Redis has answered, not until the
//! caller stops waiting: a call given up before its reply keeps its place
//! until a PING sent behind it on the same connection (on a cluster, to every
//! primary) comes back, or [`FENCE_MAX`] passes, so a stalled Redis never
//! accumulates more than the bound of unanswered commands, however many
//! callers time out meanwhile.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use deadpool::managed::{self, Object, RecycleError, RecycleResult};
use deadpool_redis::Runtime;
use futures::FutureExt;
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, FromRedisValue, IntoConnectionInfo, ProtocolVersion,
    PushInfo, PushKind, RedisConnectionInfo, RedisError, RedisFuture, RedisResult, ScriptInvocation, TlsCertificates,
    Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
    cluster_routing::{
        MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, Slot as HashSlot, SlotAddr,
    },
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    batch::Batched,
    function::FunctionCall,
    topology::{Auth, Node, Topology},
};
use crate::{
    config::Config,
    error::{Error, Result},
    metrics::{self, Metrics},
    otel::Tracing,
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
/// silent without closing cannot hold places forever. Also redis-rs's own
/// reply timeout: the service's bound is `--redis-timeout`, applied around
/// every call.
const FENCE_MAX: Duration = Duration::from_secs(30);

struct Shared {
    /// How connections are made.
    kind: Arc<Kind>,
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
    /// Upper bound on one operation, connecting included.
    timeout: Duration,
    /// Where calls, errors and connections are counted (the one place).
    metrics: Metrics,
    /// Makes a span per call made under an RPC's span (the one place).
    tracing: Tracing,
}

/// The topology, ready to connect.
enum Kind {
    /// One Redis server.
    Standalone(redis::Client),
    /// The master the sentinels name (asked again at every connect).
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    /// A Redis Cluster, a client per seed node for pub/sub, and how to reach
    /// any node (for the masters' tracking connections).
    Cluster { client: ClusterClient, seeds: Vec<redis::Client>, nodes: Box<NodeClients> },
}

/// What a client of one cluster node needs besides its address.
struct NodeClients {
    auth: Auth,
    tls: bool,
    certificates: Option<TlsCertificates>,
}

impl NodeClients {
    fn client(&self, node: &Node) -> RedisResult<redis::Client> {
        let info = node_info(node, &self.auth, self.tls)?;
        match &self.certificates {
            Some(certificates) if self.tls => redis::Client::build_with_tls(info, certificates.clone()),
            _ => redis::Client::open(info),
        }
    }
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
    /// A connection was lost and none has replaced it yet (for counting
    /// reconnects).
    lost: AtomicBool,
}

/// Calls pending on a slot, and when it last made progress.
#[derive(Default)]
struct Load {
    /// Calls sent and not yet answered (or given up and not yet fenced).
    pending: AtomicUsize,
    /// µs since the epoch of the last reply, or of the first call sent while
    /// none was pending.
    progress_us: AtomicU64,
}

/// A connection as the pool holds it: the connection and the flag that says
/// it is dead.
pub struct Link {
    /// The connection; clones share it.
    wire: Wire,
    /// Raised by redis-rs's disconnection push or by a call that saw the
    /// connection fail; never lowered.
    closed: Arc<AtomicBool>,
    /// Counts the connection open until the pool drops it.
    metrics: Metrics,
    /// When it was opened: a connection opened before one that found the
    /// server no longer the master reached that server too.
    opened: Instant,
}

/// A multiplexed connection to one server (with its batching queue), or a
/// cluster connection.
#[derive(Clone)]
pub enum Wire {
    Single(Arc<Batched>),
    Cluster(ClusterConnection),
}

/// A call's share of one connection: commands sent on it (and on its clones)
/// reach Redis in the order they were sent (on a cluster: per node).
#[derive(Clone)]
pub struct Conn {
    /// A clone of the slot's connection.
    wire: Wire,
    /// The connection's flag, raised when a call on it shows it dead.
    closed: Arc<AtomicBool>,
    /// The slot's load, counted while calls on this share are pending.
    load: Arc<Load>,
    /// A call on this share saw the socket closed (not just the connection
    /// retired, which a live connection may be).
    dropped: bool,
    /// When the connection was opened.
    opened: Instant,
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
    fence: Option<Wire>,
    /// Counts the command in flight until its place is given back.
    metrics: Metrics,
}

/// What a call sends.
enum Call<'a> {
    Script(&'a ScriptInvocation<'a>),
    Function(&'a FunctionCall<'a>),
    Cmd(&'a Cmd),
}

impl Redis {
    /// Builds the handle. No connection is opened yet: the service starts
    /// while Redis is down and reports it through health.
    pub fn new(config: &Config) -> Result<Self, String> {
        Self::with_metrics(config, Metrics::off())
    }

    /// Like [`Redis::new`], recording into `metrics` (which the stores
    /// reach through [`Redis::metrics`]).
    pub fn with_metrics(config: &Config, metrics: Metrics) -> Result<Self, String> {
        Self::with_telemetry(config, metrics, Tracing::off())
    }

    /// Like [`Redis::with_metrics`], with a span per Redis call made under
    /// an RPC's span when `tracing` is on.
    pub fn with_telemetry(config: &Config, metrics: Metrics, tracing: Tracing) -> Result<Self, String> {
        let topology = Topology::parse(&config.redis_url).map_err(|e| format!("--redis-url {e}"))?;
        let certificates = tls_certificates(config)?;
        let kind = Arc::new(Kind::new(topology, certificates, config)?);
        // RESP3 everywhere (see `Kind::new`), so a closed connection is
        // reported at once.
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.redis_connect_timeout))
            .set_response_timeout(Some(FENCE_MAX))
            .set_pipeline_buffer_size(config.redis_max_in_flight);
        let connections = config.redis_connections;
        let manager = Manager { kind: Arc::clone(&kind), connection, metrics: metrics.clone() };
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
            kind,
            pool,
            slots,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            in_flight: Arc::new(Semaphore::new(config.redis_max_in_flight)),
            timeout: config.redis_timeout,
            metrics,
            tracing,
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// The metrics this handle records into; the stores record their
    /// domain events here too.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Runs a script (EVALSHA, loading it on first use or after a restart).
    pub async fn invoke<T: FromRedisValue>(&self, script: &ScriptInvocation<'_>) -> Result<T> {
        self.send_on_any(Call::Script(script)).await
    }

    /// Calls a Redis Function (FCALL, loading its library on first use or
    /// after a restart).
    pub async fn call_function<T: FromRedisValue>(&self, function: &FunctionCall<'_>) -> Result<T> {
        self.send_on_any(Call::Function(function)).await
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        self.send_on_any(Call::Cmd(cmd)).await
    }

    /// Sends `call` on the connection [`Redis::pick`] chooses, bounded by
    /// one `--redis-timeout`, connecting included.
    async fn send_on_any<T: FromRedisValue>(&self, call: Call<'_>) -> Result<T> {
        self.bounded(async {
            let mut conn = self.pick().conn(&self.shared.pool).await?;
            self.send(&mut conn, call).await
        })
        .await
    }

    /// A share of one connection, for calls that must reach Redis in the
    /// order they were sent: a follow-up to a call that may have been cut
    /// short goes out on the same connection as that call.
    pub async fn connection(&self) -> Result<Conn> {
        self.bounded(self.pick().conn(&self.shared.pool)).await
    }

    /// Bounds `op` by one `--redis-timeout` in all: for a call that takes a
    /// connection with [`Redis::connection`] and sends on it, each step
    /// bounded on its own, so that together they cannot take two.
    pub fn within_timeout<T>(&self, op: impl Future<Output = Result<T>>) -> impl Future<Output = Result<T>> {
        self.bounded(op)
    }

    /// Runs a script on `conn` (from [`Redis::connection`]), bounded like
    /// [`Redis::invoke`].
    pub async fn invoke_on<T: FromRedisValue>(&self, conn: &mut Conn, script: &ScriptInvocation<'_>) -> Result<T> {
        self.bounded(self.send(conn, Call::Script(script))).await
    }

    /// Waits until `replicas` replicas have acknowledged every write sent
    /// before on `conn` to the server holding `key` (Redis `WAIT`, for at
    /// most half of `--redis-timeout`); how many did. `WAIT` holds the
    /// connection while it waits, so it belongs on connections of their own
    /// (see `LockStore`).
    pub async fn wait_replicas(&self, conn: &mut Conn, key: &str, replicas: usize) -> Result<usize> {
        let wait_ms = (self.shared.timeout / 2).as_millis().max(1);
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(u64::try_from(wait_ms).unwrap_or(u64::MAX));
        self.bounded(async {
            let wait = async {
                match &mut conn.wire {
                    // Through the batch queue, behind what was sent before.
                    wire @ Wire::Single(_) => cmd.query_async::<usize>(wire).await,
                    Wire::Cluster(cluster) => {
                        let route = Route::with_key(key, SlotAddr::Master);
                        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                        match cluster.route_command(cmd, routing).await {
                            Ok(value) => usize::from_redis_value(value).map_err(RedisError::from),
                            Err(err) => Err(err),
                        }
                    }
                }
            };
            let result = self.shared.tracing.redis_op("WAIT", wait).await;
            Ok(conn.check(result)?)
        })
        .await
    }

    /// Splits `keys` (Redis key names) into groups that one script may touch
    /// together, as index lists in the order of `keys`: one group on a single
    /// server, one per hash slot on a cluster.
    pub fn slot_groups<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Vec<Vec<usize>> {
        let indexes = keys.into_iter().enumerate();
        if !matches!(*self.shared.kind, Kind::Cluster { .. }) {
            let all: Vec<usize> = indexes.map(|(i, _)| i).collect();
            return if all.is_empty() { Vec::new() } else { vec![all] };
        }
        let mut groups: Vec<(HashSlot, Vec<usize>)> = Vec::new();
        for (i, key) in indexes {
            let slot = HashSlot::for_key(key);
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, group)) => group.push(i),
                None => groups.push((slot, vec![i])),
            }
        }
        groups.into_iter().map(|(_, group)| group).collect()
    }

    /// Sends one call on `conn` once it has a place in flight.
    async fn send<T: FromRedisValue>(&self, conn: &mut Conn, call: Call<'_>) -> Result<T> {
        let permit = Arc::clone(&self.shared.in_flight)
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("in-flight places closed".into()))?;
        let metrics = &self.shared.metrics;
        let started = metrics.redis_start();
        let load = &conn.load;
        if load.pending.fetch_add(1, Ordering::AcqRel) == 0 {
            load.progress_us.store(self.now_us(), Ordering::Release);
        }
        let flight = InFlight {
            permit: Some(permit),
            load: Arc::clone(load),
            epoch: self.shared.epoch,
            fence: Some(conn.wire.clone()),
            metrics: metrics.clone(),
        };
        let is_script = !matches!(call, Call::Cmd(_));
        // A span per command sent (EVALSHA, and SCRIPT LOAD after NOSCRIPT;
        // FCALL, and FUNCTION LOAD) only when tracing is on and an RPC's
        // span is current.
        let result = match (self.shared.tracing.traced(&mut conn.wire), call) {
            (None, Call::Script(script)) => script.invoke_async(&mut conn.wire).await,
            (None, Call::Function(function)) => function.invoke_async(&mut conn.wire).await,
            (None, Call::Cmd(cmd)) => cmd.query_async(&mut conn.wire).await,
            (Some(mut traced), Call::Script(script)) => script.invoke_async(&mut traced).await,
            (Some(mut traced), Call::Function(function)) => function.invoke_async(&mut traced).await,
            (Some(mut traced), Call::Cmd(cmd)) => cmd.query_async(&mut traced).await,
        };
        flight.land();
        metrics.redis_done(started, is_script);
        if let Err(err) = &result {
            metrics.redis_error(metrics::RedisError::of(err));
            if matches!(conn.wire, Wire::Single(_)) && err.code() == Some("READONLY") {
                // The server is no longer the master (a Sentinel fail-over
                // with the old master alive): every connection opened up to
                // this one reached it too, and an idle slot would otherwise
                // keep it until a write of its own failed there.
                self.shared.slots.iter().for_each(|slot| slot.retire_opened_by(conn.opened));
            }
        }
        Ok(conn.check(result)?)
    }

    /// Ok when Redis answers PING within `timeout`: on one server, on any
    /// connection; on a cluster, on every primary. Otherwise why not (the
    /// first slot's failure), for the log.
    ///
    /// Every slot is probed, so a connection that silently stopped answering
    /// (no close ever seen) is found and replaced even while calls are idle;
    /// health stays up while Redis answers on a fresh one.
    pub async fn ping(&self, timeout: Duration) -> std::result::Result<(), String> {
        let pool = &self.shared.pool;
        let probes = self.shared.slots.iter().map(|slot| async move {
            let probe = async {
                let mut conn = slot.conn(pool).await?;
                let result = conn.wire.ping().await;
                Ok::<_, Error>(conn.check(result)?)
            };
            let failure = match tokio::time::timeout(timeout, probe).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("no answer within {timeout:?}"),
            };
            slot.retire();
            Err(failure)
        });
        let results = futures::future::join_all(probes).await;
        match results.iter().find(|result| result.is_ok()) {
            Some(_) => Ok(()),
            None => results.into_iter().find_map(Result::err).map_or(Ok(()), Err),
        }
    }

    /// A dedicated pub/sub connection, opened within the timeout: to the
    /// server, the current Sentinel master, or the first cluster node that
    /// answers (Redis Cluster forwards every PUBLISH to every node).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub> {
        self.bounded(async {
            match &*self.shared.kind {
                Kind::Standalone(client) => Ok(client.get_async_pubsub().await?),
                Kind::Sentinel(sentinel) => {
                    let client = sentinel.lock().await.async_get_client().await?;
                    Ok(client.get_async_pubsub().await?)
                }
                Kind::Cluster { seeds, .. } => {
                    let mut last = None;
                    for seed in seeds {
                        match seed.get_async_pubsub().await {
                            Ok(pubsub) => return Ok(pubsub),
                            Err(err) => last = Some(err),
                        }
                    }
                    Err(last.map_or_else(|| Error::Unavailable("no cluster node".into()), Error::from))
                }
            }
        })
        .await
    }

    /// Dedicated connections whose RESP3 pushes (client-side tracking
    /// invalidations, and `Disconnection` when a socket closes) go to
    /// `pushes`, opened within the timeout: to the server, the current
    /// Sentinel master, or every cluster master (tracking is per node), with
    /// the masters they reach (none but on a cluster; see
    /// [`Redis::cluster_masters`]).
    pub async fn push_connections(
        &self,
        pushes: impl redis::aio::AsyncPushSender,
    ) -> Result<(Vec<MultiplexedConnection>, Vec<Node>)> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.shared.timeout))
            .set_response_timeout(Some(self.shared.timeout))
            .set_push_sender(pushes);
        let tracing = &self.shared.tracing;
        let connect = |client: redis::Client| {
            let config = config.clone();
            async move {
                let open = client.get_multiplexed_async_connection_with_config(&config);
                Ok::<_, Error>(tracing.redis_op("connect tracking", open).await?)
            }
        };
        self.bounded(async {
            match &*self.shared.kind {
                Kind::Standalone(client) => Ok((vec![connect(client.clone()).await?], Vec::new())),
                Kind::Sentinel(sentinel) => {
                    let client = sentinel.lock().await.async_get_client().await?;
                    Ok((vec![connect(client).await?], Vec::new()))
                }
                Kind::Cluster { nodes, .. } => {
                    let masters = self.masters_now().await?;
                    let clients = masters.iter().map(|master| nodes.client(master)).collect::<RedisResult<Vec<_>>>()?;
                    let conns = futures::future::try_join_all(clients.into_iter().map(connect)).await?;
                    Ok((conns, masters))
                }
            }
        })
        .await
    }

    /// The cluster's masters now (`CLUSTER SLOTS` of any node), sorted;
    /// none on a single server or through Sentinel.
    pub async fn cluster_masters(&self) -> Result<Vec<Node>> {
        match &*self.shared.kind {
            // Bounded: its one command is.
            Kind::Cluster { .. } => self.masters_now().await,
            _ => Ok(Vec::new()),
        }
    }

    async fn masters_now(&self) -> Result<Vec<Node>> {
        let ranges: Vec<Value> = self.query(&redis::cmd("CLUSTER").arg("SLOTS").clone()).await?;
        let mut masters: Vec<Node> = ranges.iter().filter_map(master_of_range).collect();
        masters.sort();
        masters.dedup();
        if masters.is_empty() {
            return Err(Error::Unavailable("CLUSTER SLOTS named no master".into()));
        }
        Ok(masters)
    }

    /// Runs `cmd` on a connection of its caller's own (such as one from
    /// [`Redis::push_connections`]), bounded by the timeout.
    pub async fn query_on<T: FromRedisValue>(&self, conn: &mut MultiplexedConnection, cmd: &Cmd) -> Result<T> {
        self.bounded(async {
            let result = match self.shared.tracing.traced(conn) {
                Some(mut traced) => cmd.query_async(&mut traced).await,
                None => cmd.query_async(conn).await,
            };
            Ok(result?)
        })
        .await
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

    /// `op` within `--redis-timeout`. Not an `async fn`: that would hold
    /// `op` twice in its state (the argument, and inside the timeout).
    fn bounded<T>(&self, op: impl Future<Output = Result<T>>) -> impl Future<Output = Result<T>> {
        let timeout = self.shared.timeout;
        tokio::time::timeout(timeout, op).map(move |result| {
            result.unwrap_or_else(|_| {
                self.shared.metrics.redis_error(metrics::RedisError::Timeout);
                Err(Error::Unavailable(format!("no reply within {timeout:?}")))
            })
        })
    }
}

impl Kind {
    /// Clients for `topology`, all speaking RESP3, with `certificates` on
    /// every TLS connection.
    fn new(topology: Topology, certificates: Option<TlsCertificates>, config: &Config) -> Result<Self, String> {
        let bad = |e: RedisError| format!("--redis-url: {e}");
        match topology {
            Topology::Standalone(url) => {
                let info = url.as_str().into_connection_info().map_err(bad)?;
                let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                let info = info.set_redis_settings(settings);
                let client = match certificates {
                    Some(certificates) => redis::Client::build_with_tls(info, certificates),
                    None => redis::Client::open(info),
                };
                Ok(Self::Standalone(client.map_err(bad)?))
            }
            Topology::Cluster { nodes, auth, tls } => {
                let infos: Vec<ConnectionInfo> =
                    nodes.iter().map(|node| node_info(node, &auth, tls)).collect::<RedisResult<_>>().map_err(bad)?;
                let mut builder = ClusterClientBuilder::new(infos)
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(config.redis_connect_timeout)
                    .response_timeout(FENCE_MAX);
                if let Some(username) = &auth.username {
                    builder = builder.username(username);
                }
                if let Some(password) = &auth.password {
                    builder = builder.password(password);
                }
                if tls {
                    builder = builder.tls(redis::TlsMode::Secure);
                    if let Some(certificates) = &certificates {
                        builder = builder.certs(certificates.clone());
                    }
                }
                let client = builder.build().map_err(bad)?;
                let node_clients = Box::new(NodeClients { auth, tls, certificates });
                let seeds =
                    nodes.iter().map(|node| node_clients.client(node)).collect::<RedisResult<Vec<_>>>().map_err(bad)?;
                Ok(Self::Cluster { client, seeds, nodes: node_clients })
            }
            Topology::Sentinel { sentinels, master, auth, sentinel_password, db, tls } => {
                let addrs = sentinels.iter().map(|node| addr(node, tls));
                let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                    .map_err(bad)?
                    .set_client_to_redis_protocol(ProtocolVersion::RESP3)
                    .set_client_to_redis_db(db);
                if let Some(username) = &auth.username {
                    builder = builder.set_client_to_redis_username(username);
                }
                if let Some(password) = &auth.password {
                    builder = builder.set_client_to_redis_password(password);
                }
                if let Some(password) = &sentinel_password {
                    builder = builder.set_client_to_sentinel_password(password);
                }
                if tls {
                    builder = builder
                        .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
                    if let Some(certificates) = certificates {
                        builder = builder.set_client_to_redis_certificates(certificates);
                    }
                }
                Ok(Self::Sentinel(tokio::sync::Mutex::new(builder.build().map_err(bad)?)))
            }
        }
    }
}

/// The connection info of one cluster node.
fn node_info(node: &Node, auth: &Auth, tls: bool) -> RedisResult<ConnectionInfo> {
    let mut redis = RedisConnectionInfo::default().set_protocol(ProtocolVersion::RESP3);
    if let Some(username) = &auth.username {
        redis = redis.set_username(username);
    }
    if let Some(password) = &auth.password {
        redis = redis.set_password(password);
    }
    Ok(addr(node, tls).into_connection_info()?.set_redis_settings(redis))
}

/// The master of one `CLUSTER SLOTS` range: `[start, end, [host, port,
/// id, ...], replicas...]`.
fn master_of_range(range: &Value) -> Option<Node> {
    let Value::Array(range) = range else { return None };
    let Some(Value::Array(master)) = range.get(2) else { return None };
    let host = match master.first()? {
        Value::BulkString(host) => String::from_utf8(host.clone()).ok()?,
        Value::SimpleString(host) => host.clone(),
        _ => return None,
    };
    let Value::Int(port) = master.get(1)? else { return None };
    Some(Node { host, port: u16::try_from(*port).ok()? })
}

fn addr(node: &Node, tls: bool) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls { host: node.host.clone(), port: node.port, insecure: false, tls_params: None }
    } else {
        ConnectionAddr::Tcp(node.host.clone(), node.port)
    }
}

/// The `--redis-tls-*` files, read once at start-up.
fn tls_certificates(config: &Config) -> Result<Option<TlsCertificates>, String> {
    let read =
        |flag: &str, path: &std::path::Path| std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()));
    let root_cert = config.redis_tls_ca.as_deref().map(|p| read("--redis-tls-ca", p)).transpose()?;
    let client_tls = match (&config.redis_tls_cert, &config.redis_tls_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("--redis-tls-cert", cert)?,
            client_key: read("--redis-tls-key", key)?,
        }),
        (None, None) => None,
        _ => return Err("--redis-tls-cert and --redis-tls-key go together".into()),
    };
    Ok((root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates { client_tls, root_cert }))
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
        if self.link.swap(None).is_some() {
            self.lost.store(true, Ordering::Relaxed);
        }
        // Boxed: opening a connection is rare, and its future (tens of KB,
        // the topology's whole connect) would otherwise sit inline in every
        // call's future, to be copied on every move.
        let link = Box::pin(pool.get()).await?;
        if self.lost.swap(false, Ordering::Relaxed) {
            pool.manager().metrics.redis_reconnect();
        }
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

    /// Retires the current connection if it was opened by `opened`.
    fn retire_opened_by(&self, opened: Instant) {
        if let Some(link) = self.link.load().as_deref()
            && link.opened <= opened
        {
            link.closed.store(true, Ordering::Release);
        }
    }
}

impl Link {
    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    fn share(&self, load: &Arc<Load>) -> Conn {
        Conn {
            wire: self.wire.clone(),
            closed: Arc::clone(&self.closed),
            load: Arc::clone(load),
            dropped: false,
            opened: self.opened,
        }
    }
}

impl Wire {
    /// PING: the server, or every cluster primary.
    async fn ping(&mut self) -> RedisResult<()> {
        match self {
            // Through the batch queue: a fence PING must follow the command
            // it fences.
            wire @ Wire::Single(_) => redis::cmd("PING").query_async::<Value>(wire).await.map(drop),
            Wire::Cluster(conn) => {
                let everywhere =
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, Some(ResponsePolicy::AllSucceeded)));
                conn.route_command(redis::cmd("PING"), everywhere).await.map(drop)
            }
        }
    }
}

impl ConnectionLike for Wire {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Wire::Single(single) => Box::pin(single.send(cmd)),
            Wire::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            // No store sends a pipeline; one sent beside the batch queue
            // could overtake commands queued before it.
            Wire::Single(_) => Box::pin(async {
                Err(RedisError::from((redis::ErrorKind::Client, "pipelines are not sent on shared connections")))
            }),
            Wire::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Wire::Single(single) => single.db(),
            Wire::Cluster(conn) => conn.get_db(),
        }
    }
}

impl Load {
    /// One pending call is answered (or given up and fenced).
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
        self.metrics.redis_landed();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let landed = self.fence.is_none();
        let (Some(mut wire), Ok(runtime)) = (self.fence.take(), tokio::runtime::Handle::try_current()) else {
            self.load.answered(self.epoch);
            if !landed {
                self.metrics.redis_landed();
            }
            return;
        };
        // Given up before the reply: Redis still has the command. Hold the
        // place until a PING behind it is answered (replies come in order).
        let (permit, load, epoch) = (self.permit.take(), Arc::clone(&self.load), self.epoch);
        let metrics = std::mem::take(&mut self.metrics);
        runtime.spawn(async move {
            let _ = tokio::time::timeout(FENCE_MAX, wire.ping()).await;
            load.answered(epoch);
            metrics.redis_landed();
            drop(permit);
        });
    }
}

impl Conn {
    /// Whether a call on this share saw the socket closed. A command sent on
    /// it that got no reply then either ran or never will: once the socket
    /// is closed, nothing sent on it can still reach Redis, so a follow-up
    /// may go out on another connection.
    pub fn is_dropped(&self) -> bool {
        self.dropped
    }

    /// Passes `result` through; if it shows a single-server connection is
    /// broken (closed socket, protocol error) or no longer the master
    /// (`READONLY`), marks it dead so its slot replaces it.
    fn check<T>(&mut self, result: RedisResult<T>) -> RedisResult<T> {
        if let (Wire::Single(_), Err(err)) = (&self.wire, &result) {
            let dropped = err.is_io_error() || err.is_connection_dropped();
            if dropped || err.is_unrecoverable_error() || err.code() == Some("READONLY") {
                self.closed.store(true, Ordering::Release);
            }
            self.dropped |= dropped;
        }
        result
    }
}

/// Opens connections for the pool and checks them before reuse.
struct Manager {
    /// Where and how to connect.
    kind: Arc<Kind>,
    /// Timeouts and buffering of each single-server connection.
    connection: AsyncConnectionConfig,
    /// Counts connections opened, failed and replaced.
    metrics: Metrics,
}

impl managed::Manager for Manager {
    type Type = Link;
    type Error = RedisError;

    async fn create(&self) -> Result<Link, RedisError> {
        let link = self.open().await;
        match &link {
            Ok(_) => self.metrics.redis_connections(1.0),
            Err(_) => self.metrics.redis_error(metrics::RedisError::Connect),
        }
        link
    }

    async fn recycle(&self, link: &mut Link, _: &managed::Metrics) -> RecycleResult<RedisError> {
        if link.is_open() { Ok(()) } else { Err(RecycleError::message("connection closed")) }
    }
}

impl Manager {
    /// A new connection with its closed flag wired to redis-rs's pushes.
    async fn open(&self) -> Result<Link, RedisError> {
        let closed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&closed);
        let config = self.connection.clone().set_push_sender(move |push: PushInfo| {
            if push.kind == PushKind::Disconnection {
                flag.store(true, Ordering::Release);
            }
            Ok::<_, std::convert::Infallible>(())
        });
        let wire = match &*self.kind {
            Kind::Standalone(client) => {
                Wire::Single(Batched::new(client.get_multiplexed_async_connection_with_config(&config).await?))
            }
            Kind::Sentinel(sentinel) => {
                // Where the master is now: the sentinels are asked at every
                // connect, so a replaced connection follows a fail-over.
                let client = sentinel.lock().await.async_get_client().await?;
                Wire::Single(Batched::new(client.get_multiplexed_async_connection_with_config(&config).await?))
            }
            Kind::Cluster { client, .. } => Wire::Cluster(client.get_async_connection().await?),
        };
        Ok(Link { wire, closed, metrics: self.metrics.clone(), opened: Instant::now() })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.metrics.redis_connections(-1.0);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Every call's future is moved a few times (into the handler's future,
    /// into its task) and allocated once per call in flight: a few KB is
    /// fine, tens of KB cost throughput and memory (the pool's connect
    /// future inlined here once made each 22 KB).
    #[test]
    fn a_calls_future_stays_small() {
        let config = Config::try_parse_from(["cachecoord"]).expect("defaults parse");
        let redis = Redis::new(&config).expect("handle");
        let script = redis::Script::new("return 1");
        let invocation = script.prepare_invoke();
        let cmd = redis::cmd("PING");
        let sizes = [
            ("invoke", std::mem::size_of_val(&redis.invoke::<Value>(&invocation))),
            ("query", std::mem::size_of_val(&redis.query::<Value>(&cmd))),
            ("connection", std::mem::size_of_val(&redis.connection())),
        ];
        for (call, size) in sizes {
            println!("{call}: {size} bytes");
            assert!(size <= 4096, "Redis::{call}'s future is {size} bytes");
        }
    }
}
