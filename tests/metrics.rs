//! `/metrics`: calls of every service, then a scrape; each counter and
//! histogram moves by exactly what the calls did, under the expected labels.
//! Each test has its own server, and each server its own recorder, so tests
//! run in parallel without seeing each other's counts.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use cachecoord::proto::{
    AbandonFillRequest, AcquireRequest, Algorithm, CheckRequest, CheckTokensRequest, CreateSessionRequest, Delta,
    FetchOutcome, FetchRequest, FillRequest, GetManyRequest, GetRequest, HoldEvent, HoldRequest, IncrementRequest,
    InvalidateTagsRequest, Limit, ReleaseRequest, RevokeTokenRequest, SetRequest,
};
use common::{RedisServer, TestServer, free_port, ms};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::pb::health_check_response::ServingStatus;

/// A scrape: each series (`name{label="value",...}`, labels sorted) and its value.
#[derive(Debug, Default)]
struct Scrape(HashMap<String, f64>);

impl Scrape {
    /// The value of `name` with exactly `labels` (0 when absent).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0.get(&series(name, labels)).copied().unwrap_or(0.0)
    }

    /// The sum of every series of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(key, _)| {
                let (n, rest) = key.split_once('{').unwrap_or((key, ""));
                n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, value)| value)
            .sum()
    }
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let sorted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let labels: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// Parses the Prometheus text format (the subset the exporter writes).
fn parse(text: &str) -> Scrape {
    let mut values = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("name and value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let key = match key.split_once('{') {
            None => key.to_string(),
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("closing brace");
                let pairs: Vec<(&str, &str)> = labels
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                        (k, v.trim_end_matches('"'))
                    })
                    .collect();
                series(name, &pairs)
            }
        };
        values.insert(key, value);
    }
    Scrape(values)
}

/// An HTTP/1.1 GET on the metrics port: status line and body.
async fn http_get(port: u16, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("metrics port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

async fn scrape(port: u16) -> Scrape {
    let (status, body) = http_get(port, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    parse(&body)
}

async fn start(redis: &RedisServer, flags: &[&str]) -> (TestServer, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut all = vec!["--metrics-listen", listen.as_str()];
    all.extend_from_slice(flags);
    (TestServer::start_with(redis, &all).await, port)
}

const CACHE: &str = "cachecoord.v1.CacheService";

fn grpc(service: &'static str, method: &'static str, kind: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![("grpc_service", service), ("grpc_method", method), ("grpc_type", kind)]
}

fn with_code<'a>(labels: &[(&'a str, &'a str)], code: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut labels = labels.to_vec();
    labels.push(("grpc_code", code));
    labels
}

#[tokio::test]
async fn every_service_moves_its_counters_by_exactly_its_calls() {
    let redis = RedisServer::start().await;
    let (server, port) = start(&redis, &["--session-max-per-user", "1"]).await;
    let before = scrape(port).await;

    // Cache: a hit, a miss, a batch of one hit and two misses, a bad key.
    let mut cache = server.cache();
    let set = SetRequest { key: "k".into(), value: b"v".to_vec(), tags: vec!["t".into()], ..Default::default() };
    cache.set(set).await.unwrap();
    assert!(cache.get(GetRequest { key: "k".into() }).await.unwrap().into_inner().found);
    assert!(!cache.get(GetRequest { key: "absent".into() }).await.unwrap().into_inner().found);
    let keys = vec!["k".into(), "x".into(), "y".into()];
    cache.get_many(GetManyRequest { keys }).await.unwrap();
    let bad = cache.get(GetRequest { key: String::new() }).await.expect_err("empty key");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // Fetch: a fill, the fill stored, then a hit; a stale token abandons nothing.
    let fetch = || FetchRequest { key: "f".into(), ..Default::default() };
    let first = cache.fetch(fetch()).await.unwrap().into_inner();
    assert_eq!(first.outcome(), FetchOutcome::Fill);
    let fill =
        FillRequest { key: "f".into(), fill_token: first.fill_token, value: b"1".to_vec(), ..Default::default() };
    assert!(cache.fill(fill).await.unwrap().into_inner().stored);
    assert_eq!(cache.fetch(fetch()).await.unwrap().into_inner().outcome(), FetchOutcome::Hit);
    let abandon = AbandonFillRequest { key: "f".into(), fill_token: "stale".into() };
    assert!(!cache.abandon_fill(abandon).await.unwrap().into_inner().released);
    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["t".into()] }).await.unwrap();
    assert_eq!(invalidated.into_inner().invalidated, 1);

    // Sessions: two for one user under a cap of one (one eviction), one
    // revocation, then a check of the revoked token and another.
    let mut sessions = server.sessions();
    for _ in 0..2 {
        let create = CreateSessionRequest { user_id: "u".into(), ..Default::default() };
        sessions.create_session(create).await.unwrap();
    }
    let soon = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + Duration::from_secs(60);
    let expires_at = prost_types::Timestamp { seconds: soon.as_secs() as i64, nanos: 0 };
    let revoke = RevokeTokenRequest { token: "tok".into(), expires_at: Some(expires_at) };
    assert!(sessions.revoke_token(revoke).await.unwrap().into_inner().revoked);
    let check = CheckTokensRequest { tokens: vec!["tok".into(), "other".into()] };
    assert_eq!(sessions.check_tokens(check).await.unwrap().into_inner().revoked, vec![true, false]);

    // Rate limits: a fixed window of one, checked twice; a token bucket once.
    let mut limits = server.rate_limit();
    let limit = |key: &str, algorithm: Algorithm| Limit {
        key: key.into(),
        limit: 1,
        period: ms(60_000),
        algorithm: algorithm.into(),
        burst: None,
    };
    for allowed in [true, false] {
        let request = CheckRequest { limits: vec![limit("r", Algorithm::FixedWindow)], ..Default::default() };
        assert_eq!(limits.check(request).await.unwrap().into_inner().allowed, allowed);
    }
    let request = CheckRequest { limits: vec![limit("b", Algorithm::TokenBucket)], ..Default::default() };
    assert!(limits.check(request).await.unwrap().into_inner().allowed);

    // Locks: taken at once, then busy for a caller that does not wait.
    let mut locks = server.locks();
    let acquire = || AcquireRequest { name: "l".into(), ttl: ms(10_000), wait: None, owner: "o".into() };
    let grant = locks.acquire(acquire()).await.unwrap().into_inner();
    assert!(grant.acquired);
    assert!(!locks.acquire(acquire()).await.unwrap().into_inner().acquired);
    let release = ReleaseRequest { name: "l".into(), lease_id: grant.lease_id };
    assert!(locks.release(release).await.unwrap().into_inner().released);

    // A Hold: acquired, one renewal seen, then closed by the client.
    let (tx, rx) = mpsc::channel(1);
    let hold = HoldRequest { name: "h".into(), ttl: ms(300), wait: None, owner: "o".into() };
    tx.send(hold).await.unwrap();
    let mut events = locks.hold(ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert_eq!(events.message().await.unwrap().unwrap().event(), HoldEvent::Acquired);
    assert_eq!(events.message().await.unwrap().unwrap().event(), HoldEvent::Renewed);
    drop(tx);
    while events.message().await.unwrap().is_some() {}

    // Stats: two counters in one call.
    let deltas = vec![Delta { name: "a".into(), amount: Some(2) }, Delta { name: "b".into(), amount: None }];
    server.stats().increment(IncrementRequest { deltas }).await.unwrap();

    let after = scrape(port).await;
    let moved = |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);

    // gRPC: started and handled by code; the handling-time histogram counts every call.
    let get = grpc(CACHE, "Get", "unary");
    assert_eq!(moved("grpc_server_started_total", &get), 3.0);
    assert_eq!(moved("grpc_server_handled_total", &with_code(&get, "OK")), 2.0);
    assert_eq!(moved("grpc_server_handled_total", &with_code(&get, "InvalidArgument")), 1.0);
    assert_eq!(moved("grpc_server_handling_seconds_count", &get), 3.0);
    assert!(after.get("grpc_server_handling_seconds_bucket", &[&get[..], &[("le", "+Inf")]].concat()) >= 3.0);
    let fetch = grpc(CACHE, "Fetch", "unary");
    assert_eq!(moved("grpc_server_handled_total", &with_code(&fetch, "OK")), 2.0);
    let hold = grpc("cachecoord.v1.LockService", "Hold", "bidi_stream");
    assert_eq!(moved("grpc_server_started_total", &hold), 1.0);
    assert_eq!(moved("grpc_server_handled_total", &with_code(&hold, "OK")), 1.0, "counted at the trailers");
    for (service, method, calls) in [
        ("cachecoord.v1.SessionService", "CreateSession", 2.0),
        ("cachecoord.v1.SessionService", "CheckTokens", 1.0),
        ("cachecoord.v1.RateLimitService", "Check", 3.0),
        ("cachecoord.v1.LockService", "Acquire", 2.0),
        ("cachecoord.v1.StatsService", "Increment", 1.0),
    ] {
        let labels = grpc(service, method, "unary");
        assert_eq!(moved("grpc_server_handled_total", &with_code(&labels, "OK")), calls, "{method}");
        assert_eq!(moved("grpc_server_handling_seconds_count", &labels), calls, "{method}");
    }

    // Domain counters.
    let lookups = "cachecoord_cache_lookups_total";
    assert_eq!(moved(lookups, &[("rpc", "Get"), ("result", "hit")]), 1.0);
    assert_eq!(moved(lookups, &[("rpc", "Get"), ("result", "miss")]), 1.0);
    assert_eq!(moved(lookups, &[("rpc", "GetMany"), ("result", "hit")]), 1.0);
    assert_eq!(moved(lookups, &[("rpc", "GetMany"), ("result", "miss")]), 2.0);
    assert_eq!(moved("cachecoord_cache_fetch_total", &[("outcome", "fill")]), 1.0);
    assert_eq!(moved("cachecoord_cache_fetch_total", &[("outcome", "hit")]), 1.0);
    assert_eq!(moved("cachecoord_cache_fetch_total", &[("outcome", "timeout")]), 0.0);
    assert_eq!(moved("cachecoord_cache_fills_total", &[("result", "stored")]), 1.0);
    assert_eq!(moved("cachecoord_cache_fills_total", &[("result", "abandoned")]), 0.0);
    assert_eq!(moved("cachecoord_cache_tag_invalidated_entries_total", &[]), 1.0);
    assert_eq!(moved("cachecoord_session_events_total", &[("event", "created")]), 2.0);
    assert_eq!(moved("cachecoord_session_events_total", &[("event", "evicted")]), 1.0);
    assert_eq!(moved("cachecoord_token_events_total", &[("event", "revoked")]), 1.0);
    assert_eq!(moved("cachecoord_token_events_total", &[("event", "revoked_hit")]), 1.0);
    let decisions = |algorithm, decision| {
        moved(
            "cachecoord_rate_limit_decisions_total",
            &[("api", "check"), ("algorithm", algorithm), ("decision", decision)],
        )
    };
    assert_eq!(decisions("fixed_window", "allowed"), 1.0);
    assert_eq!(decisions("fixed_window", "denied"), 1.0);
    assert_eq!(decisions("token_bucket", "allowed"), 1.0);
    assert_eq!(decisions("sliding_window", "allowed"), 0.0);
    // Two Acquires and the Hold's own acquire.
    assert_eq!(moved("cachecoord_lock_acquires_total", &[("result", "immediate")]), 2.0);
    assert_eq!(moved("cachecoord_lock_acquires_total", &[("result", "busy")]), 1.0);
    assert!(moved("cachecoord_lock_hold_events_total", &[("event", "renewed")]) >= 1.0);
    assert_eq!(moved("cachecoord_lock_hold_events_total", &[("event", "lost")]), 0.0);
    assert_eq!(moved("cachecoord_stats_increments_total", &[]), 2.0);

    // Redis: every call above went through the connection layer and landed.
    assert!(moved("cachecoord_redis_command_duration_seconds_count", &[("kind", "script")]) >= 20.0);
    assert_eq!(after.get("cachecoord_redis_commands_in_flight", &[]), 0.0);
    assert!(after.get("cachecoord_redis_connections_open", &[]) >= 1.0);
    assert_eq!(after.get("cachecoord_health_serving", &[("service", "")]), 1.0);
    assert_eq!(after.get("cachecoord_health_serving", &[("service", CACHE)]), 1.0);
    assert_eq!(after.sum("cachecoord_redis_errors_total", &[]), 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_redis_outage_shows_in_health_and_errors() {
    let mut redis = RedisServer::start().await;
    let (server, port) = start(&redis, &["--redis-timeout", "300ms", "--redis-connect-timeout", "200ms"]).await;
    let before = scrape(port).await;
    assert_eq!(before.get("cachecoord_health_serving", &[("service", "")]), 1.0);

    redis.stop();
    server.wait_for_health("", ServingStatus::NotServing).await;
    let status = server.cache().get(GetRequest { key: "k".into() }).await.expect_err("redis is down");
    assert_eq!(status.code(), tonic::Code::Unavailable);

    let down = scrape(port).await;
    assert_eq!(down.get("cachecoord_health_serving", &[("service", "")]), 0.0);
    assert_eq!(down.get("cachecoord_health_serving", &[("service", CACHE)]), 0.0);
    assert!(down.sum("cachecoord_redis_errors_total", &[]) > before.sum("cachecoord_redis_errors_total", &[]));
    let get = grpc(CACHE, "Get", "unary");
    assert_eq!(down.get("grpc_server_handled_total", &with_code(&get, "Unavailable")), 1.0);

    redis.restart().await;
    server.wait_for_health("", ServingStatus::Serving).await;
    assert!(server.cache().get(GetRequest { key: "k".into() }).await.is_ok());
    let up = scrape(port).await;
    assert_eq!(up.get("cachecoord_health_serving", &[("service", "")]), 1.0);
    assert!(up.get("cachecoord_redis_reconnects_total", &[]) >= 1.0, "the lost connection was replaced");
    assert_eq!(up.get("grpc_server_handled_total", &with_code(&get, "OK")), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn only_metrics_is_served_and_rpcs_outside_the_contract_count_as_unknown() {
    let redis = RedisServer::start().await;
    let (server, port) = start(&redis, &[]).await;
    let (status, _) = http_get(port, "/other").await;
    assert!(status.contains("404"), "{status}");
    let (status, body) = http_get(port, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    // Every metric is described, with its type.
    // (Handled counts appear with the first call that ends with each code.)
    for def in cachecoord::metrics::DEFS.iter().filter(|def| def.name != "grpc_server_handled_total") {
        let kind = format!("{:?}", def.kind).to_lowercase();
        assert!(body.contains(&format!("# TYPE {} {kind}", def.name)), "{} missing from\n{body}", def.name);
    }

    // A path no service serves: UNIMPLEMENTED, under the bounded "unknown" labels.
    let mut client = tonic::client::Grpc::new(server.channel.clone());
    client.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/nope.Secret/user-key-123");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let result = client.unary(tonic::Request::new(()), path, codec).await;
    assert_eq!(result.expect_err("no such service").code(), tonic::Code::Unimplemented);
    let after = scrape(port).await;
    let unknown = grpc("unknown", "unknown", "unary");
    assert_eq!(after.get("grpc_server_handled_total", &with_code(&unknown, "Unimplemented")), 1.0);
    assert!(!after.0.keys().any(|key| key.contains("user-key-123")), "no caller string becomes a label");
    server.shutdown().await;
}
