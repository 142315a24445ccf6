//! Faults under load: a steady mixed load on two service instances while, in
//! turn, Redis is killed and restarted, paused, stalled, has its connections
//! killed and refuses writes, and one service instance is killed or paused.
//! For each fault: errors by code and when they happened, time to the first
//! success and to full throughput after the fault ends; then the invariants,
//! hung calls, panics, and RSS and connections against their levels before.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use crate::{
    cluster::{self, Fallible, RedisProc, ServiceProc},
    invariants::{Checkers, FETCH_SLACK, Verdict},
    load::Load,
    record::{self, Recorder},
};

/// How far past `max_wait` a Fetch answer fails the run (outside faults).
const FETCH_FAIL: Duration = Duration::from_millis(500);

/// The faults, in the order they are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL redis-server, start it again 2 s later (the AOF replays).
    RedisKill,
    /// SIGSTOP redis-server for 3 s, then SIGCONT.
    RedisPause,
    /// `DEBUG SLEEP 3`: a Redis that is busy, not gone.
    RedisSleep,
    /// `CLIENT KILL` of every normal and pub/sub connection.
    ClientKill,
    /// `maxmemory 1` with `noeviction` for 3 s: every write is refused (OOM).
    RedisOom,
    /// SIGKILL service instance B, start it again 2 s later.
    ServiceKill,
    /// SIGSTOP service instance B for 3 s, then SIGCONT.
    ServicePause,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::RedisKill,
        Fault::RedisPause,
        Fault::RedisSleep,
        Fault::ClientKill,
        Fault::RedisOom,
        Fault::ServiceKill,
        Fault::ServicePause,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::RedisKill => "Redis SIGKILL + restart (AOF) after 2 s",
            Fault::RedisPause => "Redis SIGSTOP 3 s / SIGCONT",
            Fault::RedisSleep => "Redis DEBUG SLEEP 3",
            Fault::ClientKill => "CLIENT KILL (normal + pubsub)",
            Fault::RedisOom => "maxmemory 1, noeviction, 3 s",
            Fault::ServiceKill => "instance B SIGKILL + restart after 2 s",
            Fault::ServicePause => "instance B SIGSTOP 3 s / SIGCONT",
        }
    }
}

/// The running system.
pub struct System {
    /// Holds the instances' logs for as long as the system runs.
    _dir: tempfile::TempDir,
    pub redis: RedisProc,
    pub a: ServiceProc,
    pub b: ServiceProc,
}

impl System {
    pub async fn start(extra: &[&str]) -> Fallible<Self> {
        let dir = tempfile::tempdir()?;
        let redis = RedisProc::start(&[]).await?;
        let a = ServiceProc::start("a", dir.path(), &redis.url(), "torture", extra).await?;
        let b = ServiceProc::start("b", dir.path(), &redis.url(), "torture", extra).await?;
        Ok(Self { _dir: dir, redis, a, b })
    }

    /// Two connections to each instance, alternating A, B.
    pub fn channels(&self) -> Fallible<Vec<tonic::transport::Channel>> {
        Ok(vec![self.a.channel.clone(), self.b.channel.clone(), self.a.new_channel()?, self.b.new_channel()?])
    }

    /// Applies `fault`, waits for it to end, and lifts it.
    pub async fn apply(&mut self, fault: Fault) -> Fallible<()> {
        let pause = Duration::from_secs(3);
        match fault {
            Fault::RedisKill => {
                self.redis.kill();
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.redis.restart().await?;
            }
            Fault::RedisPause => {
                let pid = self.redis.pid().ok_or("redis is not running")?;
                cluster::signal(pid, libc::SIGSTOP);
                tokio::time::sleep(pause).await;
                cluster::signal(pid, libc::SIGCONT);
            }
            Fault::RedisSleep => {
                let mut admin = self.redis.admin().await?;
                let _: () = redis::cmd("DEBUG").arg("SLEEP").arg(pause.as_secs()).query_async(&mut admin).await?;
            }
            Fault::ClientKill => {
                let mut admin = self.redis.admin().await?;
                for kind in ["normal", "pubsub"] {
                    let _: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg(kind).query_async(&mut admin).await?;
                }
            }
            Fault::RedisOom => {
                let mut admin = self.redis.admin().await?;
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory-policy")
                    .arg("noeviction")
                    .query_async(&mut admin)
                    .await?;
                let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(1).query_async(&mut admin).await?;
                tokio::time::sleep(pause).await;
                let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).query_async(&mut admin).await?;
            }
            Fault::ServiceKill => {
                self.b.kill();
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.b.restart().await?;
            }
            Fault::ServicePause => {
                let pid = self.b.pid().ok_or("instance B is not running")?;
                cluster::signal(pid, libc::SIGSTOP);
                tokio::time::sleep(pause).await;
                cluster::signal(pid, libc::SIGCONT);
            }
        }
        Ok(())
    }

    /// (RSS KiB, open fds) of each instance, and Redis's connected clients.
    pub async fn levels(&self) -> Fallible<Levels> {
        let mut admin = self.redis.admin().await?;
        let pid = |s: &ServiceProc| s.pid().unwrap_or(0);
        Ok(Levels {
            rss_kb: [cluster::rss_kb(pid(&self.a)).unwrap_or(0), cluster::rss_kb(pid(&self.b)).unwrap_or(0)],
            fds: [cluster::open_fds(pid(&self.a)).unwrap_or(0), cluster::open_fds(pid(&self.b)).unwrap_or(0)],
            // Minus the admin connection asking.
            redis_clients: cluster::redis_clients(&mut admin).await.unwrap_or(0).saturating_sub(1),
        })
    }
}

/// Resource levels of the system at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Levels {
    pub rss_kb: [u64; 2],
    pub fds: [usize; 2],
    pub redis_clients: u64,
}

/// One fault's figures.
struct Outcome {
    fault: Fault,
    /// Seconds (since the recorder's origin) when the fault began and ended.
    began: f64,
    ended: f64,
    /// Successes per second in the 2 s before it.
    rate: f64,
    before: Vec<record::ErrorEvent>,
    during: Vec<record::ErrorEvent>,
    after: Vec<record::ErrorEvent>,
    first_ok: Option<f64>,
    full_rate: Option<f64>,
}

/// Runs the scenario; returns the report and whether every check passed.
pub async fn run(callers: usize, faults: &[Fault]) -> Fallible<(String, bool)> {
    let mut system = System::start(&[]).await?;
    let recorder = Arc::new(Recorder::new(Duration::from_secs(600)));
    let channels = system.channels()?;
    let load = Load::start(&recorder, &channels, callers, None);
    let checkers = Checkers::start(&recorder, &channels);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = system.levels().await?;

    let mut outcomes = Vec::new();
    for &fault in faults {
        // 2 s of steady load before each fault.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let began = recorder.now();
        let rate = recorder.ok_between(began - 2.0, began) as f64 / 2.0;
        eprintln!("[{began:7.2}s] {} ({rate:.0} calls/s before)", fault.name());
        system.apply(fault).await?;
        let ended = recorder.now();
        // Up to 10 s to recover, and no fault for at least 2 s after.
        let mut full_rate = None;
        let observe_until = ended + 10.0;
        while recorder.now() < observe_until {
            tokio::time::sleep(Duration::from_millis(250)).await;
            full_rate = recorder.full_rate_after(ended, rate, 0.8, recorder.now());
            if full_rate.is_some_and(|t| recorder.now() > t + 2.0) {
                break;
            }
        }
        let settled = recorder.now();
        outcomes.push(Outcome {
            fault,
            began,
            ended,
            rate,
            before: recorder.events_between(began - 2.0, began),
            during: recorder.events_between(began, ended),
            after: recorder.events_between(ended, settled),
            first_ok: recorder.first_ok_after(ended).map(|t| t - ended),
            full_rate: full_rate.map(|t| t - ended),
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop().await;
    let verdict = checkers.stop().await;
    // Let connections and buffers settle after the load.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = system.levels().await?;
    let panics = system.a.panics() + system.b.panics();
    let internal_logs = system.a.error_lines().len() + system.b.error_lines().len();
    let first_internal = system.a.error_lines().into_iter().chain(system.b.error_lines()).next();
    let late = late_fetches(&outcomes, &verdict);
    let report = report(&recorder, &outcomes, &verdict, before, after, panics, internal_logs, first_internal);
    let report = format!(
        "{report}- Fetch answers past their bound (max_wait + {} ms; + 2 s during a Redis fault and its recovery, + 3 s during the instance pause): {}\n",
        FETCH_FAIL.as_millis(),
        late.len()
    );
    let codes = recorder.codes();
    let passed = codes.keys().all(|code| record::fault_code(code))
        && verdict.over_admitted.is_empty()
        && verdict.stale_reads.is_empty()
        && late.is_empty()
        && panics == 0
        && recorder.hung.load(std::sync::atomic::Ordering::Relaxed) == 0
        && outcomes.iter().all(|o| o.before.is_empty());
    Ok((report, passed))
}

#[allow(clippy::too_many_arguments)]
fn report(
    recorder: &Recorder,
    outcomes: &[Outcome],
    verdict: &Verdict,
    before: Levels,
    after: Levels,
    panics: usize,
    internal_logs: usize,
    first_internal: Option<String>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### Faults under load\n");
    let _ = writeln!(
        out,
        "| fault | calls/s before | errors in the 2 s before | errors during (s) | errors after it ended | first success after | full throughput after |"
    );
    let _ = writeln!(out, "|---|---:|---|---|---|---:|---:|");
    let secs = |t: Option<f64>| t.map_or("never".into(), |t| format!("{:.2} s", t));
    for o in outcomes {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} ({:.1} s) | {} | {} | {} |",
            o.fault.name(),
            o.rate,
            record::by_code(&o.before),
            record::by_code(&o.during),
            o.ended - o.began,
            after_summary(&o.after, o.ended),
            secs(o.first_ok),
            secs(o.full_rate),
        );
    }
    let _ = writeln!(out, "\nErrors after each fault ended, by RPC:\n");
    for o in outcomes {
        if o.after.is_empty() {
            continue;
        }
        let mut ops: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
        for e in &o.after {
            *ops.entry((e.op, e.code.as_str())).or_default() += 1;
        }
        let list = ops.iter().map(|((op, code), n)| format!("{op} {code} ×{n}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(out, "- {}: {list}", o.fault.name());
    }
    let mut odd: std::collections::BTreeMap<(&str, &str, &str, &str), (usize, f64)> = Default::default();
    for o in outcomes {
        for e in o.before.iter().chain(&o.during).chain(&o.after) {
            if !matches!(e.code.as_str(), "Unavailable" | "DeadlineExceeded") {
                let seen = odd.entry((o.fault.name(), e.op, e.code.as_str(), e.message.as_str())).or_default();
                seen.0 += 1;
                seen.1 = seen.1.max(e.took);
            }
        }
    }
    if !odd.is_empty() {
        let _ = writeln!(out, "\nErrors other than UNAVAILABLE and DEADLINE_EXCEEDED, by fault, RPC and message:\n");
        for ((fault, op, code, message), (n, took)) in &odd {
            let _ = writeln!(out, "- {fault}: {op} {code} ×{n} (longest {took:.2} s): `{message}`");
        }
    }
    let codes = recorder.codes();
    let total: u64 = codes.values().sum();
    let _ = writeln!(
        out,
        "\nAll errors of the run by code: {}",
        if total == 0 {
            "none".into()
        } else {
            codes.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
        }
    );
    let _ = writeln!(
        out,
        "Calls answered later than their {} ms deadline + {} ms: {}",
        record::DEADLINE.as_millis(),
        record::HANG_SLACK.as_millis(),
        recorder.hung.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(out, "Panics in the service logs: {panics}; ERROR lines (internal errors): {internal_logs}");
    if let Some(line) = first_internal {
        let _ = writeln!(out, "First ERROR line: `{}`", line.chars().take(300).collect::<String>());
    }
    let _ = writeln!(out, "\nInvariants:\n");
    let _ = writeln!(
        out,
        "- fixed window: {} windows of {} hammered from 8 callers over both instances; over-admitted: {}",
        verdict.windows,
        100,
        verdict.over_admitted.len()
    );
    for line in verdict.over_admitted.iter().take(5) {
        let _ = writeln!(out, "  - {line}");
    }
    let _ = writeln!(
        out,
        "- Fetch: {} answered; later than max_wait 300 ms + {} ms: {} (worst overshoot {:.0} ms)",
        verdict.fetches,
        FETCH_SLACK.as_millis(),
        verdict.late_fetches.len(),
        verdict.worst_fetch_overshoot_ms
    );
    let (mut inside, mut outside) = (0, 0);
    for (at, _) in &verdict.late_fetches {
        let during = outcomes.iter().any(|o| *at >= o.began && *at <= o.ended + o.full_rate.unwrap_or(10.0).max(1.0));
        if during { inside += 1 } else { outside += 1 }
    }
    let _ = writeln!(out, "  - of these, {inside} during a fault or its recovery and {outside} outside");
    let _ = writeln!(
        out,
        "- InvalidateTags: {} tagged reads checked; entries read after an invalidation that followed their write: {}",
        verdict.reads_checked,
        verdict.stale_reads.len()
    );
    for line in verdict.stale_reads.iter().take(5) {
        let _ = writeln!(out, "  - {line}");
    }
    let _ = writeln!(out, "\nResources (before the first fault → 2 s after the load stopped):\n");
    let _ = writeln!(
        out,
        "- instance A: RSS {:.1} → {:.1} MB, open fds {} → {}",
        before.rss_kb[0] as f64 / 1024.0,
        after.rss_kb[0] as f64 / 1024.0,
        before.fds[0],
        after.fds[0]
    );
    let _ = writeln!(
        out,
        "- instance B (restarted by the kill fault): RSS {:.1} → {:.1} MB, open fds {} → {}",
        before.rss_kb[1] as f64 / 1024.0,
        after.rss_kb[1] as f64 / 1024.0,
        before.fds[1],
        after.fds[1]
    );
    let _ = writeln!(out, "- Redis connected clients: {} → {}", before.redis_clients, after.redis_clients);
    out
}

/// Fetch answers later than they may be: `max_wait` + [`FETCH_FAIL`]; while
/// an instance is paused, the pause more; while Redis is stalled or gone,
/// and until throughput is back, two Redis timeouts more: the first read of a Fetch is bounded by the Redis timeout
/// alone, twice over today (the connection checkout and the script are
/// bounded separately, `Redis::connection` + `invoke_on`; the connection
/// layer of issue #11 replaces them). (Answers past `max_wait` +
/// [`FETCH_SLACK`] are listed in the report either way.)
fn late_fetches(outcomes: &[Outcome], verdict: &Verdict) -> Vec<(f64, f64)> {
    let bound = FETCH_FAIL.as_secs_f64() * 1000.0;
    verdict
        .late_fetches
        .iter()
        .copied()
        .filter(|(at, over)| {
            let extra = outcomes
                .iter()
                .filter(|o| *at >= o.began && *at <= o.ended + o.full_rate.unwrap_or(10.0).max(1.0))
                .map(|o| match o.fault {
                    // A killed instance answers nothing late.
                    Fault::ServiceKill => 0.0,
                    // A frozen instance answers when it thaws: the pause.
                    Fault::ServicePause => 3000.0,
                    _ => 2000.0,
                })
                .fold(0.0, f64::max);
            *over > bound + extra
        })
        .collect()
}

/// Errors after a fault ended: count by code and the time of the last one.
fn after_summary(events: &[record::ErrorEvent], ended: f64) -> String {
    match events.iter().map(|e| e.at).fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t)))) {
        None => "none".into(),
        Some(last) => format!("{} (last at +{:.2} s)", record::by_code(events), last - ended),
    }
}
