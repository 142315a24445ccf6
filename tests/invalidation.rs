//! CacheService/WatchInvalidations: every way an entry changes reaches a
//! watcher on another instance, only for its own key space, and a watch that
//! may have missed something ends.

mod common;

use std::time::Duration;

use cachecoord::{
    api::{Caller, Limits, cache::CacheApi},
    config::Config,
    proto::{
        DeleteRequest, FetchOutcome, FetchRequest, FillRequest, InvalidateTagsRequest, SetItem, SetManyRequest,
        SetRequest, TouchRequest, WatchInvalidationsRequest, WatchInvalidationsResponse,
        cache_service_server::CacheService,
    },
    store::{Redis, cache::CacheStore},
};
use clap::Parser;
use common::{RedisServer, TestServer, assert_invalid, ms};
use deadpool_redis::redis;
use futures::{Stream, StreamExt};
use tonic::{Code, Request};

type Messages = std::pin::Pin<Box<dyn Stream<Item = Result<WatchInvalidationsResponse, tonic::Status>> + Send>>;

fn set(key: &str, value: &[u8]) -> SetRequest {
    SetRequest { key: key.into(), value: value.to_vec(), ..Default::default() }
}

/// Opens a watch and waits for its first (empty) message.
async fn watch(server: &TestServer, prefixes: &[&str]) -> Messages {
    let request = WatchInvalidationsRequest { prefixes: prefixes.iter().map(|p| p.to_string()).collect() };
    let mut stream: Messages = Box::pin(server.cache().watch_invalidations(request).await.unwrap().into_inner());
    let first = next(&mut stream).await.expect("first message");
    assert_eq!(first, WatchInvalidationsResponse::default());
    stream
}

/// The next message (a generous bound, so a lost one fails instead of hanging).
async fn next<S>(stream: &mut S) -> Result<WatchInvalidationsResponse, tonic::Status>
where
    S: Stream<Item = Result<WatchInvalidationsResponse, tonic::Status>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("a message in time").expect("open stream")
}

/// Waits until `key` is reported; the keys reported meanwhile.
async fn until_reported<S>(stream: &mut S, key: &str) -> Vec<String>
where
    S: Stream<Item = Result<WatchInvalidationsResponse, tonic::Status>> + Unpin,
{
    let mut seen = Vec::new();
    loop {
        let message = next(stream).await.expect("no error");
        assert!(!message.all);
        seen.extend(message.keys);
        if seen.iter().any(|k| k == key) {
            return seen;
        }
    }
}

#[tokio::test]
async fn every_write_path_reaches_a_watcher_on_another_instance() {
    let redis = RedisServer::start().await;
    let watcher = TestServer::start(&redis).await;
    let writer = TestServer::start_sibling(&redis, &watcher).await;
    let mut stream = watch(&watcher, &[]).await;
    let mut cache = writer.cache();

    cache.set(SetRequest { tags: vec!["t".into()], ..set("set", b"1") }).await.unwrap();
    until_reported(&mut stream, "set").await;

    let item = |key: &str| SetItem { key: key.into(), value: b"v".to_vec(), ..Default::default() };
    cache.set_many(SetManyRequest { items: vec![item("many1"), item("many2")] }).await.unwrap();
    let seen = until_reported(&mut stream, "many2").await;
    assert!(seen.contains(&"many1".to_string()), "{seen:?}");

    let fetched = cache.fetch(FetchRequest { key: "filled".into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(fetched.outcome(), FetchOutcome::Fill);
    let fill = FillRequest {
        key: "filled".into(),
        fill_token: fetched.fill_token,
        value: b"f".to_vec(),
        ..Default::default()
    };
    assert!(cache.fill(fill).await.unwrap().into_inner().stored);
    until_reported(&mut stream, "filled").await;

    assert!(cache.touch(TouchRequest { key: "filled".into(), ttl: ms(5_000) }).await.unwrap().into_inner().found);
    until_reported(&mut stream, "filled").await;

    cache.delete(DeleteRequest { keys: vec!["many1".into()] }).await.unwrap();
    until_reported(&mut stream, "many1").await;

    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["t".into()] }).await.unwrap();
    assert_eq!(invalidated.into_inner().invalidated, 1);
    until_reported(&mut stream, "set").await;

    // Anything else writing the entry's Redis key counts too.
    let mut conn = redis.client().await;
    let () = redis::cmd("SET").arg(watcher.cache_key("outside")).arg("x").query_async(&mut conn).await.unwrap();
    until_reported(&mut stream, "outside").await;
}

#[tokio::test]
async fn expiry_and_eviction_are_reported() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let mut expiring = watch(&server, &["short"]).await;
    cache.set(SetRequest { ttl: ms(30), ..set("short", b"v") }).await.unwrap();
    until_reported(&mut expiring, "short").await; // the write
    until_reported(&mut expiring, "short").await; // the expiry (Redis's active expiry, or this read)

    let mut evicted = watch(&server, &["victim"]).await;
    cache.set(set("victim", b"v")).await.unwrap();
    until_reported(&mut evicted, "victim").await;
    let mut conn = redis.client().await;
    let used: String = redis::cmd("INFO").arg("memory").query_async(&mut conn).await.unwrap();
    let used: u64 = used
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("used_memory");
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-random")
        .arg("maxmemory")
        .arg(used + (4 << 20))
        .query_async(&mut conn)
        .await
        .unwrap();
    // Fill memory until Redis evicts the victim.
    let mut i = 0;
    let filler = vec![0u8; 64 << 10];
    loop {
        let report = tokio::time::timeout(Duration::from_millis(1), evicted.next()).await;
        if let Ok(Some(message)) = report {
            assert_eq!(message.unwrap().keys, vec!["victim".to_string()]);
            break;
        }
        // Writes may fail with OOM while Redis evicts; either way it evicts.
        let _ = cache.set(set(&format!("filler{i}"), &filler)).await;
        i += 1;
        assert!(i < 100_000, "never evicted");
    }
}

#[tokio::test]
async fn prefixes_filter_and_are_validated() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut users = watch(&server, &["user:", "acct:"]).await;
    let mut cache = server.cache();
    for key in ["order:1", "user:1", "other", "acct:9"] {
        cache.set(set(key, b"v")).await.unwrap();
    }
    let seen = until_reported(&mut users, "acct:9").await;
    assert_eq!(seen, vec!["user:1".to_string(), "acct:9".to_string()]);

    let empty = WatchInvalidationsRequest { prefixes: vec![String::new()] };
    assert_invalid(server.cache().watch_invalidations(empty).await, "prefixes[0]");
}

#[tokio::test]
async fn a_lost_tracking_connection_ends_every_watch_and_a_new_watch_works() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut first = watch(&server, &[]).await;
    let mut second = watch(&server, &["k"]).await;

    // Kill the tracking connection (the only client with tracking on).
    let mut conn = redis.client().await;
    let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut conn).await.unwrap();
    let tracking: Vec<&str> = clients
        .lines()
        .filter(|line| line.split(' ').any(|field| field.starts_with("flags=") && field.contains('t')))
        .filter_map(|line| line.split(' ').find_map(|field| field.strip_prefix("id=")))
        .collect();
    assert_eq!(tracking.len(), 1, "{clients}");
    let _: i64 = redis::cmd("CLIENT").arg("KILL").arg("ID").arg(tracking[0]).query_async(&mut conn).await.unwrap();
    for stream in [&mut first, &mut second] {
        let status = next(stream).await.expect_err("the watch ends");
        assert_eq!(status.code(), Code::Unavailable);
    }

    let mut again = watch(&server, &[]).await;
    server.cache().set(set("k", b"v")).await.unwrap();
    until_reported(&mut again, "k").await;
}

#[tokio::test]
async fn a_flush_says_all_and_shutdown_ends_the_watch() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut stream = watch(&server, &[]).await;
    let mut conn = redis.client().await;
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let message = next(&mut stream).await.unwrap();
    assert!(message.all && message.keys.is_empty());

    server.shutdown().await;
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("ends in time") {
        Some(Err(status)) => assert!(matches!(status.code(), Code::Unavailable | Code::Cancelled), "{status:?}"),
        Some(Ok(message)) => panic!("unexpected {message:?}"),
        None => {}
    }
}

/// The handlers with a tenant in the request's extensions, as the auth layer
/// puts it there.
fn as_tenant<T>(tenant: Option<&str>, limits: Limits, body: T) -> Request<T> {
    let mut request = Request::new(body);
    if let Some(tenant) = tenant {
        request.extensions_mut().insert(Caller { key_id: format!("key-{tenant}"), tenant: tenant.into(), limits });
    }
    request
}

#[tokio::test]
async fn a_watch_sees_only_its_own_tenants_keys_under_the_callers_names() {
    let redis = RedisServer::start().await;
    let config = Config::try_parse_from(["cachecoord", "--redis-url", &redis.url(), "--key-prefix", "tn"]).unwrap();
    let store = CacheStore::new(Redis::new(&config).unwrap(), cachecoord::keys::Keys::new("tn"));
    let limits = Limits::from_config(&config);
    let api = CacheApi::new(store, limits, Duration::from_secs(60), Duration::from_secs(5));

    let mut streams = Vec::new();
    for tenant in [Some("a"), Some("b"), None] {
        let request = as_tenant(tenant, limits, WatchInvalidationsRequest::default());
        let mut stream = api.watch_invalidations(request).await.unwrap().into_inner();
        assert_eq!(next(&mut stream).await.unwrap(), WatchInvalidationsResponse::default());
        streams.push(stream);
    }
    for tenant in [Some("a"), Some("b"), None] {
        let key = format!("{}-key", tenant.unwrap_or("base"));
        api.set(as_tenant(tenant, limits, set(&key, b"v"))).await.unwrap();
        api.set(as_tenant(tenant, limits, set("shared", b"v"))).await.unwrap();
    }
    for (stream, own) in streams.iter_mut().zip(["a-key", "b-key", "base-key"]) {
        let seen = until_reported(stream, "shared").await;
        assert_eq!(seen, vec![own.to_string(), "shared".to_string()]);
        // Nothing of another tenant follows.
        assert!(tokio::time::timeout(Duration::from_millis(50), stream.next()).await.is_err());
    }
}
