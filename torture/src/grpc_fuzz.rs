//! A gRPC-level fuzzer against the real server: random and mutated messages
//! to every unary RPC, sent as raw bytes so they can be anything protobuf
//! allows and more (invalid UTF-8 in strings, unknown fields, truncations,
//! huge repeated fields, extreme durations and timestamps). Checks: the
//! answer is OK or INVALID_ARGUMENT (a wait may also run into the call's
//! deadline), never INTERNAL or UNKNOWN, never a panic, and a rejected
//! request wrote nothing (Redis's own change counter did not move).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use bytes::{Buf, BufMut};
use cachecoord::proto;
use prost::Message;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::{
    Code,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

use crate::cluster::{Fallible, RedisProc, ServiceProc};

/// Bytes in, bytes out.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining()).to_vec();
        Ok(Some(bytes))
    }
}

/// Every unary RPC with a valid request to start mutating from.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let d = |s: i64| Some(prost_types::Duration { seconds: s, nanos: 0 });
    let t = |s: i64| Some(prost_types::Timestamp { seconds: s, nanos: 0 });
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let data = crate::load::session_data(1);
    let limit = proto::Limit { key: "k".into(), limit: 10, period: d(1), algorithm: 1, burst: None };
    vec![
        ("/cachecoord.v1.CacheService/Get", proto::GetRequest { key: "k".into() }.encode_to_vec()),
        (
            "/cachecoord.v1.CacheService/GetMany",
            proto::GetManyRequest { keys: vec!["a".into(), "b".into()] }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.CacheService/Set",
            proto::SetRequest {
                key: "k".into(),
                value: b"v".to_vec(),
                ttl: d(60),
                condition: 1,
                tags: vec!["t".into()],
            }
            .encode_to_vec(),
        ),
        (
            "/cachecoord.v1.CacheService/SetMany",
            proto::SetManyRequest {
                items: vec![proto::SetItem {
                    key: "k".into(),
                    value: b"v".to_vec(),
                    ttl: d(60),
                    tags: vec!["t".into()],
                }],
            }
            .encode_to_vec(),
        ),
        ("/cachecoord.v1.CacheService/Delete", proto::DeleteRequest { keys: vec!["k".into()] }.encode_to_vec()),
        ("/cachecoord.v1.CacheService/Touch", proto::TouchRequest { key: "k".into(), ttl: d(60) }.encode_to_vec()),
        (
            "/cachecoord.v1.CacheService/Fetch",
            proto::FetchRequest { key: "f".into(), fill_timeout: d(1), max_wait: d(0) }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.CacheService/Fill",
            proto::FillRequest {
                key: "f".into(),
                fill_token: "x".into(),
                value: b"v".to_vec(),
                ttl: d(60),
                tags: vec![],
            }
            .encode_to_vec(),
        ),
        (
            "/cachecoord.v1.CacheService/AbandonFill",
            proto::AbandonFillRequest { key: "f".into(), fill_token: "x".into() }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.CacheService/InvalidateTags",
            proto::InvalidateTagsRequest { tags: vec!["t".into()] }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.SessionService/CreateSession",
            proto::CreateSessionRequest { user_id: "u".into(), data: Some(data.clone()), ttl: d(60) }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.SessionService/GetSession",
            proto::GetSessionRequest { session_id: "s".into(), touch: true }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.SessionService/TouchSession",
            proto::TouchSessionRequest { session_id: "s".into(), ttl: d(60) }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.SessionService/UpdateSession",
            proto::UpdateSessionRequest { session_id: "s".into(), data: Some(data), merge: true }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.SessionService/DeleteSession",
            proto::DeleteSessionRequest { session_id: "s".into() }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.SessionService/ListUserSessions",
            proto::ListUserSessionsRequest { user_id: "u".into() }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.SessionService/DeleteUserSessions",
            proto::DeleteUserSessionsRequest { user_id: "u".into(), keep_session_id: Some("s".into()) }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.SessionService/RevokeToken",
            proto::RevokeTokenRequest { token: "tok".into(), expires_at: t(now + 60) }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.SessionService/CheckTokens",
            proto::CheckTokensRequest { tokens: vec!["tok".into()] }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.RateLimitService/Check",
            proto::CheckRequest { limits: vec![limit], cost: Some(1), peek: false }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.RateLimitService/ResetLimits",
            proto::ResetLimitsRequest { keys: vec!["k".into()] }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.LockService/Acquire",
            proto::AcquireRequest { name: "l".into(), ttl: d(1), wait: d(0), owner: "o".into() }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.LockService/Release",
            proto::ReleaseRequest { name: "l".into(), lease_id: "x".into() }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.LockService/Extend",
            proto::ExtendRequest { name: "l".into(), lease_id: "x".into(), ttl: d(1) }.encode_to_vec(),
        ),
        ("/cachecoord.v1.LockService/Inspect", proto::InspectRequest { name: "l".into() }.encode_to_vec()),
        (
            "/cachecoord.v1.StatsService/Increment",
            proto::IncrementRequest { deltas: vec![proto::Delta { name: "n".into(), amount: Some(1) }] }
                .encode_to_vec(),
        ),
        (
            "/cachecoord.v1.StatsService/GetSeries",
            proto::GetSeriesRequest { name: "n".into(), granularity: 1, start: t(now - 600), end: t(now) }
                .encode_to_vec(),
        ),
        ("/cachecoord.v1.StatsService/GetTotals", proto::GetTotalsRequest { names: vec!["n".into()] }.encode_to_vec()),
        (
            "/cachecoord.v1.StatsService/MarkActive",
            proto::MarkActiveRequest { group: "g".into(), member: "m".into() }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.StatsService/CountActive",
            proto::CountActiveRequest { group: "g".into(), window: d(60) }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.StatsService/AddUnique",
            proto::AddUniqueRequest { name: "u".into(), members: vec!["m".into()] }.encode_to_vec(),
        ),
        (
            "/cachecoord.v1.StatsService/CountUnique",
            proto::CountUniqueRequest { name: "u".into(), start: t(now - 86_400), end: t(now) }.encode_to_vec(),
        ),
    ]
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field `field` holding `bytes`.
fn field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    varint(out, u64::from(number) << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An extreme Duration or Timestamp message (seconds, nanos).
fn extreme_time(rng: &mut StdRng) -> Vec<u8> {
    let seconds = [i64::MIN, i64::MAX, -1, 0, 1, 315_537_897_599, 315_537_897_600, -62_135_596_801, 1 << 40];
    let nanos = [i32::MIN, i32::MAX, -1, 0, 999_999_999, 1_000_000_000];
    proto_time(seconds[rng.random_range(0..seconds.len())], nanos[rng.random_range(0..nanos.len())])
}

fn proto_time(seconds: i64, nanos: i32) -> Vec<u8> {
    prost_types::Duration { seconds, nanos }.encode_to_vec()
}

/// One message for `seed`'s RPC: the seed mutated in one of several ways.
fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut m = seed.to_vec();
    match rng.random_range(0..10) {
        // Flip, insert or delete a few bytes.
        0 | 1 => {
            for _ in 0..rng.random_range(1..6) {
                if m.is_empty() {
                    m.push(rng.random());
                }
                let at = rng.random_range(0..m.len());
                match rng.random_range(0..3) {
                    0 => m[at] ^= 1 << rng.random_range(0..8),
                    1 => m.insert(at, rng.random()),
                    _ => {
                        m.remove(at);
                    }
                }
            }
        }
        // Truncated.
        2 => m.truncate(rng.random_range(0..=m.len())),
        // A string field (1..=5) holding invalid UTF-8.
        3 => field(&mut m, rng.random_range(1..=5), &[0xff, 0xfe, b'a', 0xc3]),
        // An extreme Duration or Timestamp in a message field (2..=5).
        4 => {
            let time = extreme_time(rng);
            field(&mut m, rng.random_range(2..=5), &time);
        }
        // A huge repeated field: the same string many times.
        5 => {
            let n = rng.random_range(1_000..20_000);
            let number = rng.random_range(1..=5);
            for i in 0..n {
                field(&mut m, number, format!("k{i}").as_bytes());
            }
        }
        // A long string.
        6 => field(&mut m, rng.random_range(1..=5), &vec![b'x'; rng.random_range(500..70_000)]),
        // An unknown field, then the seed.
        7 => {
            let mut u = Vec::new();
            varint(&mut u, u64::from(rng.random_range(6..2000u32)) << 3);
            varint(&mut u, rng.random());
            u.extend_from_slice(&m);
            m = u;
        }
        // A varint field with an extreme value (enums, counts, flags).
        8 => {
            varint(&mut m, u64::from(rng.random_range(1..=5u32)) << 3);
            varint(&mut m, [u64::MAX, i64::MAX as u64, 1 << 31, 1 << 53, (1 << 53) + 1, 0][rng.random_range(0..6)]);
        }
        // Random bytes.
        _ => m = (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
    }
    m
}

/// Redis's count of writes since start (`rdb_changes_since_last_save`).
async fn writes(conn: &mut redis::aio::MultiplexedConnection) -> Fallible<u64> {
    let info: String = redis::cmd("INFO").arg("persistence").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("rdb_changes_since_last_save:")?.trim().parse().ok())
        .ok_or_else(|| "INFO persistence without rdb_changes_since_last_save".into())
}

pub async fn run(calls: u64, seed: u64) -> Fallible<(String, bool)> {
    let dir = tempfile::tempdir()?;
    let redis = RedisProc::start(&["--appendonly", "no"]).await?;
    let service = ServiceProc::start("fuzz", dir.path(), &redis.url(), "fz", &[]).await?;
    let mut admin = redis.admin().await?;
    let mut grpc = tonic::client::Grpc::new(service.channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let seeds = seeds();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut bad: Vec<String> = Vec::new();
    for i in 0..calls {
        let (path, seed_message) = &seeds[rng.random_range(0..seeds.len())];
        let message = if rng.random_bool(0.1) { seed_message.clone() } else { mutate(&mut rng, seed_message) };
        let before = writes(&mut admin).await?;
        let answer = call(&mut grpc, path, message.clone()).await;
        let code = match &answer {
            Ok(()) => Code::Ok,
            Err(status) => status.code(),
        };
        *codes.entry(format!("{code:?}")).or_default() += 1;
        let waits = path.ends_with("/Fetch") || path.ends_with("/Acquire");
        let allowed = matches!(code, Code::Ok | Code::InvalidArgument) || (waits && code == Code::DeadlineExceeded);
        if !allowed && bad.len() < 20 {
            let message_text =
                answer.err().map(|s| s.message().chars().take(160).collect::<String>()).unwrap_or_default();
            bad.push(format!("call {i}: {path} answered {code:?} `{message_text}` to {} bytes", message.len()));
        }
        if code == Code::InvalidArgument {
            let after = writes(&mut admin).await?;
            if after != before && bad.len() < 20 {
                bad.push(format!("call {i}: {path} was rejected but Redis counted {} writes", after - before));
            }
        }
    }
    let panics = service.panics();
    let mut out = String::new();
    let _ = writeln!(out, "### gRPC fuzzer\n");
    let _ = writeln!(out, "{calls} messages over {} RPCs (seed {seed}); answers: {}", seeds.len(), {
        codes.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
    });
    let _ = writeln!(
        out,
        "\n- answers other than OK / INVALID_ARGUMENT (or a wait's DEADLINE_EXCEEDED), and rejected requests that wrote: {}",
        bad.len()
    );
    for line in &bad {
        let _ = writeln!(out, "  - {line}");
    }
    let _ = writeln!(out, "- panics in the service log: {panics}");
    Ok((out, bad.is_empty() && panics == 0))
}

async fn call(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    message: Vec<u8>,
) -> Result<(), tonic::Status> {
    grpc.ready().await.map_err(|e| tonic::Status::unknown(format!("not ready: {e}")))?;
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(1));
    grpc.unary(request, http::uri::PathAndQuery::from_static(path), Raw).await.map(|_| ())
}
