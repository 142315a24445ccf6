//! A steady mixed load on all five services from many callers, spread over
//! the service instances, each call recorded with its deadline.
//!
//! Every key space is bounded and every entry expires, so a long run reaches
//! a steady state: the soak checks that Redis's key count and memory stay
//! there.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use cachecoord::proto::{
    self, cache_service_client::CacheServiceClient, lock_service_client::LockServiceClient,
    rate_limit_service_client::RateLimitServiceClient, session_service_client::SessionServiceClient,
    stats_service_client::StatsServiceClient,
};
use prost_types::{Struct, Value, value::Kind};
use rand::Rng;
use tonic::transport::Channel;

use crate::record::{Recorder, dur, req};

/// Typed clients over one channel.
#[derive(Clone)]
pub struct Clients {
    pub cache: CacheServiceClient<Channel>,
    pub sessions: SessionServiceClient<Channel>,
    pub rate_limit: RateLimitServiceClient<Channel>,
    pub locks: LockServiceClient<Channel>,
    pub stats: StatsServiceClient<Channel>,
}

impl Clients {
    pub fn new(channel: Channel) -> Self {
        Self {
            cache: CacheServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            sessions: SessionServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            rate_limit: RateLimitServiceClient::new(channel.clone()),
            locks: LockServiceClient::new(channel.clone()),
            stats: StatsServiceClient::new(channel),
        }
    }
}

/// A running load; [`Load::stop`] ends it.
pub struct Load {
    running: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts `callers` closed-loop callers over `channels` (caller `i` uses
    /// `channels[i % len]`). With `pace`, each caller makes at most one call
    /// per `pace` (an open loop at a fixed rate); without, as fast as it can.
    pub fn start(recorder: &Arc<Recorder>, channels: &[Channel], callers: usize, pace: Option<Duration>) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let tasks = (0..callers)
            .map(|i| {
                let caller = Caller {
                    id: i,
                    clients: Clients::new(channels[i % channels.len()].clone()),
                    recorder: Arc::clone(recorder),
                    session: None,
                };
                let running = Arc::clone(&running);
                tokio::spawn(caller.run(running, pace))
            })
            .collect();
        Self { running, tasks }
    }

    pub async fn stop(self) {
        self.running.store(false, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// One caller of the mixed load.
struct Caller {
    id: usize,
    clients: Clients,
    recorder: Arc<Recorder>,
    /// The caller's live session, if it has one.
    session: Option<String>,
}

/// A small session document.
pub fn session_data(n: u64) -> Struct {
    let mut data = Struct::default();
    data.fields.insert("role".into(), Value { kind: Some(Kind::StringValue("user".into())) });
    data.fields.insert("n".into(), Value { kind: Some(Kind::NumberValue(n as f64)) });
    data
}

impl Caller {
    async fn run(mut self, running: Arc<AtomicBool>, pace: Option<Duration>) {
        let mut ticks = pace.map(|p| {
            let mut t = tokio::time::interval(p);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut n = 0u64;
        while running.load(Ordering::Relaxed) {
            if let Some(ticks) = ticks.as_mut() {
                ticks.tick().await;
            }
            n += 1;
            self.one(n).await;
        }
        if let Some(id) = self.session.take() {
            let _ = self.clients.sessions.delete_session(req(proto::DeleteSessionRequest { session_id: id })).await;
        }
    }

    async fn one(&mut self, n: u64) {
        let r = Arc::clone(&self.recorder);
        let roll = rand::rng().random_range(0..100);
        let hot = rand::rng().random_range(0..100u32);
        let c = &mut self.clients;
        match roll {
            0..20 => {
                let _ = r.call("Cache.Get", c.cache.get(req(proto::GetRequest { key: format!("hot:{hot}") }))).await;
            }
            20..30 => {
                let set = proto::SetRequest {
                    key: format!("hot:{hot}"),
                    value: vec![b'x'; 100],
                    ttl: dur(Duration::from_secs(30)),
                    tags: vec![format!("tag:{}", hot % 10)],
                    ..Default::default()
                };
                let _ = r.call("Cache.Set", c.cache.set(req(set))).await;
            }
            30..35 => {
                let keys = (0..10).map(|i| format!("hot:{}", (hot + i) % 100)).collect();
                let _ = r.call("Cache.GetMany", c.cache.get_many(req(proto::GetManyRequest { keys }))).await;
            }
            35..40 => {
                let key = format!("fetch:{}", hot % 50);
                let fetch = proto::FetchRequest {
                    key: key.clone(),
                    fill_timeout: dur(Duration::from_secs(1)),
                    max_wait: dur(Duration::from_millis(300)),
                };
                if let Ok(answer) = r.call("Cache.Fetch", c.cache.fetch(req(fetch))).await
                    && answer.outcome == i32::from(proto::FetchOutcome::Fill)
                {
                    let fill = proto::FillRequest {
                        key,
                        fill_token: answer.fill_token,
                        value: vec![b'f'; 100],
                        ttl: dur(Duration::from_secs(5)),
                        tags: Vec::new(),
                    };
                    let _ = r.call("Cache.Fill", c.cache.fill(req(fill))).await;
                }
            }
            40..43 => {
                let keys = vec![format!("hot:{hot}")];
                let _ = r.call("Cache.Delete", c.cache.delete(req(proto::DeleteRequest { keys }))).await;
            }
            43..44 => {
                let tags = vec![format!("tag:{}", hot % 10)];
                let call = c.cache.invalidate_tags(req(proto::InvalidateTagsRequest { tags }));
                let _ = r.call("Cache.InvalidateTags", call).await;
            }
            44..56 => self.session(n).await,
            56..66 => {
                let check = proto::CheckRequest {
                    limits: vec![proto::Limit {
                        key: format!("rl:{}", self.id),
                        limit: 1_000_000,
                        period: dur(Duration::from_secs(1)),
                        algorithm: proto::Algorithm::TokenBucket.into(),
                        burst: None,
                    }],
                    cost: None,
                    peek: false,
                };
                let _ = r.call("RateLimit.Check", c.rate_limit.check(req(check))).await;
            }
            66..76 => {
                let deltas = vec![proto::Delta { name: format!("ctr:{}", hot % 8), amount: None }];
                let _ = r.call("Stats.Increment", c.stats.increment(req(proto::IncrementRequest { deltas }))).await;
            }
            76..78 => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let ts = |s: u64| Some(prost_types::Timestamp { seconds: s as i64, nanos: 0 });
                let series = proto::GetSeriesRequest {
                    name: format!("ctr:{}", hot % 8),
                    granularity: proto::Granularity::Minute.into(),
                    start: ts(now.as_secs() - 600),
                    end: ts(now.as_secs()),
                };
                let _ = r.call("Stats.GetSeries", c.stats.get_series(req(series))).await;
            }
            78..88 => {
                let acquire = proto::AcquireRequest {
                    name: format!("lk:{}", hot % 8),
                    ttl: dur(Duration::from_secs(2)),
                    wait: None,
                    owner: format!("caller-{}", self.id),
                };
                if let Ok(grant) = r.call("Lock.Acquire", c.locks.acquire(req(acquire))).await
                    && grant.acquired
                {
                    let release = proto::ReleaseRequest { name: format!("lk:{}", hot % 8), lease_id: grant.lease_id };
                    let _ = r.call("Lock.Release", c.locks.release(req(release))).await;
                }
            }
            _ => {
                let _ = r.call("Cache.Get", c.cache.get(req(proto::GetRequest { key: format!("hot:{hot}") }))).await;
            }
        }
    }

    /// Creates a session when the caller has none; else reads, merges into
    /// or deletes it.
    async fn session(&mut self, n: u64) {
        let r = Arc::clone(&self.recorder);
        let s = &mut self.clients.sessions;
        let Some(id) = self.session.clone() else {
            let create = proto::CreateSessionRequest {
                user_id: format!("user:{}", self.id % 16),
                data: Some(session_data(n)),
                ttl: dur(Duration::from_secs(60)),
            };
            if let Ok(created) = r.call("Session.Create", s.create_session(req(create))).await {
                self.session = created.session.map(|s| s.session_id);
            }
            return;
        };
        match n % 4 {
            0 => {
                let delete = proto::DeleteSessionRequest { session_id: id };
                if r.call("Session.Delete", s.delete_session(req(delete))).await.is_ok() {
                    self.session = None;
                }
            }
            1 => {
                let update = proto::UpdateSessionRequest { session_id: id, data: Some(session_data(n)), merge: true };
                let _ = r.call("Session.Update", s.update_session(req(update))).await;
            }
            _ => {
                let get = proto::GetSessionRequest { session_id: id, touch: true };
                if let Ok(got) = r.call("Session.Get", s.get_session(req(get))).await
                    && !got.found
                {
                    self.session = None;
                }
            }
        }
    }
}
