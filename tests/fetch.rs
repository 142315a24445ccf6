//! Fetch/Fill: the stampede guard.

mod common;

use std::time::Duration;

use cachecoord::proto::{
    AbandonFillRequest, DeleteRequest, FetchOutcome, FetchRequest, FetchResponse, FillRequest, GetRequest,
    InvalidateTagsRequest, SetRequest,
};
use common::{RedisServer, TestServer, assert_invalid, ms};

fn fetch(key: &str, fill_timeout_ms: u64, max_wait_ms: u64) -> FetchRequest {
    FetchRequest { key: key.into(), fill_timeout: ms(fill_timeout_ms), max_wait: ms(max_wait_ms) }
}

fn fill(key: &str, token: &str, value: &[u8]) -> FillRequest {
    FillRequest { key: key.into(), fill_token: token.into(), value: value.to_vec(), ..Default::default() }
}

fn outcome(response: &FetchResponse) -> FetchOutcome {
    FetchOutcome::try_from(response.outcome).expect("known outcome")
}

/// How many script calls Redis has executed (waiters make a known number
/// before they block, so this tells when they are all waiting).
async fn script_calls(redis: &RedisServer) -> u64 {
    redis.calls("evalsha").await
}

async fn wait_for_script_calls(redis: &RedisServer, at_least: u64) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while script_calls(redis).await < at_least {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("waiters never all arrived");
}

#[tokio::test]
async fn fifty_concurrent_fetches_make_exactly_one_filler_and_wake_the_rest() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    // Load the script first, so the call count below is exact.
    server.cache().fetch(fetch("warm-up", 1_000, 0)).await.unwrap();
    let baseline = script_calls(&redis).await;

    // The lease outlives max_wait, so a waiter can only see the value by being
    // woken: had notification failed, every waiter would answer TIMEOUT.
    let (done, mut results) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..50 {
        let mut cache = server.cache();
        let done = done.clone();
        tokio::spawn(async move {
            let _ = done.send(cache.fetch(fetch("hot", 30_000, 10_000)).await.unwrap().into_inner());
        });
    }
    // Only the filler answers before the fill.
    let first = results.recv().await.unwrap();
    assert_eq!(outcome(&first), FetchOutcome::Fill);

    // Each of the 49 others runs the fetch script twice (read, register, read
    // again) before it blocks: once Redis has seen those calls, all wait.
    wait_for_script_calls(&redis, baseline + 1 + 49 * 2).await;
    assert!(results.try_recv().is_err(), "nobody else answers before the fill");

    let stored = server.cache().fill(fill("hot", &first.fill_token, b"computed")).await.unwrap().into_inner().stored;
    assert!(stored);
    for _ in 0..49 {
        let response = results.recv().await.unwrap();
        assert_eq!(outcome(&response), FetchOutcome::Hit);
        assert_eq!(response.value, b"computed");
        assert!(response.ttl.is_some());
    }
}

#[tokio::test]
async fn hit_returns_the_value_without_a_lease() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    cache.set(SetRequest { key: "k".into(), value: b"v".to_vec(), ..Default::default() }).await.unwrap();
    let response = cache.fetch(fetch("k", 1_000, 1_000)).await.unwrap().into_inner();
    assert_eq!(outcome(&response), FetchOutcome::Hit);
    assert_eq!(response.value, b"v");
    assert!(response.fill_token.is_empty());
}

#[tokio::test]
async fn an_expired_lease_passes_to_a_waiter() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let first = cache.fetch(fetch("k", 100, 0)).await.unwrap().into_inner();
    assert_eq!(outcome(&first), FetchOutcome::Fill);
    // The first filler never fills; the waiter takes over once its lease ends.
    let second = cache.fetch(fetch("k", 5_000, 5_000)).await.unwrap().into_inner();
    assert_eq!(outcome(&second), FetchOutcome::Fill);
    assert_ne!(first.fill_token, second.fill_token);
    // The stale token no longer fills; the current one does.
    assert!(!cache.fill(fill("k", &first.fill_token, b"late")).await.unwrap().into_inner().stored);
    assert!(cache.fill(fill("k", &second.fill_token, b"fresh")).await.unwrap().into_inner().stored);
    let got = cache.get(GetRequest { key: "k".into() }).await.unwrap().into_inner();
    assert_eq!(got.value, b"fresh");
}

#[tokio::test]
async fn abandoning_a_lease_hands_it_to_a_waiter_at_once() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let first = cache.fetch(fetch("k", 60_000, 0)).await.unwrap().into_inner();
    assert_eq!(outcome(&first), FetchOutcome::Fill);

    // The waiter's max_wait is far shorter than the lease: only the hand-back
    // can give it the lease in time.
    let mut waiter_cache = server.cache();
    let waiter = tokio::spawn(async move { waiter_cache.fetch(fetch("k", 60_000, 5_000)).await.unwrap().into_inner() });
    wait_for_script_calls(&redis, 3).await;
    let released = cache
        .abandon_fill(AbandonFillRequest { key: "k".into(), fill_token: first.fill_token.clone() })
        .await
        .unwrap()
        .into_inner()
        .released;
    assert!(released);
    let second = waiter.await.unwrap();
    assert_eq!(outcome(&second), FetchOutcome::Fill);
    // Handing back twice, or a stranger's token, releases nothing.
    let again = cache.abandon_fill(AbandonFillRequest { key: "k".into(), fill_token: first.fill_token }).await;
    assert!(!again.unwrap().into_inner().released);
}

#[tokio::test]
async fn delete_set_and_invalidation_void_the_lease() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();

    let lease = cache.fetch(fetch("d", 60_000, 0)).await.unwrap().into_inner().fill_token;
    cache.delete(DeleteRequest { keys: vec!["d".into()] }).await.unwrap();
    assert!(!cache.fill(fill("d", &lease, b"stale")).await.unwrap().into_inner().stored);
    assert!(!cache.get(GetRequest { key: "d".into() }).await.unwrap().into_inner().found);

    let lease = cache.fetch(fetch("s", 60_000, 0)).await.unwrap().into_inner().fill_token;
    cache.set(SetRequest { key: "s".into(), value: b"newer".to_vec(), ..Default::default() }).await.unwrap();
    assert!(!cache.fill(fill("s", &lease, b"stale")).await.unwrap().into_inner().stored);
    assert_eq!(cache.get(GetRequest { key: "s".into() }).await.unwrap().into_inner().value, b"newer");

    // A lease on a key that a tag invalidation deletes: the Fill that follows
    // an invalidation of the (re-)written entry is refused.
    let lease = cache.fetch(fetch("t", 60_000, 0)).await.unwrap().into_inner().fill_token;
    let tagged = SetRequest { key: "t".into(), value: b"v".to_vec(), tags: vec!["g".into()], ..Default::default() };
    let fill_lease = cache.fetch(fetch("t2", 60_000, 0)).await.unwrap().into_inner().fill_token;
    let tagged_fill = FillRequest { tags: vec!["g".into()], ..fill("t2", &fill_lease, b"v") };
    assert!(cache.fill(tagged_fill).await.unwrap().into_inner().stored);
    cache.set(tagged).await.unwrap();
    assert!(!cache.fill(fill("t", &lease, b"stale")).await.unwrap().into_inner().stored);
    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["g".into()] }).await.unwrap();
    assert_eq!(invalidated.into_inner().invalidated, 2);
}

#[tokio::test]
async fn a_set_wakes_the_waiters_with_the_new_value() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let lease = cache.fetch(fetch("k", 60_000, 0)).await.unwrap();
    assert_eq!(outcome(lease.get_ref()), FetchOutcome::Fill);
    let mut waiter_cache = server.cache();
    let waiter =
        tokio::spawn(async move { waiter_cache.fetch(fetch("k", 60_000, 10_000)).await.unwrap().into_inner() });
    wait_for_script_calls(&redis, 3).await;
    cache.set(SetRequest { key: "k".into(), value: b"direct".to_vec(), ..Default::default() }).await.unwrap();
    let response = waiter.await.unwrap();
    assert_eq!(outcome(&response), FetchOutcome::Hit);
    assert_eq!(response.value, b"direct");
}

#[tokio::test]
async fn waiters_time_out_when_no_fill_lands() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    assert_eq!(outcome(&cache.fetch(fetch("k", 60_000, 0)).await.unwrap().into_inner()), FetchOutcome::Fill);
    // max_wait zero: answer at once.
    assert_eq!(outcome(&cache.fetch(fetch("k", 60_000, 0)).await.unwrap().into_inner()), FetchOutcome::Timeout);
    // A short max_wait.
    assert_eq!(outcome(&cache.fetch(fetch("k", 60_000, 50)).await.unwrap().into_inner()), FetchOutcome::Timeout);
    // The caller's deadline comes before max_wait: TIMEOUT, not DEADLINE_EXCEEDED.
    let mut request = tonic::Request::new(fetch("k", 60_000, 30_000));
    request.set_timeout(Duration::from_millis(300));
    assert_eq!(outcome(&cache.fetch(request).await.unwrap().into_inner()), FetchOutcome::Timeout);
}

#[tokio::test]
async fn a_fill_on_one_instance_wakes_waiters_on_another() {
    let redis = RedisServer::start().await;
    let one = TestServer::start(&redis).await;
    let two = TestServer::start_sibling(&redis, &one).await;
    let lease = one.cache().fetch(fetch("k", 60_000, 0)).await.unwrap().into_inner();
    assert_eq!(outcome(&lease), FetchOutcome::Fill);
    let mut cache_two = two.cache();
    let waiter = tokio::spawn(async move { cache_two.fetch(fetch("k", 60_000, 10_000)).await.unwrap().into_inner() });
    wait_for_script_calls(&redis, 3).await;
    assert!(one.cache().fill(fill("k", &lease.fill_token, b"shared")).await.unwrap().into_inner().stored);
    let response = waiter.await.unwrap();
    assert_eq!(outcome(&response), FetchOutcome::Hit);
    assert_eq!(response.value, b"shared");
}

#[tokio::test]
async fn fetch_and_fill_check_their_input() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    assert_invalid(cache.fetch(fetch("", 1_000, 0)).await, "key");
    assert_invalid(cache.fetch(fetch("k", 0, 0)).await, "fill_timeout: must be positive");
    let negative = Some(prost_types::Duration { seconds: -1, nanos: 0 });
    assert_invalid(cache.fetch(FetchRequest { max_wait: negative, ..fetch("k", 1_000, 0) }).await, "max_wait");
    assert_invalid(cache.fill(fill("k", "", b"v")).await, "fill_token");
    assert_invalid(cache.fill(fill("k", "t", &vec![0; (1 << 20) + 1])).await, "value");
    assert_invalid(
        cache.abandon_fill(AbandonFillRequest { key: "k".into(), fill_token: String::new() }).await,
        "fill_token",
    );
}

#[tokio::test]
async fn a_fetch_cancelled_while_redis_is_busy_leaves_no_lease_behind() {
    let redis = RedisServer::start().await;
    // A Redis timeout longer than the stall: the fetch script stays in flight
    // until the caller's deadline cancels the RPC.
    let server = TestServer::start_with(&redis, &["--redis-timeout", "5s"]).await;
    let mut cache = server.cache();
    // Load the scripts, as a running service has (else the stalled call fails
    // with NOSCRIPT and never runs).
    cache.fetch(fetch("warm-up", 1_000, 0)).await.unwrap();
    let stall = redis.stall(0.5).await;

    let mut request = tonic::Request::new(fetch("k", 60_000, 0));
    request.set_timeout(Duration::from_millis(100));
    let status = cache.fetch(request).await.expect_err("cancelled by its deadline");
    assert!(matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{status:?}");
    stall.await.unwrap();

    // Once Redis has run the queued script, the lease it granted to nobody is
    // handed back right behind it, waking waiters: the next caller gets the
    // lease well within its max_wait. Without the hand-back the orphaned lease
    // would hold it off for 60 s and it would answer TIMEOUT.
    let next = cache.fetch(fetch("k", 60_000, 5_000)).await.unwrap().into_inner();
    assert_eq!(outcome(&next), FetchOutcome::Fill);
}

#[tokio::test]
async fn a_waiter_answers_timeout_at_max_wait_even_while_redis_is_stalled() {
    let redis = RedisServer::start().await;
    // A Redis timeout far beyond max_wait: only the wait bound can end the call in time.
    let server = TestServer::start_with(&redis, &["--redis-timeout", "5s"]).await;
    let mut cache = server.cache();
    assert_eq!(outcome(&cache.fetch(fetch("k", 60_000, 0)).await.unwrap().into_inner()), FetchOutcome::Fill);
    let calls = script_calls(&redis).await;
    let mut waiter_cache = server.cache();
    let waiter = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let answer = waiter_cache.fetch(fetch("k", 60_000, 400)).await;
        (answer, started.elapsed())
    });
    // The waiter has read twice (found the lease, registered): it is asleep.
    wait_for_script_calls(&redis, calls + 2).await;
    // Redis stalls past the waiter's max_wait; its wake-up read then meets the
    // stall. Found by the torture program: the read ran to the Redis timeout,
    // so waiters answered up to seconds past max_wait.
    let stall = redis.stall(3.0).await;
    let (answer, took) = waiter.await.unwrap();
    assert_eq!(outcome(&answer.unwrap().into_inner()), FetchOutcome::Timeout);
    assert!(took < Duration::from_secs(2), "answered after {took:?}, during a 3 s stall");
    stall.await.unwrap();
}
