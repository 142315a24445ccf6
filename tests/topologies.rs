//! Every RPC of every service on every topology: one server, a 3-master
//! Redis Cluster, and a Sentinel-managed master. One shared body per service,
//! with keys chosen to land on different cluster masters; then fail-overs
//! and slot migrations under load.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use cachecoord::proto::{
    AbandonFillRequest, AcquireRequest, AddUniqueRequest, Algorithm, CheckRequest, CheckTokensRequest,
    CountActiveRequest, CountUniqueRequest, CreateSessionRequest, DeleteRequest, DeleteSessionRequest,
    DeleteUserSessionsRequest, Delta, ExtendRequest, FetchOutcome, FetchRequest, FillRequest, GetManyRequest,
    GetRequest, GetSeriesRequest, GetSessionRequest, GetTotalsRequest, Granularity, IncrementRequest, InspectRequest,
    InvalidateTagsRequest, Limit, ListUserSessionsRequest, MarkActiveRequest, ReleaseRequest, ResetLimitsRequest,
    RevokeTokenRequest, SetItem, SetManyRequest, SetRequest, TouchRequest, TouchSessionRequest, UpdateSessionRequest,
    WatchInvalidationsRequest,
};
use common::{
    RedisServer, Target, TestServer,
    cluster::{RedisCluster, RedisSentinel},
    ms,
};
use tonic::Code;

/// Cache keys whose hash slots fall on the three masters of a fresh cluster
/// (slots 15495, 3300 and 7365).
const SPREAD: [&str; 3] = ["a", "b", "c"];

fn now() -> prost_types::Timestamp {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    prost_types::Timestamp { seconds: t.as_secs() as i64, nanos: 0 }
}

fn set(key: &str, value: &[u8], tags: &[&str]) -> SetRequest {
    SetRequest {
        key: key.into(),
        value: value.to_vec(),
        ttl: ms(60_000),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

async fn cache_rpcs(server: &TestServer) {
    let mut cache = server.cache();
    for key in SPREAD {
        assert!(cache.set(set(key, key.as_bytes(), &["all", key])).await.unwrap().into_inner().stored);
    }
    let got = cache.get(GetRequest { key: "b".into() }).await.unwrap().into_inner();
    assert_eq!((got.found, got.value.as_slice()), (true, &b"b"[..]));

    // GetMany across masters answers in request order, misses included.
    let keys = vec!["c".into(), "nope".into(), "a".into(), "b".into(), "a".into()];
    let entries = cache.get_many(GetManyRequest { keys }).await.unwrap().into_inner().entries;
    let seen: Vec<(&str, bool, &[u8])> =
        entries.iter().map(|e| (e.key.as_str(), e.found, e.value.as_slice())).collect();
    assert_eq!(
        seen,
        [("c", true, &b"c"[..]), ("nope", false, b""), ("a", true, b"a"), ("b", true, b"b"), ("a", true, b"a")]
    );

    let items = ["x", "y", "z"]
        .iter()
        .map(|key| SetItem { key: key.to_string(), value: b"m".to_vec(), ttl: ms(60_000), tags: vec!["many".into()] })
        .collect();
    assert_eq!(cache.set_many(SetManyRequest { items }).await.unwrap().into_inner().stored, 3);
    assert!(cache.touch(TouchRequest { key: "x".into(), ttl: ms(120_000) }).await.unwrap().into_inner().found);

    // Tags reach across slots; each entry counts once, and they are gone.
    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["all".into(), "c".into()] }).await;
    assert_eq!(invalidated.unwrap().into_inner().invalidated, 3);
    for key in SPREAD {
        assert!(!cache.get(GetRequest { key: key.into() }).await.unwrap().into_inner().found, "{key}");
    }
    let deleted = cache.delete(DeleteRequest { keys: vec!["x".into(), "y".into(), "z".into(), "a".into()] }).await;
    assert_eq!(deleted.unwrap().into_inner().deleted, 3);
    assert_eq!(
        cache
            .invalidate_tags(InvalidateTagsRequest { tags: vec!["many".into()] })
            .await
            .unwrap()
            .into_inner()
            .invalidated,
        0
    );

    // Fetch/Fill: one filler, a waiter woken with the value.
    let fetch = |key: &str, wait: u64| FetchRequest { key: key.into(), fill_timeout: ms(10_000), max_wait: ms(wait) };
    let lease = cache.fetch(fetch("f", 0)).await.unwrap().into_inner();
    assert_eq!(lease.outcome, i32::from(FetchOutcome::Fill));
    let mut waiter = server.cache();
    let waiting = tokio::spawn(async move { waiter.fetch(fetch("f", 10_000)).await.map(|r| r.into_inner()) });
    let fill = FillRequest {
        key: "f".into(),
        fill_token: lease.fill_token,
        value: b"filled".to_vec(),
        ttl: ms(60_000),
        tags: vec!["t".into()],
    };
    assert!(cache.fill(fill).await.unwrap().into_inner().stored);
    let woken = waiting.await.unwrap().unwrap();
    assert_eq!((woken.outcome, woken.value.as_slice()), (i32::from(FetchOutcome::Hit), &b"filled"[..]));
    let lease = cache.fetch(fetch("g", 0)).await.unwrap().into_inner();
    let abandoned = cache.abandon_fill(AbandonFillRequest { key: "g".into(), fill_token: lease.fill_token }).await;
    assert!(abandoned.unwrap().into_inner().released);
}

async fn session_rpcs(server: &TestServer) {
    let mut sessions = server.sessions();
    let create = |user: &str| CreateSessionRequest { user_id: user.into(), data: None, ttl: ms(60_000) };
    let mut ids = Vec::new();
    for user in ["u1", "u2", "u1"] {
        let created = sessions.create_session(create(user)).await.unwrap().into_inner();
        ids.push(created.session.unwrap().session_id);
    }
    let got = sessions.get_session(GetSessionRequest { session_id: ids[0].clone(), touch: true }).await.unwrap();
    assert_eq!(got.into_inner().session.unwrap().user_id, "u1");
    let touched = sessions.touch_session(TouchSessionRequest { session_id: ids[1].clone(), ttl: ms(90_000) }).await;
    assert!(touched.unwrap().into_inner().found);
    let data = prost_types::Struct {
        fields: [(
            "k".to_string(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("v".into())) },
        )]
        .into(),
    };
    let updated =
        sessions.update_session(UpdateSessionRequest { session_id: ids[2].clone(), data: Some(data), merge: true });
    assert!(updated.await.unwrap().into_inner().found);
    let listed = sessions.list_user_sessions(ListUserSessionsRequest { user_id: "u1".into() }).await.unwrap();
    let listed: Vec<String> = listed.into_inner().sessions.into_iter().map(|s| s.session_id).collect();
    assert_eq!(listed, [ids[2].clone(), ids[0].clone()], "newest first");
    let keep = DeleteUserSessionsRequest { user_id: "u1".into(), keep_session_id: Some(ids[2].clone()) };
    assert_eq!(sessions.delete_user_sessions(keep).await.unwrap().into_inner().deleted, 1);
    // Another user's session is never "kept" (nor touched).
    let other = DeleteUserSessionsRequest { user_id: "u1".into(), keep_session_id: Some(ids[1].clone()) };
    assert_eq!(sessions.delete_user_sessions(other).await.unwrap().into_inner().deleted, 1);
    let deleted = sessions.delete_session(DeleteSessionRequest { session_id: ids[1].clone() }).await;
    assert!(deleted.unwrap().into_inner().deleted);

    let in_a_day = prost_types::Timestamp { seconds: now().seconds + 86_400, nanos: 0 };
    for token in ["t1", "t3"] {
        let revoke = RevokeTokenRequest { token: token.into(), expires_at: Some(in_a_day) };
        assert!(sessions.revoke_token(revoke).await.unwrap().into_inner().revoked);
    }
    let tokens = (1..=4).map(|i| format!("t{i}")).collect();
    let checked = sessions.check_tokens(CheckTokensRequest { tokens }).await.unwrap().into_inner().revoked;
    assert_eq!(checked, [true, false, true, false]);
}

fn limit(key: &str, limit: u64, algorithm: Algorithm) -> Limit {
    Limit { key: key.into(), limit, period: ms(60_000), algorithm: algorithm.into(), burst: None }
}

async fn rate_limit_rpcs(server: &TestServer) {
    let mut limits = server.rate_limit();
    let check = |limits: Vec<Limit>, peek: bool| CheckRequest { limits, cost: None, peek };
    // Limits whose state keys are in different slots (on a cluster).
    let request = || {
        vec![
            limit("plenty", 100, Algorithm::TokenBucket),
            limit("window", 100, Algorithm::SlidingWindow),
            limit("scarce", 1, Algorithm::FixedWindow),
        ]
    };
    assert!(limits.check(check(request(), false)).await.unwrap().into_inner().allowed);
    let denied = limits.check(check(request(), false)).await.unwrap().into_inner();
    assert!(!denied.allowed);
    // All or nothing: the limits that allowed the denied Check kept their units.
    let peek = limits.check(check(request(), true)).await.unwrap().into_inner();
    let remaining: Vec<u64> = peek.statuses.iter().map(|s| s.remaining).collect();
    assert_eq!(remaining, [99, 99, 0]);

    // Exact under concurrency: 20 callers, 5 checks each, on a window of 30.
    let admitted = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let (mut limits, admitted) = (server.rate_limit(), Arc::clone(&admitted));
            tokio::spawn(async move {
                for _ in 0..5 {
                    let response = limits.check(check(vec![limit("hot", 30, Algorithm::FixedWindow)], false)).await;
                    if response.unwrap().into_inner().allowed {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 30);

    let keys = vec!["plenty".into(), "scarce".into(), "never".into(), "hot".into()];
    assert_eq!(limits.reset_limits(ResetLimitsRequest { keys }).await.unwrap().into_inner().reset, 3);
}

async fn lock_rpcs(server: &TestServer) {
    let mut locks = server.locks();
    let acquire = |name: &str, wait: u64| AcquireRequest {
        name: name.into(),
        ttl: ms(10_000),
        wait: ms(wait),
        owner: "me".into(),
    };
    let mut last = 0;
    for name in SPREAD {
        let grant = locks.acquire(acquire(name, 0)).await.unwrap().into_inner();
        assert!(grant.acquired, "{name}");
        let held = locks.inspect(InspectRequest { name: name.into() }).await.unwrap().into_inner();
        assert_eq!((held.held, held.owner.as_str(), held.fencing_token), (true, "me", grant.fencing_token));
        let extend = ExtendRequest { name: name.into(), lease_id: grant.lease_id.clone(), ttl: ms(20_000) };
        assert!(locks.extend(extend).await.unwrap().into_inner().extended);
        assert!(
            locks
                .release(ReleaseRequest { name: name.into(), lease_id: grant.lease_id })
                .await
                .unwrap()
                .into_inner()
                .released
        );
        last = grant.fencing_token;
    }
    // A waiter is woken by the release and gets a higher token.
    let first = locks.acquire(acquire("c", 0)).await.unwrap().into_inner();
    assert!(first.fencing_token > last);
    let mut waiter = server.locks();
    let waiting = tokio::spawn(async move { waiter.acquire(acquire("c", 10_000)).await.map(|r| r.into_inner()) });
    locks.release(ReleaseRequest { name: "c".into(), lease_id: first.lease_id }).await.unwrap();
    let second = waiting.await.unwrap().unwrap();
    assert!(second.acquired && second.fencing_token > first.fencing_token);
}

async fn stats_rpcs(server: &TestServer) {
    let mut stats = server.stats();
    let deltas = SPREAD.iter().map(|name| Delta { name: name.to_string(), amount: Some(2) }).collect();
    assert_eq!(stats.increment(IncrementRequest { deltas }).await.unwrap().into_inner().values, [2, 2, 2]);
    let deltas = vec![Delta { name: "a".into(), amount: None }, Delta { name: "c".into(), amount: Some(5) }];
    assert_eq!(stats.increment(IncrementRequest { deltas }).await.unwrap().into_inner().values, [3, 7]);
    let names = vec!["c".into(), "b".into(), "none".into(), "a".into()];
    assert_eq!(stats.get_totals(GetTotalsRequest { names }).await.unwrap().into_inner().values, [7, 2, 0, 3]);
    let series = GetSeriesRequest {
        name: "c".into(),
        granularity: Granularity::Day.into(),
        start: Some(now()),
        end: Some(now()),
    };
    assert_eq!(stats.get_series(series).await.unwrap().into_inner().total, 7);
    for member in ["m1", "m2"] {
        stats.mark_active(MarkActiveRequest { group: "online".into(), member: member.into() }).await.unwrap();
    }
    let count = stats.count_active(CountActiveRequest { group: "online".into(), window: ms(60_000) }).await;
    assert_eq!(count.unwrap().into_inner().count, 2);
    let members = vec!["x".into(), "y".into(), "x".into()];
    stats.add_unique(AddUniqueRequest { name: "dau".into(), members }).await.unwrap();
    let unique =
        stats.count_unique(CountUniqueRequest { name: "dau".into(), start: Some(now()), end: Some(now()) }).await;
    assert_eq!(unique.unwrap().into_inner().count, 2);
}

/// WatchInvalidations reports a write (on a cluster, see also
/// `a_cluster_watch_sees_every_master_and_ends_when_the_masters_change`).
async fn watch_rpc(server: &TestServer) {
    let watch = server.cache().watch_invalidations(WatchInvalidationsRequest { prefixes: vec!["w:".into()] }).await;
    let mut stream = watch.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("in time").unwrap();
    assert!(first.expect("first message").keys.is_empty());
    server.cache().set(SetRequest { key: "w:1".into(), value: b"v".to_vec(), ..Default::default() }).await.unwrap();
    let change = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("in time").unwrap();
    assert_eq!(change.expect("a change").keys, vec!["w:1".to_string()]);
}

async fn every_rpc(redis: &impl Target) {
    let server = TestServer::start(redis).await;
    watch_rpc(&server).await;
    cache_rpcs(&server).await;
    session_rpcs(&server).await;
    rate_limit_rpcs(&server).await;
    lock_rpcs(&server).await;
    stats_rpcs(&server).await;
}

#[tokio::test]
async fn every_rpc_on_one_server() {
    every_rpc(&RedisServer::start().await).await;
}

#[tokio::test]
async fn every_rpc_on_a_cluster() {
    let cluster = RedisCluster::start().await;
    let masters: std::collections::BTreeSet<u16> =
        futures::future::join_all(SPREAD.map(|key| cluster.master_of(key))).await.into_iter().collect();
    assert_eq!(masters.len(), 3, "the spread keys land on three masters");
    every_rpc(&cluster).await;
}

/// The keys of a watch's next message, or its end.
async fn next_keys(
    stream: &mut tonic::Streaming<cachecoord::proto::WatchInvalidationsResponse>,
) -> Result<Option<Vec<String>>, tonic::Status> {
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("a change in time");
    next.map(|message| message.map(|m| m.keys))
}

/// Keys changed through one instance reach a watch on another whichever
/// master holds them; a fail-over ends the watch (a new master is not yet
/// tracked), and a new watch then sees writes on the promoted master.
#[tokio::test]
async fn a_cluster_watch_sees_every_master_and_ends_when_the_masters_change() {
    let cluster = RedisCluster::start().await;
    let writer = TestServer::start(&cluster).await;
    let watcher = TestServer::start_sibling(&cluster, &writer).await;
    let watch = || async {
        let request = WatchInvalidationsRequest { prefixes: SPREAD.map(String::from).to_vec() };
        let mut stream = watcher.cache().watch_invalidations(request).await?.into_inner();
        // The first message says tracking is on.
        assert!(next_keys(&mut stream).await?.expect("first message").is_empty());
        Ok::<_, tonic::Status>(stream)
    };
    let mut stream = watch().await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for key in SPREAD {
        writer.cache().set(set(key, b"v", &[])).await.unwrap();
    }
    while seen.len() < SPREAD.len() {
        seen.extend(next_keys(&mut stream).await.unwrap().expect("open"));
    }
    assert_eq!(seen, SPREAD.map(String::from).into_iter().collect());

    cluster.failover("a").await;
    // Ended within the topology poll (plus the cluster's own agreement).
    loop {
        match next_keys(&mut stream).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the watch ended without a status"),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                break;
            }
        }
    }
    // A new watch tracks the new masters (the first tries may meet the
    // cluster still settling).
    let mut stream = loop {
        match watch().await {
            Ok(stream) => break stream,
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
    };
    loop {
        match writer.cache().set(set("a", b"after", &[])).await {
            Ok(_) => break,
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
    }
    assert_eq!(next_keys(&mut stream).await.unwrap().expect("open"), vec!["a".to_string()]);
}

#[tokio::test]
async fn every_rpc_through_sentinel() {
    every_rpc(&RedisSentinel::start().await).await;
}

#[tokio::test]
async fn two_instances_on_one_cluster_hand_off_fills_and_locks() {
    let cluster = RedisCluster::start().await;
    let first = TestServer::start(&cluster).await;
    let second = TestServer::start_sibling(&cluster, &first).await;

    let fetch = |wait: u64| FetchRequest { key: "shared".into(), fill_timeout: ms(10_000), max_wait: ms(wait) };
    let lease = first.cache().fetch(fetch(0)).await.unwrap().into_inner();
    assert_eq!(lease.outcome, i32::from(FetchOutcome::Fill));
    let mut waiter = second.cache();
    let waiting = tokio::spawn(async move { waiter.fetch(fetch(10_000)).await.map(|r| r.into_inner()) });
    let fill = FillRequest {
        key: "shared".into(),
        fill_token: lease.fill_token,
        value: b"v".to_vec(),
        ttl: ms(60_000),
        tags: vec![],
    };
    first.cache().fill(fill).await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().outcome, i32::from(FetchOutcome::Hit));

    let acquire =
        |wait: u64| AcquireRequest { name: "job".into(), ttl: ms(10_000), wait: ms(wait), owner: String::new() };
    let held = first.locks().acquire(acquire(0)).await.unwrap().into_inner();
    let mut waiter = second.locks();
    let waiting = tokio::spawn(async move { waiter.acquire(acquire(10_000)).await.map(|r| r.into_inner()) });
    first.locks().release(ReleaseRequest { name: "job".into(), lease_id: held.lease_id }).await.unwrap();
    let taken = waiting.await.unwrap().unwrap();
    assert!(taken.acquired && taken.fencing_token > held.fencing_token);
}

/// A steady mixed load on keys across the masters: every call's error is
/// counted (only UNAVAILABLE or DEADLINE_EXCEEDED are allowed), successes
/// after `settled` are counted separately.
struct Load {
    stop: Arc<AtomicBool>,
    /// Lock holders at this moment, by the load's own count, and how often
    /// a grant found another holder (or a lower fencing token than the
    /// highest granted so far).
    lock_violations: Arc<AtomicU64>,
    /// Per task, successful calls since its last failure.
    streaks: Arc<Vec<AtomicU64>>,
    errors: Arc<AtomicU64>,
    /// Failed cache and stats calls (lock grants may fail UNAVAILABLE for a
    /// while longer: until a replica acknowledges them again).
    data_errors: Arc<AtomicU64>,
    wrong: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(server: &Arc<TestServer>) -> Self {
        let (stop, errors, wrong, calls) = (Arc::default(), Arc::default(), Arc::default(), Arc::default());
        let streaks: Arc<Vec<AtomicU64>> = Arc::new((0..TASKS).map(|_| AtomicU64::new(0)).collect());
        let data_errors: Arc<AtomicU64> = Arc::default();
        let lock_violations: Arc<AtomicU64> = Arc::default();
        let holders: Arc<AtomicU64> = Arc::default();
        let highest: Arc<AtomicU64> = Arc::default();
        let tasks = (0..TASKS)
            .map(|task| {
                let server = Arc::clone(server);
                let (stop, errors, wrong, calls): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>) =
                    (Arc::clone(&stop), Arc::clone(&errors), Arc::clone(&wrong), Arc::clone(&calls));
                let streaks = Arc::clone(&streaks);
                let data_errors = Arc::clone(&data_errors);
                let (holders, highest, violations) =
                    (Arc::clone(&holders), Arc::clone(&highest), Arc::clone(&lock_violations));
                tokio::spawn(async move {
                    let key = SPREAD[task % 3];
                    while !stop.load(Ordering::SeqCst) {
                        let result = match task % 4 {
                            0 => server.cache().set(set(key, b"v", &["load"])).await.map(drop),
                            1 => server.cache().get(GetRequest { key: key.into() }).await.map(drop),
                            2 => {
                                let deltas = vec![Delta { name: key.into(), amount: None }];
                                server.stats().increment(IncrementRequest { deltas }).await.map(drop)
                            }
                            _ => hold_once(&server, &holders, &highest, &violations).await,
                        };
                        calls.fetch_add(1, Ordering::SeqCst);
                        streaks[task].fetch_add(1, Ordering::SeqCst);
                        if let Err(status) = result {
                            streaks[task].store(0, Ordering::SeqCst);
                            errors.fetch_add(1, Ordering::SeqCst);
                            if task % 4 != 3 {
                                data_errors.fetch_add(1, Ordering::SeqCst);
                            }
                            if !matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded) {
                                eprintln!("unexpected {status:?}");
                                wrong.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                })
            })
            .collect();
        Self { stop, lock_violations, streaks, errors, data_errors, wrong, calls, tasks }
    }

    /// How long after now every cache and stats task of the load makes 50
    /// calls in a row without a failure (the service has recovered by
    /// itself, on every master); panics after `limit`. (Lock tasks may wait
    /// out a lease whose release failed during the fault.)
    async fn recovered_within(&self, limit: Duration) -> Duration {
        let started = std::time::Instant::now();
        // Calls made before now do not count: a streak begun before the
        // fault took effect (a demoted master answers until it is written
        // to) would pass for a recovery.
        for streak in self.streaks.iter() {
            streak.store(0, Ordering::SeqCst);
        }
        let recovering = |(task, streak): (usize, &AtomicU64)| task % 4 != 3 && streak.load(Ordering::SeqCst) < 50;
        while self.streaks.iter().enumerate().any(recovering) {
            let streaks: Vec<u64> = self.streaks.iter().map(|s| s.load(Ordering::SeqCst)).collect();
            assert!(started.elapsed() < limit, "not recovered within {limit:?}: streaks {streaks:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        started.elapsed()
    }

    /// Waits until `n` more calls have been made.
    async fn run_for(&self, n: u64) {
        let target = self.calls.load(Ordering::SeqCst) + n;
        while self.calls.load(Ordering::SeqCst) < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Failed cache and stats calls so far.
    fn data_errors(&self) -> u64 {
        self.data_errors.load(Ordering::SeqCst)
    }

    /// Stops the load; the number of failed calls.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        assert_eq!(self.wrong.load(Ordering::SeqCst), 0, "errors other than UNAVAILABLE/DEADLINE_EXCEEDED");
        assert_eq!(self.lock_violations.load(Ordering::SeqCst), 0, "two lock holders, or a token went down");
        self.errors.load(Ordering::SeqCst)
    }
}

/// Tasks of a `Load`: cache writes, cache reads, increments and lock holders.
const TASKS: usize = 8;

/// Takes the shared lock, holds it briefly as a fenced resource would be
/// used, and gives it back, counting any overlap with another holder.
async fn hold_once(
    server: &TestServer,
    holders: &AtomicU64,
    highest: &AtomicU64,
    violations: &AtomicU64,
) -> Result<(), tonic::Status> {
    let request = AcquireRequest { name: "load".into(), ttl: ms(2_000), wait: ms(1_000), owner: String::new() };
    let grant = server.locks().acquire(request).await?.into_inner();
    if !grant.acquired {
        return Ok(());
    }
    if holders.fetch_add(1, Ordering::SeqCst) != 0
        || highest.fetch_max(grant.fencing_token, Ordering::SeqCst) >= grant.fencing_token
    {
        violations.fetch_add(1, Ordering::SeqCst);
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    holders.fetch_sub(1, Ordering::SeqCst);
    server.locks().release(ReleaseRequest { name: "load".into(), lease_id: grant.lease_id }).await.map(drop)
}

/// After a fault: every service works again without a restart, a fresh
/// fixed window admits exactly its allowance, fencing tokens keep rising.
async fn guarantees_hold(server: &TestServer, token_before: u64) {
    // The first calls after a topology change may still meet it.
    let mut ok = false;
    for _ in 0..200 {
        if server.cache().get(GetRequest { key: "a".into() }).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ok, "the service recovered by itself");
    let mut admitted = 0;
    let window = format!("after-{token_before}");
    for _ in 0..15 {
        let request =
            CheckRequest { limits: vec![limit(&window, 10, Algorithm::FixedWindow)], cost: None, peek: false };
        if server.rate_limit().check(request).await.unwrap().into_inner().allowed {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "exact after the fault");
    let grant = server
        .locks()
        .acquire(AcquireRequest { name: "fence".into(), ttl: ms(5_000), wait: ms(5_000), owner: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert!(grant.acquired && grant.fencing_token > token_before, "{} > {token_before}", grant.fencing_token);
    server.locks().release(ReleaseRequest { name: "fence".into(), lease_id: grant.lease_id }).await.unwrap();
}

async fn fence_token(server: &TestServer) -> u64 {
    let request = AcquireRequest { name: "fence".into(), ttl: ms(5_000), wait: None, owner: String::new() };
    // The locks' own Redis handle connects on first use, and connecting, the
    // script and WAIT share one --redis-timeout (500 ms here): on a loaded
    // machine the first attempt may be UNAVAILABLE, as a caller would see it.
    let mut attempts = 0;
    let grant = loop {
        match server.locks().acquire(request.clone()).await {
            Ok(grant) => break grant.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable && attempts < 5 => attempts += 1,
            Err(status) => panic!("acquire: {status:?}"),
        }
    };
    server.locks().release(ReleaseRequest { name: "fence".into(), lease_id: grant.lease_id }).await.unwrap();
    grant.fencing_token
}

/// A Fetch waiter that was waiting through the fault is answered by its
/// max_wait at the latest, never stranded.
async fn fetch_waiter(server: &TestServer) -> tokio::task::JoinHandle<Result<i32, tonic::Status>> {
    let request = |wait: u64| FetchRequest { key: "waiter".into(), fill_timeout: ms(60_000), max_wait: ms(wait) };
    let lease = server.cache().fetch(request(0)).await.unwrap().into_inner();
    assert_eq!(lease.outcome, i32::from(FetchOutcome::Fill));
    let mut cache = server.cache();
    tokio::spawn(async move {
        let mut call = tonic::Request::new(request(3_000));
        call.set_timeout(Duration::from_secs(10));
        let started = std::time::Instant::now();
        let outcome = cache.fetch(call).await.map(|r| r.into_inner().outcome);
        // max_wait, plus a read after it that may meet the fault.
        assert!(started.elapsed() < Duration::from_secs(5), "waited {:?}", started.elapsed());
        outcome
    })
}

#[tokio::test]
async fn cluster_failover_slot_migration_and_a_killed_master_under_load() {
    let mut cluster = RedisCluster::start().await;
    let flags = ["--redis-timeout", "500ms", "--lock-replicas", "1"];
    let server = Arc::new(TestServer::start_with(&cluster, &flags).await);
    let token = fence_token(&server).await;

    let load = Load::start(&server);
    load.run_for(100).await;
    let waiter = fetch_waiter(&server).await;
    cluster.failover("a").await;
    load.run_for(100).await;
    cluster.migrate_slot_of("b").await;
    load.run_for(100).await;
    let killed = cluster.kill_master_of("c").await;
    // The promoted replica has no replica of its own until the dead node
    // comes back, and grants that wait for one fail until then.
    cluster.revive(killed).await;
    // Errors only during the switch: the service follows the new topology by
    // itself within seconds of the cluster settling, and then none.
    let recovery = load.recovered_within(Duration::from_secs(10)).await;
    let settled = load.data_errors();
    load.run_for(300).await;
    assert_eq!(load.data_errors(), settled, "calls failed after recovery");
    let errors = load.stop().await;
    eprintln!("calls failed during the faults: {errors}; recovered {recovery:?} after the cluster settled");
    let outcome = waiter.await.unwrap();
    let answered = match &outcome {
        Ok(o) => *o == i32::from(FetchOutcome::Timeout) || *o == i32::from(FetchOutcome::Fill),
        Err(status) => status.code() == Code::Unavailable,
    };
    assert!(answered, "a waiter is answered within its max_wait: {outcome:?}");
    guarantees_hold(&server, token).await;
}

#[tokio::test]
async fn sentinel_failover_with_the_old_master_alive_under_load() {
    let sentinel = RedisSentinel::start().await;
    let flags = ["--redis-timeout", "500ms", "--lock-replicas", "1"];
    let server = Arc::new(TestServer::start_with(&sentinel, &flags).await);
    let token = fence_token(&server).await;
    let load = Load::start(&server);
    load.run_for(100).await;
    let old = sentinel.master_port().await;
    let new = sentinel.failover().await;
    assert_ne!(old, new);
    let recovery = load.recovered_within(Duration::from_secs(10)).await;
    let settled = load.data_errors();
    load.run_for(300).await;
    assert_eq!(load.data_errors(), settled, "calls failed after recovery");
    let errors = load.stop().await;
    eprintln!("calls failed during the fail-over: {errors}; recovered {recovery:?} after it settled");
    guarantees_hold(&server, token).await;
}
