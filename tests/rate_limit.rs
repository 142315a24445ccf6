//! RateLimitService behaviour against a real Redis: exactness under
//! concurrency, all-or-nothing, the reported times against Redis TIME,
//! expiry, faults and bad input.

mod common;

use std::time::{Duration, Instant};

use cachecoord::proto::{
    Algorithm, CheckRequest, CheckResponse, Limit, ResetLimitsRequest,
    rate_limit_service_client::RateLimitServiceClient,
};
use common::{RedisServer, TestServer, assert_invalid, ms};
use deadpool_redis::redis::{self, AsyncCommands, aio::MultiplexedConnection};
use tonic::transport::Channel;

const DAY_MS: u64 = 24 * 3600 * 1000;
/// A period so long that a test never sees its window end (windows are
/// aligned to the epoch; a 30-day boundary falls in a test run about once
/// in a million runs, and the tests that care check for it).
const MONTH_MS: u64 = 30 * DAY_MS;

fn limit(key: &str, limit: u64, period_ms: u64, algorithm: Algorithm) -> Limit {
    Limit { key: key.into(), limit, period: ms(period_ms), algorithm: algorithm.into(), burst: None }
}

fn bucket(key: &str, limit: u64, period_ms: u64, burst: u64) -> Limit {
    Limit { burst: Some(burst), ..self::limit(key, limit, period_ms, Algorithm::TokenBucket) }
}

fn request(limits: Vec<Limit>) -> CheckRequest {
    CheckRequest { limits, cost: None, peek: false }
}

fn with_cost(limits: Vec<Limit>, cost: u64) -> CheckRequest {
    CheckRequest { limits, cost: Some(cost), peek: false }
}

fn peek(limits: Vec<Limit>) -> CheckRequest {
    CheckRequest { limits, cost: None, peek: true }
}

async fn check(client: &mut RateLimitServiceClient<Channel>, request: CheckRequest) -> CheckResponse {
    client.check(request).await.expect("check").into_inner()
}

/// A duration the service reported, in whole milliseconds (asserting it is
/// whole: the service counts in milliseconds).
fn millis(d: &Option<prost_types::Duration>) -> u64 {
    let d = d.expect("duration present");
    assert_eq!(d.nanos % 1_000_000, 0, "{d:?} is not whole milliseconds");
    d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000
}

/// Redis's clock, in Unix milliseconds: the only clock the service uses.
async fn redis_now(conn: &mut MultiplexedConnection) -> u64 {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    seconds * 1000 + micros / 1000
}

/// Runs `f` and returns its result with Redis times read just before and
/// just after: the script's `now` lies in [before, after].
async fn bracketed<T>(conn: &mut MultiplexedConnection, f: impl std::future::Future<Output = T>) -> (T, u64, u64) {
    let before = redis_now(conn).await;
    let out = f.await;
    let after = redis_now(conn).await;
    (out, before, after)
}

/// Waits (polling Redis TIME) until at least `margin_ms` remain in the
/// current window of `period_ms`, so a bracketed call stays in one window.
async fn settle_in_window(conn: &mut MultiplexedConnection, period_ms: u64, margin_ms: u64) {
    for _ in 0..1000 {
        if period_ms - redis_now(conn).await % period_ms > margin_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("window never settled");
}

/// When `key` expires, in Redis Unix ms (PTTL and TIME read atomically).
async fn expires_at(conn: &mut MultiplexedConnection, key: &str) -> u64 {
    let script = redis::Script::new("local t = redis.call('TIME') return {redis.call('PTTL', KEYS[1]), t[1], t[2]}");
    let (pttl, seconds, micros): (i64, u64, u64) = script.key(key).invoke_async(conn).await.expect("PTTL");
    let pttl = u64::try_from(pttl).unwrap_or_else(|_| panic!("{key} has no expiry: {pttl}"));
    seconds * 1000 + micros / 1000 + pttl
}

async fn state_keys(redis: &RedisServer, server: &TestServer) -> Vec<String> {
    let mut conn = redis.client().await;
    let mut keys: Vec<String> = conn.keys(format!("{}:*", server.prefix)).await.expect("KEYS");
    keys.sort();
    keys
}

fn state_key(server: &TestServer, letter: char, key: &str) -> String {
    format!("{}:rl:{letter}:{key}", server.prefix)
}

/// 64 tasks x 10 checks on one limit; returns how many were allowed.
async fn hammer(server: &TestServer, limit: Limit) -> usize {
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut client = server.rate_limit();
            let limit = limit.clone();
            tokio::spawn(async move {
                let mut allowed = 0;
                for _ in 0..10 {
                    if check(&mut client, request(vec![limit.clone()])).await.allowed {
                        allowed += 1;
                    }
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.expect("task");
    }
    let elapsed = started.elapsed();
    println!(
        "{:?}: 640 checks from 64 tasks in {elapsed:?} ({:.0} checks/s, debug build)",
        limit.algorithm(),
        640.0 / elapsed.as_secs_f64()
    );
    allowed
}

#[tokio::test]
async fn fixed_window_admits_exactly_its_allowance_under_concurrency() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut conn = redis.client().await;
    let (allowed, before, after) =
        bracketed(&mut conn, hammer(&server, limit("hot", 100, MONTH_MS, Algorithm::FixedWindow))).await;
    if before / MONTH_MS == after / MONTH_MS {
        assert_eq!(allowed, 100);
    } else {
        assert!(allowed <= 200, "two windows admit at most twice the limit: {allowed}");
    }
}

#[tokio::test]
async fn token_bucket_admits_exactly_its_allowance_under_concurrency() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    // Refills one unit per 7.2 h: nothing refills during the test.
    assert_eq!(hammer(&server, limit("hot", 100, MONTH_MS, Algorithm::TokenBucket)).await, 100);
    // A burst of 30 on a limit of 100 per month: exactly the burst.
    assert_eq!(hammer(&server, bucket("burst", 100, MONTH_MS, 30)).await, 30);
}

#[tokio::test]
async fn sliding_window_never_admits_more_than_the_limit_in_the_first_period() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut conn = redis.client().await;
    let (allowed, before, after) =
        bracketed(&mut conn, hammer(&server, limit("hot", 100, MONTH_MS, Algorithm::SlidingWindow))).await;
    if before / MONTH_MS == after / MONTH_MS {
        assert_eq!(allowed, 100);
    } else {
        assert!(allowed <= 200, "{allowed}");
    }
    // Unspecified is the sliding window: same state key.
    let mut client = server.rate_limit();
    check(&mut client, request(vec![limit("u", 100, MONTH_MS, Algorithm::Unspecified)])).await;
    assert!(state_keys(&redis, &server).await.contains(&state_key(&server, 's', "u")));
}

#[tokio::test]
async fn a_denial_by_any_limit_consumes_no_limit() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let limits = || {
        vec![
            limit("{u1}:fixed", 10, MONTH_MS, Algorithm::FixedWindow),
            limit("{u1}:sliding", 10, MONTH_MS, Algorithm::SlidingWindow),
            bucket("{u1}:bucket", 10, MONTH_MS, 10),
            limit("{u1}:tight", 2, MONTH_MS, Algorithm::FixedWindow),
        ]
    };
    for remaining in [1, 0] {
        let response = check(&mut client, request(limits())).await;
        assert!(response.allowed);
        assert_eq!(response.statuses[3].remaining, remaining);
    }
    let mut conn = redis.client().await;
    let mut snapshot = Vec::new();
    for key in state_keys(&redis, &server).await {
        let state: Vec<(String, String)> = conn.hgetall(&key).await.expect("HGETALL");
        snapshot.push((key, state));
    }
    assert_eq!(snapshot.len(), 4);

    let response = check(&mut client, request(limits())).await;
    assert!(!response.allowed);
    let allowed: Vec<bool> = response.statuses.iter().map(|s| s.allowed).collect();
    assert_eq!(allowed, [true, true, true, false]);
    // Nothing consumed: the others still report 8 left, and the stored
    // state is byte for byte what it was.
    for status in &response.statuses[..3] {
        assert_eq!(status.remaining, 8, "{status:?}");
    }
    assert_eq!(response.statuses[3].remaining, 0);
    for (key, state) in snapshot {
        let now: Vec<(String, String)> = conn.hgetall(&key).await.expect("HGETALL");
        assert_eq!(now, state, "{key} changed");
    }
    // Statuses come back in request order, with their keys.
    let keys: Vec<&str> = response.statuses.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["{u1}:fixed", "{u1}:sliding", "{u1}:bucket", "{u1}:tight"]);
}

#[tokio::test]
async fn cost_takes_several_units_and_remaining_counts_down() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow, Algorithm::TokenBucket] {
        let l = || vec![limit("k", 10, MONTH_MS, algorithm)];
        for remaining in [7, 4, 1] {
            let response = check(&mut client, with_cost(l(), 3)).await;
            assert!(response.allowed, "{algorithm:?}");
            assert_eq!(response.statuses[0].remaining, remaining, "{algorithm:?}");
            assert_eq!(millis(&response.retry_after), 0);
        }
        let denied = check(&mut client, with_cost(l(), 3)).await;
        assert!(!denied.allowed, "{algorithm:?}");
        assert_eq!(denied.statuses[0].remaining, 1, "a denial consumes nothing");
        assert!(millis(&denied.retry_after) > 0);
        assert_eq!(denied.retry_after, denied.statuses[0].retry_after);
        let last = check(&mut client, request(l())).await;
        assert!(last.allowed, "{algorithm:?}: one unit still fits");
        assert_eq!(last.statuses[0].remaining, 0);
    }
}

#[tokio::test]
async fn peek_reports_and_consumes_nothing() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let limits = || {
        vec![
            limit("a", 3, MONTH_MS, Algorithm::FixedWindow),
            limit("b", 3, MONTH_MS, Algorithm::SlidingWindow),
            limit("c", 3, MONTH_MS, Algorithm::TokenBucket),
        ]
    };
    for _ in 0..5 {
        let response = check(&mut client, peek(limits())).await;
        assert!(response.allowed);
        for status in &response.statuses {
            assert_eq!(status.remaining, 3, "{status:?}");
            assert_eq!(millis(&status.reset_after), 0, "an untouched limit is already full");
        }
    }
    assert!(state_keys(&redis, &server).await.is_empty(), "peek wrote state");

    check(&mut client, with_cost(limits(), 3)).await;
    let response = check(&mut client, peek(limits())).await;
    assert!(!response.allowed);
    for status in &response.statuses {
        assert_eq!(status.remaining, 0);
        assert!(millis(&status.retry_after) > 0);
    }
}

#[tokio::test]
async fn fixed_window_times_match_redis_time() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let mut conn = redis.client().await;
    let period = 10_000;
    settle_in_window(&mut conn, period, 1000).await;
    let l = || vec![limit("w", 2, period, Algorithm::FixedWindow)];
    let (first, before, after) = bracketed(&mut conn, check(&mut client, request(l()))).await;
    let window_end = (before / period + 1) * period;
    let reset = millis(&first.statuses[0].reset_after);
    assert!((window_end - after..=window_end - before).contains(&reset), "{reset} vs [{before}, {after}]");
    check(&mut client, request(l())).await;
    let (denied, before, after) = bracketed(&mut conn, check(&mut client, request(l()))).await;
    assert!(!denied.allowed);
    let retry = millis(&denied.retry_after);
    assert!((window_end - after..=window_end - before).contains(&retry), "retry {retry}");
    assert_eq!(millis(&denied.statuses[0].reset_after), retry, "the window's end is both");
}

#[tokio::test]
async fn token_bucket_times_match_redis_time_and_retry_after_is_when_it_passes() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let mut conn = redis.client().await;
    // 5 per second (one unit per 200 ms), burst 5.
    let l = || vec![limit("b", 5, 1000, Algorithm::TokenBucket)];
    let (full, t1, t1_late) = bracketed(&mut conn, check(&mut client, with_cost(l(), 5))).await;
    assert!(full.allowed);
    assert_eq!(full.statuses[0].remaining, 0);
    assert_eq!(millis(&full.statuses[0].reset_after), 1000, "empty bucket: 5 units x 200 ms to full");

    // Polls with peeks until the request passes. Each denial at script time
    // n says it passes at n + retry_after; with n bracketed, every answer
    // must agree on one instant, and the first allowed peek comes at or after it.
    let mut earliest = 0;
    let mut latest = u64::MAX;
    let mut denials = 0;
    loop {
        let (response, before, after) = bracketed(&mut conn, check(&mut client, peek(l()))).await;
        let status = &response.statuses[0];
        if response.allowed {
            assert!(after >= earliest, "allowed before the announced instant");
            assert_eq!(millis(&status.retry_after), 0);
            break;
        }
        denials += 1;
        let retry = millis(&status.retry_after);
        earliest = earliest.max(before + retry);
        latest = latest.min(after + retry);
        assert!(earliest <= latest, "answers disagree on when it passes");
        assert_eq!(status.remaining, 0);
        // Full again 4 units after the next one passes.
        assert_eq!(millis(&status.reset_after), retry + 800, "{status:?}");
        assert!(before < t1 + 400, "never passed");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert!(denials > 0);
    // It passes 200 ms after the bucket was emptied, at some instant in [t1, t1_late].
    assert!(earliest <= t1_late + 200 && latest >= t1 + 200, "[{earliest}, {latest}] vs [{t1}, {t1_late}]");
}

#[tokio::test]
async fn token_bucket_holds_burst_and_refills_limit_per_period() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    // Burst above the rate: 6 at once, then one unit per 500 ms.
    let big = || vec![bucket("big", 2, 1000, 6)];
    let response = check(&mut client, with_cost(big(), 6)).await;
    assert!(response.allowed);
    assert_eq!(response.statuses[0].remaining, 0);
    assert_eq!(millis(&response.statuses[0].reset_after), 3000, "6 units x 500 ms");
    let response = check(&mut client, peek(big())).await;
    let status = &response.statuses[0];
    assert!(!response.allowed);
    // Both count down from the same instant: full in 3000 - t, next unit in 500 - t.
    assert_eq!(millis(&status.retry_after) + 2500, millis(&status.reset_after), "{status:?}");

    // Burst below the rate: one at a time, one unit per 100 ms.
    let small = || vec![bucket("small", 10, 1000, 1)];
    assert!(check(&mut client, request(small())).await.allowed);
    let response = check(&mut client, request(small())).await;
    let status = &response.statuses[0];
    assert!(!response.allowed);
    assert_eq!(status.retry_after, status.reset_after, "{status:?}");
    assert!((1..=100).contains(&millis(&status.retry_after)), "{status:?}");
}

#[tokio::test]
async fn sliding_window_weights_the_previous_window() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let mut conn = redis.client().await;
    let period = 10_000;
    let key = state_key(&server, 's', "s");
    let l = || vec![limit("s", 100, period, Algorithm::SlidingWindow)];
    settle_in_window(&mut conn, period, 1000).await;

    // Previous window full (100), current holds 50: a unit passes once the
    // previous window's weight has fallen to 49%, at 51% of this window.
    let window = redis_now(&mut conn).await / period;
    let _: () = conn.hset_multiple(&key, &[("w", window), ("c", 50), ("p", 100)]).await.unwrap();
    let (response, before, after) = bracketed(&mut conn, check(&mut client, peek(l()))).await;
    let (ea, eb) = (before % period, after % period);
    let status = &response.statuses[0];
    // reset_after: the current window's count stops counting at the end of the next window.
    let e = 2 * period - millis(&status.reset_after);
    assert!((ea..=eb).contains(&e), "reset {status:?} vs e in [{ea}, {eb}]");
    if response.allowed {
        // remaining = floor(100 e / period) - 50 (units that still fit)
        assert_eq!(status.remaining, e * 100 / period - 50, "{status:?}");
    } else {
        assert_eq!(millis(&status.retry_after), 5100 - e, "{status:?}");
        assert_eq!(status.remaining, 0);
    }

    // The current window full (100) and no previous: a unit passes in the
    // next window once this window's weight has fallen to 99%: 1% in.
    let _: () = conn.hset_multiple(&key, &[("w", window), ("c", 100), ("p", 0)]).await.unwrap();
    let (response, before, after) = bracketed(&mut conn, check(&mut client, request(l()))).await;
    assert!(!response.allowed);
    let retry = millis(&response.retry_after);
    // reset_after (2 x period - e) gives the script's exact e.
    let e = 2 * period - millis(&response.statuses[0].reset_after);
    assert!((before % period..=after % period).contains(&e), "{response:?}");
    assert_eq!(retry, period - e + period / 100, "{response:?}");

    // The previous window full and the current empty: within the first 1%
    // of the window nothing fits; later, the share that has passed.
    let _: () = conn.hset_multiple(&key, &[("w", window - 1), ("c", 100), ("p", 0)]).await.unwrap();
    let (response, before, after) = bracketed(&mut conn, check(&mut client, peek(l()))).await;
    let status = &response.statuses[0];
    let e = period - millis(&status.reset_after);
    assert!((before % period..=after % period).contains(&e), "{status:?}");
    assert_eq!(status.remaining, e * 100 / period, "{status:?}");
}

#[tokio::test]
async fn two_instances_give_identical_decisions_on_one_key() {
    let redis = RedisServer::start().await;
    let a = TestServer::start(&redis).await;
    let b = TestServer::start_sibling(&redis, &a).await;
    let mut clients = [a.rate_limit(), b.rate_limit()];
    for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow, Algorithm::TokenBucket] {
        let l = || vec![limit("shared", 10, MONTH_MS, algorithm)];
        for (i, remaining) in (0..10).rev().enumerate() {
            let response = check(&mut clients[i % 2], request(l())).await;
            assert!(response.allowed, "{algorithm:?} #{i}");
            assert_eq!(response.statuses[0].remaining, remaining, "{algorithm:?} #{i}");
        }
        let from_a = check(&mut clients[0], peek(l())).await;
        let from_b = check(&mut clients[1], peek(l())).await;
        assert!(!from_a.allowed && !from_b.allowed, "{algorithm:?}");
        // Same clock: the two answers differ by no more than the time between them.
        let (ra, rb) = (millis(&from_a.retry_after), millis(&from_b.retry_after));
        assert!(ra >= rb && ra - rb < 1000, "{algorithm:?}: {ra} vs {rb}");
    }
}

#[tokio::test]
async fn one_redis_round_trip_per_check_whatever_the_number_of_limits() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let mut conn = redis.client().await;
    let limits = || {
        (0..200)
            .map(|i| {
                let algorithm = [Algorithm::FixedWindow, Algorithm::SlidingWindow, Algorithm::TokenBucket][i % 3];
                limit(&format!("{{t}}:k{i}"), 5, MONTH_MS, algorithm)
            })
            .collect::<Vec<_>>()
    };
    // The first call loads the function (not found, FUNCTION LOAD, FCALL).
    assert!(check(&mut client, request(limits())).await.allowed);
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut conn).await.unwrap();
    let response = check(&mut client, request(limits())).await;
    assert!(response.allowed);
    assert_eq!(response.statuses.len(), 200);
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    let calls = redis.command_calls().await;
    assert_eq!(calls.get("fcall"), Some(&1), "{stats}");
    let fcall = stats.lines().find(|line| line.starts_with("cmdstat_fcall:")).unwrap_or_default();
    println!("one Check of 200 limits (the most --rate-limit-max-limits allows by default), inside Redis: {fcall}");
    assert_eq!(calls.get("function|load"), None, "{stats}");
}

#[tokio::test]
async fn a_server_that_lost_the_function_gets_it_again_and_each_version_keeps_its_own() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let mut conn = redis.client().await;
    let limits = || vec![limit("lost", 2, MONTH_MS, Algorithm::TokenBucket)];
    // Another version's library, as during a rolling upgrade: left alone.
    let other = "#!lua name=cachecoord_rate_limit_check_0000000000000000\n\
                 redis.register_function('cachecoord_rate_limit_check_0000000000000000', function() return 0 end)";
    let _: String = redis::cmd("FUNCTION").arg("LOAD").arg(other).query_async(&mut conn).await.unwrap();
    assert_eq!(check(&mut client, request(limits())).await.statuses[0].remaining, 1);
    assert_eq!(libraries(&mut conn).await.len(), 2, "ours loaded beside the other");

    // As after a restart without persistence.
    let _: () = redis::cmd("FUNCTION").arg("FLUSH").query_async(&mut conn).await.unwrap();
    assert!(libraries(&mut conn).await.is_empty());
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut conn).await.unwrap();
    let response = check(&mut client, request(limits())).await;
    assert!(response.allowed);
    assert_eq!(response.statuses[0].remaining, 0, "the state survived; only the function was lost");
    let calls = redis.command_calls().await;
    assert_eq!((calls.get("fcall"), calls.get("function|load")), (Some(&2), Some(&1)), "{calls:?}");
    let names = libraries(&mut conn).await;
    assert!(names.len() == 1 && names[0].starts_with("cachecoord_rate_limit_check_"), "{names:?}");
    assert!(!check(&mut client, request(limits())).await.allowed);
}

#[tokio::test]
async fn on_a_redis_without_functions_a_check_fails_internal_and_the_rest_works() {
    // What Redis 6 answers to FCALL (README: Redis 7 is required).
    let redis = RedisServer::start_with(&["--rename-command", "FCALL", ""], None).await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let status = client.check(request(vec![limit("old", 2, MONTH_MS, Algorithm::TokenBucket)])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    let reset = client.reset_limits(ResetLimitsRequest { keys: vec!["old".into()] }).await.unwrap().into_inner();
    assert_eq!(reset.reset, 0, "nothing was written");
}

/// The names of the function libraries loaded on the server.
async fn libraries(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    use redis::Value;
    let list: Vec<Value> = redis::cmd("FUNCTION").arg("LIST").query_async(conn).await.unwrap();
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(text) => text.clone(),
        _ => String::new(),
    };
    list.iter()
        .filter_map(|library| {
            let fields: Vec<(&Value, &Value)> = match library {
                Value::Map(fields) => fields.iter().map(|(k, v)| (k, v)).collect(),
                Value::Array(flat) => flat.chunks_exact(2).map(|kv| (&kv[0], &kv[1])).collect(),
                _ => return None,
            };
            fields.into_iter().find(|(k, _)| text(k) == "library_name").map(|(_, v)| text(v))
        })
        .collect()
}

#[tokio::test]
async fn every_key_expires_by_itself() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let mut conn = redis.client().await;
    let period = 60_000;
    settle_in_window(&mut conn, period, 2000).await;
    let (_, before, after) = bracketed(
        &mut conn,
        check(
            &mut client,
            with_cost(
                vec![
                    limit("f", 10, period, Algorithm::FixedWindow),
                    limit("s", 10, period, Algorithm::SlidingWindow),
                    limit("t", 10, period, Algorithm::TokenBucket),
                ],
                2,
            ),
        ),
    )
    .await;
    let window_end = (before / period + 1) * period;
    let fixed = expires_at(&mut conn, &state_key(&server, 'f', "f")).await;
    assert!(fixed.abs_diff(window_end) <= 1, "fixed expires at {fixed}, its window ends at {window_end}");
    let sliding = expires_at(&mut conn, &state_key(&server, 's', "s")).await;
    assert!(sliding.abs_diff(window_end + period) <= 1, "sliding expires at {sliding}");
    // Two units of a bucket refilling one per 6 s: full again 12 s after the check.
    let bucket = expires_at(&mut conn, &state_key(&server, 't', "t")).await;
    assert!((before + 12_000 - 1..=after + 12_000 + 1).contains(&bucket), "bucket expires at {bucket}");

    // And with short periods, they are gone soon after.
    let short = vec![
        limit("f2", 10, 50, Algorithm::FixedWindow),
        limit("s2", 10, 50, Algorithm::SlidingWindow),
        limit("t2", 10, 50, Algorithm::TokenBucket),
    ];
    check(&mut client, request(short)).await;
    for _ in 0..200 {
        let keys = state_keys(&redis, &server).await;
        if keys.iter().all(|k| !k.ends_with('2')) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("short-period keys never expired: {:?}", state_keys(&redis, &server).await);
}

#[tokio::test]
async fn reset_limits_restores_the_full_allowance() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let limits = || {
        vec![
            limit("x", 1, MONTH_MS, Algorithm::FixedWindow),
            limit("y", 1, MONTH_MS, Algorithm::SlidingWindow),
            limit("z", 1, MONTH_MS, Algorithm::TokenBucket),
        ]
    };
    assert!(check(&mut client, request(limits())).await.allowed);
    assert!(!check(&mut client, request(limits())).await.allowed);
    // One key checked with two algorithms has two states; both are cleared.
    check(&mut client, request(vec![limit("x", 1, MONTH_MS, Algorithm::TokenBucket)])).await;
    assert_eq!(state_keys(&redis, &server).await.len(), 4);

    let keys = vec!["x".into(), "y".into(), "z".into(), "never-used".into(), "x".into()];
    let reset = client.reset_limits(ResetLimitsRequest { keys }).await.unwrap().into_inner().reset;
    assert_eq!(reset, 3, "keys with state, each once");
    assert!(state_keys(&redis, &server).await.is_empty());
    let response = check(&mut client, request(limits())).await;
    assert!(response.allowed);
    assert!(response.statuses.iter().all(|s| s.remaining == 0));
}

#[tokio::test]
async fn redis_down_is_unavailable_within_the_timeout() {
    let mut redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--redis-timeout", "300ms"]).await;
    let mut client = server.rate_limit();
    let l = || request(vec![limit("k", 10, MONTH_MS, Algorithm::FixedWindow)]);
    assert!(check(&mut client, l()).await.allowed);

    // Slow: Redis busy for 3 s.
    let sleeper = redis.stall(3.0).await;
    let started = Instant::now();
    let status = client.check(l()).await.expect_err("unavailable");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < Duration::from_millis(2500), "took {:?}", started.elapsed());
    let reset = client.reset_limits(ResetLimitsRequest { keys: vec!["k".into()] }).await.expect_err("unavailable");
    assert_eq!(reset.code(), tonic::Code::Unavailable);
    sleeper.await.unwrap();

    // Gone.
    redis.stop();
    let status = client.check(l()).await.expect_err("unavailable");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("refused"), "no Redis text reaches the client");
}

#[tokio::test]
async fn fail_open_answers_allowed_and_unchecked_when_redis_is_down() {
    let mut redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--rate-limit-fail-open", "--redis-timeout", "300ms"]).await;
    let mut client = server.rate_limit();
    let l = || request(vec![limit("a", 1, MONTH_MS, Algorithm::FixedWindow), bucket("b", 1, MONTH_MS, 1)]);
    let response = check(&mut client, l()).await;
    assert!(response.allowed && !response.unchecked);
    let response = check(&mut client, l()).await;
    assert!(!response.allowed && !response.unchecked, "fail-open changes nothing while Redis answers");

    redis.stop();
    let response = check(&mut client, l()).await;
    assert!(response.allowed);
    assert!(response.unchecked);
    let keys: Vec<(&str, bool)> = response.statuses.iter().map(|s| (s.key.as_str(), s.allowed)).collect();
    assert_eq!(keys, [("a", true), ("b", true)]);
    // Bad input is still rejected, and ResetLimits still fails.
    assert_invalid(client.check(request(vec![limit("", 1, 1000, Algorithm::FixedWindow)])).await, "limits[0].key");
    let reset = client.reset_limits(ResetLimitsRequest { keys: vec!["a".into()] }).await.expect_err("unavailable");
    assert_eq!(reset.code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--max-batch", "3", "--max-key-bytes", "8"]).await;
    let mut client = server.rate_limit();
    let ok = || limit("k", 10, 1000, Algorithm::FixedWindow);
    let bad = |f: &dyn Fn(&mut Limit)| {
        let mut l = ok();
        f(&mut l);
        request(vec![ok_named("first"), l])
    };
    fn ok_named(key: &str) -> Limit {
        limit(key, 10, 1000, Algorithm::FixedWindow)
    }

    // limits: 1..=max_batch
    assert_invalid(client.check(request(vec![])).await, "limits");
    let three = (0..3).map(|i| limit(&format!("k{i}"), 1, 1000, Algorithm::FixedWindow)).collect::<Vec<_>>();
    assert!(client.check(request(three.clone())).await.is_ok());
    let mut four = three;
    four.push(limit("k3", 1, 1000, Algorithm::FixedWindow));
    assert_invalid(client.check(request(four)).await, "limits: must have at most 3");

    // key: 1..=8 bytes, unique
    assert_invalid(client.check(bad(&|l| l.key = String::new())).await, "limits[1].key: must not be empty");
    assert!(client.check(bad(&|l| l.key = "12345678".into())).await.is_ok());
    assert_invalid(client.check(bad(&|l| l.key = "123456789".into())).await, "limits[1].key");
    assert_invalid(client.check(bad(&|l| l.key = "first".into())).await, "limits[1].key: must be unique");

    // limit: at least 1, at most 2^53
    assert_invalid(client.check(bad(&|l| l.limit = 0)).await, "limits[1].limit: must be at least 1");
    assert!(client.check(bad(&|l| l.limit = 1)).await.is_ok());
    assert!(client.check(peek(vec![limit("big", 1 << 53, 1000, Algorithm::FixedWindow)])).await.is_ok());
    assert_invalid(client.check(bad(&|l| l.limit = (1 << 53) + 1)).await, "limits[1].limit");

    // period: required, >= 1 ms, whole ms, <= 30 days
    assert_invalid(client.check(bad(&|l| l.period = None)).await, "limits[1].period: is required");
    assert_invalid(client.check(bad(&|l| l.period = ms(0))).await, "limits[1].period: must be positive");
    let negative = Some(prost_types::Duration { seconds: -1, nanos: 0 });
    assert_invalid(client.check(bad(&|l| l.period = negative)).await, "limits[1].period: must be positive");
    assert!(client.check(bad(&|l| l.period = ms(1))).await.is_ok());
    let sub_ms = Some(prost_types::Duration { seconds: 0, nanos: 1_500_000 });
    assert_invalid(client.check(bad(&|l| l.period = sub_ms)).await, "limits[1].period: must be a whole number");
    assert!(client.check(bad(&|l| l.period = ms(MONTH_MS))).await.is_ok());
    assert_invalid(client.check(bad(&|l| l.period = ms(MONTH_MS + 1))).await, "limits[1].period: must be at most");

    // algorithm: known values only
    assert_invalid(client.check(bad(&|l| l.algorithm = 9)).await, "limits[1].algorithm");

    // burst: token bucket only, >= 1, refilled within 30 days
    assert_invalid(client.check(bad(&|l| l.burst = Some(5))).await, "limits[1].burst: is only for");
    let tb = |burst| request(vec![bucket("b", 10, DAY_MS, burst)]);
    assert_invalid(client.check(tb(0)).await, "limits[0].burst: must be at least 1");
    assert!(client.check(tb(1)).await.is_ok());
    assert!(client.check(tb(300)).await.is_ok(), "300 units at 10 a day refill in 30 days");
    assert_invalid(client.check(tb(301)).await, "limits[0].burst: must refill within 30days");

    // cost: >= 1, at most each limit's capacity
    let with = |cost| with_cost(vec![ok(), bucket("b", 10, 1000, 4)], cost);
    assert_invalid(client.check(with(0)).await, "cost: must be at least 1");
    assert!(client.check(with(4)).await.is_ok());
    assert_invalid(client.check(with(5)).await, "cost: must be at most the capacity of limits[1] (4)");
    assert!(client.check(with_cost(vec![ok()], 10)).await.is_ok());
    assert_invalid(client.check(with_cost(vec![ok()], 11)).await, "cost");

    // ResetLimits: 1..=max_batch keys of 1..=8 bytes
    let reset = |keys: Vec<&str>| ResetLimitsRequest { keys: keys.into_iter().map(String::from).collect() };
    assert_invalid(client.reset_limits(reset(vec![])).await, "keys: must not be empty");
    assert_invalid(client.reset_limits(reset(vec!["a", "b", "c", "d"])).await, "keys: must have at most 3");
    assert_invalid(client.reset_limits(reset(vec!["a", ""])).await, "keys[1]: must not be empty");
    assert_invalid(client.reset_limits(reset(vec!["123456789"])).await, "keys[0]");
    assert!(client.reset_limits(reset(vec!["a", "b", "12345678"])).await.is_ok());
}

#[tokio::test]
async fn rejected_requests_write_nothing() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    // The first limit is fine; the second is bad: nothing at all is written.
    let bad = vec![limit("good", 10, 1000, Algorithm::FixedWindow), limit("bad", 0, 1000, Algorithm::FixedWindow)];
    assert_invalid(client.check(request(bad)).await, "limits[1].limit");
    let too_costly =
        vec![limit("good", 10, 1000, Algorithm::FixedWindow), limit("small", 2, 1000, Algorithm::TokenBucket)];
    assert_invalid(client.check(with_cost(too_costly, 3)).await, "cost");
    assert!(state_keys(&redis, &server).await.is_empty());
}

/// A Check is one script, atomic over its limits, so its size is what
/// bounds the time it holds Redis: at most 200 limits by default
/// (--rate-limit-max-limits), at most --max-batch in any case.
#[tokio::test]
async fn a_check_holds_at_most_200_limits_by_default() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    let limits = |n: usize| -> Vec<Limit> {
        (0..n).map(|i| limit(&format!("k{i}"), 1, 60_000, Algorithm::FixedWindow)).collect()
    };
    let response = check(&mut client, request(limits(200))).await;
    assert!(response.allowed);
    assert_eq!(response.statuses.len(), 200);
    assert_invalid(
        client.check(request(limits(201))).await,
        "limits: must have at most 200 items (--rate-limit-max-limits)",
    );

    let server = TestServer::start_with(&redis, &["--rate-limit-max-limits", "2"]).await;
    let mut client = server.rate_limit();
    assert!(client.check(request(limits(2))).await.is_ok());
    assert_invalid(
        client.check(request(limits(3))).await,
        "limits: must have at most 2 items (--rate-limit-max-limits)",
    );
}

/// A check answers five integers per limit packed into one string, built a
/// limit at a time: where the flags allow thousands of limits in one check,
/// every one gets its own verdict, and a denial still consumes from none.
#[tokio::test]
async fn a_check_of_2000_limits_answers_each_and_stays_all_or_nothing() {
    let redis = RedisServer::start().await;
    let flags = ["--rate-limit-max-limits", "2000", "--max-batch", "2000"];
    let server = TestServer::start_with(&redis, &flags).await;
    let mut client = server.rate_limit();
    // Limit i admits i % 7 + 1 units; the check costs one of each.
    let limits: Vec<Limit> =
        (0..2000).map(|i| limit(&format!("k{i}"), i % 7 + 1, 60_000, Algorithm::FixedWindow)).collect();
    let response = check(&mut client, request(limits.clone())).await;
    assert!(response.allowed);
    assert_eq!(response.statuses.len(), 2000);
    for (i, status) in (0..).zip(&response.statuses) {
        assert_eq!(status.key, format!("k{i}"));
        assert!(status.allowed, "k{i}");
        assert_eq!(status.remaining, i % 7, "k{i}");
        assert!(millis(&status.reset_after) > 0, "k{i}");
    }
    // The limits of one unit are spent now: the check is denied, they say
    // so, and nothing is taken from the others.
    let response = check(&mut client, request(limits)).await;
    assert!(!response.allowed);
    for (i, status) in (0..).zip(&response.statuses) {
        assert_eq!(status.allowed, i % 7 != 0, "k{i}");
        assert_eq!(status.remaining, i % 7, "k{i}");
        if i % 7 == 0 {
            assert!(millis(&status.retry_after) > 0, "k{i}");
        }
    }
}

/// ResetLimits of more keys than one reset script takes (100) clears every
/// one of them under every algorithm.
#[tokio::test]
async fn reset_of_1000_keys_clears_every_state() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.rate_limit();
    for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow, Algorithm::TokenBucket] {
        for first in (0..1000).step_by(200) {
            let limits = (first..first + 200).map(|i| limit(&format!("k{i}"), 1, 60_000, algorithm)).collect();
            assert!(check(&mut client, request(limits)).await.allowed);
        }
    }
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    let reset = client.reset_limits(ResetLimitsRequest { keys }).await.unwrap().into_inner().reset;
    assert_eq!(reset, 1000);
    let mut conn = redis.client().await;
    let left: Vec<String> = conn.keys(format!("{}:rl:*", server.prefix)).await.unwrap();
    assert!(left.is_empty(), "{} states left", left.len());
}
