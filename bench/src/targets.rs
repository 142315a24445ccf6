//! What the benchmark calls: each service RPC, its floors, and the
//! service's own store layer.
//!
//! - The Redis floor is what a user would do instead of calling us: a plain
//!   redis-rs client over a few shared multiplexed connections (no pool),
//!   sending the plainest equivalent commands (`GET`, `MGET`, `INCR` +
//!   `PEXPIRE`, `SET NX PX` + `DEL`, ...).
//! - The store rows run the service's own store layer inside the benchmark
//!   process (the same scripts over the same connection layer, minus gRPC and
//!   the service process), so the cost of the gRPC hop and of the store layer
//!   can be told apart.

use std::{sync::Arc, time::Instant};

use cachecoord::{
    calendar::Calendar,
    config::Config,
    keys::Keys,
    proto::{
        self, AcquireRequest, GetManyRequest, GetRequest, GetSessionRequest, IncrementRequest, ReleaseRequest,
        SetRequest, cache_service_client::CacheServiceClient, lock_service_client::LockServiceClient,
        rate_limit_service_client::RateLimitServiceClient, session_service_client::SessionServiceClient,
        stats_service_client::StatsServiceClient,
    },
    store::{
        Redis,
        cache::{CacheStore, Condition, Write},
        rate_limit::{Algorithm, Limit, Part, RateLimitStore},
        session::SessionStore,
        stats::{Retention, StatsStore},
    },
};
use clap::Parser as _;
use envoy_types::pb::envoy::{
    extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry},
    service::ratelimit::v3::{
        RateLimitRequest, rate_limit_response::Code, rate_limit_service_client::RateLimitServiceClient as EnvoyClient,
    },
};
use hdrhistogram::Histogram;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Keys the benchmark preloads.
const HOT_KEY: &str = "hot";
/// The hot entry's Redis key, for plain clients.
const HOT: &str = "bench:c:{hot}";
const MANY: usize = 100;
/// A token bucket that never runs dry: the benchmark measures the check, not denials.
const LIMIT: u64 = 1 << 40;
const PERIOD_MS: u64 = 1_000;

/// The Envoy rate-limit domain of the benchmark's `--rls-config` (and of an
/// external RLS server's config, see BENCHMARKS.md).
pub const RLS_DOMAIN: &str = "bench";

/// The service's `--rls-config`: per caller, a fixed window of a minute that
/// never runs dry (`caller`); per value, 100 a day (`exact`, for exactness).
pub const RLS_CONFIG: &str = "domain: bench
descriptors:
  - key: caller
    rate_limit: {unit: minute, requests_per_unit: 4294967295}
  - key: exact
    rate_limit: {unit: day, requests_per_unit: 100}
";

/// A thing to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// grpc.health.v1 Check: the gRPC floor, no Redis work.
    Echo,
    CacheGet,
    RedisGet,
    RedisEvalGet,
    RedisGetPttl,
    StoreGet,
    CacheSet,
    RedisSet,
    StoreSet,
    CacheGetMany,
    RedisMget,
    StoreGetMany,
    RateLimitCheck,
    RedisIncrExpire,
    StoreRateLimitCheck,
    ShouldRateLimit,
    StoreFixedWindowCheck,
    ExternalShouldRateLimit,
    LockAcquireRelease,
    RedisSetNxDel,
    StatsIncrement,
    RedisIncrBuckets,
    StoreStatsIncrement,
    SessionGet,
    RedisHgetall,
    StoreSessionGet,
}

impl Target {
    /// Every target, in the interleaved order of one round.
    pub const ALL: &'static [Target] = &[
        Target::Echo,
        Target::CacheGet,
        Target::RedisGet,
        Target::RedisEvalGet,
        Target::RedisGetPttl,
        Target::StoreGet,
        Target::CacheSet,
        Target::RedisSet,
        Target::StoreSet,
        Target::CacheGetMany,
        Target::RedisMget,
        Target::StoreGetMany,
        Target::RateLimitCheck,
        Target::RedisIncrExpire,
        Target::StoreRateLimitCheck,
        Target::ShouldRateLimit,
        Target::StoreFixedWindowCheck,
        Target::ExternalShouldRateLimit,
        Target::LockAcquireRelease,
        Target::RedisSetNxDel,
        Target::StatsIncrement,
        Target::RedisIncrBuckets,
        Target::StoreStatsIncrement,
        Target::SessionGet,
        Target::RedisHgetall,
        Target::StoreSessionGet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Echo => "echo (Health/Check)",
            Target::CacheGet => "Cache.Get (100 B hit)",
            Target::RedisGet => "redis GET",
            Target::RedisEvalGet => "redis EVALSHA get.lua",
            Target::RedisGetPttl => "redis GET+PTTL pipelined",
            Target::StoreGet => "store cache get",
            Target::CacheSet => "Cache.Set (100 B)",
            Target::RedisSet => "redis SET PX",
            Target::StoreSet => "store cache set",
            Target::CacheGetMany => "Cache.GetMany (100 keys)",
            Target::RedisMget => "redis MGET (100 keys)",
            Target::StoreGetMany => "store cache get (100 keys)",
            Target::RateLimitCheck => "RateLimit.Check (token bucket)",
            Target::RedisIncrExpire => "redis INCR+PEXPIRE (fixed window)",
            Target::StoreRateLimitCheck => "store rate-limit check",
            Target::ShouldRateLimit => "Envoy ShouldRateLimit (1 descriptor)",
            Target::StoreFixedWindowCheck => "store fixed-window check",
            Target::ExternalShouldRateLimit => "external RLS ShouldRateLimit (1 descriptor)",
            Target::LockAcquireRelease => "Lock.Acquire+Release (2 RPCs)",
            Target::RedisSetNxDel => "redis SET NX PX + DEL",
            Target::StatsIncrement => "Stats.Increment (1 delta)",
            Target::RedisIncrBuckets => "redis 4 INCRBY + 3 PEXPIRE",
            Target::StoreStatsIncrement => "store stats increment",
            Target::SessionGet => "Session.GetSession",
            Target::RedisHgetall => "redis HGETALL",
            Target::StoreSessionGet => "store session get",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Self::ALL.iter().copied().find(|t| t.name() == name)
    }

    /// The Redis floor of a service target: what a user's own client sends.
    pub fn floor(self) -> Option<Target> {
        match self {
            Target::CacheGet => Some(Target::RedisGet),
            Target::CacheSet => Some(Target::RedisSet),
            Target::CacheGetMany => Some(Target::RedisMget),
            Target::RateLimitCheck | Target::ShouldRateLimit => Some(Target::RedisIncrExpire),
            Target::LockAcquireRelease => Some(Target::RedisSetNxDel),
            Target::StatsIncrement => Some(Target::RedisIncrBuckets),
            Target::SessionGet => Some(Target::RedisHgetall),
            _ => None,
        }
    }

    /// The service's own store layer doing a service target's Redis work.
    pub fn store(self) -> Option<Target> {
        match self {
            Target::CacheGet => Some(Target::StoreGet),
            Target::CacheSet => Some(Target::StoreSet),
            Target::CacheGetMany => Some(Target::StoreGetMany),
            Target::RateLimitCheck => Some(Target::StoreRateLimitCheck),
            Target::ShouldRateLimit => Some(Target::StoreFixedWindowCheck),
            Target::StatsIncrement => Some(Target::StoreStatsIncrement),
            Target::SessionGet => Some(Target::StoreSessionGet),
            _ => None,
        }
    }
}

/// Connections and stores shared by all callers.
pub struct Clients {
    /// HTTP/2 connections to the service; caller i uses i % n.
    channels: Vec<Channel>,
    cache: CacheStore,
    rate_limit: RateLimitStore,
    stats: StatsStore,
    sessions: SessionStore,
    /// Plain redis-rs connections (the Redis floor); caller i uses i % n.
    plain: Vec<Plain>,
    /// One connection to each Redis server, to read their CPU time.
    servers: Vec<MultiplexedConnection>,
    /// get.lua, for the same script sent by a plain client.
    get_script: redis::Script,
    /// The session created for GetSession, and its Redis key.
    session_id: String,
    session_key: String,
    value: Vec<u8>,
    /// Services that answered UNIMPLEMENTED when prepared.
    lock_available: bool,
    /// Channels to an external Envoy RLS server (`--rls-external`), if any.
    external: Vec<Channel>,
}

impl Clients {
    /// Connects `connections` channels to the service, `connections` plain
    /// Redis connections and the stores (over `connections` shared
    /// connections), waits for the service to be SERVING, and preloads what
    /// is read.
    pub async fn connect(
        grpc_port: u16,
        redis_url: &str,
        server_ports: &[u16],
        connections: usize,
        external: Option<&str>,
    ) -> Result<Self, String> {
        let mut channels = Vec::new();
        let mut external_channels = Vec::new();
        for _ in 0..connections.max(1) {
            let endpoint = Channel::from_shared(format!("http://127.0.0.1:{grpc_port}")).map_err(|e| e.to_string())?;
            channels.push(connect_retrying(endpoint).await?);
            if let Some(addr) = external {
                let endpoint = Channel::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
                external_channels.push(connect_retrying(endpoint).await?);
            }
        }
        let shared = connections.max(1).to_string();
        let args = ["cachecoord", "--redis-url", redis_url, "--key-prefix", "bench", "--redis-connections", &shared];
        let config = Config::try_parse_from(args).map_err(|e| e.to_string())?;
        let redis = Redis::new(&config)?;
        let keys = Keys::new(&config.key_prefix);
        let calendar = Calendar::new(jiff::tz::TimeZone::UTC);
        let retention = Retention {
            minute: config.stats_retention_minute,
            hour: config.stats_retention_hour,
            day: config.stats_retention_day,
        };
        let stats = StatsStore::new(redis.clone(), keys.clone(), calendar, retention, config.stats_active_window_max);
        let sessions =
            SessionStore::new(redis.clone(), keys.clone(), 0, config.max_value_bytes, config.max_revocation_ttl);
        // As a user would open them, minus the reply timeout: a loaded
        // machine must slow the floor down, not end the run.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut servers = Vec::new();
        for port in server_ports {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).map_err(|e| e.to_string())?;
            loop {
                // redis-server may still be starting.
                match client.get_multiplexed_async_connection_with_config(&config).await {
                    Ok(conn) => break servers.push(conn),
                    Err(err) if err.is_connection_refusal() => {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    Err(err) => return Err(err.to_string()),
                }
            }
        }
        let mut plain = Vec::new();
        for _ in 0..connections.max(1) {
            plain.push(if server_ports.len() > 1 {
                let nodes = server_ports.iter().map(|port| format!("redis://127.0.0.1:{port}"));
                let client =
                    redis::cluster::ClusterClient::new(nodes.collect::<Vec<_>>()).map_err(|e| e.to_string())?;
                Plain::Cluster(client.get_async_connection().await.map_err(|e| e.to_string())?)
            } else {
                let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
                let conn = client.get_multiplexed_async_connection_with_config(&config).await;
                Plain::Single(conn.map_err(|e| e.to_string())?)
            });
        }
        let mut clients = Self {
            plain,
            servers,
            get_script: redis::Script::new(include_str!("../../src/store/lua/get.lua")),
            channels,
            cache: CacheStore::new(redis.clone(), keys.clone()),
            rate_limit: RateLimitStore::new(redis, keys),
            stats,
            sessions,
            session_id: String::new(),
            session_key: String::new(),
            value: vec![b'x'; 100],
            lock_available: false,
            external: external_channels,
        };
        clients.prepare().await?;
        Ok(clients)
    }

    async fn prepare(&mut self) -> Result<(), String> {
        let mut health = HealthClient::new(self.channels[0].clone());
        for _ in 0..500 {
            let status = health.check(HealthCheckRequest { service: String::new() }).await;
            if status.map(|s| s.into_inner().status).unwrap_or(0) == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut cache = CacheServiceClient::new(self.channels[0].clone());
        let set = |key: String| SetRequest { key, value: self.value.clone(), ..Default::default() };
        cache.set(set(HOT_KEY.into())).await.map_err(|e| e.to_string())?;
        for i in 0..MANY {
            cache.set(set(format!("many:{i}"))).await.map_err(|e| e.to_string())?;
        }
        let mut sessions = SessionServiceClient::new(self.channels[0].clone());
        let created = sessions
            .create_session(proto::CreateSessionRequest { user_id: "bench".into(), data: None, ttl: None })
            .await
            .map_err(|e| e.to_string())?;
        self.session_id = created.into_inner().session.map(|s| s.session_id).unwrap_or_default();
        self.session_key = Keys::new("bench").session(&self.session_id);
        let mut locks = LockServiceClient::new(self.channels[0].clone());
        let probe = locks.inspect(proto::InspectRequest { name: "probe".into() }).await;
        self.lock_available = !matches!(probe, Err(ref status) if status.code() == tonic::Code::Unimplemented);
        Ok(())
    }

    /// Redis's CPU time so far (user + sys, from `INFO cpu`; on a cluster,
    /// summed over its servers).
    pub async fn redis_cpu(&self) -> Result<std::time::Duration, String> {
        let mut seconds = 0.0;
        for server in &self.servers {
            let mut conn = server.clone();
            let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await.map_err(|e| e.to_string())?;
            seconds += info
                .lines()
                .filter_map(|line| line.strip_prefix("used_cpu_sys:").or_else(|| line.strip_prefix("used_cpu_user:")))
                .filter_map(|v| v.trim().parse::<f64>().ok())
                .sum::<f64>();
        }
        Ok(std::time::Duration::from_secs_f64(seconds))
    }

    /// True when the service implements what `target` calls.
    pub fn available(&self, target: Target) -> bool {
        match target {
            Target::LockAcquireRelease => self.lock_available,
            Target::ExternalShouldRateLimit => !self.external.is_empty(),
            _ => true,
        }
    }

    /// Channels to our service, and to the external RLS server if any.
    pub fn rls_channels(&self) -> [(&'static str, &[Channel]); 2] {
        [("cachecoord", &self.channels), ("external", &self.external)]
    }

    pub fn worker(self: &Arc<Self>, target: Target, caller: usize) -> Worker {
        let channel = self.channels[caller % self.channels.len()].clone();
        Worker {
            target,
            clients: Arc::clone(self),
            cache: CacheServiceClient::new(channel.clone()),
            rate_limit: RateLimitServiceClient::new(channel.clone()),
            locks: LockServiceClient::new(channel.clone()),
            stats: StatsServiceClient::new(channel.clone()),
            sessions: SessionServiceClient::new(channel.clone()),
            health: HealthClient::new(channel.clone()),
            envoy: EnvoyClient::new(channel),
            external: self.external.get(caller % self.external.len().max(1)).cloned().map(EnvoyClient::new),
            plain: self.plain[caller % self.plain.len()].clone(),
            own_key: format!("caller:{caller}"),
            many: (0..MANY).map(|i| format!("many:{i}")).collect(),
        }
    }
}

async fn connect_retrying(endpoint: tonic::transport::Endpoint) -> Result<Channel, String> {
    let mut last = String::new();
    for _ in 0..500 {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Err(format!("service did not come up: {last}"))
}

fn ms(ms: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 })
}

/// One caller's state.
pub struct Worker {
    target: Target,
    clients: Arc<Clients>,
    cache: CacheServiceClient<Channel>,
    rate_limit: RateLimitServiceClient<Channel>,
    locks: LockServiceClient<Channel>,
    stats: StatsServiceClient<Channel>,
    sessions: SessionServiceClient<Channel>,
    health: HealthClient<Channel>,
    envoy: EnvoyClient<Channel>,
    external: Option<EnvoyClient<Channel>>,
    /// This caller's share of a plain Redis connection.
    plain: Plain,
    /// This caller's own key or name, so callers do not contend.
    own_key: String,
    /// The GetMany keys.
    many: Vec<String>,
}

impl Worker {
    /// One call; errors end the run.
    pub async fn call(&mut self) -> Result<(), String> {
        let c = &self.clients;
        let err = |e: &dyn std::fmt::Display| e.to_string();
        match self.target {
            Target::Echo => {
                self.health.check(HealthCheckRequest { service: String::new() }).await.map_err(|e| err(&e))?;
            }
            Target::CacheGet => {
                let found = self.cache.get(GetRequest { key: HOT_KEY.into() }).await.map_err(|e| err(&e))?;
                if !found.into_inner().found {
                    return Err("hot key missing".into());
                }
            }
            Target::RedisGet => {
                let value: Option<Vec<u8>> =
                    redis::cmd("GET").arg(HOT).query_async(&mut self.plain).await.map_err(|e| err(&e))?;
                value.ok_or("hot key missing")?;
            }
            Target::RedisEvalGet => {
                let mut call = c.get_script.prepare_invoke();
                call.key(HOT);
                let _: (Vec<u8>, Vec<u8>) = call.invoke_async(&mut self.plain).await.map_err(|e| err(&e))?;
            }
            Target::RedisGetPttl => {
                let (value, _ttl): (Option<Vec<u8>>, i64) =
                    redis::pipe().get(HOT).pttl(HOT).query_async(&mut self.plain).await.map_err(|e| err(&e))?;
                value.ok_or("hot key missing")?;
            }
            Target::StoreGet => {
                c.cache.get_many(c.cache.keys(), &[HOT_KEY.to_string()]).await.map_err(|e| err(&e))?;
            }
            Target::CacheSet => {
                let request = SetRequest { key: self.own_key.clone(), value: c.value.clone(), ..Default::default() };
                self.cache.set(request).await.map_err(|e| err(&e))?;
            }
            Target::RedisSet => {
                let key = format!("bench:plain:{}", self.own_key);
                let _: () = redis::cmd("SET")
                    .arg(key)
                    .arg(&c.value)
                    .arg("PX")
                    .arg(3_600_000)
                    .query_async(&mut self.plain)
                    .await
                    .map_err(|e| err(&e))?;
            }
            Target::StoreSet => {
                let write =
                    Write { key: &self.own_key, value: &c.value, ttl: std::time::Duration::from_secs(3600), tags: &[] };
                c.cache.set(c.cache.keys(), &write, Condition::Always).await.map_err(|e| err(&e))?;
            }
            Target::CacheGetMany => {
                self.cache.get_many(GetManyRequest { keys: self.many.clone() }).await.map_err(|e| err(&e))?;
            }
            Target::RedisMget => {
                let keys: Vec<String> = (0..MANY).map(|i| format!("bench:c:{{many:{i}}}")).collect();
                let _: Vec<Option<Vec<u8>>> =
                    redis::cmd("MGET").arg(keys).query_async(&mut self.plain).await.map_err(|e| err(&e))?;
            }
            Target::StoreGetMany => {
                c.cache.get_many(c.cache.keys(), &self.many).await.map_err(|e| err(&e))?;
            }
            Target::RateLimitCheck => {
                let limit = proto::Limit {
                    key: self.own_key.clone(),
                    limit: LIMIT,
                    period: ms(PERIOD_MS),
                    algorithm: proto::Algorithm::TokenBucket.into(),
                    burst: None,
                };
                let request = proto::CheckRequest { limits: vec![limit], cost: None, peek: false };
                self.rate_limit.check(request).await.map_err(|e| err(&e))?;
            }
            Target::RedisIncrExpire => {
                let key = format!("bench:plain:rl:{}", self.own_key);
                let _: (i64, i64) = redis::pipe()
                    .incr(&key, 1)
                    .pexpire(&key, 60_000)
                    .query_async(&mut self.plain)
                    .await
                    .map_err(|e| err(&e))?;
            }
            Target::StoreRateLimitCheck => {
                let limit = Limit {
                    key: &self.own_key,
                    limit: LIMIT,
                    period_ms: PERIOD_MS,
                    algorithm: Algorithm::TokenBucket,
                    burst: LIMIT,
                };
                c.rate_limit.check(c.rate_limit.keys(), &[limit], 1, false).await.map_err(|e| err(&e))?;
            }
            Target::ShouldRateLimit => {
                should_rate_limit(&mut self.envoy, "caller", &self.own_key).await?;
            }
            Target::ExternalShouldRateLimit => {
                let client = self.external.as_mut().ok_or("no external RLS server")?;
                should_rate_limit(client, "caller", &self.own_key).await?;
            }
            Target::StoreFixedWindowCheck => {
                let key = cachecoord::rls::counter_key(RLS_DOMAIN, &[("caller", &self.own_key)]);
                let limit = Limit {
                    key: &key,
                    limit: u32::MAX.into(),
                    period_ms: 60_000,
                    algorithm: Algorithm::FixedWindow,
                    burst: 0,
                };
                let part = Part { limit, cost: 1, peek: false, advisory: false };
                c.rate_limit.check_each(c.rate_limit.keys(), &[part]).await.map_err(|e| err(&e))?;
            }
            Target::LockAcquireRelease => {
                let name = self.own_key.clone();
                let acquire = AcquireRequest { name: name.clone(), ttl: ms(30_000), wait: None, owner: "bench".into() };
                let lease_id = self.locks.acquire(acquire).await.map_err(|e| err(&e))?.into_inner().lease_id;
                self.locks.release(ReleaseRequest { name, lease_id }).await.map_err(|e| err(&e))?;
            }
            Target::RedisSetNxDel => {
                let key = format!("bench:plain:lock:{}", self.own_key);
                let taken: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg("lease")
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut self.plain)
                    .await
                    .map_err(|e| err(&e))?;
                taken.ok_or("plain lock held")?;
                let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut self.plain).await.map_err(|e| err(&e))?;
            }
            Target::StatsIncrement => {
                let delta = proto::Delta { name: self.own_key.clone(), amount: None };
                self.stats.increment(IncrementRequest { deltas: vec![delta] }).await.map_err(|e| err(&e))?;
            }
            Target::RedisIncrBuckets => {
                let base = format!("bench:plain:st:{}", self.own_key);
                let (minute, hour, day) = (format!("{base}:m"), format!("{base}:h"), format!("{base}:d"));
                let _: () = redis::pipe()
                    .incr(&minute, 1)
                    .ignore()
                    .pexpire(&minute, 172_800_000)
                    .ignore()
                    .incr(&hour, 1)
                    .ignore()
                    .pexpire(&hour, 2_592_000_000_i64)
                    .ignore()
                    .incr(&day, 1)
                    .ignore()
                    .pexpire(&day, 34_560_000_000_i64)
                    .ignore()
                    .incr(format!("{base}:total"), 1)
                    .ignore()
                    .query_async(&mut self.plain)
                    .await
                    .map_err(|e| err(&e))?;
            }
            Target::StoreStatsIncrement => {
                c.stats.increment(c.stats.keys(), &[(&self.own_key, 1)]).await.map_err(|e| err(&e))?;
            }
            Target::SessionGet => {
                let request = GetSessionRequest { session_id: c.session_id.clone(), touch: false };
                let found = self.sessions.get_session(request).await.map_err(|e| err(&e))?.into_inner().found;
                if !found {
                    return Err("bench session missing".into());
                }
            }
            Target::RedisHgetall => {
                let fields: std::collections::HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
                    .arg(&c.session_key)
                    .query_async(&mut self.plain)
                    .await
                    .map_err(|e| err(&e))?;
                if fields.is_empty() {
                    return Err("bench session missing".into());
                }
            }
            Target::StoreSessionGet => {
                c.sessions.get(c.sessions.keys(), &c.session_id, false, None).await.map_err(|e| err(&e))?;
            }
        }
        Ok(())
    }
}

/// One ShouldRateLimit with one descriptor `[(key, value)]` in [`RLS_DOMAIN`];
/// true when OK.
async fn should_rate_limit(client: &mut EnvoyClient<Channel>, key: &str, value: &str) -> Result<bool, String> {
    let descriptor =
        RateLimitDescriptor { entries: vec![Entry { key: key.into(), value: value.into() }], ..Default::default() };
    let request = RateLimitRequest { domain: RLS_DOMAIN.into(), descriptors: vec![descriptor], hits_addend: 0 };
    let response = client.should_rate_limit(request).await.map_err(|e| e.to_string())?.into_inner();
    match Code::try_from(response.overall_code) {
        Ok(Code::Ok) => Ok(true),
        Ok(Code::OverLimit) => Ok(false),
        _ => Err(format!("unexpected overall code {}", response.overall_code)),
    }
}

/// How many of 64 callers x 10 ShouldRateLimit calls on one fresh counter
/// with a limit of 100 (`exact`) are answered OK, per run.
pub async fn overadmission(channels: &[Channel], runs: usize) -> Result<Vec<usize>, String> {
    let mut counts = Vec::new();
    for run in 0..runs {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let value = format!("run{run}-{nanos}");
        let tasks: Vec<_> = (0..64)
            .map(|caller| {
                let mut client = EnvoyClient::new(channels[caller % channels.len()].clone());
                let value = value.clone();
                tokio::spawn(async move {
                    let mut ok = 0;
                    for _ in 0..10 {
                        if should_rate_limit(&mut client, "exact", &value).await? {
                            ok += 1;
                        }
                    }
                    Ok::<_, String>(ok)
                })
            })
            .collect();
        let mut ok = 0;
        for task in tasks {
            ok += task.await.map_err(|e| e.to_string())??;
        }
        counts.push(ok);
    }
    Ok(counts)
}

/// Lock hand-off latency: a waiter blocked in Acquire, woken by Release,
/// timed at the client from just before Release is sent until the waiter's
/// Acquire answers. `None` when the service has no LockService yet.
pub async fn lock_handoff(clients: &Arc<Clients>, rounds: usize) -> Result<Option<(f64, f64)>, String> {
    if !clients.lock_available {
        return Ok(None);
    }
    let mut holder = LockServiceClient::new(clients.channels[0].clone());
    let acquire = |wait| AcquireRequest { name: "handoff".into(), ttl: ms(30_000), wait, owner: "bench".into() };
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let mut lease_id = holder.acquire(acquire(None)).await.map_err(|e| e.to_string())?.into_inner().lease_id;
    for _ in 0..rounds {
        let mut waiter = LockServiceClient::new(clients.channels[1 % clients.channels.len()].clone());
        let request = acquire(ms(10_000));
        let blocked =
            tokio::spawn(async move { waiter.acquire(request).await.map(|r| (Instant::now(), r.into_inner())) });
        // Give the waiter time to block server-side before releasing.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let sent = Instant::now();
        holder.release(ReleaseRequest { name: "handoff".into(), lease_id }).await.map_err(|e| e.to_string())?;
        let (granted, response) = blocked.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        if !response.acquired {
            return Err("waiter was not granted the lock".into());
        }
        let _ = latency.record(granted.duration_since(sent).as_micros() as u64);
        lease_id = response.lease_id;
    }
    holder.release(ReleaseRequest { name: "handoff".into(), lease_id }).await.map_err(|e| e.to_string())?;
    Ok(Some((latency.value_at_quantile(0.5) as f64 / 1000.0, latency.value_at_quantile(0.99) as f64 / 1000.0)))
}

/// A plain redis-rs connection: to one server, or a cluster connection (what
/// a user of a cluster would use).
#[derive(Clone)]
pub enum Plain {
    Single(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Plain {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Plain::Single(conn) => conn.req_packed_command(cmd),
            Plain::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Plain::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Plain::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// An OTLP trace receiver in the benchmark process that counts the spans it
/// is sent and keeps nothing: its endpoint and the count.
pub async fn span_sink() -> Result<(String, Arc<std::sync::atomic::AtomicU64>), Box<dyn std::error::Error>> {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    };

    struct Sink(Arc<std::sync::atomic::AtomicU64>);

    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let spans: usize =
                request.get_ref().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
            self.0.fetch_add(spans as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink(Arc::clone(&count))))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    Ok((endpoint, count))
}
