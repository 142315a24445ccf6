//! CacheService behaviour, RPC by RPC, against a real Redis.

mod common;

use std::time::Duration;

use cachecoord::proto::{
    DeleteRequest, GetManyRequest, GetRequest, InvalidateTagsRequest, SetCondition, SetItem, SetManyRequest,
    SetRequest, TouchRequest,
};
use common::{RedisServer, TestServer, assert_invalid, ms};
use deadpool_redis::redis::{self, AsyncCommands};

fn set(key: &str, value: &[u8]) -> SetRequest {
    SetRequest { key: key.into(), value: value.to_vec(), ..Default::default() }
}

fn get(key: &str) -> GetRequest {
    GetRequest { key: key.into() }
}

fn ttl_ms(ttl: Option<prost_types::Duration>) -> u64 {
    let ttl = ttl.expect("ttl present");
    ttl.seconds as u64 * 1000 + ttl.nanos as u64 / 1_000_000
}

/// Every key the service wrote under its prefix.
async fn stored_keys(redis: &RedisServer, server: &TestServer) -> Vec<String> {
    let mut conn = redis.client().await;
    conn.keys(format!("{}:*", server.prefix)).await.expect("KEYS")
}

#[tokio::test]
async fn set_then_get_round_trips_value_and_ttl() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();

    let stored =
        cache.set(SetRequest { ttl: ms(60_000), ..set("user:1", b"\x00\xffbytes") }).await.unwrap().into_inner().stored;
    assert!(stored);
    let got = cache.get(get("user:1")).await.unwrap().into_inner();
    assert!(got.found);
    assert_eq!(got.value, b"\x00\xffbytes");
    let ttl = ttl_ms(got.ttl);
    assert!((59_000..=60_000).contains(&ttl), "ttl {ttl}");

    // Empty is a valid value, distinct from a miss.
    cache.set(set("empty", b"")).await.unwrap();
    let got = cache.get(get("empty")).await.unwrap().into_inner();
    assert!(got.found);
    assert!(got.value.is_empty());
}

#[tokio::test]
async fn miss_is_not_an_error() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let got = server.cache().get(get("nope")).await.unwrap().into_inner();
    assert!(!got.found);
    assert!(got.value.is_empty());
    assert!(got.ttl.is_none());
}

#[tokio::test]
async fn absent_ttl_uses_the_configured_default() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--cache-default-ttl", "90s"]).await;
    let mut cache = server.cache();
    cache.set(set("k", b"v")).await.unwrap();
    let ttl = ttl_ms(cache.get(get("k")).await.unwrap().into_inner().ttl);
    assert!((89_000..=90_000).contains(&ttl), "ttl {ttl}");
}

#[tokio::test]
async fn entry_without_expiry_has_no_ttl() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    // Written by another Redis client, without an expiry.
    let mut conn = redis.client().await;
    let _: () = conn.set(server.cache_key("legacy"), "v").await.unwrap();
    let got = server.cache().get(get("legacy")).await.unwrap().into_inner();
    assert!(got.found);
    assert!(got.ttl.is_none());
}

#[tokio::test]
async fn entries_expire() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    cache.set(SetRequest { ttl: ms(50), ..set("short", b"v") }).await.unwrap();
    // Redis expires the key itself; ask Redis when it is gone, then check the RPC agrees.
    let mut conn = redis.client().await;
    let key = server.cache_key("short");
    for _ in 0..200 {
        let exists: bool = conn.exists(&key).await.unwrap();
        if !exists {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!cache.get(get("short")).await.unwrap().into_inner().found);
}

#[tokio::test]
async fn set_conditions() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let with = |key: &str, value: &[u8], condition: SetCondition| SetRequest {
        condition: condition.into(),
        ..set(key, value)
    };

    // IF_PRESENT on a missing key: not stored.
    assert!(!cache.set(with("k", b"1", SetCondition::IfPresent)).await.unwrap().into_inner().stored);
    assert!(!cache.get(get("k")).await.unwrap().into_inner().found);
    // IF_ABSENT on a missing key: stored.
    assert!(cache.set(with("k", b"2", SetCondition::IfAbsent)).await.unwrap().into_inner().stored);
    // IF_ABSENT on a present key: not stored, value kept.
    assert!(!cache.set(with("k", b"3", SetCondition::IfAbsent)).await.unwrap().into_inner().stored);
    assert_eq!(cache.get(get("k")).await.unwrap().into_inner().value, b"2");
    // IF_PRESENT on a present key: stored.
    assert!(cache.set(with("k", b"4", SetCondition::IfPresent)).await.unwrap().into_inner().stored);
    // UNSPECIFIED: always.
    assert!(cache.set(with("k", b"5", SetCondition::Unspecified)).await.unwrap().into_inner().stored);
    assert_eq!(cache.get(get("k")).await.unwrap().into_inner().value, b"5");

    let unknown = SetRequest { condition: 42, ..set("k", b"6") };
    assert_invalid(cache.set(unknown).await, "condition");
}

#[tokio::test]
async fn if_absent_admits_exactly_one_of_many_concurrent_writers() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let writers = (0..64).map(|i| {
        let mut cache = server.cache();
        tokio::spawn(async move {
            let request =
                SetRequest { condition: SetCondition::IfAbsent.into(), ..set("race", format!("{i}").as_bytes()) };
            cache.set(request).await.unwrap().into_inner().stored
        })
    });
    let mut stored = 0;
    for writer in writers.collect::<Vec<_>>() {
        stored += usize::from(writer.await.unwrap());
    }
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn get_many_answers_in_request_order_with_duplicates() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    cache.set(set("a", b"A")).await.unwrap();
    cache.set(set("c", b"C")).await.unwrap();

    let keys: Vec<String> = ["c", "b", "a", "c"].map(String::from).to_vec();
    let entries = cache.get_many(GetManyRequest { keys: keys.clone() }).await.unwrap().into_inner().entries;
    let seen: Vec<_> = entries.iter().map(|e| (e.key.as_str(), e.found, e.value.as_slice())).collect();
    assert_eq!(seen, [("c", true, &b"C"[..]), ("b", false, &b""[..]), ("a", true, &b"A"[..]), ("c", true, &b"C"[..])]);
    assert!(entries[0].ttl.is_some() && entries[1].ttl.is_none());

    let none = cache.get_many(GetManyRequest { keys: vec![] }).await.unwrap().into_inner();
    assert!(none.entries.is_empty());
}

#[tokio::test]
async fn set_many_writes_every_item_with_its_ttl() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let items: Vec<SetItem> = (0..100)
        .map(|i| SetItem {
            key: format!("k{i}"),
            value: format!("v{i}").into_bytes(),
            ttl: if i % 2 == 0 { ms(30_000) } else { None },
            tags: if i < 10 { vec!["first-ten".into()] } else { vec![] },
        })
        .collect();
    let stored = cache.set_many(SetManyRequest { items }).await.unwrap().into_inner().stored;
    assert_eq!(stored, 100);

    let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    let entries = cache.get_many(GetManyRequest { keys }).await.unwrap().into_inner().entries;
    for (i, entry) in entries.iter().enumerate() {
        assert!(entry.found);
        assert_eq!(entry.value, format!("v{i}").into_bytes());
        let ttl = ttl_ms(entry.ttl);
        if i % 2 == 0 {
            assert!(ttl <= 30_000, "k{i} ttl {ttl}");
        } else {
            assert!(ttl > 3_000_000, "k{i} default ttl {ttl}");
        }
    }
    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["first-ten".into()] }).await;
    assert_eq!(invalidated.unwrap().into_inner().invalidated, 10);
}

#[tokio::test]
async fn delete_counts_only_live_entries() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    cache.set(set("a", b"1")).await.unwrap();
    cache.set(set("b", b"2")).await.unwrap();
    let keys = ["a", "b", "missing"].map(String::from).to_vec();
    assert_eq!(cache.delete(DeleteRequest { keys: keys.clone() }).await.unwrap().into_inner().deleted, 2);
    assert_eq!(cache.delete(DeleteRequest { keys }).await.unwrap().into_inner().deleted, 0);
    assert!(!cache.get(get("a")).await.unwrap().into_inner().found);
}

#[tokio::test]
async fn touch_sets_a_new_ttl_on_live_entries_only() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    cache.set(SetRequest { ttl: ms(5_000), ..set("k", b"v") }).await.unwrap();
    let touched = cache.touch(TouchRequest { key: "k".into(), ttl: ms(120_000) }).await.unwrap().into_inner();
    assert!(touched.found);
    let ttl = ttl_ms(cache.get(get("k")).await.unwrap().into_inner().ttl);
    assert!(ttl > 100_000, "ttl {ttl}");
    assert_eq!(cache.get(get("k")).await.unwrap().into_inner().value, b"v");

    let missing = cache.touch(TouchRequest { key: "nope".into(), ttl: ms(1_000) }).await.unwrap().into_inner();
    assert!(!missing.found);
    assert_invalid(cache.touch(TouchRequest { key: "k".into(), ttl: None }).await, "ttl");
}

#[tokio::test]
async fn invalidate_tags_deletes_tagged_entries_once_each() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let tagged =
        |key: &str, tags: &[&str]| SetRequest { tags: tags.iter().map(|t| t.to_string()).collect(), ..set(key, b"v") };
    cache.set(tagged("u1", &["users", "team:a"])).await.unwrap();
    cache.set(tagged("u2", &["users"])).await.unwrap();
    cache.set(tagged("p1", &["posts"])).await.unwrap();
    // Re-tagging replaces: u3 was a user, is now only a post.
    cache.set(tagged("u3", &["users"])).await.unwrap();
    cache.set(tagged("u3", &["posts"])).await.unwrap();

    let tags = vec!["users".to_string(), "team:a".to_string()];
    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags }).await.unwrap().into_inner().invalidated;
    assert_eq!(invalidated, 2, "u1 counted once although it has both tags");
    for (key, found) in [("u1", false), ("u2", false), ("p1", true), ("u3", true)] {
        assert_eq!(cache.get(get(key)).await.unwrap().into_inner().found, found, "{key}");
    }
    // Deleted entries leave their other tags too: nothing left for team:a or users.
    let again = cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["users".into(), "team:a".into()] }).await;
    assert_eq!(again.unwrap().into_inner().invalidated, 0);
}

#[tokio::test]
async fn tag_bookkeeping_expires_with_its_entries() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let request = SetRequest { ttl: ms(80), tags: vec!["t".into()], ..set("k", b"v") };
    cache.set(request).await.unwrap();
    assert_eq!(stored_keys(&redis, &server).await.len(), 4, "entry, its tag list, the tag index and its floor");

    // Every key carries an expiry no later than the entry's.
    let mut conn = redis.client().await;
    for key in stored_keys(&redis, &server).await {
        let pttl: i64 = conn.pttl(&key).await.unwrap();
        assert!((1..=80).contains(&pttl), "{key} pttl {pttl}");
    }
    // And so they all go away.
    for _ in 0..300 {
        if stored_keys(&redis, &server).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("tag bookkeeping outlived its entry: {:?}", stored_keys(&redis, &server).await);
}

/// Tag indexes live in other hash slots than their entries (Redis Cluster),
/// so a delete or an untagging rewrite cannot reach them: the member stays
/// until the entry's old expiry at most, and an invalidation skips it.
#[tokio::test]
async fn deleted_or_untagged_entries_leave_their_tag_index_by_their_old_expiry() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    cache.set(SetRequest { ttl: ms(60_000), tags: vec!["t".into()], ..set("a", b"v") }).await.unwrap();
    cache.set(SetRequest { ttl: ms(60_000), tags: vec!["t".into()], ..set("b", b"v") }).await.unwrap();
    cache.delete(DeleteRequest { keys: vec!["a".into()] }).await.unwrap();
    cache.set(set("b", b"untagged now")).await.unwrap();

    let index = format!("{}:tag:{{t}}", server.prefix);
    let pttl: i64 = redis.client().await.pttl(&index).await.unwrap();
    assert!((1..=60_000).contains(&pttl), "the index expires with the old entries: {pttl}");
    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["t".into()] }).await.unwrap();
    assert_eq!(invalidated.into_inner().invalidated, 0, "nothing is under the tag any more");
    assert!(cache.get(get("b")).await.unwrap().into_inner().found);
    // The invalidation forgot the members; the index's floor (the highest
    // score it gave) expires with the old entries too.
    let floor = format!("{index}:floor");
    let mut left = stored_keys(&redis, &server).await;
    left.sort();
    assert_eq!(left, vec![server.cache_key("b"), floor.clone()]);
    let pttl: i64 = redis.client().await.pttl(&floor).await.unwrap();
    assert!((1..=60_000).contains(&pttl), "the floor expires with the old entries: {pttl}");
}

#[tokio::test]
async fn touch_keeps_tags_valid_until_the_new_expiry() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    cache.set(SetRequest { ttl: ms(1_000), tags: vec!["t".into()], ..set("k", b"v") }).await.unwrap();
    cache.touch(TouchRequest { key: "k".into(), ttl: ms(600_000) }).await.unwrap();
    let mut conn = redis.client().await;
    for key in stored_keys(&redis, &server).await {
        let pttl: i64 = conn.pttl(&key).await.unwrap();
        assert!(pttl > 500_000, "{key} pttl {pttl}");
    }
    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["t".into()] }).await.unwrap();
    assert_eq!(invalidated.into_inner().invalidated, 1);
}

#[tokio::test]
async fn default_limits_hold_at_and_past_the_boundary() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let key_512 = "k".repeat(512);
    let key_513 = "k".repeat(513);
    let mib = vec![7u8; 1 << 20];
    let mib_plus = vec![7u8; (1 << 20) + 1];
    let days_30 = Some(prost_types::Duration { seconds: 30 * 86_400, nanos: 0 });
    let days_30_plus = Some(prost_types::Duration { seconds: 30 * 86_400, nanos: 1 });

    assert!(cache.set(set(&key_512, b"v")).await.unwrap().into_inner().stored);
    assert_invalid(cache.set(set(&key_513, b"v")).await, "key: must be at most 512 bytes");
    assert_invalid(cache.set(set("", b"v")).await, "key: must not be empty");
    assert_invalid(cache.get(get(&key_513)).await, "key");
    assert_invalid(cache.get(get("")).await, "key");

    assert!(cache.set(set("big", &mib)).await.unwrap().into_inner().stored);
    assert_eq!(cache.get(get("big")).await.unwrap().into_inner().value.len(), 1 << 20);
    assert_invalid(cache.set(set("bigger", &mib_plus)).await, "value: must be at most 1048576 bytes");

    assert!(cache.set(SetRequest { ttl: days_30, ..set("long", b"v") }).await.is_ok());
    assert_invalid(cache.set(SetRequest { ttl: days_30_plus, ..set("longer", b"v") }).await, "ttl");
    assert_invalid(cache.set(SetRequest { ttl: ms(0), ..set("zero", b"v") }).await, "ttl: must be positive");
    let negative = Some(prost_types::Duration { seconds: -1, nanos: 0 });
    assert_invalid(cache.set(SetRequest { ttl: negative, ..set("neg", b"v") }).await, "ttl");

    let keys_1000: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    let mut keys_1001 = keys_1000.clone();
    keys_1001.push("one-more".into());
    assert_eq!(
        cache.get_many(GetManyRequest { keys: keys_1000.clone() }).await.unwrap().into_inner().entries.len(),
        1000
    );
    assert_invalid(
        cache.get_many(GetManyRequest { keys: keys_1001.clone() }).await,
        "keys: must have at most 1000 items",
    );
    assert!(cache.delete(DeleteRequest { keys: keys_1000.clone() }).await.is_ok());
    assert_invalid(cache.delete(DeleteRequest { keys: keys_1001.clone() }).await, "keys");
    assert!(cache.invalidate_tags(InvalidateTagsRequest { tags: keys_1000.clone() }).await.is_ok());
    assert_invalid(cache.invalidate_tags(InvalidateTagsRequest { tags: keys_1001.clone() }).await, "tags");
    // An entry's tags: at most 100 (--cache-max-tags; its write is one script).
    let tagged_100 = SetRequest { tags: keys_1000[..100].to_vec(), ..set("many-tags", b"v") };
    assert!(cache.set(tagged_100).await.unwrap().into_inner().stored);
    let tagged_101 = SetRequest { tags: keys_1000[..101].to_vec(), ..set("too-many-tags", b"v") };
    assert_invalid(cache.set(tagged_101).await, "tags: must have at most 100 items (--cache-max-tags)");
    let item_101 = SetItem { key: "i".into(), value: b"v".to_vec(), ttl: None, tags: keys_1000[..101].to_vec() };
    assert_invalid(
        cache.set_many(SetManyRequest { items: vec![item_101] }).await,
        "items[0].tags: must have at most 100 items (--cache-max-tags)",
    );
    assert!(!cache.get(get("too-many-tags")).await.unwrap().into_inner().found, "nothing written");

    let item = |i: usize| SetItem { key: format!("item{i}"), value: b"v".to_vec(), ttl: None, tags: vec![] };
    let items: Vec<SetItem> = (0..1000).map(item).collect();
    assert_eq!(cache.set_many(SetManyRequest { items }).await.unwrap().into_inner().stored, 1000);
    let items: Vec<SetItem> = (0..1001).map(item).collect();
    assert_invalid(cache.set_many(SetManyRequest { items }).await, "items: must have at most 1000 items");
}

#[tokio::test]
async fn configured_limits_apply() {
    let redis = RedisServer::start().await;
    let flags = [
        "--max-key-bytes",
        "8",
        "--max-value-bytes",
        "16",
        "--max-batch",
        "2",
        "--max-ttl",
        "1m",
        "--cache-default-ttl",
        "30s",
    ];
    let server = TestServer::start_with(&redis, &flags).await;
    let mut cache = server.cache();
    assert!(cache.set(set("12345678", &[0; 16])).await.is_ok());
    assert_invalid(cache.set(set("123456789", b"v")).await, "key: must be at most 8 bytes");
    assert_invalid(cache.set(set("k", &[0; 17])).await, "value: must be at most 16 bytes");
    assert_invalid(cache.set(SetRequest { ttl: ms(60_001), ..set("k", b"v") }).await, "ttl: must be at most 1m");
    let keys = ["a", "b", "c"].map(String::from).to_vec();
    assert_invalid(cache.get_many(GetManyRequest { keys }).await, "keys: must have at most 2 items");
}

#[tokio::test]
async fn rejected_requests_write_nothing() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    // A batch with one bad item in the middle is rejected whole, naming the item.
    let items = vec![
        SetItem { key: "ok1".into(), value: b"v".to_vec(), ttl: None, tags: vec!["t".into()] },
        SetItem { key: "".into(), value: b"v".to_vec(), ttl: None, tags: vec![] },
        SetItem { key: "ok2".into(), value: b"v".to_vec(), ttl: None, tags: vec![] },
    ];
    assert_invalid(cache.set_many(SetManyRequest { items }).await, "items[1].key: must not be empty");
    let bad_tag = SetItem { key: "ok3".into(), value: b"v".to_vec(), ttl: None, tags: vec!["".into()] };
    assert_invalid(cache.set_many(SetManyRequest { items: vec![bad_tag] }).await, "items[0].tags[0]");
    assert_invalid(cache.set(SetRequest { tags: vec!["x".repeat(513)], ..set("k", b"v") }).await, "tags[0]");
    assert_invalid(cache.set(SetRequest { ttl: ms(0), ..set("k", b"v") }).await, "ttl");
    // A leading '}' would empty the key's Redis Cluster hash tag; one later is fine.
    assert_invalid(cache.set(set("}k", b"v")).await, "key: must not start with '}'");
    assert!(cache.set(set("k}", b"v")).await.unwrap().into_inner().stored);
    cache.delete(DeleteRequest { keys: vec!["k}".into()] }).await.unwrap();
    assert!(stored_keys(&redis, &server).await.is_empty());
}

#[tokio::test]
async fn data_is_readable_by_plain_redis_clients() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    server.cache().set(set("plain", b"hello")).await.unwrap();
    let mut conn = redis.client().await;
    let value: String = redis::cmd("GET").arg(server.cache_key("plain")).query_async(&mut conn).await.unwrap();
    assert_eq!(value, "hello");
}

// Redis blocking budget (RELIABILITY.md): large requests are split into
// bounded scripts; the answers are those of one call.

#[tokio::test]
async fn get_many_reads_values_beyond_one_scripts_byte_budget() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    // Five values of 300 KiB: more than one script copies (512 KiB), so the
    // read takes several rounds; small values and misses between them.
    let mut keys = Vec::new();
    let mut expected = Vec::new();
    for i in 0..5u8 {
        let big = vec![i; 300 << 10];
        cache.set(SetRequest { ttl: ms(60_000), ..set(&format!("big{i}"), &big) }).await.unwrap();
        cache.set(set(&format!("small{i}"), &[i])).await.unwrap();
        keys.extend([format!("big{i}"), format!("small{i}"), format!("none{i}")]);
        expected.extend([Some(big), Some(vec![i]), None]);
    }
    keys.push("big0".into());
    expected.push(Some(vec![0; 300 << 10]));
    let before = redis.calls("evalsha").await;
    let entries = cache.get_many(GetManyRequest { keys: keys.clone() }).await.unwrap().into_inner().entries;
    assert!(redis.calls("evalsha").await - before >= 3, "read in several scripts");
    assert_eq!(entries.len(), keys.len());
    for ((entry, key), want) in entries.iter().zip(&keys).zip(&expected) {
        assert_eq!(&entry.key, key);
        assert_eq!(entry.found, want.is_some(), "{key}");
        assert_eq!(&entry.value, want.as_ref().unwrap_or(&Vec::new()), "{key}");
        if key.starts_with("big") {
            assert!(ttl_ms(entry.ttl) > 50_000, "{key} keeps its ttl");
        }
    }
}

/// One get.lua call reads at most 1,000 keys (its TTLs go packed through
/// one Lua `unpack`, which takes a few thousand values); a larger batch,
/// where --max-batch allows one, is read in several calls and answered whole.
#[tokio::test]
async fn get_many_of_more_keys_than_one_script_reads_answers_every_key() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--max-batch", "2500"]).await;
    let mut cache = server.cache();
    // Every third key is a miss; the others carry their index as value and
    // a TTL that tells them apart.
    let items: Vec<SetItem> = (0..2500)
        .filter(|i| i % 3 != 0)
        .map(|i| SetItem {
            key: format!("k{i}"),
            value: i.to_string().into_bytes(),
            ttl: ms(100_000 + i * 100),
            tags: vec![],
        })
        .collect();
    cache.set_many(SetManyRequest { items }).await.unwrap();
    let keys: Vec<String> = (0..2500).map(|i| format!("k{i}")).collect();
    // Loaded first, so that no call below is a NOSCRIPT retry.
    cache.get(get("k1")).await.unwrap();
    let before = redis.calls("evalsha").await;
    let entries = cache.get_many(GetManyRequest { keys: keys.clone() }).await.unwrap().into_inner().entries;
    assert_eq!(redis.calls("evalsha").await - before, 3, "2,500 keys in runs of at most 1,000");
    assert_eq!(entries.len(), 2500);
    for (i, (entry, key)) in (0..).zip(entries.into_iter().zip(&keys)) {
        assert_eq!(&entry.key, key);
        assert_eq!(entry.found, i % 3 != 0, "{key}");
        if entry.found {
            assert_eq!(entry.value, i.to_string().into_bytes(), "{key}");
            let ttl = ttl_ms(entry.ttl);
            assert!(ttl <= 100_000 + i * 100 && ttl > 90_000 + i * 100, "{key}: {ttl} ms");
        } else {
            assert!(entry.value.is_empty() && entry.ttl.is_none(), "{key}");
        }
    }
}

#[tokio::test]
async fn set_many_beyond_one_scripts_bounds_writes_every_item_and_tag() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    // 4 values of 300 KiB (over the bytes of one script) and 12 items of 100
    // tags (over the steps of one script and of one tag_index call).
    let tags: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
    let mut items: Vec<SetItem> = (0..4u8)
        .map(|i| SetItem { key: format!("big{i}"), value: vec![i; 300 << 10], ttl: ms(60_000), tags: vec![] })
        .collect();
    let tagged =
        |i: usize| SetItem { key: format!("tagged{i}"), value: b"v".to_vec(), ttl: ms(60_000), tags: tags.clone() };
    items.extend((0..12).map(tagged));
    let stored = cache.set_many(SetManyRequest { items }).await.unwrap().into_inner().stored;
    assert_eq!(stored, 16);
    for i in 0..4u8 {
        let got = cache.get(get(&format!("big{i}"))).await.unwrap().into_inner();
        assert_eq!(got.value, vec![i; 300 << 10]);
    }
    // Every tag reaches every tagged entry: the last tag, then (after
    // writing them again) the first.
    for tag in ["t99", "t0"] {
        let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: vec![tag.into()] }).await.unwrap();
        assert_eq!(invalidated.into_inner().invalidated, 12, "{tag}");
        for i in 0..12 {
            assert!(!cache.get(get(&format!("tagged{i}"))).await.unwrap().into_inner().found);
        }
        let items = (0..12).map(tagged).collect();
        cache.set_many(SetManyRequest { items }).await.unwrap();
    }
}

#[tokio::test]
async fn delete_and_invalidate_of_many_entries_take_every_one() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let write = |prefix: &'static str, n: usize| SetManyRequest {
        items: (0..n)
            .map(|i| SetItem {
                key: format!("{prefix}{i}"),
                value: b"v".to_vec(),
                ttl: ms(60_000),
                tags: vec!["wide".into()],
            })
            .collect(),
    };
    // 2,500 entries under one tag: many ZSCAN pages and invalidation scripts.
    for prefix in ["a", "b"] {
        cache.set_many(write(prefix, 1000)).await.unwrap();
    }
    cache.set_many(write("c", 500)).await.unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("c{i}")).collect();
    let deleted = cache.delete(DeleteRequest { keys }).await.unwrap().into_inner().deleted;
    assert_eq!(deleted, 500, "more keys than one delete script takes; only the live ones count");
    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["wide".into()] }).await.unwrap();
    assert_eq!(invalidated.into_inner().invalidated, 2000);
    assert_eq!(
        stored_keys(&redis, &server).await,
        vec![format!("{}:tag:{{wide}}:floor", server.prefix)],
        "entries, tag lists and the index are gone; the index's floor expires with the scores it gave"
    );
}

/// InvalidateTags works in steps; its guarantee is that no entry written
/// before the call began is readable after it returns, whatever is written
/// meanwhile.
#[tokio::test]
async fn entries_written_before_an_invalidation_are_gone_after_it_despite_concurrent_writes() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut cache = server.cache();
    let item = |key: String| SetItem { key, value: b"old".to_vec(), ttl: ms(60_000), tags: vec!["t".into()] };
    for n in 0..3 {
        let items = (0..1000).map(|i| item(format!("old{n}:{i}"))).collect();
        cache.set_many(SetManyRequest { items }).await.unwrap();
    }
    // Writers keep adding entries under the tag (and rewriting old ones
    // with new values) while the invalidation runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (mut cache, stop) = (server.cache(), std::sync::Arc::clone(&stop));
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let items = (0..50)
                        .map(|i| SetItem { value: b"new".to_vec(), ..item(format!("new{w}:{n}:{i}")) })
                        .collect();
                    cache.set_many(SetManyRequest { items }).await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["t".into()] }).await.unwrap();
    assert!(invalidated.into_inner().invalidated >= 3000);
    let keys: Vec<String> = (0..3).flat_map(|n| (0..1000).map(move |i| format!("old{n}:{i}"))).collect();
    for chunk in keys.chunks(1000) {
        let entries = cache.get_many(GetManyRequest { keys: chunk.to_vec() }).await.unwrap().into_inner().entries;
        assert!(entries.iter().all(|e| !e.found), "an entry written before the invalidation survived it");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
}

/// A tagged write racing invalidations of its tag stays findable: once the
/// writes and invalidations stop, one more InvalidateTags leaves none of
/// their entries. (An invalidation that read a member just before a write
/// re-recorded it, deleted the old entry, then dropped the member after the
/// new entry landed, used to leave that entry out of the index for good.)
#[tokio::test]
async fn tagged_rewrites_racing_invalidations_are_all_found_by_the_next_one() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let keys: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (mut cache, keys) = (server.cache(), keys.clone());
            tokio::spawn(async move {
                for n in 0..300u64 {
                    // TTLs vary, so a rewrite may record a shorter expiry
                    // than the member already has.
                    let ttl = 30_000 + (n * 7919 + w * 104_729) % 30_000;
                    let key = keys[((n + w) % keys.len() as u64) as usize].clone();
                    let write = SetRequest { ttl: ms(ttl), tags: vec!["t".into()], ..set(&key, b"v") };
                    cache.set(write).await.unwrap();
                }
            })
        })
        .collect();
    let invalidators: Vec<_> = (0..2)
        .map(|_| {
            let (mut cache, stop) = (server.cache(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut calls = 0;
                while !stop.load(Ordering::Relaxed) {
                    cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["t".into()] }).await.unwrap();
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for invalidator in invalidators {
        assert!(invalidator.await.unwrap() > 0);
    }
    let mut cache = server.cache();
    cache.invalidate_tags(InvalidateTagsRequest { tags: vec!["t".into()] }).await.unwrap();
    let entries = cache.get_many(GetManyRequest { keys: keys.clone() }).await.unwrap().into_inner().entries;
    let survivors: Vec<&String> = keys.iter().zip(&entries).filter(|(_, e)| e.found).map(|(k, _)| k).collect();
    assert!(survivors.is_empty(), "entries the last invalidation missed: {survivors:?}");
}

#[tokio::test]
async fn an_entrys_tags_are_bounded_by_cache_max_tags() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--cache-max-tags", "3"]).await;
    let mut cache = server.cache();
    let tags = |n: usize| (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>();
    assert!(cache.set(SetRequest { tags: tags(3), ..set("three", b"v") }).await.unwrap().into_inner().stored);
    assert_invalid(
        cache.set(SetRequest { tags: tags(4), ..set("four", b"v") }).await,
        "tags: must have at most 3 items (--cache-max-tags)",
    );
    assert!(!cache.get(get("four")).await.unwrap().into_inner().found, "nothing written");
    // InvalidateTags names tags, not an entry's: the batch limit applies.
    let invalidated = cache.invalidate_tags(InvalidateTagsRequest { tags: tags(10) }).await.unwrap();
    assert_eq!(invalidated.into_inner().invalidated, 1);
}
