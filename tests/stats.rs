//! StatsService behaviour, RPC by RPC, against a real Redis.
//!
//! Redis's clock cannot be set, so tests that depend on "now" read Redis
//! `TIME` before and after the call and accept the buckets of either instant.

mod common;

use std::collections::HashMap;

use cachecoord::proto::{
    AddUniqueRequest, CountActiveRequest, CountUniqueRequest, Delta, GetSeriesRequest, GetTotalsRequest, Granularity,
    IncrementRequest, MarkActiveRequest,
};
use common::{RedisServer, TestServer, assert_invalid, ms};
use deadpool_redis::redis::{self, AsyncCommands};
use jiff::{Timestamp, tz::TimeZone};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

/// Redis's clock, in Unix ms.
async fn redis_now(redis: &RedisServer) -> i64 {
    let mut conn = redis.client().await;
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// What ran between two `command_calls`, without the health probe's PINGs,
/// the test's own INFO, and the connection pool's check on checkout (UNWATCH).
fn ran(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> HashMap<String, u64> {
    after
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "ping" | "info" | "unwatch"))
        .filter_map(|(name, n)| {
            let diff = n - before.get(name).copied().unwrap_or(0);
            (diff > 0).then(|| (name.clone(), diff))
        })
        .collect()
}

fn expect(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
    pairs.iter().map(|(name, n)| (name.to_string(), *n)).collect()
}

fn ts(ms: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 })
}

fn ms_of(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

fn delta(name: &str, amount: i64) -> Delta {
    Delta { name: name.into(), amount: Some(amount) }
}

fn series(name: &str, g: Granularity, start: i64, end: i64) -> GetSeriesRequest {
    GetSeriesRequest { name: name.into(), granularity: g.into(), start: ts(start), end: ts(end) }
}

/// The start of the local day containing `ms` in `zone`.
fn local_day_start(zone: &str, ms: i64) -> i64 {
    let tz = TimeZone::get(zone).unwrap();
    let date = Timestamp::from_millisecond(ms).unwrap().to_zoned_datetime(tz.clone()).date();
    date.to_zoned_datetime(tz).unwrap().timestamp().as_millisecond()
}

/// The keys under `pattern` (relative to the server's prefix).
async fn keys(redis: &RedisServer, server: &TestServer, pattern: &str) -> Vec<String> {
    let mut conn = redis.client().await;
    let mut keys: Vec<String> = conn.keys(format!("{}:{pattern}", server.prefix)).await.unwrap();
    keys.sort();
    keys
}

/// The one key under `pattern` and the bucket start at its end.
async fn one_bucket(redis: &RedisServer, server: &TestServer, pattern: &str) -> (String, i64) {
    let found = keys(redis, server, pattern).await;
    assert_eq!(found.len(), 1, "{pattern}: {found:?}");
    let key = found[0].clone();
    let start = key.rsplit(':').next().unwrap().parse().unwrap();
    (key, start)
}

async fn get_i64(redis: &RedisServer, key: &str) -> i64 {
    let mut conn = redis.client().await;
    conn.get::<_, Option<i64>>(key).await.unwrap().unwrap_or(0)
}

async fn pttl(redis: &RedisServer, key: &str) -> i64 {
    let mut conn = redis.client().await;
    conn.pttl(key).await.unwrap()
}

#[tokio::test]
async fn one_increment_of_100_deltas_is_one_round_trip_updating_every_bucket() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut stats = server.stats();
    // Load the script first, so the command count below is exact.
    stats.increment(IncrementRequest { deltas: vec![delta("warm-up", 1)] }).await.unwrap();

    // Ten counters, each named ten times with amounts 1..=10, interleaved.
    let deltas: Vec<Delta> = (0..100).map(|i| delta(&format!("api:/e{}", i % 10), i / 10 + 1)).collect();
    let before = redis.command_calls().await;
    let t0 = redis_now(&redis).await;
    let started = std::time::Instant::now();
    let values = stats.increment(IncrementRequest { deltas }).await.unwrap().into_inner().values;
    println!("Increment of 100 deltas: {:?}", started.elapsed());
    let t1 = redis_now(&redis).await;
    let after = redis.command_calls().await;

    // One script call, and inside it one INCRBY per bucket and total (and
    // one EXISTS per counter: its keys are touched before any is written).
    let ran = ran(&before, &after);
    let expected = [("evalsha", 1), ("time", 3), ("exists", 100), ("incrby", 400), ("pexpireat", 300), ("get", 100)];
    assert_eq!(ran, expect(&expected));

    // Running totals, in request order.
    let expected: Vec<i64> = (0..100).map(|i: i64| (1..=i / 10 + 1).sum()).collect();
    assert_eq!(values, expected);

    for e in 0..10 {
        let name = format!("api:/e{e}");
        assert_eq!(get_i64(&redis, &format!("{}:st:{{{name}}}:total", server.prefix)).await, 55);
        let (key, start) = one_bucket(&redis, &server, &format!("st:{{{name}}}:m:*")).await;
        assert!([t0 - t0 % MINUTE, t1 - t1 % MINUTE].contains(&start), "minute {start}");
        assert_eq!(get_i64(&redis, &key).await, 55);
        let (key, start) = one_bucket(&redis, &server, &format!("st:{{{name}}}:h:*")).await;
        assert!([t0 - t0 % HOUR, t1 - t1 % HOUR].contains(&start), "hour {start}");
        assert_eq!(get_i64(&redis, &key).await, 55);
        let (key, start) = one_bucket(&redis, &server, &format!("st:{{{name}}}:d:*")).await;
        assert!([t0 - t0 % DAY, t1 - t1 % DAY].contains(&start), "day {start}");
        assert_eq!(get_i64(&redis, &key).await, 55);
    }
}

#[tokio::test]
async fn buckets_expire_after_their_retention_and_totals_never() {
    let redis = RedisServer::start().await;
    let flags = ["--stats-retention-minute", "10m", "--stats-retention-hour", "2d", "--stats-retention-day", "40d"];
    for (server, minute, hour, day) in [
        (TestServer::start(&redis).await, 48 * HOUR, 30 * DAY, 400 * DAY),
        (TestServer::start_with(&redis, &flags).await, 10 * MINUTE, 2 * DAY, 40 * DAY),
    ] {
        let mut stats = server.stats();
        stats.increment(IncrementRequest { deltas: vec![delta("n", 3)] }).await.unwrap();
        let now = redis_now(&redis).await;
        // The expiry is the bucket's end plus the retention: between the
        // retention and the retention plus one bucket from now.
        for (g, bucket, retention) in [("m", MINUTE, minute), ("h", HOUR, hour), ("d", DAY, day)] {
            let (key, start) = one_bucket(&redis, &server, &format!("st:{{n}}:{g}:*")).await;
            let left = pttl(&redis, &key).await;
            assert!(left > 0, "{key} has no expiry");
            assert!((start + bucket + retention - now - left).abs() <= 1000, "{key}: pttl {left}");
            assert!(left > retention - 1000 && left <= retention + bucket, "{key}: pttl {left}");
        }
        assert_eq!(pttl(&redis, &format!("{}:st:{{n}}:total", server.prefix)).await, -1, "totals never expire");
    }
}

#[tokio::test]
async fn concurrent_increments_are_exact() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let t0 = redis_now(&redis).await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for task in 0..64 {
        let mut stats = server.stats();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                // Every task hits "hot"; each also hits one of two shared counters.
                let deltas = vec![delta("hot", 1), delta(if task % 2 == 0 { "even" } else { "odd" }, 2)];
                stats.increment(IncrementRequest { deltas }).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    println!("64 tasks x 100 increments: {:?}", started.elapsed());
    let t1 = redis_now(&redis).await;

    let mut stats = server.stats();
    let names = vec!["hot".to_string(), "even".to_string(), "odd".to_string()];
    let totals = stats.get_totals(GetTotalsRequest { names: names.clone() }).await.unwrap().into_inner().values;
    assert_eq!(totals, vec![6400, 6400, 6400]);
    for name in &names {
        for g in [Granularity::Minute, Granularity::Hour, Granularity::Day] {
            let got = stats.get_series(series(name, g, t0, t1)).await.unwrap().into_inner();
            assert_eq!(got.total, 6400, "{name} {g:?}");
            assert_eq!(got.buckets.iter().map(|b| b.value).sum::<i64>(), 6400, "{name} {g:?}");
        }
    }
}

#[tokio::test]
async fn get_series_is_zero_filled_oldest_first_in_one_round_trip() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut stats = server.stats();
    stats.increment(IncrementRequest { deltas: vec![delta("api:/users", 7)] }).await.unwrap();
    let now = redis_now(&redis).await;
    let bucket = now - now % MINUTE;

    let before = redis.command_calls().await;
    let got = stats.get_series(series("api:/users", Granularity::Minute, now - 9 * MINUTE, now)).await.unwrap();
    assert_eq!(ran(&before, &redis.command_calls().await), expect(&[("mget", 1)]));
    let got = got.into_inner();
    let starts: Vec<i64> = got.buckets.iter().map(|b| ms_of(&b.start)).collect();
    assert_eq!(starts, (0..10).rev().map(|i| bucket - i * MINUTE).collect::<Vec<_>>());
    // The increment landed in this minute or, across a boundary, the one before.
    let values: Vec<i64> = got.buckets.iter().map(|b| b.value).collect();
    assert!(values == [0, 0, 0, 0, 0, 0, 0, 0, 0, 7] || values == [0, 0, 0, 0, 0, 0, 0, 0, 7, 0], "{values:?}");
    assert_eq!(got.total, 7);

    // A counter never written reads as zeros.
    let got = stats.get_series(series("never", Granularity::Hour, now - 5 * HOUR, now)).await.unwrap().into_inner();
    assert_eq!(got.buckets.len(), 6);
    assert!(got.buckets.iter().all(|b| b.value == 0));
    assert_eq!(got.total, 0);

    // An end exactly on a boundary includes the bucket starting there.
    let got = stats.get_series(series("x", Granularity::Minute, bucket, bucket + MINUTE)).await.unwrap().into_inner();
    assert_eq!(got.buckets.len(), 2);
}

#[tokio::test]
async fn get_series_spans_at_most_the_configured_buckets() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut stats = server.stats();
    let t = 1_780_000_000_000 - 1_780_000_000_000 % HOUR; // An hour boundary.
    let started = std::time::Instant::now();
    let got = stats.get_series(series("n", Granularity::Minute, t, t + 999 * MINUTE)).await.unwrap().into_inner();
    println!("GetSeries of 1,000 minute buckets: {:?}", started.elapsed());
    assert_eq!(got.buckets.len(), 1000);
    assert_invalid(stats.get_series(series("n", Granularity::Minute, t, t + 1000 * MINUTE)).await, "end");
    let got = stats.get_series(series("n", Granularity::Day, t, t + 999 * DAY)).await.unwrap().into_inner();
    assert_eq!(got.buckets.len(), 1000);
    assert_invalid(stats.get_series(series("n", Granularity::Day, t, t + 1000 * DAY)).await, "end");

    let server = TestServer::start_with(&redis, &["--stats-max-buckets", "24"]).await;
    let mut stats = server.stats();
    assert_eq!(
        stats.get_series(series("n", Granularity::Hour, t, t + 23 * HOUR)).await.unwrap().into_inner().buckets.len(),
        24
    );
    assert_invalid(stats.get_series(series("n", Granularity::Hour, t, t + 24 * HOUR)).await, "end");
}

#[tokio::test]
async fn shanghai_days_start_at_16_utc() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--stats-time-zone", "Asia/Shanghai"]).await;
    let mut stats = server.stats();
    let t0 = redis_now(&redis).await;
    stats.increment(IncrementRequest { deltas: vec![delta("api:/orders", 5)] }).await.unwrap();
    let t1 = redis_now(&redis).await;

    // The day bucket is the Shanghai calendar day of Redis TIME: it starts at
    // 16:00 UTC, so an increment at 16:30 UTC counts for the next local day.
    let expected = [local_day_start("Asia/Shanghai", t0), local_day_start("Asia/Shanghai", t1)];
    let (_, day) = one_bucket(&redis, &server, "st:{api:/orders}:d:*").await;
    assert!(expected.contains(&day), "day {day}, expected one of {expected:?}");
    assert_eq!(day.rem_euclid(DAY), 16 * HOUR);

    let got = stats.get_series(series("api:/orders", Granularity::Day, t1, t1)).await.unwrap().into_inner();
    assert_eq!(got.buckets.len(), 1);
    assert_eq!(ms_of(&got.buckets[0].start), local_day_start("Asia/Shanghai", t1));
    if day == local_day_start("Asia/Shanghai", t1) {
        assert_eq!(got.total, 5);
    }
}

/// The scripts' bucket picking (stats_lib.lua), run in Redis on chosen
/// instants instead of `TIME`, agrees with `Calendar::bucket_start` across
/// DST changes and half-hour zones.
#[tokio::test]
async fn script_bucket_rules_match_the_calendar() {
    use cachecoord::calendar::{Calendar, Granularity as G};
    let redis = RedisServer::start().await;
    let mut conn = redis.client().await;
    let probe = concat!(
        include_str!("../src/store/lua/stats_lib.lua"),
        "local clock, a = read_clock(1)
        local out = {}
        for i = a, #ARGV do
          local t = tonumber(ARGV[i])
          local h = hour_of(clock, t)
          local d, e = day_of(clock, t)
          table.insert(out, {fmt(h), fmt(d), fmt(e)})
        end
        return out"
    );
    for (zone, now) in [
        ("America/New_York", "2026-03-08T12:00:00Z"),
        ("America/New_York", "2026-11-01T12:00:00Z"),
        ("Australia/Lord_Howe", "2026-04-04T15:00:00Z"),
        ("Asia/Kolkata", "2026-06-01T00:00:00Z"),
        ("Asia/Shanghai", "2026-03-01T16:30:00Z"),
    ] {
        let calendar = Calendar::new(TimeZone::get(zone).unwrap());
        let table = calendar.clock_table(now.parse::<Timestamp>().unwrap().as_millisecond()).unwrap();
        let mut eval = redis::cmd("EVAL");
        eval.arg(probe).arg(0).arg(table.day_starts.len()).arg(&table.day_starts).arg(table.offsets.len());
        for (from, offset) in &table.offsets {
            eval.arg(from).arg(offset);
        }
        let instants: Vec<i64> = (table.day_starts[0]..table.day_starts[4]).step_by(13 * 60_000 + 7).collect();
        eval.arg(&instants);
        let picked: Vec<(i64, i64, i64)> = eval.query_async(&mut conn).await.unwrap();
        assert_eq!(picked.len(), instants.len());
        for (t, (hour, day, day_end)) in instants.iter().zip(picked) {
            assert_eq!(Ok(hour), calendar.bucket_start(G::Hour, *t), "{zone} hour at {t}");
            assert_eq!(Ok(day), calendar.bucket_start(G::Day, *t), "{zone} day at {t}");
            assert_eq!(Ok(day_end), calendar.next_start(G::Day, day), "{zone} day end at {t}");
        }
    }
}

#[tokio::test]
async fn totals_read_in_order_and_zero_amounts_only_read() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut stats = server.stats();
    let values = stats
        .increment(IncrementRequest {
            deltas: vec![Delta { name: "a".into(), amount: None }, delta("b", -4), delta("a", 10)],
        })
        .await
        .unwrap()
        .into_inner()
        .values;
    assert_eq!(values, vec![1, -4, 11]);
    let names = vec!["b".to_string(), "never".to_string(), "a".to_string()];
    let totals = stats.get_totals(GetTotalsRequest { names }).await.unwrap().into_inner().values;
    assert_eq!(totals, vec![-4, 0, 11]);

    // Zero reads the total and creates nothing.
    let values = stats.increment(IncrementRequest { deltas: vec![delta("a", 0), delta("c", 0)] }).await.unwrap();
    assert_eq!(values.into_inner().values, vec![11, 0]);
    assert!(keys(&redis, &server, "st:{c}*").await.is_empty());
}

#[tokio::test]
async fn an_overflowing_total_rejects_the_whole_increment() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut stats = server.stats();
    stats.increment(IncrementRequest { deltas: vec![delta("big", i64::MAX - 1)] }).await.unwrap();
    let deltas = vec![delta("a", 5), delta("m", i64::MIN), delta("big", 1), delta("big", 1)];
    assert_invalid(stats.increment(IncrementRequest { deltas }).await, "deltas[3].amount");
    // The earlier deltas were undone and no bucket was touched.
    let names = vec!["a".to_string(), "m".to_string(), "big".to_string()];
    let totals = stats.get_totals(GetTotalsRequest { names }).await.unwrap().into_inner().values;
    assert_eq!(totals, vec![0, 0, i64::MAX - 1]);
    assert!(keys(&redis, &server, "st:{a}:[mhd]:*").await.is_empty());
    assert!(keys(&redis, &server, "st:{m}:[mhd]:*").await.is_empty());
    // Totals near the int64 limits are exact (no floating point on the way).
    let values = stats.increment(IncrementRequest { deltas: vec![delta("big", 1)] }).await.unwrap().into_inner().values;
    assert_eq!(values, vec![i64::MAX]);
}

#[tokio::test]
async fn count_active_counts_the_window_and_trims_the_rest() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut stats = server.stats();
    let mark = |member: &str| MarkActiveRequest { group: "online".into(), member: member.into() };
    let count = |window_ms| CountActiveRequest { group: "online".into(), window: ms(window_ms) };
    for member in ["u1", "u2", "u3", "u1"] {
        stats.mark_active(mark(member)).await.unwrap();
    }
    assert_eq!(stats.count_active(count(60_000)).await.unwrap().into_inner().count, 3);

    // Members seen 10 minutes and 25 hours ago (the longest window is 24 h).
    let key = format!("{}:sa:{{online}}", server.prefix);
    let now = redis_now(&redis).await;
    let mut conn = redis.client().await;
    let _: () = conn.zadd(&key, "u4", now - 10 * MINUTE).await.unwrap();
    let _: () = conn.zadd(&key, "old", now - 25 * HOUR).await.unwrap();
    assert_eq!(stats.count_active(count(5 * 60_000)).await.unwrap().into_inner().count, 3);
    assert_eq!(stats.count_active(count(3_600_000)).await.unwrap().into_inner().count, 4);
    assert_eq!(stats.count_active(count(86_400_000)).await.unwrap().into_inner().count, 4);

    // The next MarkActive trims members older than the longest window.
    stats.mark_active(mark("u5")).await.unwrap();
    let members: Vec<String> = conn.zrange(&key, 0, -1).await.unwrap();
    assert_eq!(members.len(), 5, "{members:?}");
    assert!(!members.contains(&"old".to_string()));
    let left = pttl(&redis, &key).await;
    assert!(left > 24 * HOUR - 1000 && left <= 24 * HOUR, "pttl {left}");

    // Window limits: 1 ms .. 24 h.
    assert_eq!(stats.count_active(count(86_400_000)).await.unwrap().into_inner().count, 5);
    assert_invalid(stats.count_active(count(86_400_001)).await, "window");
    assert_invalid(stats.count_active(count(0)).await, "window");
    assert_invalid(stats.count_active(CountActiveRequest { group: "online".into(), window: None }).await, "window");
    assert!(stats.count_active(count(1)).await.unwrap().into_inner().count <= 5);
}

#[tokio::test]
async fn count_active_window_follows_configuration() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--stats-active-window-max", "5m"]).await;
    let mut stats = server.stats();
    stats.mark_active(MarkActiveRequest { group: "g".into(), member: "m".into() }).await.unwrap();
    let key = format!("{}:sa:{{g}}", server.prefix);
    let left = pttl(&redis, &key).await;
    assert!(left > 5 * MINUTE - 1000 && left <= 5 * MINUTE, "pttl {left}");
    let count = |window_ms| CountActiveRequest { group: "g".into(), window: ms(window_ms) };
    assert_eq!(stats.count_active(count(300_000)).await.unwrap().into_inner().count, 1);
    assert_invalid(stats.count_active(count(300_001)).await, "window");
}

#[tokio::test]
async fn count_unique_is_the_union_of_days_within_2_percent() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut stats = server.stats();
    let mut conn = redis.client().await;
    let day_key = |start: i64| format!("{}:su:{{visitors}}:d:{start}", server.prefix);

    // Three days of 40,000 members each, overlapping by 10,000: 100,000
    // distinct, 120,000 added. AddUnique always writes today, so after each
    // of the first two days the test moves today's HyperLogLog back in time.
    let today = local_day_start("UTC", redis_now(&redis).await);
    let started = std::time::Instant::now();
    for (day, first) in [(2, 0), (1, 30_000), (0, 60_000)] {
        for batch in 0..40 {
            let members = (0..1000).map(|i| format!("user-{}", first + batch * 1000 + i)).collect();
            stats.add_unique(AddUniqueRequest { name: "visitors".into(), members }).await.unwrap();
        }
        let key = day_key(today);
        let left = pttl(&redis, &key).await;
        assert!(left > 400 * DAY && left <= 401 * DAY, "{key}: pttl {left} (did the day change during the test?)");
        if day > 0 {
            let _: () = conn.rename(&key, day_key(today - day * DAY)).await.unwrap();
        }
    }
    println!("120 AddUnique calls of 1,000 members: {:?}", started.elapsed());

    let request = |start, end| CountUniqueRequest { name: "visitors".into(), start: ts(start), end: ts(end) };
    let before = redis.command_calls().await;
    let count = stats.count_unique(request(today - 2 * DAY + 5, today + 5)).await.unwrap().into_inner().count;
    assert_eq!(ran(&before, &redis.command_calls().await), expect(&[("pfcount", 1)]));
    println!("CountUnique over 3 days: {count} (exact 100000)");
    assert!((98_000..=102_000).contains(&count), "{count}");

    let one_day = stats.count_unique(request(today - DAY, today - 1)).await.unwrap().into_inner().count;
    assert!((39_200..=40_800).contains(&one_day), "{one_day}");
    let none = stats.count_unique(request(today - 9 * DAY, today - 3 * DAY)).await.unwrap().into_inner().count;
    assert_eq!(none, 0);

    // At most 1,000 days.
    let t = today + 1;
    assert!(stats.count_unique(request(t - 999 * DAY, t)).await.is_ok());
    assert_invalid(stats.count_unique(request(t - 1000 * DAY, t)).await, "end");

    // Adding members seen before does not change today's estimate.
    let members = (60_000..61_000).map(|i| format!("user-{i}")).collect();
    let added = stats.add_unique(AddUniqueRequest { name: "visitors".into(), members }).await.unwrap();
    assert!(!added.into_inner().added);
    let added = stats.add_unique(AddUniqueRequest { name: "visitors".into(), members: vec!["new".into()] }).await;
    assert!(added.unwrap().into_inner().added);
}

#[tokio::test]
async fn redis_down_is_unavailable_and_recovers() {
    let mut redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--redis-timeout", "300ms"]).await;
    let mut stats = server.stats();
    stats.increment(IncrementRequest { deltas: vec![delta("n", 1)] }).await.unwrap();
    redis.stop();
    let now = 1_780_000_000_000;
    let status = stats.increment(IncrementRequest { deltas: vec![delta("n", 1)] }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let status = stats.get_series(series("n", Granularity::Hour, now, now)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let status = stats.count_active(CountActiveRequest { group: "g".into(), window: ms(1000) }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("127.0.0.1"), "no internals: {status:?}");

    redis.restart().await;
    // A fresh Redis: the service reloads its scripts and counts from zero.
    let values = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Ok(response) = stats.increment(IncrementRequest { deltas: vec![delta("n", 1)] }).await {
                return response.into_inner().values;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("recovers after Redis restarts");
    assert_eq!(values, vec![1]);
}

#[tokio::test]
async fn bad_input_is_rejected_naming_the_field_and_writes_nothing() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut stats = server.stats();
    let now = redis_now(&redis).await;
    let long = "x".repeat(513);
    let max = "x".repeat(512);

    // Increment.
    assert_invalid(stats.increment(IncrementRequest { deltas: vec![] }).await, "deltas");
    assert_invalid(
        stats.increment(IncrementRequest { deltas: vec![delta("a", 1), delta("", 1)] }).await,
        "deltas[1].name",
    );
    assert_invalid(stats.increment(IncrementRequest { deltas: vec![delta(&long, 1)] }).await, "deltas[0].name");
    let too_many = (0..1001).map(|i| delta(&format!("n{i}"), 1)).collect();
    assert_invalid(stats.increment(IncrementRequest { deltas: too_many }).await, "deltas");
    // At most 100 deltas (--stats-max-deltas): one script, within Redis's
    // blocking budget.
    let at_most = (0..100).map(|i| delta(&format!("n{i}"), 0)).collect();
    assert!(stats.increment(IncrementRequest { deltas: at_most }).await.is_ok());
    let too_many = (0..101).map(|i| delta(&format!("n{i}"), 1)).collect();
    assert_invalid(
        stats.increment(IncrementRequest { deltas: too_many }).await,
        "deltas: must have at most 100 items (--stats-max-deltas)",
    );

    // GetSeries.
    assert_invalid(stats.get_series(series("", Granularity::Minute, now, now)).await, "name");
    assert_invalid(stats.get_series(series(&long, Granularity::Minute, now, now)).await, "name");
    assert_invalid(stats.get_series(series("a", Granularity::Unspecified, now, now)).await, "granularity");
    let unknown = GetSeriesRequest { granularity: 99, ..series("a", Granularity::Minute, now, now) };
    assert_invalid(stats.get_series(unknown).await, "granularity");
    assert_invalid(stats.get_series(series("a", Granularity::Minute, now + 1, now)).await, "end");
    let no_start = GetSeriesRequest { start: None, ..series("a", Granularity::Minute, now, now) };
    assert_invalid(stats.get_series(no_start).await, "start");
    let no_end = GetSeriesRequest { end: None, ..series("a", Granularity::Minute, now, now) };
    assert_invalid(stats.get_series(no_end).await, "end");
    let bad = GetSeriesRequest {
        start: Some(prost_types::Timestamp { seconds: i64::MAX, nanos: 0 }),
        ..series("a", Granularity::Minute, now, now)
    };
    assert_invalid(stats.get_series(bad).await, "start");

    // GetTotals.
    assert_invalid(stats.get_totals(GetTotalsRequest { names: vec![] }).await, "names");
    assert_invalid(stats.get_totals(GetTotalsRequest { names: vec!["a".into(), long.clone()] }).await, "names[1]");
    assert_invalid(stats.get_totals(GetTotalsRequest { names: vec!["n".into(); 1001] }).await, "names");

    // MarkActive / CountActive.
    assert_invalid(stats.mark_active(MarkActiveRequest { group: "".into(), member: "m".into() }).await, "group");
    assert_invalid(stats.mark_active(MarkActiveRequest { group: "g".into(), member: long.clone() }).await, "member");
    let request = CountActiveRequest { group: "".into(), window: ms(1000) };
    assert_invalid(stats.count_active(request).await, "group");

    // AddUnique / CountUnique.
    assert_invalid(stats.add_unique(AddUniqueRequest { name: "".into(), members: vec!["m".into()] }).await, "name");
    assert_invalid(stats.add_unique(AddUniqueRequest { name: "u".into(), members: vec![] }).await, "members");
    let request = AddUniqueRequest { name: "u".into(), members: vec!["m".into(), "".into()] };
    assert_invalid(stats.add_unique(request).await, "members[1]");
    let request = AddUniqueRequest { name: "u".into(), members: vec!["m".into(); 1001] };
    assert_invalid(stats.add_unique(request).await, "members");
    let request = CountUniqueRequest { name: "".into(), start: ts(now), end: ts(now) };
    assert_invalid(stats.count_unique(request).await, "name");
    let request = CountUniqueRequest { name: "u".into(), start: ts(now), end: ts(now - 1) };
    assert_invalid(stats.count_unique(request).await, "end");

    assert!(keys(&redis, &server, "*").await.is_empty(), "a rejected request wrote something");

    // The limits themselves are accepted.
    stats.increment(IncrementRequest { deltas: vec![delta(&max, 1)] }).await.unwrap();
    let batch = (0..100).map(|i| delta(&format!("n{i}"), 1)).collect();
    assert_eq!(stats.increment(IncrementRequest { deltas: batch }).await.unwrap().into_inner().values.len(), 100);
    stats.add_unique(AddUniqueRequest { name: "u".into(), members: vec![max.clone(); 1000] }).await.unwrap();
    stats.mark_active(MarkActiveRequest { group: max.clone(), member: max }).await.unwrap();
}

#[tokio::test]
async fn the_deltas_limit_is_configurable() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--stats-max-deltas", "3"]).await;
    let mut stats = server.stats();
    let deltas = |n: usize| IncrementRequest { deltas: (0..n).map(|i| delta(&format!("n{i}"), 1)).collect() };
    assert!(stats.increment(deltas(3)).await.is_ok());
    assert_invalid(stats.increment(deltas(4)).await, "deltas: must have at most 3 items (--stats-max-deltas)");
}

/// More days than one PFCOUNT takes (64) are merged in steps into a scratch
/// key, which is gone afterwards.
#[tokio::test]
async fn count_unique_over_many_days_merges_in_steps() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut stats = server.stats();
    let mut conn = redis.client().await;
    let day_key = |start: i64| format!("{}:su:{{u}}:d:{start}", server.prefix);
    let today = local_day_start("UTC", redis_now(&redis).await);
    // 200 past days, each with its own member and one seen every day.
    for day in 0..200 {
        let _: i64 = redis::cmd("PFADD")
            .arg(day_key(today - day * DAY))
            .arg(format!("only-{day}"))
            .arg("everyday")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let request =
        |days: i64| CountUniqueRequest { name: "u".into(), start: ts(today - (days - 1) * DAY), end: ts(today + 1) };
    let before = redis.command_calls().await;
    let count = stats.count_unique(request(64)).await.unwrap().into_inner().count;
    assert_eq!(ran(&before, &redis.command_calls().await), expect(&[("pfcount", 1)]), "64 days: one PFCOUNT");
    assert!((63..=67).contains(&count), "{count}");

    let before = redis.command_calls().await;
    let count = stats.count_unique(request(300)).await.unwrap().into_inner().count;
    let ran = ran(&before, &redis.command_calls().await);
    assert_eq!(ran.get("pfmerge"), Some(&5), "300 days in steps of 64: {ran:?}");
    assert!((197..=205).contains(&count), "{count}");
    assert_eq!(keys(&redis, &server, "su:{u}:m:*").await, Vec::<String>::new(), "no scratch key is left");
}
