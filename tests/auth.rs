//! Authentication and tenants: API keys from a file (none, wrong, revoked
//! by a reload, calling what they may not), and, for every RPC, that one
//! tenant never reads, changes or wakes anything of another's.

mod common;

use std::{path::Path, time::Duration};

use cachecoord::{
    auth::keyring,
    proto::{
        AbandonFillRequest, AcquireRequest, AddUniqueRequest, CheckRequest, CheckTokensRequest, CountActiveRequest,
        CountUniqueRequest, CreateSessionRequest, DeleteRequest, DeleteSessionRequest, DeleteUserSessionsRequest,
        Delta, ExtendRequest, FetchOutcome, FetchRequest, FillRequest, GetManyRequest, GetRequest, GetSeriesRequest,
        GetSessionRequest, GetTotalsRequest, Granularity, HoldEvent, HoldRequest, IncrementRequest, InspectRequest,
        InvalidateTagsRequest, Limit, ListUserSessionsRequest, MarkActiveRequest, ReleaseRequest, ResetLimitsRequest,
        RevokeTokenRequest, SetRequest, TouchRequest, TouchSessionRequest, UpdateSessionRequest,
        cache_service_client::CacheServiceClient, lock_service_client::LockServiceClient,
        rate_limit_service_client::RateLimitServiceClient, session_service_client::SessionServiceClient,
        stats_service_client::StatsServiceClient,
    },
};
use common::{RedisServer, TestServer, ms};
use tonic::{
    Code, Request, Status,
    metadata::{AsciiMetadataValue, MetadataKey},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// Adds one metadata header (the credential) to every call.
#[derive(Clone)]
struct Credential {
    header: MetadataKey<tonic::metadata::Ascii>,
    value: AsciiMetadataValue,
}

impl Interceptor for Credential {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(self.header.clone(), self.value.clone());
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Credential>;

/// Clients of every service that present one credential.
struct As {
    cache: CacheServiceClient<Authed>,
    sessions: SessionServiceClient<Authed>,
    rate_limit: RateLimitServiceClient<Authed>,
    locks: LockServiceClient<Authed>,
    stats: StatsServiceClient<Authed>,
    health: HealthClient<Authed>,
}

impl As {
    fn header(server: &TestServer, header: &'static str, value: &str) -> Self {
        let credential =
            Credential { header: MetadataKey::from_static(header), value: value.parse().expect("ascii credential") };
        let channel = || InterceptedService::new(server.channel.clone(), credential.clone());
        Self {
            cache: CacheServiceClient::new(channel()),
            sessions: SessionServiceClient::new(channel()),
            rate_limit: RateLimitServiceClient::new(channel()),
            locks: LockServiceClient::new(channel()),
            stats: StatsServiceClient::new(channel()),
            health: HealthClient::new(channel()),
        }
    }

    fn key(server: &TestServer, key: &str) -> Self {
        Self::header(server, "authorization", &format!("Bearer {key}"))
    }
}

/// A key with its entry for the keys file.
struct Key {
    key: String,
    entry: String,
}

fn key(id: &str, tenant: &str, allow: &[&str]) -> Key {
    let allow: Vec<String> = allow.iter().map(ToString::to_string).collect();
    let (key, entry) = keyring::entry(id, tenant, &allow).expect("key");
    Key { key, entry }
}

fn write_keys(path: &Path, keys: &[&Key], extra: &str) {
    let text: String = keys.iter().map(|k| k.entry.as_str()).collect::<String>() + extra;
    // Written whole and renamed, as an operator's tooling should, so a poll
    // never reads half a file.
    let staging = path.with_extension("tmp");
    std::fs::write(&staging, text).expect("write keys");
    std::fs::rename(&staging, path).expect("rename keys");
}

async fn start(redis: &RedisServer, keys_file: &Path, flags: &[&str]) -> TestServer {
    let path = keys_file.to_str().expect("utf-8 path");
    let mut all = vec!["--auth-keys-file", path, "--auth-keys-poll", "20ms"];
    all.extend_from_slice(flags);
    TestServer::start_with(redis, &all).await
}

fn get(key: &str) -> GetRequest {
    GetRequest { key: key.into() }
}

/// Polls `call` until it answers `code`; panics after 10 s.
async fn until_code<F, Fut, T>(mut call: F, code: Code)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let wait = async {
        loop {
            match call().await {
                Err(status) if status.code() == code => return,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap_or_else(|_| panic!("never answered {code:?}"));
}

#[tokio::test]
async fn keys_none_wrong_revoked_and_out_of_scope_are_refused() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("keys.toml");
    let full = key("full", "shop", &["*"]);
    let cache_only = key("cache-only", "shop", &["cachecoord.v1.CacheService"]);
    let getter = key("getter", "shop", &["cachecoord.v1.CacheService/Get"]);
    write_keys(&file, &[&full, &cache_only, &getter], "");
    let server = start(&redis, &file, &[]).await;

    // No key, a wrong key, a key of an unknown id, a malformed one: the same
    // UNAUTHENTICATED, which does not tell whether an id exists.
    let mut messages = Vec::new();
    let (wrong, _) = keyring::new_key("full").expect("key");
    let (unknown, _) = keyring::new_key("nobody").expect("key");
    for attempt in [None, Some(wrong.as_str()), Some(unknown.as_str()), Some("not-a-key")] {
        let mut client = match attempt {
            None => CacheServiceClient::new(server.channel.clone()),
            Some(key) => {
                let status = As::key(&server, key).cache.get(get("k")).await.expect_err("refused");
                assert_eq!(status.code(), Code::Unauthenticated, "{key}");
                messages.push(status.message().to_string());
                continue;
            }
        };
        let status = client.get(get("k")).await.expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated);
        messages.push(status.message().to_string());
    }
    assert!(messages.windows(2).all(|pair| pair[0] == pair[1]), "{messages:?}");
    assert!(!messages[0].contains("full") && !messages[0].contains("nobody"), "{}", messages[0]);

    // Keys in force, by Bearer and by dapr-api-token.
    As::key(&server, &full.key).cache.get(get("k")).await.expect("full key");
    As::key(&server, &full.key).locks.inspect(InspectRequest { name: "l".into() }).await.expect("full key");
    As::header(&server, "dapr-api-token", &cache_only.key).cache.get(get("k")).await.expect("dapr-api-token");

    // A key calling what it may not: PERMISSION_DENIED, and nothing written.
    let cache_only_client = As::key(&server, &cache_only.key);
    let mut locks = cache_only_client.locks.clone();
    let status = locks.acquire(AcquireRequest { name: "l".into(), ..Default::default() }).await.expect_err("denied");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("cachecoord.v1.LockService/Acquire"), "{}", status.message());
    let mut getter_cache = As::key(&server, &getter.key).cache;
    getter_cache.get(get("k")).await.expect("allowed method");
    let set = SetRequest { key: "k".into(), value: b"v".to_vec(), ..Default::default() };
    assert_eq!(getter_cache.set(set).await.expect_err("denied").code(), Code::PermissionDenied);
    assert!(redis_keys(&redis, &format!("{}:*", server.prefix)).await.is_empty(), "a refused call wrote");

    // Health answers anyone; the rest needs a key.
    let mut health = HealthClient::new(server.channel.clone());
    health.check(HealthCheckRequest::default()).await.expect("health is open");

    // A revoked key (removed from the file) stops working at the reload; the
    // others keep working.
    write_keys(&file, &[&cache_only, &getter], "");
    let full_cache = As::key(&server, &full.key).cache;
    until_code(
        || {
            let mut client = full_cache.clone();
            async move { client.get(get("k")).await }
        },
        Code::Unauthenticated,
    )
    .await;
    As::key(&server, &cache_only.key).cache.get(get("k")).await.expect("still in force");

    // A file that fails to parse keeps the keys in force (the reloader's own
    // test shows the bad version is read and rejected).
    std::fs::write(&file, "[[keys]\n").expect("write");
    As::key(&server, &cache_only.key).cache.get(get("k")).await.expect("old keys stay");
    // Restoring a key brings it back.
    write_keys(&file, &[&full, &cache_only], "");
    let mut full_cache = As::key(&server, &full.key).cache;
    let wait = async {
        while full_cache.get(get("k")).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.expect("restored key works again");
    server.shutdown().await;
}

#[tokio::test]
async fn health_can_require_a_key_and_a_bad_file_stops_start_up() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("keys.toml");
    let prober = key("prober", "ops", &["grpc.health.v1.Health"]);
    write_keys(&file, &[&prober], "");
    let path = file.to_str().expect("utf-8 path");
    let flags = ["--auth-keys-file", path, "--auth-health-needs-key"];
    let server = TestServer::start_unchecked(&redis, &flags).await;
    let mut health = As::key(&server, &prober.key).health;
    let serving = async {
        loop {
            match health.check(HealthCheckRequest::default()).await {
                Ok(answer) if answer.get_ref().status() == ServingStatus::Serving => return,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), serving).await.expect("serving, asked with a key");
    let mut open = HealthClient::new(server.channel.clone());
    assert_eq!(open.check(HealthCheckRequest::default()).await.expect_err("needs a key").code(), Code::Unauthenticated);
    As::key(&server, &prober.key).health.check(HealthCheckRequest::default()).await.expect("with its key");
    server.shutdown().await;

    std::fs::write(&file, "[[keys]]\nid = \"x\"\n").expect("write");
    let url = redis.url();
    let args = ["cachecoord", "--auth-keys-file", path, "--redis-url", &url];
    let config = <cachecoord::config::Config as clap::Parser>::try_parse_from(args).expect("flags");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let err = cachecoord::server::run(config, listener, std::future::pending()).await.expect_err("refuses to start");
    assert!(err.to_string().contains("missing field"), "{err}");
}

/// Redis keys matching `pattern`.
async fn redis_keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let mut client = redis.client().await;
    redis::cmd("KEYS").arg(pattern).query_async(&mut client).await.expect("KEYS")
}

#[tokio::test]
async fn tenants_never_meet_in_any_rpc() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("keys.toml");
    let (key_a, key_b) = (key("a-key", "alpha", &["*"]), key("b-key", "beta", &["*"]));
    write_keys(&file, &[&key_a, &key_b], "");
    let server = start(&redis, &file, &[]).await;
    let (mut a, mut b) = (As::key(&server, &key_a.key), As::key(&server, &key_b.key));

    // Cache: the same key and tag names in both tenants.
    let set = |value: &[u8]| SetRequest {
        key: "k".into(),
        value: value.to_vec(),
        tags: vec!["t".into()],
        ..Default::default()
    };
    assert!(a.cache.set(set(b"alpha")).await.expect("set").into_inner().stored);
    assert!(!b.cache.get(get("k")).await.expect("get").into_inner().found);
    let many = b.cache.get_many(GetManyRequest { keys: vec!["k".into()] }).await.expect("get_many").into_inner();
    assert!(!many.entries[0].found);
    assert_eq!(b.cache.delete(DeleteRequest { keys: vec!["k".into()] }).await.expect("delete").into_inner().deleted, 0);
    assert!(!b.cache.touch(TouchRequest { key: "k".into(), ttl: ms(1) }).await.expect("touch").into_inner().found);
    let invalidated = b.cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["t".into()] }).await.expect("inv");
    assert_eq!(invalidated.into_inner().invalidated, 0);
    let fetch = |key: &str, wait: u64| FetchRequest { key: key.into(), fill_timeout: ms(10_000), max_wait: ms(wait) };
    let fetched = b.cache.fetch(fetch("k", 0)).await.expect("fetch").into_inner();
    assert_eq!(fetched.outcome(), FetchOutcome::Fill, "beta has no k, so it fills its own");
    let abandon = AbandonFillRequest { key: "k".into(), fill_token: fetched.fill_token };
    assert!(b.cache.abandon_fill(abandon).await.expect("abandon").into_inner().released);
    assert!(b.cache.set(set(b"beta")).await.expect("set").into_inner().stored);
    assert_eq!(a.cache.get(get("k")).await.expect("get").into_inner().value, b"alpha");
    assert_eq!(
        b.cache
            .invalidate_tags(InvalidateTagsRequest { tags: vec!["t".into()] })
            .await
            .expect("inv")
            .into_inner()
            .invalidated,
        1
    );
    assert_eq!(a.cache.get(get("k")).await.expect("get").into_inner().value, b"alpha", "beta's tag is beta's");

    // Fetch wake-ups: beta's fill of "w" neither fills nor wakes alpha's waiter.
    let lease = a.cache.fetch(fetch("w", 0)).await.expect("fetch").into_inner();
    assert_eq!(lease.outcome(), FetchOutcome::Fill);
    let mut waiter_cache = a.cache.clone();
    let waiter = tokio::spawn(async move { waiter_cache.fetch(fetch("w", 5_000)).await });
    let b_lease = b.cache.fetch(fetch("w", 0)).await.expect("fetch").into_inner();
    assert_eq!(b_lease.outcome(), FetchOutcome::Fill, "alpha's lease is not beta's");
    let fill = |value: &[u8], token: String| FillRequest {
        key: "w".into(),
        value: value.to_vec(),
        fill_token: token,
        ..Default::default()
    };
    assert!(b.cache.fill(fill(b"beta", b_lease.fill_token)).await.expect("fill").into_inner().stored);
    assert!(a.cache.fill(fill(b"alpha", lease.fill_token)).await.expect("fill").into_inner().stored);
    let waited = waiter.await.expect("task").expect("fetch").into_inner();
    assert_eq!(
        (waited.outcome(), waited.value.as_slice()),
        (FetchOutcome::Hit, &b"alpha"[..]),
        "served alpha's fill only"
    );

    // Sessions and revoked tokens.
    let create = CreateSessionRequest { user_id: "u".into(), ..Default::default() };
    let session = a.sessions.create_session(create).await.expect("create").into_inner().session.expect("session");
    let id = session.session_id.clone();
    let found = b.sessions.get_session(GetSessionRequest { session_id: id.clone(), ..Default::default() }).await;
    assert!(!found.expect("get").into_inner().found);
    let touched = b.sessions.touch_session(TouchSessionRequest { session_id: id.clone(), ttl: None }).await;
    assert!(!touched.expect("touch").into_inner().found);
    let update = UpdateSessionRequest { session_id: id.clone(), data: None, merge: true };
    assert!(!b.sessions.update_session(update).await.expect("update").into_inner().found);
    let deleted = b.sessions.delete_session(DeleteSessionRequest { session_id: id.clone() }).await.expect("delete");
    assert!(!deleted.into_inner().deleted);
    let listed = b.sessions.list_user_sessions(ListUserSessionsRequest { user_id: "u".into() }).await.expect("list");
    assert!(listed.into_inner().sessions.is_empty());
    let wiped = DeleteUserSessionsRequest { user_id: "u".into(), keep_session_id: None };
    assert_eq!(b.sessions.delete_user_sessions(wiped).await.expect("wipe").into_inner().deleted, 0);
    let found = a.sessions.get_session(GetSessionRequest { session_id: id, ..Default::default() }).await;
    assert!(found.expect("get").into_inner().found, "alpha's session survived beta's calls");
    let in_an_hour =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let expires_at = Some(prost_types::Timestamp { seconds: in_an_hour as i64, nanos: 0 });
    let revoke = RevokeTokenRequest { token: "tok".into(), expires_at };
    a.sessions.revoke_token(revoke).await.expect("revoke");
    let checked = b.sessions.check_tokens(CheckTokensRequest { tokens: vec!["tok".into()] }).await.expect("check");
    assert_eq!(checked.into_inner().revoked, vec![false]);
    let checked = a.sessions.check_tokens(CheckTokensRequest { tokens: vec!["tok".into()] }).await.expect("check");
    assert_eq!(checked.into_inner().revoked, vec![true]);

    // Rate limits: separate counters; beta's reset does not reset alpha's.
    let check = || CheckRequest {
        limits: vec![Limit { key: "r".into(), limit: 1, period: ms(60_000), ..Default::default() }],
        ..Default::default()
    };
    assert!(a.rate_limit.check(check()).await.expect("check").into_inner().allowed);
    assert!(b.rate_limit.check(check()).await.expect("check").into_inner().allowed, "beta's own allowance");
    b.rate_limit.reset_limits(ResetLimitsRequest { keys: vec!["r".into()] }).await.expect("reset");
    assert!(!a.rate_limit.check(check()).await.expect("check").into_inner().allowed, "alpha still counted");

    // Locks: the same name is two locks; neither can release, extend or see
    // the other's; a release in one never wakes a waiter in the other.
    let acquire =
        |wait: u64| AcquireRequest { name: "L".into(), ttl: ms(30_000), wait: ms(wait), owner: String::new() };
    let held = a.locks.acquire(acquire(0)).await.expect("acquire").into_inner();
    assert!(held.acquired);
    assert!(!b.locks.inspect(InspectRequest { name: "L".into() }).await.expect("inspect").into_inner().held);
    let release = |lease_id: &str| ReleaseRequest { name: "L".into(), lease_id: lease_id.into() };
    assert!(!b.locks.release(release(&held.lease_id)).await.expect("release").into_inner().released);
    let extend = ExtendRequest { name: "L".into(), lease_id: held.lease_id.clone(), ttl: ms(30_000) };
    assert!(!b.locks.extend(extend).await.expect("extend").into_inner().extended);
    let b_held = b.locks.acquire(acquire(0)).await.expect("acquire").into_inner();
    assert!(b_held.acquired, "beta's L is free");
    let mut waiting_locks = a.locks.clone();
    let waiter = tokio::spawn(async move { waiting_locks.acquire(acquire(10_000)).await });
    let mut hold = b.locks.clone();
    // A Hold of beta's L: acquired at once (beta's L was released below first).
    assert!(b.locks.release(release(&b_held.lease_id)).await.expect("release").into_inner().released);
    let first = HoldRequest { name: "L".into(), ttl: ms(30_000), wait: ms(0), owner: String::new() };
    let mut events = hold.hold(tokio_stream::iter([first])).await.expect("hold").into_inner();
    assert_eq!(events.message().await.expect("event").expect("one").event(), HoldEvent::Acquired);
    assert!(!waiter.is_finished(), "alpha's waiter took beta's lock");
    assert!(a.locks.release(release(&held.lease_id)).await.expect("release").into_inner().released);
    let granted = waiter.await.expect("task").expect("acquire").into_inner();
    assert!(granted.acquired && granted.fencing_token > held.fencing_token);
    assert_eq!(
        a.locks.inspect(InspectRequest { name: "L".into() }).await.expect("inspect").into_inner().fencing_token,
        granted.fencing_token
    );
    drop(events);

    // Stats.
    let delta = IncrementRequest { deltas: vec![Delta { name: "n".into(), amount: Some(5) }] };
    a.stats.increment(delta).await.expect("increment");
    let totals = b.stats.get_totals(GetTotalsRequest { names: vec!["n".into()] }).await.expect("totals");
    assert_eq!(totals.into_inner().values, vec![0]);
    let now = prost_types::Timestamp {
        seconds: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64,
        nanos: 0,
    };
    let day_ago = prost_types::Timestamp { seconds: now.seconds - 86_400, ..now };
    let now = prost_types::Timestamp { seconds: now.seconds + 86_400, ..now }; // past any bucket just written
    let series = GetSeriesRequest {
        name: "n".into(),
        granularity: Granularity::Hour.into(),
        start: Some(day_ago),
        end: Some(now),
    };
    assert_eq!(b.stats.get_series(series.clone()).await.expect("series").into_inner().total, 0);
    assert_eq!(a.stats.get_series(series).await.expect("series").into_inner().total, 5);
    a.stats.mark_active(MarkActiveRequest { group: "g".into(), member: "m".into() }).await.expect("mark");
    let active = b.stats.count_active(CountActiveRequest { group: "g".into(), window: ms(60_000) }).await;
    assert_eq!(active.expect("count").into_inner().count, 0);
    a.stats.add_unique(AddUniqueRequest { name: "v".into(), members: vec!["x".into()] }).await.expect("add");
    let unique = CountUniqueRequest { name: "v".into(), start: Some(day_ago), end: Some(now) };
    assert_eq!(b.stats.count_unique(unique.clone()).await.expect("count").into_inner().count, 0);
    assert_eq!(a.stats.count_unique(unique).await.expect("count").into_inner().count, 1);

    // Everything either tenant wrote lives under its own prefix.
    let all = redis_keys(&redis, &format!("{}:*", server.prefix)).await;
    assert!(!all.is_empty());
    let alpha = format!("{}:t:alpha:", server.prefix);
    let beta = format!("{}:t:beta:", server.prefix);
    let stray: Vec<&String> = all.iter().filter(|k| !k.starts_with(&alpha) && !k.starts_with(&beta)).collect();
    assert!(stray.is_empty(), "keys outside the tenants' spaces: {stray:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_tenant_is_held_to_its_own_tighter_limits() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("keys.toml");
    let (small, big) = (key("small-key", "small", &["*"]), key("big-key", "big", &["*"]));
    write_keys(&file, &[&small, &big], "\n[tenants.small]\nmax_value_bytes = 10\nmax_batch = 2\n");
    let server = start(&redis, &file, &[]).await;
    let value = |n: usize| SetRequest { key: "k".into(), value: vec![b'x'; n], ..Default::default() };
    let mut small_cache = As::key(&server, &small.key).cache;
    small_cache.set(value(10)).await.expect("at the tenant's limit");
    let status = small_cache.set(value(11)).await.expect_err("past it");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("value: must be at most 10 bytes"), "{}", status.message());
    let keys = |n: usize| GetManyRequest { keys: (0..n).map(|i| i.to_string()).collect() };
    small_cache.get_many(keys(2)).await.expect("at the tenant's batch limit");
    assert_eq!(small_cache.get_many(keys(3)).await.expect_err("past it").code(), Code::InvalidArgument);
    // Another tenant keeps the process's limits.
    As::key(&server, &big.key).cache.set(value(11)).await.expect("big tenant");
    server.shutdown().await;
}

/// The Redis ACL rule README "Securing it" recommends, with the test's
/// prefix pattern in place of `cc`.
const ACL_COMMANDS: &str = "+@read +@write +@scripting +@pubsub +@connection +time -@dangerous +info";

#[tokio::test]
async fn the_documented_redis_acl_user_is_enough() {
    let redis = RedisServer::start().await;
    let mut admin = redis.client().await;
    let mut rule = vec!["SETUSER", "cachecoord", "reset", "on", ">acl-test-password", "~t*", "&t*"];
    rule.extend(ACL_COMMANDS.split(' '));
    let _: () = redis::cmd("ACL").arg(&rule).query_async(&mut admin).await.expect("ACL SETUSER");
    let url =
        format!("redis://cachecoord:acl-test-password@127.0.0.1:{}", redis.url().rsplit(':').next().expect("port"));
    let server = TestServer::start_with(&redis, &["--redis-url", &url]).await;

    let mut cache = server.cache();
    let set = SetRequest { key: "k".into(), value: b"v".to_vec(), tags: vec!["t".into()], ..Default::default() };
    cache.set(set).await.expect("Set");
    assert!(cache.get(get("k")).await.expect("Get").into_inner().found);
    let fetched =
        cache.fetch(FetchRequest { key: "f".into(), ..Default::default() }).await.expect("Fetch").into_inner();
    let fill =
        FillRequest { key: "f".into(), value: b"v".to_vec(), fill_token: fetched.fill_token, ..Default::default() };
    cache.fill(fill).await.expect("Fill");
    cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["t".into()] }).await.expect("InvalidateTags");

    let mut sessions = server.sessions();
    let create = CreateSessionRequest { user_id: "u".into(), ..Default::default() };
    let id =
        sessions.create_session(create).await.expect("CreateSession").into_inner().session.expect("session").session_id;
    sessions.get_session(GetSessionRequest { session_id: id, touch: true }).await.expect("GetSession");
    sessions.check_tokens(CheckTokensRequest { tokens: vec!["x".into()] }).await.expect("CheckTokens");

    let check = CheckRequest {
        limits: vec![Limit { key: "r".into(), limit: 5, period: ms(60_000), ..Default::default() }],
        ..Default::default()
    };
    server.rate_limit().check(check).await.expect("Check");

    let mut locks = server.locks();
    let lease = locks.acquire(AcquireRequest { name: "l".into(), ttl: ms(10_000), ..Default::default() }).await;
    let lease = lease.expect("Acquire").into_inner();
    let mut waiting = server.locks();
    let waiter = tokio::spawn(async move {
        waiting
            .acquire(AcquireRequest { name: "l".into(), ttl: ms(10_000), wait: ms(10_000), ..Default::default() })
            .await
    });
    locks.release(ReleaseRequest { name: "l".into(), lease_id: lease.lease_id }).await.expect("Release");
    assert!(waiter.await.expect("task").expect("woken Acquire").into_inner().acquired, "the release woke the waiter");

    let mut stats = server.stats();
    stats
        .increment(IncrementRequest { deltas: vec![Delta { name: "n".into(), amount: Some(1) }] })
        .await
        .expect("Increment");
    stats.add_unique(AddUniqueRequest { name: "v".into(), members: vec!["m".into()] }).await.expect("AddUnique");
    stats.mark_active(MarkActiveRequest { group: "g".into(), member: "m".into() }).await.expect("MarkActive");
    stats.count_active(CountActiveRequest { group: "g".into(), window: ms(60_000) }).await.expect("CountActive");
    server.shutdown().await;
}
