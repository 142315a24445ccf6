//! What the benchmark calls: each service RPC and its two floors.

use std::{sync::Arc, time::Instant};

use cachecoord::{
    keys::Keys,
    proto::{
        AcquireRequest, GetManyRequest, GetRequest, ReleaseRequest, SetRequest,
        cache_service_client::CacheServiceClient, lock_service_client::LockServiceClient,
    },
};
use deadpool_redis::redis::{self, Script, aio::MultiplexedConnection};
use hdrhistogram::Histogram;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The scripts the service runs, sent directly for the Redis floor.
const GET_LUA: &str = include_str!("../../src/store/lua/get.lua");
const SET_LUA: &str =
    concat!(include_str!("../../src/store/lua/cache_lib.lua"), include_str!("../../src/store/lua/set.lua"));

/// Keys the benchmark preloads.
const HOT_KEY: &str = "hot";
const MANY: usize = 100;
const PREFIX: &str = "bench";

/// A thing to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// grpc.health.v1 Check: the gRPC floor, no Redis work.
    Echo,
    CacheGet,
    DirectGet,
    CacheSet,
    DirectSet,
    CacheGetMany,
    DirectGetMany,
}

impl Target {
    /// Every target, in the interleaved order of one round.
    pub const ALL: &'static [Target] = &[
        Target::Echo,
        Target::CacheGet,
        Target::DirectGet,
        Target::CacheSet,
        Target::DirectSet,
        Target::CacheGetMany,
        Target::DirectGetMany,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Echo => "echo (Health/Check)",
            Target::CacheGet => "Cache.Get (100 B hit)",
            Target::DirectGet => "direct get.lua",
            Target::CacheSet => "Cache.Set (100 B)",
            Target::DirectSet => "direct set.lua",
            Target::CacheGetMany => "Cache.GetMany (100 keys)",
            Target::DirectGetMany => "direct get.lua (100 keys)",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Self::ALL.iter().copied().find(|t| t.name() == name)
    }

    /// The Redis floor of a service target.
    pub fn direct(self) -> Option<Target> {
        match self {
            Target::CacheGet => Some(Target::DirectGet),
            Target::CacheSet => Some(Target::DirectSet),
            Target::CacheGetMany => Some(Target::DirectGetMany),
            _ => None,
        }
    }
}

/// Connections shared by all callers.
pub struct Clients {
    /// HTTP/2 connections to the service; caller i uses i % n.
    channels: Vec<Channel>,
    /// Multiplexed Redis connections for the floor; caller i uses i % n.
    redis: Vec<MultiplexedConnection>,
    keys: Keys,
    get: Script,
    set: Script,
    value: Vec<u8>,
}

impl Clients {
    /// Connects `connections` channels and Redis connections, waiting for the
    /// service to come up.
    pub async fn connect(grpc_port: u16, redis_url: &str, connections: usize) -> Result<Self, String> {
        let mut channels = Vec::new();
        for _ in 0..connections.max(1) {
            let endpoint = Channel::from_shared(format!("http://127.0.0.1:{grpc_port}")).map_err(|e| e.to_string())?;
            channels.push(connect_retrying(endpoint).await?);
        }
        let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
        let mut redis = Vec::new();
        for _ in 0..connections.max(1) {
            redis.push(client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?);
        }
        Ok(Self {
            channels,
            redis,
            keys: Keys::new(PREFIX),
            get: Script::new(GET_LUA),
            set: Script::new(SET_LUA),
            value: vec![b'x'; 100],
        })
    }

    /// Waits for SERVING and preloads the keys that are read.
    pub async fn prepare(&self) -> Result<(), String> {
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
        Ok(())
    }

    /// True when the service implements what `target` calls.
    pub async fn available(&self, _target: Target) -> bool {
        true
    }

    pub fn worker(self: &Arc<Self>, target: Target, caller: usize) -> Worker {
        let channel = self.channels[caller % self.channels.len()].clone();
        Worker {
            target,
            clients: Arc::clone(self),
            cache: CacheServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
            redis: self.redis[caller % self.redis.len()].clone(),
            own_key: format!("set:{caller}"),
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

/// One caller's state.
pub struct Worker {
    target: Target,
    clients: Arc<Clients>,
    cache: CacheServiceClient<Channel>,
    health: HealthClient<Channel>,
    redis: MultiplexedConnection,
    /// This caller's key for writes, so writers do not contend.
    own_key: String,
    /// The GetMany keys.
    many: Vec<String>,
}

impl Worker {
    /// One call; errors end the run.
    pub async fn call(&mut self) -> Result<(), String> {
        let clients = &self.clients;
        match self.target {
            Target::Echo => {
                self.health.check(HealthCheckRequest { service: String::new() }).await.map_err(|e| e.to_string())?;
            }
            Target::CacheGet => {
                let found = self.cache.get(GetRequest { key: HOT_KEY.into() }).await.map_err(|e| e.to_string())?;
                if !found.into_inner().found {
                    return Err("hot key missing".into());
                }
            }
            Target::DirectGet => {
                let mut call = clients.get.prepare_invoke();
                call.key(clients.keys.cache_entry(HOT_KEY));
                let _: Vec<(Option<Vec<u8>>, i64)> =
                    call.invoke_async(&mut self.redis).await.map_err(|e| e.to_string())?;
            }
            Target::CacheSet => {
                let request =
                    SetRequest { key: self.own_key.clone(), value: clients.value.clone(), ..Default::default() };
                self.cache.set(request).await.map_err(|e| e.to_string())?;
            }
            Target::DirectSet => {
                let mut call = clients.set.prepare_invoke();
                call.key(clients.keys.cache_entry(&self.own_key));
                call.arg(format!("{PREFIX}:fills")).arg(&clients.value).arg(3_600_000).arg("");
                let _: i64 = call.invoke_async(&mut self.redis).await.map_err(|e| e.to_string())?;
            }
            Target::CacheGetMany => {
                let request = GetManyRequest { keys: self.many.clone() };
                self.cache.get_many(request).await.map_err(|e| e.to_string())?;
            }
            Target::DirectGetMany => {
                let mut call = clients.get.prepare_invoke();
                for key in &self.many {
                    call.key(clients.keys.cache_entry(key));
                }
                let _: Vec<(Option<Vec<u8>>, i64)> =
                    call.invoke_async(&mut self.redis).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

/// Lock hand-off latency: a waiter blocked in Acquire, woken by Release,
/// timed at the client from just before Release is sent until the waiter's
/// Acquire answers. `None` when the service has no LockService yet.
pub async fn lock_handoff(clients: &Arc<Clients>, rounds: usize) -> Result<Option<(f64, f64)>, String> {
    let channel = clients.channels[0].clone();
    let mut holder = LockServiceClient::new(channel.clone());
    let ms = |ms: i64| Some(prost_types::Duration { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 });
    let acquire = |wait| AcquireRequest { name: "handoff".into(), ttl: ms(30_000), wait, owner: "bench".into() };
    match holder.acquire(acquire(None)).await {
        Err(status) if status.code() == tonic::Code::Unimplemented => return Ok(None),
        Err(status) => return Err(status.to_string()),
        Ok(first) => {
            let lease_id = first.into_inner().lease_id;
            holder.release(ReleaseRequest { name: "handoff".into(), lease_id }).await.map_err(|e| e.to_string())?;
        }
    }
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
