//! The Redis blocking budget: Redis runs one command at a time for every
//! client it has, so no script may hold it long. Each case sends the worst
//! input the default limits allow (largest values, fullest batches, most
//! tags, largest session data of the costliest shape, longest ranges) and
//! reads how long Redis itself spent on each command from SLOWLOG, and the
//! scripts' count and total time from `INFO commandstats`.
//!
//! SLOWLOG logs only commands over [`LOGGED_US`]: at a threshold of 0 it also
//! logs every command a script runs, and that logging, counted in the
//! script's time, made scripts of a few thousand commands 2–3× slower than
//! they are.

use std::{fmt::Write as _, time::Duration};

use cachecoord::proto;
use prost_types::{ListValue, Struct, Value, value::Kind};
use redis::aio::MultiplexedConnection;

use crate::{
    cluster::{Fallible, RedisProc, ServiceProc},
    load::Clients,
    record::dur,
};

/// Longest a single command may block Redis.
pub const BUDGET_US: u64 = 5_000;

/// SLOWLOG's threshold: far below the budget, far above one command inside
/// a script.
const LOGGED_US: u64 = 500;

/// The default limits of the service (see `cachecoord --help`).
const KEY: usize = 512;
const VALUE: usize = 1 << 20;
const BATCH: usize = 1000;
const MESSAGE: usize = 16 << 20;
const SESSION_DATA: usize = 16 << 10;
const SESSIONS_PER_USER: usize = 100;
/// `--rate-limit-max-limits`, `--stats-max-deltas`, `--cache-max-tags`.
const RATE_LIMITS: usize = 200;
const DELTAS: usize = 100;
const TAGS: usize = 100;

/// One measured case.
struct Row {
    rpc: &'static str,
    input: String,
    /// The slowest command's name and time, µs.
    command: String,
    micros: u64,
    /// How many scripts the request ran, and their Redis time in all, µs.
    commands: usize,
    total_micros: u64,
    /// What the service answered.
    answer: String,
}

/// Runs every case; the report and whether every command stayed in budget.
pub async fn run() -> Fallible<(String, bool)> {
    let dir = tempfile::tempdir()?;
    let threshold = LOGGED_US.to_string();
    let redis = RedisProc::start(&[
        "--slowlog-log-slower-than",
        &threshold,
        "--slowlog-max-len",
        "100000",
        "--appendonly",
        "no",
    ])
    .await?;
    // A Redis timeout long enough to let every script finish, so the answer
    // shows what the service makes of the result rather than a timeout.
    let service = ServiceProc::start("budget", dir.path(), &redis.url(), "b", &["--redis-timeout", "30s"]).await?;
    let mut admin = redis.admin().await?;
    let c = Clients::new(service.channel.clone());
    let mut rows = Vec::new();
    let mut b = Bench { admin: &mut admin, rows: &mut rows };

    cache_cases(&mut b, &c).await?;
    session_cases(&mut b, &c).await?;
    rate_limit_cases(&mut b, &c).await?;
    stats_cases(&mut b, &c).await?;
    lock_cases(&mut b, &c).await?;

    let mut out = String::new();
    let _ = writeln!(out, "### Redis blocking budget (every command ≤ {} ms by SLOWLOG)\n", BUDGET_US / 1000);
    let _ = writeln!(
        out,
        "| RPC | worst input | slowest command | Redis time | within | scripts | their time in all | service answered |"
    );
    let _ = writeln!(out, "|---|---|---|---:|---|---:|---:|---|");
    for row in &rows {
        let time = if row.micros == 0 {
            format!("< {:.1} ms", LOGGED_US as f64 / 1000.0)
        } else {
            format!("{:.2} ms", row.micros as f64 / 1000.0)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {time} | {} | {} | {:.2} ms | {} |",
            row.rpc,
            row.input,
            row.command,
            if row.micros <= BUDGET_US { "yes" } else { "**no**" },
            row.commands,
            row.total_micros as f64 / 1000.0,
            row.answer
        );
    }
    let passed = rows.iter().all(|r| r.micros <= BUDGET_US);
    Ok((out, passed))
}

struct Bench<'a> {
    admin: &'a mut MultiplexedConnection,
    rows: &'a mut Vec<Row>,
}

impl Bench<'_> {
    /// Clears SLOWLOG, runs `call`, and records the slowest command it caused.
    async fn measure<T: std::fmt::Debug>(
        &mut self,
        rpc: &'static str,
        input: impl Into<String>,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
        show: impl Fn(&T) -> String,
    ) -> Fallible<Option<T>> {
        let _: () = redis::cmd("SLOWLOG").arg("RESET").query_async(self.admin).await?;
        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(self.admin).await?;
        let result = tokio::time::timeout(Duration::from_secs(120), call).await;
        let (answer, value) = match result {
            Ok(Ok(response)) => {
                let value = response.into_inner();
                (show(&value), Some(value))
            }
            Ok(Err(status)) => {
                (format!("{:?}: {}", status.code(), status.message().chars().take(80).collect::<String>()), None)
            }
            Err(_) => ("no answer in 120 s".into(), None),
        };
        let Slowlog { command, micros, commands, total_micros } = slowest(self.admin).await?;
        let input = input.into();
        eprintln!(
            "{rpc:<28} {input:<70} {command:<10} {:>9.2} ms  {commands:>6} scripts {:>10.2} ms  {answer}",
            micros as f64 / 1000.0,
            total_micros as f64 / 1000.0
        );
        self.rows.push(Row { rpc, input, command, micros, commands, total_micros, answer });
        Ok(value)
    }
}

/// What SLOWLOG holds of one request.
struct Slowlog {
    /// The slowest command and its time, µs.
    command: String,
    micros: u64,
    /// The scripts (EVALSHA) and functions (FCALL), and their time in all, µs.
    commands: usize,
    total_micros: u64,
}

/// The slowest command in SLOWLOG but the harness's own and the health
/// PINGs, and the scripts run since the stats were reset.
async fn slowest(admin: &mut MultiplexedConnection) -> Fallible<Slowlog> {
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG").arg("GET").arg(-1).query_async(admin).await?;
    let mut worst = Slowlog { command: String::from("-"), micros: 0, commands: 0, total_micros: 0 };
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(admin).await?;
    for line in stats.lines() {
        let scripts = ["cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_fcall:"];
        let Some(fields) = scripts.iter().find_map(|prefix| line.strip_prefix(prefix)) else {
            continue;
        };
        for field in fields.split(',') {
            match field.split_once('=') {
                Some(("calls", n)) => worst.commands += n.parse::<usize>().unwrap_or(0),
                Some(("usec", n)) => worst.total_micros += n.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    for entry in entries {
        let redis::Value::Array(fields) = entry else { continue };
        let (Some(redis::Value::Int(micros)), Some(redis::Value::Array(args))) = (fields.get(2), fields.get(3)) else {
            continue;
        };
        let name = match args.first() {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).to_uppercase(),
            _ => continue,
        };
        if matches!(name.as_str(), "SLOWLOG" | "PING" | "SCRIPT" | "FUNCTION" | "CLIENT" | "HELLO" | "INFO" | "CONFIG")
        {
            continue;
        }
        let micros = *micros as u64;
        if micros > worst.micros {
            (worst.command, worst.micros) = (name, micros);
        }
    }
    Ok(worst)
}

fn key(prefix: &str, i: usize) -> String {
    let mut k = format!("{prefix}{i}:");
    k.extend(std::iter::repeat_n('k', KEY - k.len()));
    k
}

fn tags(n: usize, long: bool) -> Vec<String> {
    (0..n).map(|i| if long { key("tag", i) } else { format!("t{i}") }).collect()
}

async fn cache_cases(b: &mut Bench<'_>, c: &Clients) -> Fallible<()> {
    let mut cache = c.cache.clone();
    let set = |k: String, value: Vec<u8>, tags: Vec<String>| proto::SetRequest {
        key: k,
        value,
        ttl: dur(Duration::from_secs(3600)),
        tags,
        ..Default::default()
    };
    for round in ["", " (overwriting one with 100 tags)"] {
        let request = set(key("big", 0), vec![b'v'; VALUE], tags(TAGS, true));
        b.measure("Cache.Set", format!("1 MiB value, 100 tags of 512 B{round}"), cache.set(request), |r| {
            format!("stored {}", r.stored)
        })
        .await?;
    }
    // As many 1 MiB values as one message carries.
    let fit = (MESSAGE - 64 * 1024) / (VALUE + KEY + 16);
    let items = (0..fit)
        .map(|i| proto::SetItem {
            key: key("mb", i),
            value: vec![b'v'; VALUE],
            ttl: dur(Duration::from_secs(3600)),
            tags: vec![],
        })
        .collect();
    b.measure(
        "Cache.SetMany",
        format!("{fit} values of 1 MiB (one 16 MiB message)"),
        cache.set_many(proto::SetManyRequest { items }),
        |r| format!("stored {}", r.stored),
    )
    .await?;
    let items = (0..BATCH)
        .map(|i| proto::SetItem {
            key: format!("tagged{i}"),
            value: b"v".to_vec(),
            ttl: dur(Duration::from_secs(3600)),
            tags: tags(TAGS, false),
        })
        .collect();
    b.measure("Cache.SetMany", "1,000 items × 100 tags", cache.set_many(proto::SetManyRequest { items }), |r| {
        format!("stored {}", r.stored)
    })
    .await?;
    let keys: Vec<String> = (0..BATCH).map(|i| if i < fit { key("mb", i) } else { key("none", i) }).collect();
    b.measure(
        "Cache.GetMany",
        format!("1,000 keys, {fit} of them 1 MiB values"),
        cache.get_many(proto::GetManyRequest { keys: keys.clone() }),
        |r| format!("{} entries", r.entries.len()),
    )
    .await?;
    b.measure("Cache.Get", "a 1 MiB value", cache.get(proto::GetRequest { key: key("mb", 0) }), |r| {
        format!("found {}", r.found)
    })
    .await?;
    b.measure(
        "Cache.InvalidateTags",
        "1 tag on 1,000 entries that have 100 tags each",
        cache.invalidate_tags(proto::InvalidateTagsRequest { tags: vec!["t0".into()] }),
        |r| format!("invalidated {}", r.invalidated),
    )
    .await?;
    // A tag on 100,000 entries: 100 SetMany of 1,000 first.
    for n in 0..100 {
        let items = (0..BATCH)
            .map(|i| proto::SetItem {
                key: format!("wide{n}:{i}"),
                value: b"v".to_vec(),
                ttl: dur(Duration::from_secs(3600)),
                tags: vec!["wide".into()],
            })
            .collect();
        cache.set_many(proto::SetManyRequest { items }).await?;
    }
    b.measure(
        "Cache.InvalidateTags",
        "1 tag on 100,000 entries",
        cache.invalidate_tags(proto::InvalidateTagsRequest { tags: vec!["wide".into()] }),
        |r| format!("invalidated {}", r.invalidated),
    )
    .await?;
    b.measure(
        "Cache.InvalidateTags",
        "1,000 tags of 512 B",
        cache.invalidate_tags(proto::InvalidateTagsRequest { tags: tags(BATCH, true) }),
        |r| format!("invalidated {}", r.invalidated),
    )
    .await?;
    let items = (0..BATCH)
        .map(|i| proto::SetItem {
            key: format!("d{i}"),
            value: b"v".to_vec(),
            ttl: dur(Duration::from_secs(3600)),
            tags: tags(TAGS, false),
        })
        .collect();
    let _ = tokio::time::timeout(Duration::from_secs(120), cache.set_many(proto::SetManyRequest { items })).await;
    let keys = (0..BATCH).map(|i| format!("d{i}")).collect();
    b.measure("Cache.Delete", "1,000 keys with 100 tags each", cache.delete(proto::DeleteRequest { keys }), |r| {
        format!("deleted {}", r.deleted)
    })
    .await?;
    let fetch = proto::FetchRequest { key: key("mb", 1), fill_timeout: None, max_wait: None };
    b.measure("Cache.Fetch", "a 1 MiB hit", cache.fetch(fetch), |r| format!("outcome {}", r.outcome)).await?;
    let lease = cache
        .fetch(proto::FetchRequest { key: key("fill", 0), fill_timeout: None, max_wait: None })
        .await?
        .into_inner();
    let fill = proto::FillRequest {
        key: key("fill", 0),
        fill_token: lease.fill_token,
        value: vec![b'v'; VALUE],
        ttl: dur(Duration::from_secs(3600)),
        tags: tags(TAGS, true),
    };
    b.measure("Cache.Fill", "1 MiB value, 100 tags of 512 B", cache.fill(fill), |r| format!("stored {}", r.stored))
        .await?;
    Ok(())
}

/// JSON-costliest session data within `bytes`: many top-level members whose
/// values are deeply nested lists (every bracket is a step of the merge's
/// scanner).
pub fn costly_data(bytes: usize) -> Struct {
    fn nested(depth: usize) -> Value {
        let mut v = Value { kind: Some(Kind::NumberValue(1.0)) };
        for _ in 0..depth {
            v = Value { kind: Some(Kind::ListValue(ListValue { values: vec![v] })) };
        }
        v
    }
    // Each member `"m00000":[[...1...]],` is 10 + 2 × depth + 1 bytes.
    let depth = 40;
    let member = 10 + 2 * depth + 1;
    let mut data = Struct::default();
    for i in 0..(bytes - 2) / member {
        data.fields.insert(format!("m{i:05}"), nested(depth));
    }
    data
}

async fn session_cases(b: &mut Bench<'_>, c: &Clients) -> Fallible<()> {
    let mut s = c.sessions.clone();
    let data = costly_data(SESSION_DATA - 64);
    let create = proto::CreateSessionRequest { user_id: key("user", 0), data: Some(data.clone()), ttl: None };
    let created =
        b.measure("Session.CreateSession", "16 KiB of data", s.create_session(create), |_| "created".into()).await?;
    let id = created.and_then(|c| c.session).map(|s| s.session_id).unwrap_or_default();
    let get = proto::GetSessionRequest { session_id: id.clone(), touch: true };
    b.measure("Session.GetSession", "16 KiB of data, touch", s.get_session(get), |r| format!("found {}", r.found))
        .await?;
    let mut one = Struct::default();
    one.fields.insert("m00000".into(), Value { kind: Some(Kind::BoolValue(true)) });
    one.fields.insert("new".into(), Value { kind: Some(Kind::BoolValue(true)) });
    let merge = proto::UpdateSessionRequest { session_id: id.clone(), data: Some(one), merge: true };
    let members = data.fields.len();
    b.measure(
        "Session.UpdateSession",
        format!("merge 2 fields into 16 KiB of {members} members nested 40 deep"),
        s.update_session(merge),
        |r| format!("found {}", r.found),
    )
    .await?;
    let replace = proto::UpdateSessionRequest { session_id: id.clone(), data: Some(data.clone()), merge: false };
    b.measure("Session.UpdateSession", "replace with 16 KiB", s.update_session(replace), |r| {
        format!("found {}", r.found)
    })
    .await?;
    // One user at the per-user cap, each session with the largest data.
    let user = key("many", 0);
    let mut big = Struct::default();
    big.fields.insert("x".into(), Value { kind: Some(Kind::StringValue("a".repeat(SESSION_DATA - 8))) });
    for _ in 0..SESSIONS_PER_USER {
        let create = proto::CreateSessionRequest { user_id: user.clone(), data: Some(big.clone()), ttl: None };
        s.create_session(create).await?;
    }
    let create = proto::CreateSessionRequest { user_id: user.clone(), data: Some(big.clone()), ttl: None };
    b.measure("Session.CreateSession", "past the cap of 100 (evicts the oldest)", s.create_session(create), |r| {
        format!("evicted {}", r.evicted_session_ids.len())
    })
    .await?;
    b.measure(
        "Session.ListUserSessions",
        "100 sessions of 16 KiB",
        s.list_user_sessions(proto::ListUserSessionsRequest { user_id: user.clone() }),
        |r| format!("{} sessions", r.sessions.len()),
    )
    .await?;
    let delete = proto::DeleteUserSessionsRequest { user_id: user, keep_session_id: None };
    b.measure("Session.DeleteUserSessions", "100 sessions", s.delete_user_sessions(delete), |r| {
        format!("deleted {}", r.deleted)
    })
    .await?;
    let tokens = (0..BATCH).map(|i| key("token", i)).collect();
    b.measure("Session.CheckTokens", "1,000 tokens", s.check_tokens(proto::CheckTokensRequest { tokens }), |r| {
        format!("{} flags", r.revoked.len())
    })
    .await?;
    Ok(())
}

async fn rate_limit_cases(b: &mut Bench<'_>, c: &Clients) -> Fallible<()> {
    let mut rl = c.rate_limit.clone();
    for (algorithm, name) in [
        (proto::Algorithm::SlidingWindow, "sliding window"),
        (proto::Algorithm::TokenBucket, "token bucket"),
        (proto::Algorithm::FixedWindow, "fixed window"),
    ] {
        // Every key of the ResetLimits case below gets state under every
        // algorithm; the first check is measured.
        for (n, first) in (0..BATCH).step_by(RATE_LIMITS).enumerate() {
            let limits = (first..first + RATE_LIMITS)
                .map(|i| proto::Limit {
                    key: key("rl", i),
                    limit: 10,
                    period: dur(Duration::from_secs(60)),
                    algorithm: algorithm.into(),
                    burst: None,
                })
                .collect();
            let check = proto::CheckRequest { limits, cost: None, peek: false };
            if n > 0 {
                rl.check(check).await?;
                continue;
            }
            b.measure("RateLimit.Check", format!("{RATE_LIMITS} limits, {name}"), rl.check(check), |r| {
                format!("allowed {}", r.allowed)
            })
            .await?;
        }
    }
    let keys = (0..BATCH).map(|i| key("rl", i)).collect();
    b.measure(
        "RateLimit.ResetLimits",
        "1,000 keys, each with state under all three algorithms",
        rl.reset_limits(proto::ResetLimitsRequest { keys }),
        |r| format!("reset {}", r.reset),
    )
    .await?;
    Ok(())
}

async fn stats_cases(b: &mut Bench<'_>, c: &Clients) -> Fallible<()> {
    let mut st = c.stats.clone();
    let deltas = (0..DELTAS).map(|i| proto::Delta { name: key("ctr", i), amount: Some(1) }).collect();
    b.measure("Stats.Increment", format!("{DELTAS} deltas"), st.increment(proto::IncrementRequest { deltas }), |r| {
        format!("{} totals", r.values.len())
    })
    .await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let ts = |s: i64| Some(prost_types::Timestamp { seconds: s, nanos: 0 });
    let series = proto::GetSeriesRequest {
        name: key("ctr", 0),
        granularity: proto::Granularity::Minute.into(),
        start: ts(now - 999 * 60),
        end: ts(now),
    };
    b.measure("Stats.GetSeries", "1,000 minute buckets", st.get_series(series), |r| {
        format!("{} buckets", r.buckets.len())
    })
    .await?;
    let names = (0..BATCH).map(|i| key("ctr", i)).collect();
    b.measure("Stats.GetTotals", "1,000 names", st.get_totals(proto::GetTotalsRequest { names }), |r| {
        format!("{} totals", r.values.len())
    })
    .await?;
    let members: Vec<String> = (0..BATCH).map(|i| key("member", i)).collect();
    b.measure(
        "Stats.AddUnique",
        "1,000 members of 512 B",
        st.add_unique(proto::AddUniqueRequest { name: "uniq".into(), members: members.clone() }),
        |r| format!("added {}", r.added),
    )
    .await?;
    // 1,000 past days of dense HyperLogLogs, written directly (the service
    // only writes today's).
    let day = 86_400i64;
    let today = now - now.rem_euclid(day);
    for d in 0..BATCH as i64 {
        let mut pfadd = redis::cmd("PFADD");
        pfadd.arg(format!("b:su:{{uniq}}:d:{}", (today - d * day) * 1000));
        for m in 0..4000 {
            pfadd.arg(format!("{d}:{m}"));
        }
        let _: i64 = pfadd.query_async(b.admin).await?;
    }
    let count = proto::CountUniqueRequest { name: "uniq".into(), start: ts(today - 999 * day), end: ts(now) };
    b.measure("Stats.CountUnique", "1,000 days of dense HyperLogLogs", st.count_unique(count), |r| {
        format!("count {}", r.count)
    })
    .await?;
    for i in 0..BATCH {
        let mark = proto::MarkActiveRequest { group: "online".into(), member: key("who", i) };
        st.mark_active(mark).await?;
    }
    b.measure(
        "Stats.CountActive",
        "1,000 members",
        st.count_active(proto::CountActiveRequest { group: "online".into(), window: dur(Duration::from_secs(60)) }),
        |r| format!("count {}", r.count),
    )
    .await?;
    Ok(())
}

async fn lock_cases(b: &mut Bench<'_>, c: &Clients) -> Fallible<()> {
    let mut locks = c.locks.clone();
    let acquire = proto::AcquireRequest { name: key("lock", 0), ttl: None, wait: None, owner: key("owner", 0) };
    let grant = b
        .measure("Lock.Acquire", "512 B name and owner", locks.acquire(acquire), |r| format!("acquired {}", r.acquired))
        .await?;
    if let Some(grant) = grant {
        let release = proto::ReleaseRequest { name: key("lock", 0), lease_id: grant.lease_id };
        b.measure("Lock.Release", "512 B name", locks.release(release), |r| format!("released {}", r.released)).await?;
    }
    Ok(())
}
