//! LockService: exclusion, fencing, hand-off, cancellation, Hold streams.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cachecoord::proto::{
    AcquireRequest, AcquireResponse, ExtendRequest, HoldEvent, HoldRequest, HoldResponse, InspectRequest,
    InspectResponse, ReleaseRequest, lock_service_client::LockServiceClient,
};
use common::{RedisServer, TestServer, assert_invalid, ms};
use deadpool_redis::redis;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, transport::Channel};

type Locks = LockServiceClient<Channel>;

fn acquire(name: &str, ttl_ms: u64, wait_ms: u64) -> AcquireRequest {
    AcquireRequest { name: name.into(), ttl: ms(ttl_ms), wait: ms(wait_ms), owner: String::new() }
}

fn owned(owner: &str, request: AcquireRequest) -> AcquireRequest {
    AcquireRequest { owner: owner.into(), ..request }
}

async fn take(locks: &mut Locks, request: AcquireRequest) -> AcquireResponse {
    locks.acquire(request).await.expect("acquire").into_inner()
}

async fn release(locks: &mut Locks, name: &str, lease_id: &str) -> bool {
    let request = ReleaseRequest { name: name.into(), lease_id: lease_id.into() };
    locks.release(request).await.expect("release").into_inner().released
}

async fn inspect(locks: &mut Locks, name: &str) -> InspectResponse {
    locks.inspect(InspectRequest { name: name.into() }).await.expect("inspect").into_inner()
}

fn as_std(d: Option<prost_types::Duration>) -> Duration {
    Duration::try_from(d.expect("duration set")).expect("non-negative")
}

/// A `valid_for` answered to a request sent at `sent`: the lease began
/// between the send and now, so it cannot last past `now + ttl`, and the
/// service keeps back no more than its drift margin (1% and 2 ms) plus the
/// time the call took.
#[track_caller]
fn assert_plausible_validity(valid_for: Option<prost_types::Duration>, sent: Instant, ttl: Duration) {
    let valid_for = as_std(valid_for);
    let took = sent.elapsed();
    assert!(valid_for <= took + ttl, "{valid_for:?} promises more than the lease can last");
    assert!(valid_for + took + ttl / 100 + Duration::from_millis(2) >= ttl, "{valid_for:?} keeps back too much");
}

/// How many script calls Redis has executed. A waiter runs the acquire
/// script exactly twice (try, register, try again) before it blocks, so
/// this tells when waiters are all waiting.
async fn script_calls(redis: &RedisServer) -> u64 {
    let mut conn = redis.client().await;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    info.lines()
        .find(|line| line.starts_with("cmdstat_evalsha:"))
        .and_then(|line| line.split("calls=").nth(1))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn wait_for_script_calls(redis: &RedisServer, at_least: u64) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while script_calls(redis).await < at_least {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("waiters never all arrived");
}

/// Loads every lock script, so that script call counts are exact from here.
async fn warm_up(locks: &mut Locks) {
    let grant = take(locks, acquire("warm-up", 1_000, 0)).await;
    locks
        .extend(ExtendRequest { name: "warm-up".into(), lease_id: grant.lease_id.clone(), ttl: ms(1_000) })
        .await
        .unwrap();
    inspect(locks, "warm-up").await;
    assert!(release(locks, "warm-up", &grant.lease_id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_tasks_never_overlap_and_tokens_rise_in_grant_order() {
    let redis = RedisServer::start().await;
    let one = TestServer::start(&redis).await;
    // Half the tasks go through a second instance: releases must wake
    // waiters across instances too.
    let two = TestServer::start_sibling(&redis, &one).await;

    #[derive(Default)]
    struct Record {
        /// [acquired, released] as the holder saw them, in grant order.
        intervals: Vec<(Instant, Instant)>,
        /// Fencing tokens in grant order.
        tokens: Vec<u64>,
    }
    let record = Arc::new(Mutex::new(Record::default()));
    let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..32 {
        let mut locks = if task % 2 == 0 { one.locks() } else { two.locks() };
        let (record, inside) = (Arc::clone(&record), Arc::clone(&inside));
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                // The lease outlives the whole run, so only releases hand the
                // lock on; waits are long and retried, since waiters are not
                // served in order.
                let grant = loop {
                    let grant = take(&mut locks, acquire("shared", 60_000, 30_000)).await;
                    if grant.acquired {
                        break grant;
                    }
                };
                let acquired = Instant::now();
                assert_eq!(inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0, "two holders at once");
                record.lock().unwrap().tokens.push(grant.fencing_token);
                tokio::task::yield_now().await;
                inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                let released = Instant::now();
                record.lock().unwrap().intervals.push((acquired, released));
                assert!(release(&mut locks, "shared", &grant.lease_id).await);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }

    let mut record = Arc::try_unwrap(record).ok().expect("tasks done").into_inner().unwrap();
    assert_eq!(record.tokens.len(), 32 * 50);
    assert!(record.tokens.windows(2).all(|w| w[0] < w[1]), "tokens must strictly increase in grant order");
    record.intervals.sort();
    for w in record.intervals.windows(2) {
        assert!(w[0].1 <= w[1].0, "holds overlap: {:?} and {:?}", w[0], w[1]);
    }
    assert!(!inspect(&mut one.locks(), "shared").await.held);
}

#[tokio::test]
async fn tokens_rise_after_release_after_expiry_and_after_data_loss() {
    let mut redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();

    let first = take(&mut locks, acquire("job", 30_000, 0)).await;
    assert!(first.acquired);
    assert!(first.fencing_token >= 1);
    assert!(release(&mut locks, "job", &first.lease_id).await);
    let second = take(&mut locks, acquire("job", 100, 0)).await;
    assert!(second.fencing_token > first.fencing_token, "after a release");
    // Its lease runs out while the next caller waits: it takes over then.
    let third = take(&mut locks, acquire("job", 30_000, 10_000)).await;
    assert!(third.acquired);
    assert!(third.fencing_token > second.fencing_token, "after an expiry");

    // Redis restarts without its data: the counter is gone, but the next
    // token is at least Redis's clock in microseconds, above all before.
    redis.restart().await;
    let mut conn = redis.client().await;
    let fence = format!("{}:lock:{{job}}:fence", server.prefix);
    let exists: bool = redis::cmd("EXISTS").arg(&fence).query_async(&mut conn).await.unwrap();
    assert!(!exists, "the data is gone");
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let fourth = retry_while_reconnecting(&mut locks, acquire("job", 30_000, 0)).await;
    assert!(fourth.acquired, "the lock was lost with the data");
    assert!(fourth.fencing_token > third.fencing_token, "after data loss");
    assert!(fourth.fencing_token >= secs * 1_000_000 + micros);
}

/// The first calls after a Redis restart may meet dropped connections.
async fn retry_while_reconnecting(locks: &mut Locks, request: AcquireRequest) -> AcquireResponse {
    for _ in 0..100 {
        match locks.acquire(request.clone()).await {
            Ok(response) => return response.into_inner(),
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("acquire: {status:?}"),
        }
    }
    panic!("service never reconnected to Redis");
}

#[tokio::test]
async fn the_counter_and_the_lease_survive_a_restart_with_data() {
    let mut redis = RedisServer::start_persistent().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    // A counter far ahead of the clock shows which of the two the next
    // token follows.
    let ahead: u64 = 4_000_000_000_000_000;
    let mut conn = redis.client().await;
    let fence = format!("{}:lock:{{job}}:fence", server.prefix);
    let () = redis::cmd("SET").arg(&fence).arg(ahead).query_async(&mut conn).await.unwrap();

    let first = take(&mut locks, owned("w1", acquire("job", 60_000, 0))).await;
    assert_eq!(first.fencing_token, ahead + 1);
    redis.restart().await;

    let held = loop {
        match locks.inspect(InspectRequest { name: "job".into() }).await {
            Ok(response) => break response.into_inner(),
            Err(status) if status.code() == Code::Unavailable => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(status) => panic!("inspect: {status:?}"),
        }
    };
    assert!(held.held, "the lease survived the restart");
    assert_eq!((held.owner.as_str(), held.fencing_token), ("w1", ahead + 1));
    assert!(release(&mut locks, "job", &first.lease_id).await);
    let second = take(&mut locks, acquire("job", 60_000, 0)).await;
    assert_eq!(second.fencing_token, ahead + 2, "the counter continues");
}

#[tokio::test]
async fn a_waiter_is_handed_the_lock_on_release_by_notification() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut holder = server.locks();
    warm_up(&mut holder).await;

    let mut latencies = Vec::with_capacity(200);
    for _ in 0..200 {
        // The holder's lease and the waiter's wait are both far longer than
        // the test: only the release can hand the lock on.
        let held = take(&mut holder, acquire("handoff", 60_000, 0)).await;
        assert!(held.acquired);
        let before = script_calls(&redis).await;
        let mut waiter_locks = server.locks();
        let waiter = tokio::spawn(async move {
            let response = take(&mut waiter_locks, acquire("handoff", 60_000, 30_000)).await;
            (Instant::now(), response)
        });
        wait_for_script_calls(&redis, before + 2).await;

        let released_at = Instant::now();
        assert!(release(&mut holder, "handoff", &held.lease_id).await);
        let (granted_at, granted) = waiter.await.unwrap();
        assert!(granted.acquired);
        assert!(granted.fencing_token > held.fencing_token);
        latencies.push(granted_at - released_at);
        assert!(release(&mut holder, "handoff", &granted.lease_id).await);
    }
    latencies.sort();
    println!(
        "lock hand-off at the gRPC client over {} releases: p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
        latencies[latencies.len() - 1],
    );
}

#[tokio::test]
async fn a_waiter_takes_over_when_the_lease_expires() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    let held = take(&mut locks, acquire("exp", 300, 0)).await;
    let started = Instant::now();
    // Woken only at the end of its 10 s wait, it would still get the lock
    // then: the bound tells the expiry timer from that.
    let next = tokio::time::timeout(Duration::from_secs(5), take(&mut locks, acquire("exp", 30_000, 10_000)))
        .await
        .expect("taken over when the lease ran out");
    assert!(next.acquired);
    assert!(next.fencing_token > held.fencing_token);
    // The wait counts: the lease began only when the waiter took over.
    assert_plausible_validity(next.valid_for, started, Duration::from_secs(30));
    assert!(as_std(next.valid_for) > Duration::from_secs(30) - Duration::from_millis(302), "the wait counts");
    println!("expiry hand-off: waited {:?} for a 300ms lease", started.elapsed());
    // The expired holder can no longer release or extend.
    assert!(!release(&mut locks, "exp", &held.lease_id).await);
}

#[tokio::test]
async fn shortening_a_lease_wakes_the_waiters() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    warm_up(&mut locks).await;
    let held = take(&mut locks, acquire("short", 60_000, 0)).await;
    let before = script_calls(&redis).await;
    let mut waiter_locks = server.locks();
    // The waiter read the 60 s expiry; it must learn of the new one, or it
    // would sleep past its 10 s wait.
    let waiter = tokio::spawn(async move { take(&mut waiter_locks, acquire("short", 60_000, 10_000)).await });
    wait_for_script_calls(&redis, before + 2).await;
    let extended = locks
        .extend(ExtendRequest { name: "short".into(), lease_id: held.lease_id.clone(), ttl: ms(50) })
        .await
        .unwrap()
        .into_inner();
    assert!(extended.extended);
    // Unwoken, it would sleep until its wait ends 10 s from now.
    let next = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken by the shortening");
    assert!(next.unwrap().acquired);
}

#[tokio::test]
async fn only_the_holder_can_release_or_extend() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    let sent = Instant::now();
    let held = take(&mut locks, owned("me", acquire("x", 10_000, 0))).await;
    assert!(held.acquired);
    assert_eq!(held.lease_id.len(), 32);
    assert_plausible_validity(held.valid_for, sent, Duration::from_secs(10));

    // A second caller, trying once, does not get it.
    let other = take(&mut locks, acquire("x", 10_000, 0)).await;
    assert_eq!((other.acquired, other.lease_id.as_str(), other.fencing_token, other.valid_for), (false, "", 0, None));

    let extend = |lease_id: &str, ttl| ExtendRequest { name: "x".into(), lease_id: lease_id.into(), ttl: ms(ttl) };
    let wrong = "0".repeat(32);
    assert!(!release(&mut locks, "x", &wrong).await);
    let refused = locks.extend(extend(&wrong, 60_000)).await.unwrap().into_inner();
    assert_eq!((refused.extended, refused.valid_for), (false, None));
    assert!(!release(&mut locks, "other-name", &held.lease_id).await);

    let extended = locks.extend(extend(&held.lease_id, 60_000)).await.unwrap().into_inner();
    assert!(extended.extended);
    assert!(as_std(extended.valid_for) > Duration::from_secs(50));
    let seen = inspect(&mut locks, "x").await;
    assert_eq!((seen.held, seen.owner.as_str(), seen.fencing_token), (true, "me", held.fencing_token));
    assert!(as_std(seen.ttl_remaining) > Duration::from_secs(50), "extended, same token");

    assert!(release(&mut locks, "x", &held.lease_id).await);
    assert!(!release(&mut locks, "x", &held.lease_id).await, "twice");
    assert!(!locks.extend(extend(&held.lease_id, 60_000)).await.unwrap().into_inner().extended);
    let seen = inspect(&mut locks, "x").await;
    assert_eq!((seen.held, seen.owner.as_str(), seen.fencing_token, seen.ttl_remaining), (false, "", 0, None));

    // An expired lease is not revived.
    let short = take(&mut locks, acquire("x", 20, 0)).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while inspect(&mut locks, "x").await.held {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("lease expires");
    assert!(!locks.extend(extend(&short.lease_id, 60_000)).await.unwrap().into_inner().extended);
    assert!(!inspect(&mut locks, "x").await.held);
}

#[tokio::test]
async fn waiters_that_give_up_never_end_up_holding_the_lock() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    warm_up(&mut locks).await;
    let held = take(&mut locks, acquire("c", 60_000, 0)).await;
    let before = script_calls(&redis).await;

    // Ten waiters whose deadline passes, ten whose callers cancel.
    let mut deadlined = Vec::new();
    for i in 0..10 {
        let mut client = server.locks();
        deadlined.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(owned(&format!("deadline-{i}"), acquire("c", 60_000, 30_000)));
            request.set_timeout(Duration::from_millis(1_000));
            client.acquire(request).await
        }));
    }
    let mut cancelled = Vec::new();
    for i in 0..10 {
        let mut client = server.locks();
        cancelled.push(tokio::spawn(async move {
            client.acquire(owned(&format!("cancelled-{i}"), acquire("c", 60_000, 30_000))).await
        }));
    }
    wait_for_script_calls(&redis, before + 20 * 2).await;
    for task in &cancelled {
        task.abort();
    }
    for task in deadlined {
        match task.await.unwrap() {
            Ok(response) => assert!(!response.into_inner().acquired),
            // The client's timer says DEADLINE_EXCEEDED, the server's CANCELLED.
            Err(status) => assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}"),
        }
    }
    for task in cancelled {
        assert!(task.await.unwrap_err().is_cancelled());
    }

    // A live waiter joins; on release the lock goes to it (a given-up waiter
    // holding it would keep it for 60 s, past the live waiter's wait).
    let mut live_locks = server.locks();
    let before = script_calls(&redis).await;
    let live = tokio::spawn(async move { take(&mut live_locks, owned("live", acquire("c", 60_000, 20_000))).await });
    wait_for_script_calls(&redis, before + 2).await;
    assert!(release(&mut locks, "c", &held.lease_id).await);
    let live = live.await.unwrap();
    assert!(live.acquired);
    let seen = inspect(&mut locks, "c").await;
    assert_eq!((seen.owner.as_str(), seen.fencing_token), ("live", live.fencing_token));
    assert!(release(&mut locks, "c", &live.lease_id).await);
    assert!(!inspect(&mut locks, "c").await.held, "free: nobody else took it");
}

#[tokio::test]
async fn a_grant_whose_caller_left_mid_attempt_is_released() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    warm_up(&mut locks).await;

    // Redis holds back scripts (writes) for a while; the acquire script
    // queues, and the caller's deadline passes before its reply: the script
    // then grants the lock to a caller that is gone.
    let mut conn = redis.client().await;
    let () = redis::cmd("CLIENT").arg("PAUSE").arg(1_000).arg("WRITE").query_async(&mut conn).await.unwrap();
    let mut request = tonic::Request::new(owned("gone", acquire("m", 60_000, 0)));
    request.set_timeout(Duration::from_millis(300));
    let status = locks.acquire(request).await.expect_err("the caller gives up first");
    // The server's deadline timer answers CANCELLED, the client's DEADLINE_EXCEEDED.
    assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");

    // The grant was released in the background, right after it was made.
    tokio::time::timeout(Duration::from_secs(5), async {
        while inspect(&mut locks, "m").await.held {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the orphaned grant is released, long before its 60 s lease");
    let fence = format!("{}:lock:{{m}}:fence", server.prefix);
    let issued: u64 = redis::cmd("GET").arg(&fence).query_async(&mut conn).await.unwrap();
    assert!(issued > 0, "the acquire script did run and grant");
}

/// Opens a Hold stream; returns the request sender (drop it to close) and
/// the events.
async fn hold(
    locks: &mut Locks,
    request: HoldRequest,
) -> Result<(mpsc::Sender<HoldRequest>, Streaming<HoldResponse>), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(request).await.unwrap();
    let events = locks.hold(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, events))
}

fn hold_request(name: &str, ttl_ms: u64, wait_ms: u64) -> HoldRequest {
    HoldRequest { name: name.into(), ttl: ms(ttl_ms), wait: ms(wait_ms), owner: "holder".into() }
}

async fn next_event(events: &mut Streaming<HoldResponse>) -> HoldResponse {
    tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("an event in time")
        .expect("stream ok")
        .expect("stream not ended")
}

fn event(response: &HoldResponse) -> HoldEvent {
    HoldEvent::try_from(response.event).expect("known event")
}

#[tokio::test]
async fn a_hold_outlives_many_ttls_and_releases_when_closed() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    let sent = Instant::now();
    let (tx, mut events) = hold(&mut locks, hold_request("h", 300, 0)).await.unwrap();
    let acquired = next_event(&mut events).await;
    assert_eq!((event(&acquired), acquired.acquired), (HoldEvent::Acquired, true));
    assert!(acquired.fencing_token > 0 && !acquired.lease_id.is_empty());
    assert_plausible_validity(acquired.valid_for, sent, Duration::from_millis(300));

    // Twenty renewals every 100 ms: about seven TTLs.
    let started = Instant::now();
    for _ in 0..20 {
        let renewed = next_event(&mut events).await;
        assert_eq!((event(&renewed), renewed.acquired), (HoldEvent::Renewed, true));
        assert_eq!(
            (renewed.lease_id.as_str(), renewed.fencing_token),
            (acquired.lease_id.as_str(), acquired.fencing_token)
        );
        assert!(as_std(renewed.valid_for) <= Duration::from_millis(300));
    }
    assert!(started.elapsed() > Duration::from_millis(1_900), "renewals follow ttl/3, not faster");
    let seen = inspect(&mut locks, "h").await;
    assert_eq!((seen.held, seen.owner.as_str(), seen.fencing_token), (true, "holder", acquired.fencing_token));
    assert!(!take(&mut locks, acquire("h", 1_000, 0)).await.acquired);

    // Closing the sending side releases before the stream ends.
    drop(tx);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.message()).await.expect("ends in time") {
            Ok(Some(renewed)) => assert_eq!(event(&renewed), HoldEvent::Renewed),
            Ok(None) => break,
            Err(status) => panic!("stream should end with OK: {status:?}"),
        }
    }
    assert!(!inspect(&mut locks, "h").await.held, "released at once");
}

#[tokio::test]
async fn a_broken_hold_stream_releases_at_once() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    warm_up(&mut locks).await;
    let (tx, mut events) = hold(&mut locks, hold_request("b", 60_000, 0)).await.unwrap();
    let acquired = next_event(&mut events).await;
    assert_eq!(event(&acquired), HoldEvent::Acquired);

    let before = script_calls(&redis).await;
    let mut waiter_locks = server.locks();
    let waiter = tokio::spawn(async move { take(&mut waiter_locks, acquire("b", 60_000, 20_000)).await });
    wait_for_script_calls(&redis, before + 2).await;
    // The client goes away without closing properly: the call is cancelled.
    drop(events);
    drop(tx);
    let next = waiter.await.unwrap();
    assert!(next.acquired, "a 60 s lease was handed on: the broken stream released it");
    assert!(next.fencing_token > acquired.fencing_token);
}

#[tokio::test]
async fn a_hold_reports_a_lost_lease_at_once() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    let (_tx, mut events) = hold(&mut locks, hold_request("lost", 300, 0)).await.unwrap();
    assert_eq!(event(&next_event(&mut events).await), HoldEvent::Acquired);
    let mut conn = redis.client().await;
    let () = redis::cmd("DEL").arg(format!("{}:lock:{{lost}}", server.prefix)).query_async(&mut conn).await.unwrap();
    let lost = loop {
        let response = next_event(&mut events).await;
        if event(&response) != HoldEvent::Renewed {
            break response;
        }
    };
    assert_eq!((event(&lost), lost.acquired, lost.valid_for), (HoldEvent::Lost, false, None));
    assert!(events.message().await.expect("ends with OK").is_none());
}

#[tokio::test]
async fn a_hold_that_cannot_acquire_or_gets_a_second_request_ends() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    let held = take(&mut locks, acquire("n", 60_000, 0)).await;
    let (_tx, mut events) = hold(&mut locks, hold_request("n", 1_000, 50)).await.unwrap();
    let refused = next_event(&mut events).await;
    assert_eq!((event(&refused), refused.acquired, refused.fencing_token), (HoldEvent::NotAcquired, false, 0));
    assert!(refused.lease_id.is_empty() && refused.valid_for.is_none());
    assert!(events.message().await.expect("ends with OK").is_none());
    assert!(release(&mut locks, "n", &held.lease_id).await);

    let (tx, mut events) = hold(&mut locks, hold_request("n", 60_000, 0)).await.unwrap();
    assert_eq!(event(&next_event(&mut events).await), HoldEvent::Acquired);
    tx.send(hold_request("n", 60_000, 0)).await.unwrap();
    let status = events.message().await.expect_err("a second request is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(!inspect(&mut locks, "n").await.held, "and the lock released");
}

#[tokio::test]
async fn bad_input_is_rejected_and_writes_nothing() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    let long = "n".repeat(513);
    let max = "n".repeat(512);
    let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
    let month = 30 * 24 * 3600;

    assert_invalid(locks.acquire(acquire("", 1_000, 0)).await, "name: must not be empty");
    assert_invalid(locks.acquire(acquire(&long, 1_000, 0)).await, "name: must be at most 512 bytes");
    assert_invalid(locks.acquire(AcquireRequest { ttl: d(0, 0), ..acquire("a", 0, 0) }).await, "ttl: must be positive");
    assert_invalid(
        locks.acquire(AcquireRequest { ttl: d(0, 999_999), ..acquire("a", 0, 0) }).await,
        "ttl: must be at least 1ms",
    );
    assert_invalid(locks.acquire(AcquireRequest { ttl: d(-1, 0), ..acquire("a", 0, 0) }).await, "ttl");
    assert_invalid(
        locks.acquire(AcquireRequest { ttl: d(month, 1), ..acquire("a", 0, 0) }).await,
        "ttl: must be at most",
    );
    assert_invalid(locks.acquire(AcquireRequest { wait: d(-1, 0), ..acquire("a", 1_000, 0) }).await, "wait");
    assert_invalid(
        locks.acquire(AcquireRequest { wait: d(month, 1), ..acquire("a", 1_000, 0) }).await,
        "wait: must be at most",
    );
    assert_invalid(locks.acquire(owned(&long, acquire("a", 1_000, 0))).await, "owner: must be at most 512 bytes");
    assert_invalid(locks.release(ReleaseRequest { name: "a".into(), lease_id: String::new() }).await, "lease_id");
    assert_invalid(locks.release(ReleaseRequest { name: String::new(), lease_id: "l".into() }).await, "name");
    let extend = ExtendRequest { name: "a".into(), lease_id: "l".into(), ttl: d(0, 999_999) };
    assert_invalid(locks.extend(extend.clone()).await, "ttl: must be at least 1ms");
    assert_invalid(locks.extend(ExtendRequest { lease_id: String::new(), ..extend.clone() }).await, "lease_id");
    assert_invalid(locks.extend(ExtendRequest { name: long.clone(), ..extend }).await, "name");
    assert_invalid(locks.inspect(InspectRequest { name: String::new() }).await, "name");
    assert_invalid(hold(&mut locks, hold_request("", 1_000, 0)).await, "name: must not be empty");
    assert_invalid(hold(&mut locks, HoldRequest { ttl: d(0, 999_999), ..hold_request("a", 0, 0) }).await, "ttl");
    assert_invalid(hold(&mut locks, HoldRequest { wait: d(-1, 0), ..hold_request("a", 1_000, 0) }).await, "wait");

    // Nothing was written for any of them.
    let mut conn = redis.client().await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{}:*", server.prefix)).query_async(&mut conn).await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");

    // The boundaries themselves are accepted.
    let edge = AcquireRequest { ttl: d(month, 0), wait: d(month, 0), owner: max.clone(), name: max.clone() };
    let grant = take(&mut locks, edge).await;
    assert!(grant.acquired);
    assert_eq!(inspect(&mut locks, &max).await.owner, max);
    let tiny = take(&mut locks, AcquireRequest { ttl: d(0, 1_000_000), ..acquire("tiny", 0, 0) }).await;
    assert!(tiny.acquired);
    // No TTL means the default, 30 s.
    let default = take(&mut locks, AcquireRequest { ttl: None, ..acquire("default", 0, 0) }).await;
    let ttl = as_std(inspect(&mut locks, "default").await.ttl_remaining);
    assert!(default.acquired && ttl > Duration::from_secs(25) && ttl <= Duration::from_secs(30), "{ttl:?}");
}

#[tokio::test]
async fn shutdown_releases_held_streams_and_ends_waits() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let other = TestServer::start_sibling(&redis, &server).await;
    let mut locks = server.locks();
    let (_tx, mut events) = hold(&mut locks, hold_request("s", 60_000, 0)).await.unwrap();
    assert_eq!(event(&next_event(&mut events).await), HoldEvent::Acquired);
    let before = script_calls(&redis).await;
    let mut waiter_locks = server.locks();
    let waiter = tokio::spawn(async move { waiter_locks.acquire(acquire("s", 60_000, 30_000)).await });
    wait_for_script_calls(&redis, before + 2).await;

    server.shutdown().await;
    let status = events.message().await.expect_err("the stream ends with UNAVAILABLE");
    assert_eq!(status.code(), Code::Unavailable);
    // The waiter gave up rather than taking the lock the stream let go of.
    assert!(!waiter.await.unwrap().expect("answered").into_inner().acquired);
    assert!(!inspect(&mut other.locks(), "s").await.held, "released, not left to expire");
}

#[tokio::test]
async fn without_redis_calls_are_unavailable_and_a_hold_is_lost_when_its_lease_runs_out() {
    let mut redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut locks = server.locks();
    let (_tx, mut events) = hold(&mut locks, hold_request("r", 300, 0)).await.unwrap();
    assert_eq!(event(&next_event(&mut events).await), HoldEvent::Acquired);

    redis.stop();
    let status = locks.acquire(acquire("other", 1_000, 0)).await.expect_err("no Redis");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(locks.inspect(InspectRequest { name: "r".into() }).await.unwrap_err().code(), Code::Unavailable);
    // Renewals fail; once the last confirmed validity is over, the holder
    // must stop: the lease may have expired in Redis.
    let lost = loop {
        let response = next_event(&mut events).await;
        if event(&response) != HoldEvent::Renewed {
            break response;
        }
    };
    assert_eq!((event(&lost), lost.acquired), (HoldEvent::Lost, false));
    assert!(events.message().await.expect("ends with OK").is_none());
}
