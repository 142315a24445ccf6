//! Redis going away, coming back, or stalling; and shutdown.

mod common;

use std::time::{Duration, Instant};

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use cachecoord::proto::{
    AcquireRequest, Algorithm, CheckRequest, Delta, FetchOutcome, FetchRequest, GetRequest, IncrementRequest, Limit,
    ReleaseRequest, SetRequest,
};
use common::{RedisServer, TestServer, ms};
use deadpool_redis::redis;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// Health must follow Redis within this long (SPEC §3).
const HEALTH_FLIP: Duration = Duration::from_secs(2);

fn get(key: &str) -> tonic::Request<GetRequest> {
    // A generous client deadline: the service must answer well before it.
    let mut request = tonic::Request::new(GetRequest { key: key.into() });
    request.set_timeout(Duration::from_secs(5));
    request
}

fn set(key: &str) -> SetRequest {
    SetRequest { key: key.into(), value: b"v".to_vec(), ..Default::default() }
}

const SERVICES: [&str; 6] = [
    "",
    "cachecoord.v1.CacheService",
    "cachecoord.v1.SessionService",
    "cachecoord.v1.RateLimitService",
    "cachecoord.v1.LockService",
    "cachecoord.v1.StatsService",
];

#[tokio::test]
async fn redis_outage_is_unavailable_flips_health_and_heals_itself() {
    let mut redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--redis-timeout", "300ms"]).await;
    let mut cache = server.cache();
    cache.set(set("k")).await.unwrap();
    for service in SERVICES {
        assert_eq!(server.health_status(service).await, ServingStatus::Serving, "{service:?}");
    }

    redis.stop();
    let stopped = Instant::now();
    let status = cache.get(get("k")).await.expect_err("redis is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("127.0.0.1"), "no internals leak: {:?}", status.message());
    server.wait_for_health("", ServingStatus::NotServing).await;
    let flipped = stopped.elapsed();
    assert!(flipped < HEALTH_FLIP, "NOT_SERVING after {flipped:?}");
    for service in SERVICES {
        assert_eq!(server.health_status(service).await, ServingStatus::NotServing, "{service:?}");
    }

    redis.restart().await;
    let restarted = Instant::now();
    server.wait_for_health("", ServingStatus::Serving).await;
    let healed = restarted.elapsed();
    assert!(healed < HEALTH_FLIP, "SERVING after {healed:?}");
    // Same service, no restart: requests work again (this Redis kept no data).
    assert!(!cache.get(get("k")).await.unwrap().into_inner().found);
    cache.set(set("k")).await.unwrap();
    assert!(cache.get(get("k")).await.unwrap().into_inner().found);
}

#[tokio::test]
async fn a_stalled_redis_times_out_as_unavailable() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--redis-timeout", "200ms"]).await;
    let mut cache = server.cache();
    cache.set(set("k")).await.unwrap();

    // DEBUG SLEEP blocks the whole Redis for a while: a slow Redis, not a dead one.
    let stall = redis.stall(1.5).await;

    let mut request = get("k");
    request.set_timeout(Duration::from_secs(1)); // shorter than the stall
    let status = cache.get(request).await.expect_err("redis is stalled");
    assert_eq!(status.code(), Code::Unavailable, "answered by our timeout, not the caller's deadline: {status:?}");

    stall.await.unwrap();
    assert!(cache.get(get("k")).await.unwrap().into_inner().found);
}

#[tokio::test]
async fn the_service_starts_without_redis_and_serves_once_it_appears() {
    let mut redis = RedisServer::start().await;
    redis.stop();
    let server = TestServer::start_unchecked(&redis, &["--redis-timeout", "300ms"]).await;
    server.wait_for_health("", ServingStatus::NotServing).await;
    let status = server.cache().get(get("k")).await.expect_err("no redis yet");
    assert_eq!(status.code(), Code::Unavailable);

    redis.restart().await;
    server.wait_for_health("", ServingStatus::Serving).await;
    server.cache().set(set("k")).await.unwrap();
}

#[tokio::test]
async fn shutdown_reports_not_serving_and_lets_in_flight_rpcs_finish() {
    let redis = RedisServer::start().await;
    // A long grace: finishing well inside it shows the drain, not the grace timer, ended the run.
    let server = TestServer::start_with(&redis, &["--shutdown-grace", "60s"]).await;
    let mut health = server.health();
    let mut updates = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(updates.message().await.unwrap().unwrap().status(), ServingStatus::Serving);

    // An RPC that is still waiting server-side when shutdown begins.
    let mut cache = server.cache();
    let lease = cache.fetch(FetchRequest { key: "k".into(), fill_timeout: ms(60_000), max_wait: ms(0) }).await;
    assert_eq!(lease.unwrap().into_inner().outcome, i32::from(FetchOutcome::Fill));
    let waiter = tokio::spawn(async move {
        cache.fetch(FetchRequest { key: "k".into(), fill_timeout: ms(60_000), max_wait: ms(500) }).await
    });
    // Let the waiter's request reach the server before shutting down.
    while !(server.health_status("").await == ServingStatus::Serving && waiter_started(&redis).await) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let shutdown = tokio::spawn(server.shutdown());
    let status = updates.message().await.unwrap().unwrap().status();
    assert_eq!(status, ServingStatus::NotServing, "health says NOT_SERVING as shutdown begins");
    drop(updates); // a watch stream would otherwise hold the drain open until the grace ends
    let answer = waiter.await.unwrap().expect("the in-flight RPC completes");
    assert_eq!(answer.into_inner().outcome, i32::from(FetchOutcome::Timeout));
    tokio::time::timeout(Duration::from_secs(30), shutdown).await.expect("drained before the grace ran out").unwrap();
}

/// True once the Fetch waiter has made its reads (lease found, registered).
async fn waiter_started(redis: &RedisServer) -> bool {
    redis.calls("evalsha").await >= 3
}
#[tokio::test]
async fn password_and_database_number_in_the_url_are_used() {
    let redis = common::RedisServer::start_with_password("s3cret").await;
    let url = format!("redis://:s3cret@127.0.0.1:{}/3", redis.port);
    let server = TestServer::start_with(&redis, &["--redis-url", &url]).await;
    server.cache().set(set("k")).await.unwrap();
    let mut conn = redis.client().await;
    let _: () = redis::cmd("SELECT").arg(3).query_async(&mut conn).await.unwrap();
    let exists: bool = redis::cmd("EXISTS").arg(server.cache_key("k")).query_async(&mut conn).await.unwrap();
    assert!(exists, "written to database 3");
}

#[tokio::test]
async fn a_wrong_password_is_unavailable_not_a_crash() {
    let redis = common::RedisServer::start_with_password("s3cret").await;
    let url = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let server = TestServer::start_unchecked(&redis, &["--redis-url", &url]).await;
    server.wait_for_health("", ServingStatus::NotServing).await;
    let status = server.cache().get(get("k")).await.expect_err("cannot authenticate");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(!status.message().contains("wrong"), "{:?}", status.message());
}

#[tokio::test]
async fn a_redis_out_of_memory_is_unavailable_and_writes_nothing() {
    use cachecoord::proto::{Delta, IncrementRequest};
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let mut stats = server.stats();
    let increment = || IncrementRequest { deltas: vec![Delta { name: "n".into(), amount: Some(5) }] };
    assert_eq!(stats.increment(increment()).await.unwrap().into_inner().values, vec![5]);

    // Redis refuses every write (noeviction at its memory limit). Found by the
    // torture program: scripts answered INTERNAL, and Increment called the
    // refusal an int64 overflow (INVALID_ARGUMENT).
    let mut conn = redis.client().await;
    let config = |name: &str, value: &str| redis::cmd("CONFIG").arg("SET").arg(name).arg(value).clone();
    let _: () = config("maxmemory-policy", "noeviction").query_async(&mut conn).await.unwrap();
    let _: () = config("maxmemory", "1").query_async(&mut conn).await.unwrap();
    let status = cache.set(set("k")).await.expect_err("Redis refuses writes");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = stats.increment(increment()).await.expect_err("Redis refuses writes");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("OOM"), "no Redis text reaches the client: {status:?}");

    let _: () = config("maxmemory", "0").query_async(&mut conn).await.unwrap();
    assert_eq!(
        stats.increment(increment()).await.unwrap().into_inner().values,
        vec![10],
        "the refused delta left no trace"
    );
    cache.set(set("k")).await.unwrap();
}

/// One call of every kind a killed connection could meet: a cache read, a
/// rate-limit check, a counter increment, and a lock taken and given back.
async fn mixed_call(server: &TestServer, task: usize) -> Result<(), tonic::Status> {
    let (mut cache, mut limits, mut stats, mut locks) =
        (server.cache(), server.rate_limit(), server.stats(), server.locks());
    cache.get(get("k")).await?;
    let limit = Limit {
        key: format!("rl{task}"),
        limit: 1_000_000,
        period: ms(60_000),
        algorithm: Algorithm::TokenBucket.into(),
        burst: None,
    };
    limits.check(CheckRequest { limits: vec![limit], cost: None, peek: false }).await?;
    stats.increment(IncrementRequest { deltas: vec![Delta { name: "calls".into(), amount: None }] }).await?;
    let name = format!("lock{task}");
    let grant = locks
        .acquire(AcquireRequest { name: name.clone(), ttl: ms(10_000), wait: None, owner: String::new() })
        .await?
        .into_inner();
    assert!(grant.acquired, "each task has a lock of its own");
    locks.release(ReleaseRequest { name, lease_id: grant.lease_id }).await?;
    Ok(())
}

#[tokio::test]
async fn killed_connections_cost_only_the_calls_in_flight_and_health_holds() {
    const TASKS: usize = 8;
    let redis = RedisServer::start().await;
    let server = Arc::new(TestServer::start(&redis).await);
    server.cache().set(set("k")).await.unwrap();
    let mut updates = server.health().watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(updates.message().await.unwrap().unwrap().status(), ServingStatus::Serving);
    let health_flipped = Arc::new(AtomicBool::new(false));
    let flipped = Arc::clone(&health_flipped);
    let watcher = tokio::spawn(async move {
        while let Ok(Some(update)) = updates.message().await {
            if update.status() != ServingStatus::Serving {
                flipped.store(true, Ordering::SeqCst);
            }
        }
    });

    // Every task runs mixed calls back to back, so each has one call (one
    // RPC of it) in flight when the connections are killed.
    let (done, errors, killed) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (server, done, errors, killed) =
                (Arc::clone(&server), Arc::clone(&done), Arc::clone(&errors), Arc::clone(&killed));
            tokio::spawn(async move {
                let mut after_kill = 0;
                while after_kill < 20 {
                    match mixed_call(&server, task).await {
                        Ok(()) => {}
                        Err(status) => {
                            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    if killed.load(Ordering::SeqCst) {
                        after_kill += 1;
                    }
                }
            })
        })
        .collect();
    while done.load(Ordering::SeqCst) < 50 {
        tokio::task::yield_now().await;
    }

    let mut admin = redis.client().await;
    let victims: u64 =
        redis::cmd("CLIENT").arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"]).query_async(&mut admin).await.unwrap();
    killed.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    watcher.abort();

    assert!(victims >= 4, "the service's shared connections were killed ({victims})");
    let errors = errors.load(Ordering::SeqCst);
    assert!(errors <= TASKS as u64, "{errors} failed calls; at most the {TASKS} in flight may fail");
    assert!(!health_flipped.load(Ordering::SeqCst), "health flipped while Redis answered");
}

#[tokio::test]
async fn the_first_call_after_redis_is_back_succeeds_on_every_service() {
    let mut redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--redis-timeout", "300ms"]).await;
    mixed_call(&server, 0).await.unwrap();
    redis.restart().await;
    // No retry: the dead connections were noticed when Redis went away, so
    // the next call of each kind opens a fresh one.
    mixed_call(&server, 0).await.expect("no call fails once Redis answers again");
}

#[tokio::test]
async fn commands_in_flight_are_bounded_and_the_rest_wait_then_give_up() {
    let redis = RedisServer::start().await;
    let flags = ["--redis-timeout", "300ms", "--redis-connections", "1", "--redis-max-in-flight", "2"];
    let server = TestServer::start_with(&redis, &flags).await;
    server.cache().set(set("k")).await.unwrap();
    server.cache().get(get("k")).await.unwrap(); // loads the script
    let before = redis.calls("evalsha").await;

    // Far longer than the timeout, so even a call that reaches the service
    // late gives up long before the stall ends and frees a place.
    let stall = redis.stall(3.0).await;
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let mut cache = server.cache();
            tokio::spawn(async move { cache.get(get("k")).await })
        })
        .collect();
    for call in calls {
        let status = call.await.unwrap().expect_err("redis is stalled");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    stall.await.unwrap();

    // Only the two calls that held a slot reached Redis; the other eight
    // gave up while waiting and were never sent.
    let sent = redis.calls("evalsha").await - before;
    assert_eq!(sent, 2, "commands sent during the stall");
    assert!(server.cache().get(get("k")).await.unwrap().into_inner().found);
}

/// Fetch and lock Acquire take a connection and then run their script on
/// it, each step bounded by `--redis-timeout` on its own; together they
/// must still answer UNAVAILABLE within one timeout, before a caller's
/// deadline of one and a half (the torture program saw them take two).
/// Here the service's connections are cut and Redis stalls, so each call
/// opens a connection against a Redis that does not answer.
#[tokio::test]
async fn fetch_and_acquire_fail_unavailable_within_one_redis_timeout() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--redis-timeout", "400ms", "--redis-connect-timeout", "5s"]).await;
    let (mut cache, mut locks) = (server.cache(), server.locks());
    let fetch = || {
        let mut request = tonic::Request::new(FetchRequest { key: "k".into(), fill_timeout: None, max_wait: None });
        request.set_timeout(Duration::from_millis(600));
        request
    };
    let acquire = || {
        let request = AcquireRequest { name: "l".into(), ttl: None, wait: None, owner: String::new() };
        let mut request = tonic::Request::new(request);
        request.set_timeout(Duration::from_millis(600));
        request
    };
    // Scripts loaded, as in a running service.
    assert_eq!(cache.fetch(fetch()).await.unwrap().into_inner().outcome, FetchOutcome::Fill as i32);
    let grant = locks.acquire(acquire()).await.unwrap().into_inner();
    let release = ReleaseRequest { name: "l".into(), lease_id: grant.lease_id };
    assert!(locks.release(release).await.unwrap().into_inner().released);

    let mut admin = redis.client().await;
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut admin)
        .await
        .unwrap();
    let stall = redis.stall(2.0).await;
    let status = cache.fetch(fetch()).await.expect_err("redis is stalled");
    assert_eq!(status.code(), Code::Unavailable, "fetch: {status:?}");
    let status = locks.acquire(acquire()).await.expect_err("redis is stalled");
    assert_eq!(status.code(), Code::Unavailable, "acquire: {status:?}");
    stall.await.unwrap();
}
