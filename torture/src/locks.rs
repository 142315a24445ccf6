//! The lock checker: many clients on few lock names, through two service
//! instances, each writing `(fencing token, client)` into a shared register
//! that refuses a token lower than one it has seen (as a fenced resource
//! would), while the service is paused, clients pause past their lease,
//! Redis restarts or loses its connections, and Hold streams are cut.
//!
//! Checks:
//! - every write a client makes while its lease is valid on its own clock
//!   is accepted (a rejection means a newer holder got the lock while this
//!   lease was still valid);
//! - no two Acquire leases overlap in Redis time (the fencing token is the
//!   Redis clock in µs at the grant; a release is bracketed by TIME calls);
//! - fencing tokens are never reused;
//! - every grant is accounted for: released, expired after a client pause,
//!   lost and reported (Release false, Hold LOST), or cut (Hold dropped).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use cachecoord::proto::{self, HoldEvent, lock_service_client::LockServiceClient};
use rand::Rng;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::transport::Channel;

use crate::{
    cluster::{self, Fallible},
    faults::System,
    record::{self, Recorder, dur, req},
};

/// Lock names the clients fight over.
const NAMES: usize = 3;
/// Clients.
const CLIENTS: usize = 12;
/// Lease of an Acquire; a Hold renews a shorter one.
const ACQUIRE_TTL: Duration = Duration::from_millis(800);
const HOLD_TTL: Duration = Duration::from_millis(600);
/// Time taken off a Hold's validity for the event's trip to the client.
const TRANSIT: Duration = Duration::from_millis(20);

/// How a grant ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// Release answered true, or a Hold closed by its client without LOST.
    Released,
    /// The client paused past its lease; Release then answered false.
    ExpiredAfterPause,
    /// Release answered false without a pause, or Hold said LOST: reported.
    LostReported,
    /// The client dropped its Hold stream mid-lease.
    Cut,
    /// The release call failed (Redis or the instance unreachable); the
    /// lease ends with its TTL.
    ReleaseFailed,
}

/// One lease granted to a client.
#[derive(Clone, Debug)]
struct Grant {
    name: usize,
    client: usize,
    token: u64,
    hold: bool,
    ttl: Duration,
    end: End,
    /// Redis TIME (µs) just before and after a successful Release.
    released_between: Option<(u64, u64)>,
}

/// The fenced resource: per name, the highest token written.
#[derive(Default)]
struct Register {
    highest: Mutex<HashMap<usize, (u64, usize)>>,
}

impl Register {
    /// Accepts the write unless a higher token has been written.
    fn write(&self, name: usize, token: u64, client: usize) -> bool {
        let mut highest = self.highest.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = highest.entry(name).or_insert((0, client));
        if token < entry.0 {
            return false;
        }
        *entry = (token, client);
        true
    }
}

/// Everything the clients saw.
#[derive(Default)]
struct Log {
    grants: Vec<Grant>,
    writes_valid: u64,
    /// Writes within validity that the register refused.
    rejected_valid: Vec<String>,
    /// Writes after a pause past the lease: (accepted, rejected).
    stale: (u64, u64),
}

struct Shared {
    register: Register,
    log: Mutex<Log>,
    recorder: Arc<Recorder>,
    running: AtomicBool,
    redis_url: String,
}

/// Runs the checker for `duration`; the report and whether it passed.
pub async fn run(duration: Duration) -> Fallible<(String, bool)> {
    let mut system = System::start(&[]).await?;
    let recorder = Arc::new(Recorder::new(duration + Duration::from_secs(60)));
    let shared = Arc::new(Shared {
        register: Register::default(),
        log: Mutex::new(Log::default()),
        recorder: Arc::clone(&recorder),
        running: AtomicBool::new(true),
        redis_url: system.redis.url(),
    });
    let channels = [system.a.channel.clone(), system.b.channel.clone()];
    let clients: Vec<_> =
        (0..CLIENTS).map(|i| tokio::spawn(client(i, channels[i % 2].clone(), Arc::clone(&shared)))).collect();

    // Faults in turn, one every few seconds, until the time is up.
    let started = Instant::now();
    let mut faults = Vec::new();
    let schedule = ["service pause", "Redis restart", "CLIENT KILL", "service pause", "Redis restart"];
    let mut next = 0;
    while started.elapsed() + Duration::from_secs(6) < duration {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let fault = schedule[next % schedule.len()];
        next += 1;
        let began = recorder.now();
        eprintln!("[{began:7.2}s] {fault}");
        match fault {
            "service pause" => {
                let pid = system.b.pid().ok_or("instance B is not running")?;
                cluster::signal(pid, libc::SIGSTOP);
                tokio::time::sleep(Duration::from_secs(2)).await;
                cluster::signal(pid, libc::SIGCONT);
            }
            "Redis restart" => {
                system.redis.kill();
                tokio::time::sleep(Duration::from_secs(1)).await;
                system.redis.restart().await?;
            }
            _ => {
                let mut admin = system.redis.admin().await?;
                for kind in ["normal", "pubsub"] {
                    let _: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg(kind).query_async(&mut admin).await?;
                }
            }
        }
        faults.push((fault, began, recorder.now()));
    }
    let left = duration.saturating_sub(started.elapsed());
    tokio::time::sleep(left).await;
    shared.running.store(false, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let panics = system.a.panics() + system.b.panics();
    Ok(report(&shared, &recorder, &faults, panics))
}

/// Redis's clock in µs, on a connection of the checker's own.
async fn redis_time(conn: &mut Option<MultiplexedConnection>, url: &str) -> Option<u64> {
    if conn.is_none() {
        let client = redis::Client::open(url).ok()?;
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_millis(500)));
        *conn = client.get_multiplexed_async_connection_with_config(&config).await.ok();
    }
    let result: redis::RedisResult<(u64, u64)> = redis::cmd("TIME").query_async(conn.as_mut()?).await;
    match result {
        Ok((s, us)) => Some(s * 1_000_000 + us),
        Err(_) => {
            *conn = None;
            None
        }
    }
}

async fn client(id: usize, channel: Channel, shared: Arc<Shared>) {
    let mut locks = LockServiceClient::new(channel);
    let mut time_conn = None;
    while shared.running.load(Ordering::Relaxed) {
        let name = rand::rng().random_range(0..NAMES);
        if rand::rng().random_bool(0.6) {
            acquire_round(id, name, &mut locks, &shared, &mut time_conn).await;
        } else {
            hold_round(id, name, &mut locks, &shared).await;
        }
    }
}

/// Writes to the register while the lease is valid; returns false if the
/// lease ran out first.
async fn work(id: usize, name: usize, token: u64, valid_until: Instant, shared: &Shared, writes: usize) {
    for _ in 0..writes {
        let pause = Duration::from_millis(rand::rng().random_range(10..80));
        tokio::time::sleep(pause).await;
        // The check and the write are back to back: a real client would
        // check its lease the same way before touching the resource.
        if Instant::now() >= valid_until {
            return;
        }
        let accepted = shared.register.write(name, token, id);
        let mut log = shared.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.writes_valid += 1;
        if !accepted {
            log.rejected_valid.push(format!("client {id} token {token} on lock {name}"));
        }
    }
}

async fn acquire_round(
    id: usize,
    name: usize,
    locks: &mut LockServiceClient<Channel>,
    shared: &Shared,
    time_conn: &mut Option<MultiplexedConnection>,
) {
    let r = &shared.recorder;
    let acquire = proto::AcquireRequest {
        name: format!("lock:{name}"),
        ttl: dur(ACQUIRE_TTL),
        wait: dur(Duration::from_secs(3)),
        owner: format!("client-{id}"),
    };
    let sent = Instant::now();
    let Ok(grant) = r.call("Lock.Acquire", locks.acquire(req(acquire))).await else {
        tokio::time::sleep(Duration::from_millis(50)).await;
        return;
    };
    if !grant.acquired {
        return;
    }
    let valid_for = grant.valid_for.and_then(|d| Duration::try_from(d).ok()).unwrap_or_default();
    let valid_until = sent + valid_for;
    let writes = rand::rng().random_range(1..4);
    work(id, name, grant.fencing_token, valid_until, shared, writes).await;
    let paused = rand::rng().random_bool(0.1);
    if paused {
        // A pause longer than the lease (a GC pause, a stalled VM), then a
        // write as if nothing happened: the register must refuse it if a
        // newer holder wrote meanwhile.
        tokio::time::sleep(ACQUIRE_TTL + ACQUIRE_TTL / 2).await;
        let accepted = shared.register.write(name, grant.fencing_token, id);
        let mut log = shared.log.lock().unwrap_or_else(PoisonError::into_inner);
        if accepted { log.stale.0 += 1 } else { log.stale.1 += 1 }
    }
    let before = redis_time(time_conn, &shared.redis_url).await;
    let release = proto::ReleaseRequest { name: format!("lock:{name}"), lease_id: grant.lease_id };
    let released = r.call("Lock.Release", locks.release(req(release))).await;
    let after = redis_time(time_conn, &shared.redis_url).await;
    let (end, released_between) = match released {
        Ok(answer) if answer.released => (End::Released, before.zip(after)),
        Ok(_) if paused => (End::ExpiredAfterPause, None),
        Ok(_) => (End::LostReported, None),
        Err(_) => (End::ReleaseFailed, None),
    };
    let grant =
        Grant { name, client: id, token: grant.fencing_token, hold: false, ttl: ACQUIRE_TTL, end, released_between };
    shared.log.lock().unwrap_or_else(PoisonError::into_inner).grants.push(grant);
}

async fn hold_round(id: usize, name: usize, locks: &mut LockServiceClient<Channel>, shared: &Shared) {
    let r = &shared.recorder;
    let (tx, rx) = mpsc::channel(1);
    let first = proto::HoldRequest {
        name: format!("lock:{name}"),
        ttl: dur(HOLD_TTL),
        wait: dur(Duration::from_secs(3)),
        owner: format!("client-{id}"),
    };
    let _ = tx.send(first).await;
    let sent = Instant::now();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    // Long enough for the wait and the whole hold.
    request.set_timeout(Duration::from_secs(10));
    let opened = Instant::now();
    let stream = match tokio::time::timeout(Duration::from_secs(12), locks.hold(request)).await {
        Ok(Ok(response)) => {
            r.record("Lock.Hold", opened, None);
            response.into_inner()
        }
        Ok(Err(status)) => {
            r.record("Lock.Hold", opened, Some(&status));
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        Err(_) => return,
    };
    let mut stream = stream;
    let Some(Ok(first)) = stream.next().await else { return };
    if first.event != i32::from(HoldEvent::Acquired) {
        return;
    }
    let token = first.fencing_token;
    let validity = |d: Option<prost_types::Duration>| d.and_then(|d| Duration::try_from(d).ok()).unwrap_or_default();
    let mut valid_until = sent + validity(first.valid_for);
    let hold_for = Duration::from_millis(rand::rng().random_range(200..2000));
    let cut = rand::rng().random_bool(0.3);
    let until = Instant::now() + hold_for;
    let mut lost = false;
    while Instant::now() < until {
        tokio::select! {
            event = stream.next() => match event {
                Some(Ok(event)) if event.event == i32::from(HoldEvent::Renewed) => {
                    valid_until = Instant::now() + validity(event.valid_for).saturating_sub(TRANSIT);
                }
                Some(Ok(event)) if event.event == i32::from(HoldEvent::Lost) => { lost = true; break }
                // The stream ended or broke: the lease is not ours any more.
                _ => { lost = true; break }
            },
            () = work(id, name, token, valid_until, shared, 1) => {}
        }
    }
    let end = if lost {
        End::LostReported
    } else if cut {
        // Dropping both halves at once: the service must let go.
        End::Cut
    } else {
        End::Released
    };
    if cut {
        // Reset the call mid-lease (as a crashed client's connection would).
        drop(stream);
        drop(tx);
    } else {
        // Closing our side: the service releases, then ends the stream.
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while stream.next().await.is_some() {} }).await;
    }
    let grant = Grant { name, client: id, token, hold: true, ttl: HOLD_TTL, end, released_between: None };
    shared.log.lock().unwrap_or_else(PoisonError::into_inner).grants.push(grant);
}

fn report(shared: &Shared, recorder: &Recorder, faults: &[(&str, f64, f64)], panics: usize) -> (String, bool) {
    let log = shared.log.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = String::new();
    let _ = writeln!(out, "### Lock checker\n");
    let acquires = log.grants.iter().filter(|g| !g.hold).count();
    let _ = writeln!(
        out,
        "{} grants ({} Acquire, {} Hold) over {NAMES} names from {CLIENTS} clients through two instances.\n",
        log.grants.len(),
        acquires,
        log.grants.len() - acquires
    );
    let mut ends: BTreeMap<End, usize> = BTreeMap::new();
    for g in &log.grants {
        *ends.entry(g.end).or_default() += 1;
    }
    let _ = writeln!(out, "| how a grant ended | count |\n|---|---:|");
    for (end, n) in &ends {
        let _ = writeln!(out, "| {end:?} | {n} |");
    }
    // Token reuse.
    let mut seen: HashMap<(usize, u64), usize> = HashMap::new();
    for g in &log.grants {
        *seen.entry((g.name, g.token)).or_default() += 1;
    }
    let reused = seen.values().filter(|n| **n > 1).count();
    // Overlaps in Redis time between an Acquire lease and the next grant.
    let mut overlaps = Vec::new();
    for name in 0..NAMES {
        let mut grants: Vec<&Grant> = log.grants.iter().filter(|g| g.name == name).collect();
        grants.sort_by_key(|g| g.token);
        for pair in grants.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if a.hold {
                continue;
            }
            let expiry = a.token + a.ttl.as_micros() as u64;
            // 1 ms: expiries have millisecond precision.
            let before_expiry = b.token + 1_000 < expiry;
            let overlap = match (a.end, a.released_between) {
                (End::Released, Some((t1, _))) => before_expiry && b.token < t1,
                (End::Released, None) | (End::ReleaseFailed, _) => false,
                _ => before_expiry,
            };
            if overlap {
                overlaps.push(format!(
                    "lock {name}: client {} (token {}, {:?}) and client {} (token {})",
                    a.client, a.token, a.end, b.client, b.token
                ));
            }
        }
    }
    let _ = writeln!(
        out,
        "\n- writes made within a lease's validity: {}; refused by the register: {}",
        log.writes_valid,
        log.rejected_valid.len()
    );
    for line in log.rejected_valid.iter().take(5) {
        let _ = writeln!(out, "  - {line}");
    }
    let _ = writeln!(
        out,
        "- writes after a client paused past its lease: {} refused (a newer holder had written), {} accepted (nobody had)",
        log.stale.1, log.stale.0
    );
    let _ = writeln!(out, "- fencing tokens reused: {reused}");
    let _ = writeln!(out, "- Acquire leases overlapping the next grant in Redis time: {}", overlaps.len());
    for line in overlaps.iter().take(5) {
        let _ = writeln!(out, "  - {line}");
    }
    let _ = writeln!(out, "- panics in the service logs: {panics}");
    let _ = writeln!(out, "\nLock RPC errors around each fault (the fault's own span, then after it ended):\n");
    let _ = writeln!(out, "| fault | during | after it ended | last error after it ended |\n|---|---|---|---:|");
    for (i, (fault, began, ended)) in faults.iter().enumerate() {
        let next = faults.get(i + 1).map_or(f64::MAX, |f| f.1);
        let during = recorder.events_between(*began, *ended);
        let after = recorder.events_between(*ended, next.min(ended + 3.0));
        let last = after.iter().map(|e| e.at - ended).fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
        let _ = writeln!(
            out,
            "| {fault} at {began:.1} s | {} | {} | {} |",
            record::by_code(&during),
            record::by_code(&after),
            last.map_or("-".into(), |t| format!("+{t:.2} s"))
        );
    }
    let passed = log.rejected_valid.is_empty() && reused == 0 && overlaps.is_empty() && panics == 0;
    (out, passed)
}
