//! SessionService behaviour, RPC by RPC, against a real Redis.

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use cachecoord::proto::{
    CheckTokensRequest, CreateSessionRequest, CreateSessionResponse, DeleteSessionRequest, DeleteUserSessionsRequest,
    GetSessionRequest, ListUserSessionsRequest, RevokeTokenRequest, Session, TouchSessionRequest, UpdateSessionRequest,
    session_service_client::SessionServiceClient,
};
use common::{RedisServer, TestServer, assert_invalid, ms};
use deadpool_redis::redis::{self, AsyncCommands};
use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};
use tonic::transport::Channel;

type Client = SessionServiceClient<Channel>;

// ---- building data -------------------------------------------------------

fn num(n: f64) -> Value {
    Value { kind: Some(Kind::NumberValue(n)) }
}
fn text(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}
fn boolean(b: bool) -> Value {
    Value { kind: Some(Kind::BoolValue(b)) }
}
fn null() -> Value {
    Value { kind: Some(Kind::NullValue(0)) }
}
fn list(values: Vec<Value>) -> Value {
    Value { kind: Some(Kind::ListValue(ListValue { values })) }
}
fn obj(fields: Vec<(&str, Value)>) -> Struct {
    Struct { fields: fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>() }
}
fn nested(fields: Vec<(&str, Value)>) -> Value {
    Value { kind: Some(Kind::StructValue(obj(fields))) }
}

// ---- requests --------------------------------------------------------------

fn create(user: &str, data: Option<Struct>, ttl_ms: Option<u64>) -> CreateSessionRequest {
    CreateSessionRequest { user_id: user.into(), data, ttl: ttl_ms.and_then(ms) }
}

async fn create_ok(client: &mut Client, user: &str, data: Option<Struct>, ttl_ms: Option<u64>) -> Session {
    client.create_session(create(user, data, ttl_ms)).await.unwrap().into_inner().session.expect("session")
}

async fn get(client: &mut Client, id: &str, touch: bool) -> Option<Session> {
    let response = client.get_session(GetSessionRequest { session_id: id.into(), touch }).await.unwrap().into_inner();
    assert_eq!(response.found, response.session.is_some());
    response.session
}

async fn update(client: &mut Client, id: &str, data: Struct, merge: bool) -> Option<Session> {
    let request = UpdateSessionRequest { session_id: id.into(), data: Some(data), merge };
    let response = client.update_session(request).await.unwrap().into_inner();
    assert_eq!(response.found, response.session.is_some());
    response.session
}

async fn list_ids(client: &mut Client, user: &str) -> Vec<String> {
    let request = ListUserSessionsRequest { user_id: user.into() };
    let sessions = client.list_user_sessions(request).await.unwrap().into_inner().sessions;
    sessions.into_iter().map(|s| s.session_id).collect()
}

fn revoke(token: &str, expires_at_ms: i64) -> RevokeTokenRequest {
    RevokeTokenRequest { token: token.into(), expires_at: Some(timestamp(expires_at_ms)) }
}

async fn check(client: &mut Client, tokens: &[&str]) -> Vec<bool> {
    let tokens = tokens.iter().map(|t| t.to_string()).collect();
    client.check_tokens(CheckTokensRequest { tokens }).await.unwrap().into_inner().revoked
}

// ---- time ------------------------------------------------------------------

fn millis(ts: &Option<Timestamp>) -> i64 {
    let ts = ts.as_ref().expect("timestamp");
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
}

fn timestamp(ms: i64) -> Timestamp {
    Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

// ---- what Redis holds ---------------------------------------------------------

fn session_key(server: &TestServer, id: &str) -> String {
    cachecoord::keys::Keys::new(&server.prefix).session(id)
}

fn index_key(server: &TestServer, user: &str) -> String {
    cachecoord::keys::Keys::new(&server.prefix).user_sessions(user)
}

/// Every key the service wrote under its prefix.
async fn stored_keys(redis: &RedisServer, server: &TestServer) -> Vec<String> {
    let mut conn = redis.client().await;
    let mut keys: Vec<String> = conn.keys(format!("{}:*", server.prefix)).await.unwrap();
    keys.sort();
    keys
}

async fn pexpiretime(redis: &RedisServer, key: &str) -> i64 {
    let mut conn = redis.client().await;
    redis::cmd("PEXPIRETIME").arg(key).query_async(&mut conn).await.unwrap()
}

/// Waits (bounded) until Redis holds no key of this server.
async fn wait_until_no_keys(redis: &RedisServer, server: &TestServer) {
    for _ in 0..500 {
        if stored_keys(redis, server).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("keys remain: {:?}", stored_keys(redis, server).await);
}

fn rich_data() -> Struct {
    obj(vec![
        ("name", text("Zoë 🎉 \"quoted\" \\ / 中文")),
        ("age", num(42.0)),
        ("ratio", num(0.1 + 0.2)),
        ("negative", num(-12.5)),
        ("admin", boolean(true)),
        ("banned", boolean(false)),
        ("nothing", null()),
        ("roles", list(vec![text("a"), num(1.0), null(), list(vec![]), nested(vec![])])),
        ("prefs", nested(vec![("theme", text("dark")), ("deep", nested(vec![("x", list(vec![boolean(false)]))]))])),
        ("empty_list", list(vec![])),
        ("empty_object", nested(vec![])),
    ])
}

// ---- tests -----------------------------------------------------------------------

#[tokio::test]
async fn create_then_get_round_trips_data_and_times() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();

    let before = now_ms();
    let created = create_ok(&mut client, "user-1", Some(rich_data()), Some(60_000)).await;
    let after = now_ms();
    // The user's 8-character tag, then 16 random bytes as 22 base64 characters.
    assert_eq!(created.session_id.len(), 30, "{}", created.session_id);
    assert!(created.session_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert_eq!(created.user_id, "user-1");
    assert_eq!(created.data, Some(rich_data()));
    let created_at = millis(&created.created_at);
    assert!((before - 1000..=after + 1000).contains(&created_at), "created_at {created_at}");
    assert_eq!(millis(&created.expires_at) - created_at, 60_000);
    // expires_at is exactly what Redis will act on.
    assert_eq!(pexpiretime(&redis, &session_key(&server, &created.session_id)).await, millis(&created.expires_at));

    let got = get(&mut client, &created.session_id, false).await.expect("found");
    assert_eq!(got, created);
}

#[tokio::test]
async fn data_is_plain_json_readable_by_any_redis_client() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let data = obj(vec![
        ("n", num(5.0)),
        ("s", text("é")),
        ("l", list(vec![num(1.5), null()])),
        ("o", nested(vec![("t", boolean(true))])),
    ]);
    let session = create_ok(&mut client, "u", Some(data), None).await;

    let mut conn = redis.client().await;
    let key = session_key(&server, &session.session_id);
    let json: String = conn.hget(&key, "data").await.unwrap();
    // Whole numbers are integers, as redis-py's json.loads would want them.
    assert_eq!(json, r#"{"l":[1.5,null],"n":5,"o":{"t":true},"s":"é"}"#);
    let user: String = conn.hget(&key, "user").await.unwrap();
    assert_eq!(user, "u");

    // JSON written by another client is read back as a Struct.
    let _: () = conn.hset(&key, "data", r#"{"from":"python","n":[1,2.5,{}],"big":12345678901234567}"#).await.unwrap();
    let got = get(&mut client, &session.session_id, false).await.expect("found").data.unwrap();
    assert_eq!(got.fields["from"], text("python"));
    assert_eq!(got.fields["n"], list(vec![num(1.0), num(2.5), nested(vec![])]));
    assert_eq!(got.fields["big"], num(12_345_678_901_234_567.0));
}

#[tokio::test]
async fn absent_data_is_an_empty_object_and_absent_ttl_the_default() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let session = create_ok(&mut client, "u", None, None).await;
    assert_eq!(session.data, Some(Struct::default()));
    assert_eq!(millis(&session.expires_at) - millis(&session.created_at), 24 * 3600 * 1000);
    let mut conn = redis.client().await;
    let json: String = conn.hget(session_key(&server, &session.session_id), "data").await.unwrap();
    assert_eq!(json, "{}");

    let server = TestServer::start_with(&redis, &["--session-default-ttl", "90s"]).await;
    let session = create_ok(&mut server.sessions(), "u", None, None).await;
    assert_eq!(millis(&session.expires_at) - millis(&session.created_at), 90_000);

    // A default above --max-ttl is cut to it.
    let server = TestServer::start_with(&redis, &["--max-ttl", "1m", "--cache-default-ttl", "1m"]).await;
    let session = create_ok(&mut server.sessions(), "u", None, None).await;
    assert_eq!(millis(&session.expires_at) - millis(&session.created_at), 60_000);
}

#[tokio::test]
async fn unknown_sessions_are_not_found_not_errors() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    assert!(get(&mut client, "never-issued", false).await.is_none());
    assert!(get(&mut client, "never-issued", true).await.is_none());
    let touched = client.touch_session(TouchSessionRequest { session_id: "nope".into(), ttl: None }).await.unwrap();
    assert!(!touched.into_inner().found);
    assert!(update(&mut client, "nope", obj(vec![("a", num(1.0))]), true).await.is_none());
    assert!(update(&mut client, "nope", obj(vec![("a", num(1.0))]), false).await.is_none());
    let deleted = client.delete_session(DeleteSessionRequest { session_id: "nope".into() }).await.unwrap();
    assert!(!deleted.into_inner().deleted);
    assert!(list_ids(&mut client, "nobody").await.is_empty());
    let request = DeleteUserSessionsRequest { user_id: "nobody".into(), keep_session_id: None };
    assert_eq!(client.delete_user_sessions(request).await.unwrap().into_inner().deleted, 0);
    // None of that wrote anything.
    assert!(stored_keys(&redis, &server).await.is_empty());
}

#[tokio::test]
async fn get_with_touch_and_touch_slide_the_idle_timeout() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let session = create_ok(&mut client, "u", None, Some(10_000)).await;
    let id = session.session_id.clone();
    let key = session_key(&server, &id);
    let first_expiry = millis(&session.expires_at);

    // A plain read does not slide.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let read = get(&mut client, &id, false).await.unwrap();
    assert_eq!(millis(&read.expires_at), first_expiry);

    // A touching read slides by the session's own 10 s, from now.
    let before = now_ms();
    let touched = get(&mut client, &id, true).await.unwrap();
    let after = now_ms();
    let expiry = millis(&touched.expires_at);
    assert!(expiry > first_expiry, "{expiry} <= {first_expiry}");
    assert!((before + 10_000 - 1000..=after + 10_000 + 1000).contains(&expiry), "{expiry}");
    assert_eq!(pexpiretime(&redis, &key).await, expiry);
    assert_eq!(touched.created_at, session.created_at);
    assert_eq!(touched.data, session.data);

    // TouchSession with a ttl: expires that long from now and keeps it.
    let touched = client
        .touch_session(TouchSessionRequest { session_id: id.clone(), ttl: ms(600_000) })
        .await
        .unwrap()
        .into_inner();
    assert!(touched.found);
    let expiry = millis(&touched.session.unwrap().expires_at);
    assert!((now_ms() + 600_000 - 2000..=now_ms() + 600_000).contains(&expiry), "{expiry}");
    assert_eq!(pexpiretime(&redis, &key).await, expiry);
    let mut conn = redis.client().await;
    let idle: u64 = conn.hget(&key, "idle").await.unwrap();
    assert_eq!(idle, 600_000);
    // Later touches without a ttl slide by the kept 600 s, not the original 10 s.
    let touched = client.touch_session(TouchSessionRequest { session_id: id.clone(), ttl: None }).await.unwrap();
    let expiry = millis(&touched.into_inner().session.unwrap().expires_at);
    assert!(expiry >= now_ms() + 600_000 - 2000, "{expiry}");
    // The user's index lives at least as long as the session.
    assert_eq!(pexpiretime(&redis, &index_key(&server, "u")).await, expiry);
}

#[tokio::test]
async fn a_touched_session_outlives_its_first_expiry_and_then_ends_at_expires_at() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let session = create_ok(&mut client, "u", None, Some(3_000)).await;
    let id = session.session_id;
    let first_expiry = millis(&session.expires_at);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let expiry = millis(&get(&mut client, &id, true).await.expect("still live").expires_at);
    assert!(expiry >= first_expiry + 1_400, "{expiry} vs {first_expiry}");

    // Past the first expiry, the touched session is still there.
    let wait = first_expiry + 300 - now_ms();
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    assert!(get(&mut client, &id, false).await.is_some(), "touch did not slide the expiry");

    // It ends at expires_at, to the second.
    let gone_at = loop {
        if get(&mut client, &id, false).await.is_none() {
            break now_ms();
        }
        assert!(now_ms() < expiry + 5_000, "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("expired {} ms after expires_at", gone_at - expiry);
    assert!((expiry..expiry + 1_000).contains(&gone_at), "gone at {gone_at}, expires_at {expiry}");

    // An expired session is not revived by a touch.
    let touched = client.touch_session(TouchSessionRequest { session_id: id.clone(), ttl: ms(60_000) }).await.unwrap();
    assert!(!touched.into_inner().found);
    assert!(stored_keys(&redis, &server).await.is_empty());
}

#[tokio::test]
async fn update_merges_or_replaces_without_sliding() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let initial = obj(vec![("a", num(1.0)), ("b", nested(vec![("x", list(vec![]))])), ("c", text("keep"))]);
    let session = create_ok(&mut client, "u", Some(initial), Some(60_000)).await;
    let id = session.session_id.clone();
    tokio::time::sleep(Duration::from_millis(20)).await;

    // Merge: sent fields replace theirs (null is stored as null), others stay.
    let merged = update(&mut client, &id, obj(vec![("a", null()), ("d", text("new"))]), true).await.unwrap();
    let want =
        obj(vec![("a", null()), ("b", nested(vec![("x", list(vec![]))])), ("c", text("keep")), ("d", text("new"))]);
    assert_eq!(merged.data, Some(want.clone()));
    assert_eq!(merged.expires_at, session.expires_at, "an update must not slide");
    assert_eq!(get(&mut client, &id, false).await.unwrap().data, Some(want));

    // An empty merge changes nothing.
    let same = update(&mut client, &id, Struct::default(), true).await.unwrap();
    assert_eq!(same.data, merged.data);

    // Replace: the whole object.
    let replaced = update(&mut client, &id, obj(vec![("z", boolean(true))]), false).await.unwrap();
    assert_eq!(replaced.data, Some(obj(vec![("z", boolean(true))])));
    assert_eq!(replaced.expires_at, session.expires_at);
    let replaced = update(&mut client, &id, Struct::default(), false).await.unwrap();
    assert_eq!(replaced.data, Some(Struct::default()));
}

#[tokio::test]
async fn merge_keeps_other_fields_byte_for_byte() {
    // The merge must not re-encode what it does not change: Redis's cjson
    // would turn [] into {}, round numbers to 14 digits and reorder fields.
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let id = create_ok(&mut client, "u", None, None).await.session_id;
    let key = session_key(&server, &id);
    let mut conn = redis.client().await;
    let stored = r#"{"z":[],"y":{},"big":12345678901234567,"f":0.30000000000000004,"u":"\u00e9\"}{,[" , "tricky,\"key\"" : [1,{"a":"]"}]}"#;
    let _: () = conn.hset(&key, "data", stored).await.unwrap();

    update(&mut client, &id, obj(vec![("new", num(1.0)), ("y", list(vec![])), ("tricky,\"key\"", null())]), true)
        .await
        .unwrap();
    let json: String = conn.hget(&key, "data").await.unwrap();
    assert_eq!(
        json,
        r#"{"z":[],"y":[],"big":12345678901234567,"f":0.30000000000000004,"u":"\u00e9\"}{,[","tricky,\"key\"":null,"new":1}"#
    );
    // And it is still JSON that parses to what the RPC answers.
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["u"], "é\"}{,[");

    // A stored field whose name was written with escapes is still matched.
    let _: () = conn.hset(&key, "data", r#"{"caf\u00e9":1,"x":2}"#).await.unwrap();
    update(&mut client, &id, obj(vec![("café", num(3.0))]), true).await.unwrap();
    let json: String = conn.hget(&key, "data").await.unwrap();
    assert_eq!(json, r#"{"café":3,"x":2}"#);
}

#[tokio::test]
async fn twenty_concurrent_merges_of_distinct_fields_all_survive() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let initial = obj(vec![("from_create", text("yes")), ("n", num(0.0))]);
    let id = create_ok(&mut client, "u", Some(initial), None).await.session_id;

    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut client = server.sessions();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let field = format!("f{i}");
            update(&mut client, &id, obj(vec![(field.as_str(), num(f64::from(i)))]), true).await.expect("found");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let data = get(&mut client, &id, false).await.unwrap().data.unwrap();
    assert_eq!(data.fields.len(), 22, "{:?}", data.fields.keys());
    for i in 0..20 {
        assert_eq!(data.fields[&format!("f{i}")], num(f64::from(i)));
    }
    assert_eq!(data.fields["from_create"], text("yes"));
}

#[tokio::test]
async fn per_user_cap_evicts_the_oldest_in_the_same_step() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--session-max-per-user", "2"]).await;
    let mut client = server.sessions();
    let first = create_ok(&mut client, "u", None, None).await.session_id;
    let second = create_ok(&mut client, "u", None, None).await.session_id;
    let other_user = create_ok(&mut client, "v", None, None).await.session_id;
    let third = client.create_session(create("u", None, None)).await.unwrap().into_inner();
    assert_eq!(third.evicted_session_ids, vec![first.clone()]);
    let third = third.session.unwrap().session_id;
    assert!(get(&mut client, &first, false).await.is_none());
    assert_eq!(list_ids(&mut client, "u").await, vec![third, second]);
    assert_eq!(list_ids(&mut client, "v").await, vec![other_user]);
}

#[tokio::test]
async fn twenty_concurrent_creates_with_a_cap_of_five_leave_the_five_newest() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--session-max-per-user", "5"]).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut client = server.sessions();
        tasks.push(tokio::spawn(async move {
            client.create_session(create("busy", None, None)).await.unwrap().into_inner()
        }));
    }
    let mut responses: Vec<CreateSessionResponse> = Vec::new();
    for task in tasks {
        responses.push(task.await.unwrap());
    }
    let created: Vec<Session> = responses.iter().map(|r| r.session.clone().unwrap()).collect();
    let evicted: Vec<String> = responses.iter().flat_map(|r| r.evicted_session_ids.clone()).collect();
    let evicted_set: HashSet<&String> = evicted.iter().collect();
    assert_eq!(evicted.len(), 15, "each create past the cap evicts exactly one");
    assert_eq!(evicted_set.len(), 15, "no session is evicted twice");

    let mut client = server.sessions();
    let live = list_ids(&mut client, "busy").await;
    assert_eq!(live.len(), 5);
    let survivors: HashSet<&String> =
        created.iter().map(|s| &s.session_id).filter(|id| !evicted_set.contains(id)).collect();
    assert_eq!(survivors, live.iter().collect());
    // The survivors are the newest: none was created before an evicted one.
    let created_at = |id: &String| millis(&created.iter().find(|s| &s.session_id == id).unwrap().created_at);
    let newest_evicted = evicted.iter().map(created_at).max().unwrap();
    assert!(live.iter().all(|id| created_at(id) >= newest_evicted));
    // Listed newest first.
    let order: Vec<i64> = live.iter().map(created_at).collect();
    assert!(order.windows(2).all(|w| w[0] >= w[1]), "{order:?}");

    // Redis holds exactly the five sessions and the index of five.
    let mut conn = redis.client().await;
    let indexed: u64 = conn.zcard(index_key(&server, "busy")).await.unwrap();
    assert_eq!(indexed, 5);
    assert_eq!(stored_keys(&redis, &server).await.len(), 6);
}

#[tokio::test]
async fn without_a_cap_a_user_keeps_every_session() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    for _ in 0..30 {
        let response = client.create_session(create("u", None, None)).await.unwrap().into_inner();
        assert!(response.evicted_session_ids.is_empty());
    }
    assert_eq!(list_ids(&mut client, "u").await.len(), 30);
}

#[tokio::test]
async fn two_thousand_concurrent_creates_get_distinct_ids() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut client = server.sessions();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..250 {
                ids.push(create_ok(&mut client, &format!("user{t}"), None, None).await.session_id);
            }
            ids
        }));
    }
    let mut ids = HashSet::new();
    for task in tasks {
        for id in task.await.unwrap() {
            assert!(ids.insert(id), "duplicate id");
        }
    }
    assert_eq!(ids.len(), 2000);
    println!("2000 CreateSession RPCs from 8 tasks: {:?}", started.elapsed());
}

#[tokio::test]
async fn list_is_newest_first_and_prunes_expired_ids() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let a = create_ok(&mut client, "u", None, None).await.session_id;
    let b = create_ok(&mut client, "u", None, None).await.session_id;
    let c = create_ok(&mut client, "u", None, None).await.session_id;
    let mut conn = redis.client().await;
    let index = index_key(&server, "u");
    let indexed: u64 = conn.zcard(&index).await.unwrap();
    assert_eq!(indexed, 3);

    // Remove b's key the way Redis's own expiry does: behind the index's back.
    // (Real expiry is exercised in no_key_of_a_user_remains_after_the_last_session_ends.)
    let _: () = conn.del(session_key(&server, &b)).await.unwrap();
    assert_eq!(list_ids(&mut client, "u").await, vec![c.clone(), a.clone()]);
    let members: Vec<String> = conn.zrange(&index, 0, -1).await.unwrap();
    assert_eq!(members, vec![session_key(&server, &a), session_key(&server, &c)], "the dead id is pruned");
}

#[tokio::test]
async fn no_key_of_a_user_remains_after_the_last_session_ends() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();

    // Ended by DeleteSession.
    let a = create_ok(&mut client, "u", None, Some(60_000)).await.session_id;
    let b = create_ok(&mut client, "u", None, Some(120_000)).await;
    let index = index_key(&server, "u");
    assert_eq!(pexpiretime(&redis, &index).await, millis(&b.expires_at), "index expires with its longest-lived");
    assert!(
        client.delete_session(DeleteSessionRequest { session_id: b.session_id }).await.unwrap().into_inner().deleted
    );
    let a_expiry = pexpiretime(&redis, &session_key(&server, &a)).await;
    assert_eq!(pexpiretime(&redis, &index).await, a_expiry, "index shrinks to the survivor");
    assert!(client.delete_session(DeleteSessionRequest { session_id: a }).await.unwrap().into_inner().deleted);
    assert!(stored_keys(&redis, &server).await.is_empty());

    // Ended by expiry: the index expires with the last session.
    create_ok(&mut client, "u", None, Some(150)).await;
    create_ok(&mut client, "u", None, Some(300)).await;
    wait_until_no_keys(&redis, &server).await;

    // Ended by expiry after a touch shortened the longest-lived session.
    let long = create_ok(&mut client, "u", None, Some(600_000)).await.session_id;
    create_ok(&mut client, "u", None, Some(200)).await;
    client.touch_session(TouchSessionRequest { session_id: long, ttl: ms(300) }).await.unwrap();
    wait_until_no_keys(&redis, &server).await;

    // Ended by DeleteUserSessions.
    create_ok(&mut client, "u", None, None).await;
    create_ok(&mut client, "u", None, None).await;
    let request = DeleteUserSessionsRequest { user_id: "u".into(), keep_session_id: None };
    assert_eq!(client.delete_user_sessions(request).await.unwrap().into_inner().deleted, 2);
    assert!(stored_keys(&redis, &server).await.is_empty());
}

#[tokio::test]
async fn delete_user_sessions_can_keep_the_current_one() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let mut mine = Vec::new();
    for _ in 0..4 {
        mine.push(create_ok(&mut client, "u1", None, None).await.session_id);
    }
    let theirs = create_ok(&mut client, "u2", None, None).await.session_id;

    let keep = |user: &str, keep: &str| DeleteUserSessionsRequest {
        user_id: user.into(),
        keep_session_id: Some(keep.to_string()),
    };
    assert_eq!(client.delete_user_sessions(keep("u1", &mine[1])).await.unwrap().into_inner().deleted, 3);
    assert_eq!(list_ids(&mut client, "u1").await, vec![mine[1].clone()]);
    assert!(get(&mut client, &mine[1], false).await.is_some());

    // Another user's session keeps nothing of u1's, and is itself untouched.
    assert_eq!(client.delete_user_sessions(keep("u1", &theirs)).await.unwrap().into_inner().deleted, 1);
    assert!(list_ids(&mut client, "u1").await.is_empty());
    assert_eq!(list_ids(&mut client, "u2").await, vec![theirs.clone()]);

    // An unknown id keeps nothing.
    create_ok(&mut client, "u1", None, None).await;
    assert_eq!(client.delete_user_sessions(keep("u1", "unknown")).await.unwrap().into_inner().deleted, 1);
    assert!(list_ids(&mut client, "u1").await.is_empty());
}

#[tokio::test]
async fn revoked_tokens_are_stored_as_hashes_until_they_expire() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let token = "eyJhbGciOiJIUzI1NiJ9.secret-token-material.sig";
    let expires_at = now_ms() + 60_000;
    assert!(client.revoke_token(revoke(token, expires_at)).await.unwrap().into_inner().revoked);
    assert_eq!(check(&mut client, &[token, "other", token]).await, vec![true, false, true]);

    // Redis holds a hash, never the token: not in any key name or value.
    let mut conn = redis.client().await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(!keys[0].contains("secret-token-material"));
    let value: Vec<u8> = conn.get(&keys[0]).await.unwrap();
    assert!(!String::from_utf8_lossy(&value).contains("secret-token-material"));
    let dump: Vec<u8> = redis::cmd("DUMP").arg(&keys[0]).query_async(&mut conn).await.unwrap();
    assert!(!String::from_utf8_lossy(&dump).contains("secret-token-material"));
    // It expires at expires_at, to the millisecond.
    assert_eq!(pexpiretime(&redis, &keys[0]).await, expires_at);

    // Revoking again keeps the later instant.
    assert!(client.revoke_token(revoke(token, expires_at - 30_000)).await.unwrap().into_inner().revoked);
    assert_eq!(pexpiretime(&redis, &keys[0]).await, expires_at);
    assert!(client.revoke_token(revoke(token, expires_at + 30_000)).await.unwrap().into_inner().revoked);
    assert_eq!(pexpiretime(&redis, &keys[0]).await, expires_at + 30_000);

    // A short revocation lapses by itself.
    assert!(client.revoke_token(revoke("short-lived", now_ms() + 1_000)).await.unwrap().into_inner().revoked);
    assert_eq!(check(&mut client, &["short-lived"]).await, vec![true]);
    for _ in 0..500 {
        if check(&mut client, &["short-lived"]).await == vec![false] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(check(&mut client, &["short-lived"]).await, vec![false]);
}

#[tokio::test]
async fn revoking_with_an_expiry_already_past_stores_nothing() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    for past in [now_ms() - 1, now_ms() - 86_400_000, -5_000] {
        let response = client.revoke_token(revoke("expired", past)).await.unwrap().into_inner();
        assert!(!response.revoked);
    }
    assert!(stored_keys(&redis, &server).await.is_empty());
    assert_eq!(check(&mut client, &["expired"]).await, vec![false]);
}

#[tokio::test]
async fn check_tokens_answers_a_thousand_in_order_in_one_round_trip() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let tokens: Vec<String> = (0..1000).map(|i| format!("token-{i}")).collect();
    let expires_at = now_ms() + 600_000;
    for token in tokens.iter().filter(|t| t.ends_with('7')) {
        client.revoke_token(revoke(token, expires_at)).await.unwrap();
    }
    let before = redis.calls("mget").await;
    let started = Instant::now();
    let revoked =
        client.check_tokens(CheckTokensRequest { tokens: tokens.clone() }).await.unwrap().into_inner().revoked;
    println!("CheckTokens of 1000: {:?}", started.elapsed());
    assert_eq!(redis.calls("mget").await - before, 1);
    assert_eq!(revoked.len(), 1000);
    for (token, revoked) in tokens.iter().zip(revoked) {
        assert_eq!(revoked, token.ends_with('7'), "{token}");
    }
    // An empty list gets an empty answer, without Redis.
    assert!(check(&mut client, &[]).await.is_empty());
    assert_eq!(redis.calls("mget").await - before, 1);
}

#[tokio::test]
async fn every_session_rpc_is_one_script_call() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--session-max-per-user", "3"]).await;
    let mut client = server.sessions();
    // Load the scripts so each call below is exactly one EVALSHA.
    let id = create_ok(&mut client, "u", None, None).await.session_id;
    get(&mut client, &id, true).await;
    update(&mut client, &id, obj(vec![]), true).await;
    list_ids(&mut client, "u").await;
    client.delete_session(DeleteSessionRequest { session_id: "x".into() }).await.unwrap();
    let request = || DeleteUserSessionsRequest { user_id: "x".into(), keep_session_id: None };
    client.delete_user_sessions(request()).await.unwrap();
    client.revoke_token(revoke("t", now_ms() + 60_000)).await.unwrap();

    let mut calls = redis.calls("evalsha").await;
    let mut one_more = async |what: &str| {
        let now = redis.calls("evalsha").await;
        assert_eq!(now - calls, 1, "{what}");
        calls = now;
    };
    for _ in 0..5 {
        create_ok(&mut client, "u", None, None).await;
        one_more("create").await;
    }
    get(&mut client, &id, false).await;
    one_more("get").await;
    get(&mut client, &id, true).await;
    one_more("get+touch").await;
    client.touch_session(TouchSessionRequest { session_id: id.clone(), ttl: ms(1000) }).await.unwrap();
    one_more("touch").await;
    update(&mut client, &id, obj(vec![("a", num(1.0))]), true).await;
    one_more("merge").await;
    list_ids(&mut client, "u").await;
    one_more("list").await;
    client.delete_session(DeleteSessionRequest { session_id: id.clone() }).await.unwrap();
    one_more("delete").await;
    client.delete_user_sessions(request()).await.unwrap();
    one_more("delete user").await;
    client.revoke_token(revoke("t", now_ms() + 60_000)).await.unwrap();
    one_more("revoke").await;
}

#[tokio::test]
async fn limits_hold_at_and_past_the_boundary() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let id_512 = "i".repeat(512);
    let id_513 = "i".repeat(513);

    // user_id: 1..512 bytes.
    assert!(client.create_session(create(&id_512, None, None)).await.is_ok());
    assert_invalid(client.create_session(create(&id_513, None, None)).await, "user_id: must be at most 512 bytes");
    assert_invalid(client.create_session(create("", None, None)).await, "user_id: must not be empty");
    assert_invalid(client.list_user_sessions(ListUserSessionsRequest { user_id: "".into() }).await, "user_id");
    let request = |user: &str, keep: Option<&str>| DeleteUserSessionsRequest {
        user_id: user.into(),
        keep_session_id: keep.map(String::from),
    };
    assert_invalid(client.delete_user_sessions(request("", None)).await, "user_id");
    assert_invalid(client.delete_user_sessions(request("u", Some(""))).await, "keep_session_id: must not be empty");
    assert_invalid(client.delete_user_sessions(request("u", Some(&id_513))).await, "keep_session_id");
    assert!(client.delete_user_sessions(request("u", Some(&id_512))).await.is_ok());

    // session_id: 1..512 bytes, on every RPC that takes one.
    for id in ["", id_513.as_str()] {
        assert_invalid(
            client.get_session(GetSessionRequest { session_id: id.into(), touch: true }).await,
            "session_id",
        );
        let touch = TouchSessionRequest { session_id: id.into(), ttl: None };
        assert_invalid(client.touch_session(touch).await, "session_id");
        let update = UpdateSessionRequest { session_id: id.into(), data: None, merge: true };
        assert_invalid(client.update_session(update).await, "session_id");
        assert_invalid(client.delete_session(DeleteSessionRequest { session_id: id.into() }).await, "session_id");
    }
    assert!(get(&mut client, &id_512, false).await.is_none());

    // ttl: positive, at most 30 days.
    let days_30 = Some(prost_types::Duration { seconds: 30 * 86_400, nanos: 0 });
    let days_30_plus = Some(prost_types::Duration { seconds: 30 * 86_400, nanos: 1 });
    let with_ttl = |ttl| CreateSessionRequest { user_id: "u".into(), data: None, ttl };
    assert!(client.create_session(with_ttl(days_30)).await.is_ok());
    assert_invalid(client.create_session(with_ttl(days_30_plus)).await, "ttl: must be at most 30days");
    assert_invalid(client.create_session(with_ttl(ms(0))).await, "ttl: must be positive");
    let touch = |ttl| TouchSessionRequest { session_id: "x".into(), ttl };
    assert_invalid(client.touch_session(touch(days_30_plus)).await, "ttl");
    assert_invalid(client.touch_session(touch(ms(0))).await, "ttl");

    // data: at most 16 KiB as JSON (--session-max-data-bytes). {"x":"…"} is 8 bytes plus the string.
    const DATA: usize = 16 << 10;
    let sized = |len: usize| obj(vec![("x", text(&"a".repeat(len - 8)))]);
    let session = create_ok(&mut client, "u", Some(sized(DATA)), None).await;
    assert_invalid(
        client.create_session(create("u", Some(sized(DATA + 1)), None)).await,
        "data: must be at most 16384 bytes",
    );
    let id = session.session_id;
    assert!(update(&mut client, &id, sized(DATA), false).await.is_some());
    let replace = UpdateSessionRequest { session_id: id.clone(), data: Some(sized(DATA + 1)), merge: false };
    assert_invalid(client.update_session(replace).await, "data: must be at most 16384 bytes");
    let merge = UpdateSessionRequest { session_id: id.clone(), data: Some(sized(DATA + 1)), merge: true };
    assert_invalid(client.update_session(merge).await, "data: must be at most 16384 bytes");
    // A merge whose own fields fit but whose result would not: refused, nothing changes.
    let merge = UpdateSessionRequest { session_id: id.clone(), data: Some(obj(vec![("y", num(1.0))])), merge: true };
    assert_invalid(client.update_session(merge).await, "data: must be at most 16384 bytes");
    assert_eq!(get(&mut client, &id, false).await.unwrap().data, Some(sized(DATA)));
    // …and one that replaces a field to land exactly on the limit is fine.
    let shrink = obj(vec![("x", text(&"b".repeat(DATA - 8 - 8))), ("y", num(1.0))]);
    let merged = update(&mut client, &id, shrink.clone(), true).await.unwrap();
    assert_eq!(merged.data, Some(shrink));
    let nan = obj(vec![("n", num(f64::NAN))]);
    assert_invalid(client.create_session(create("u", Some(nan), None)).await, "data.n: must be a finite number");

    // token: 1 byte up to 1 MiB; tokens: at most 1,000.
    let far = now_ms() + 60_000;
    let mib = "t".repeat(1 << 20);
    assert!(client.revoke_token(revoke(&mib, far)).await.unwrap().into_inner().revoked);
    assert_eq!(check(&mut client, &[&mib]).await, vec![true]);
    let mib_plus = "t".repeat((1 << 20) + 1);
    assert_invalid(client.revoke_token(revoke(&mib_plus, far)).await, "token: must be at most 1048576 bytes");
    assert_invalid(client.revoke_token(revoke("", far)).await, "token: must not be empty");
    let no_expiry = RevokeTokenRequest { token: "t".into(), expires_at: None };
    assert_invalid(client.revoke_token(no_expiry).await, "expires_at: is required");
    let bad_nanos = RevokeTokenRequest { token: "t".into(), expires_at: Some(Timestamp { seconds: 1, nanos: -1 }) };
    assert_invalid(client.revoke_token(bad_nanos).await, "expires_at");
    // Revocations have their own bound (--max-revocation-ttl, 366 days), far
    // past --max-ttl (30 days): a 90-day refresh token stays revoked for all
    // of its life.
    let day = 86_400_000;
    assert!(client.revoke_token(revoke("refresh", now_ms() + 90 * day)).await.unwrap().into_inner().revoked);
    assert_eq!(check(&mut client, &["refresh"]).await, vec![true]);
    let too_far = now_ms() + 366 * day + 60_000;
    assert_invalid(client.revoke_token(revoke("t", too_far)).await, "expires_at: must be at most 1year 18h from now");
    assert!(client.revoke_token(revoke("t", now_ms() + 366 * day - 60_000)).await.is_ok());
    let huge = RevokeTokenRequest { token: "t".into(), expires_at: Some(Timestamp { seconds: i64::MAX, nanos: 0 }) };
    assert_invalid(client.revoke_token(huge).await, "expires_at");

    let tokens_1000: Vec<String> = (0..1000).map(|i| format!("t{i}")).collect();
    let mut tokens_1001 = tokens_1000.clone();
    tokens_1001.push("one-more".into());
    assert_eq!(check(&mut client, &tokens_1000.iter().map(String::as_str).collect::<Vec<_>>()).await.len(), 1000);
    assert_invalid(
        client.check_tokens(CheckTokensRequest { tokens: tokens_1001 }).await,
        "tokens: must have at most 1000 items",
    );
    let tokens = vec!["ok".into(), "".into()];
    assert_invalid(client.check_tokens(CheckTokensRequest { tokens }).await, "tokens[1]: must not be empty");
    let tokens = vec!["ok".into(), mib_plus.clone()];
    assert_invalid(client.check_tokens(CheckTokensRequest { tokens }).await, "tokens[1]: must be at most");
}

#[tokio::test]
async fn rejected_requests_write_nothing() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--session-max-data-bytes", "64"]).await;
    let mut client = server.sessions();
    let big = obj(vec![("x", text(&"a".repeat(100)))]);
    assert_invalid(client.create_session(create("u", Some(big), None)).await, "data: must be at most 64 bytes");
    assert_invalid(client.create_session(create("", None, None)).await, "user_id");
    assert_invalid(client.create_session(create("u", None, Some(0))).await, "ttl");
    let nan = obj(vec![("deep", nested(vec![("list", list(vec![num(f64::INFINITY)]))]))]);
    assert_invalid(client.create_session(create("u", Some(nan), None)).await, "data.deep.list[0]");
    assert_invalid(client.revoke_token(revoke("", now_ms() + 1000)).await, "token");
    assert_invalid(client.revoke_token(revoke("t", now_ms() + 367 * 86_400_000)).await, "expires_at");
    assert!(stored_keys(&redis, &server).await.is_empty());

    // A session whose update is refused keeps its data.
    let id = create_ok(&mut client, "u", Some(obj(vec![("a", num(1.0))])), None).await.session_id;
    let big = obj(vec![("x", text(&"a".repeat(100)))]);
    let replace = UpdateSessionRequest { session_id: id.clone(), data: Some(big.clone()), merge: false };
    assert_invalid(client.update_session(replace).await, "data");
    // {"a":1,"b":"…"} is 14 bytes plus the string: 51 b's merge to 65 bytes.
    let merge_b = |len: usize| UpdateSessionRequest {
        session_id: id.clone(),
        data: Some(obj(vec![("b", text(&"b".repeat(len)))])),
        merge: true,
    };
    assert_invalid(client.update_session(merge_b(51)).await, "data: must be at most 64 bytes as JSON, is 65");
    assert_eq!(get(&mut client, &id, false).await.unwrap().data, Some(obj(vec![("a", num(1.0))])));
    let merged = client.update_session(merge_b(50)).await.unwrap().into_inner().session.unwrap();
    assert_eq!(merged.data.unwrap().fields.len(), 2);
}

#[track_caller]
fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{what}: {status:?}");
    assert_eq!(status.message(), "redis is unavailable; retry later", "no Redis text reaches the client");
}

#[tokio::test]
async fn redis_down_is_unavailable_within_the_timeout() {
    let mut redis = RedisServer::start().await;
    let server =
        TestServer::start_with(&redis, &["--redis-timeout", "300ms", "--redis-connect-timeout", "300ms"]).await;
    let mut client = server.sessions();
    let id = create_ok(&mut client, "u", None, None).await.session_id;
    redis.stop();

    let started = Instant::now();
    assert_unavailable(client.create_session(create("u", None, None)).await, "create");
    let request = GetSessionRequest { session_id: id.clone(), touch: true };
    assert_unavailable(client.get_session(request).await, "get");
    let request = UpdateSessionRequest { session_id: id.clone(), data: None, merge: true };
    assert_unavailable(client.update_session(request).await, "update");
    let request = ListUserSessionsRequest { user_id: "u".into() };
    assert_unavailable(client.list_user_sessions(request).await, "list");
    let request = CheckTokensRequest { tokens: vec!["t".into()] };
    assert_unavailable(client.check_tokens(request).await, "check");
    let elapsed = started.elapsed();
    println!("5 RPCs against a stopped Redis answered UNAVAILABLE in {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    // Slow rather than gone: a Redis stuck in DEBUG SLEEP.
    redis.restart().await;
    let mut ok = false;
    for _ in 0..100 {
        if client.create_session(create("u", None, None)).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the service recovers when Redis is back");
    let sleeper = redis.stall(2.0).await;
    let started = Instant::now();
    let result = client.get_session(GetSessionRequest { session_id: id, touch: false }).await;
    let elapsed = started.elapsed();
    println!("GetSession against a sleeping Redis: UNAVAILABLE in {elapsed:?}");
    assert_unavailable(result, "get while Redis sleeps");
    assert!(elapsed < Duration::from_millis(1_500), "{elapsed:?}");
    sleeper.await.unwrap();
}

#[tokio::test]
async fn by_default_a_user_keeps_at_most_100_sessions() {
    // The session scripts walk a user's whole index inside Redis, so the
    // default cap keeps each under the blocking budget (RELIABILITY.md).
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let first = create_ok(&mut client, "u", None, None).await.session_id;
    for _ in 1..100 {
        create_ok(&mut client, "u", None, None).await;
    }
    assert_eq!(list_ids(&mut client, "u").await.len(), 100);
    let next = client.create_session(create("u", None, None)).await.unwrap().into_inner();
    assert_eq!(next.evicted_session_ids, vec![first]);
    assert_eq!(list_ids(&mut client, "u").await.len(), 100);
}

#[tokio::test]
async fn a_revocation_lasts_as_long_as_the_token_it_revokes() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = server.sessions();
    let day = 86_400_000;
    assert!(client.revoke_token(revoke("refresh-token", now_ms() + 90 * day)).await.unwrap().into_inner().revoked);
    let mut redis_client = redis.client().await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{}:rt:*", server.prefix)).query_async(&mut redis_client).await.unwrap();
    assert_eq!(keys.len(), 1);
    let pttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut redis_client).await.unwrap();
    assert!(pttl > 89 * day && pttl <= 90 * day, "the denylist entry lives 90 days: {pttl} ms");
}
