//! Invariants checked from outside while faults happen:
//! - a fixed window never admits more than its allowance, counted across
//!   every client and both instances;
//! - a Fetch waiter never waits past `max_wait`;
//! - InvalidateTags never lets an entry written before it be read after it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use cachecoord::proto;
use rand::Rng;
use tonic::transport::Channel;

use crate::{
    load::Clients,
    record::{Recorder, dur, req},
};

/// Allowance of each fixed window the checker hammers.
const WINDOW_LIMIT: u64 = 100;
/// A new fixed-window key every this long, so the limit is reached again and again.
const WINDOW_KEY_EVERY: Duration = Duration::from_secs(3);
/// A Fetch waiter's `max_wait`.
const MAX_WAIT: Duration = Duration::from_millis(300);
/// Time for the Fetch's own script calls on top of `max_wait` before an
/// answer counts as late (a loaded 2-core machine takes tens of ms at times).
pub const FETCH_SLACK: Duration = Duration::from_millis(150);

/// What the checkers saw.
#[derive(Default)]
pub struct Findings {
    /// Admitted checks per (key, window end rounded to the second).
    admitted: HashMap<(String, i64), u64>,
    /// Fetch answers later than `max_wait` + slack: (at seconds, overshoot ms).
    pub late_fetches: Vec<(f64, f64)>,
    /// The worst overshoot past `max_wait` of any answered Fetch, ms.
    pub worst_fetch_overshoot_ms: f64,
    /// Answered Fetches.
    pub fetches: u64,
    writes: HashMap<String, Vec<Write>>,
    invalidations: HashMap<String, Vec<(f64, f64)>>,
    reads: Vec<Read>,
}

struct Write {
    version: u64,
    end: f64,
}

struct Read {
    group: String,
    start: f64,
    version: u64,
    at: f64,
}

/// The invariant checkers, running beside the load.
pub struct Checkers {
    running: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub findings: Arc<Mutex<Findings>>,
}

/// What the checkers concluded.
pub struct Verdict {
    /// Fixed windows seen, and those that admitted more than their allowance.
    pub windows: usize,
    pub over_admitted: Vec<String>,
    pub fetches: u64,
    pub late_fetches: Vec<(f64, f64)>,
    pub worst_fetch_overshoot_ms: f64,
    pub reads_checked: usize,
    /// Reads that returned an entry written before an invalidation that
    /// ended before the read began.
    pub stale_reads: Vec<String>,
}

impl Checkers {
    pub fn start(recorder: &Arc<Recorder>, channels: &[Channel]) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let findings = Arc::new(Mutex::new(Findings::default()));
        let mut tasks = Vec::new();
        let clients = |i: usize| Clients::new(channels[i % channels.len()].clone());
        for i in 0..8 {
            tasks.push(tokio::spawn(fixed_window(clients(i), Arc::clone(recorder), findings.clone(), running.clone())));
        }
        for i in 0..6 {
            tasks.push(tokio::spawn(fetcher(clients(i), Arc::clone(recorder), findings.clone(), running.clone())));
        }
        for group in 0..2 {
            let name = format!("inv:{group}");
            let r = || Arc::clone(recorder);
            tasks.push(tokio::spawn(tag_writer(clients(group), r(), findings.clone(), running.clone(), name.clone())));
            tasks.push(tokio::spawn(invalidator(
                clients(group + 1),
                r(),
                findings.clone(),
                running.clone(),
                name.clone(),
            )));
            for reader in 0..2 {
                tasks.push(tokio::spawn(tag_reader(
                    clients(group + reader),
                    r(),
                    findings.clone(),
                    running.clone(),
                    name.clone(),
                )));
            }
        }
        Self { running, tasks, findings }
    }

    pub async fn stop(self) -> Verdict {
        self.running.store(false, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        let f = self.findings.lock().unwrap_or_else(PoisonError::into_inner);
        let over_admitted = f
            .admitted
            .iter()
            .filter(|(_, n)| **n > WINDOW_LIMIT)
            .map(|((key, window), n)| format!("{key} (window ending {window}): {n} admitted"))
            .collect();
        let mut stale_reads = Vec::new();
        for read in &f.reads {
            let Some(write) = f.writes.get(&read.group).and_then(|w| w.iter().find(|w| w.version == read.version))
            else {
                continue;
            };
            let invalidations = f.invalidations.get(&read.group).map(Vec::as_slice).unwrap_or_default();
            if let Some((s, e)) = invalidations.iter().find(|(s, e)| *s > write.end && *e < read.start) {
                stale_reads.push(format!(
                    "{}: version {} (written by {:.3}s) read at {:.3}s after an invalidation {s:.3}..{e:.3}s",
                    read.group, read.version, write.end, read.at
                ));
            }
        }
        Verdict {
            windows: f.admitted.len(),
            over_admitted,
            fetches: f.fetches,
            late_fetches: f.late_fetches.clone(),
            worst_fetch_overshoot_ms: f.worst_fetch_overshoot_ms,
            reads_checked: f.reads.len(),
            stale_reads,
        }
    }
}

/// Hammers one fixed-window key at a time and counts what it admits.
async fn fixed_window(mut c: Clients, r: Arc<Recorder>, f: Arc<Mutex<Findings>>, running: Arc<AtomicBool>) {
    while running.load(Ordering::Relaxed) {
        let key = format!("fw:{}", r.origin.elapsed().as_millis() / WINDOW_KEY_EVERY.as_millis());
        let check = proto::CheckRequest {
            limits: vec![proto::Limit {
                key: key.clone(),
                limit: WINDOW_LIMIT,
                period: dur(Duration::from_secs(86_400)),
                algorithm: proto::Algorithm::FixedWindow.into(),
                burst: None,
            }],
            cost: None,
            peek: false,
        };
        let sent = std::time::SystemTime::now();
        if let Ok(answer) = r.call("RateLimit.Check(fixed)", c.rate_limit.check(req(check))).await {
            let reset = answer.statuses.first().and_then(|s| s.reset_after).map_or(0, |d| d.seconds);
            let now = sent.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            // The window's end, to the hour: which day window admitted it.
            let window = (now + reset + 1800) / 3600 * 3600;
            let mut f = f.lock().unwrap_or_else(PoisonError::into_inner);
            let admitted = f.admitted.entry((key, window)).or_default();
            if answer.allowed {
                *admitted += 1;
            }
        }
    }
}

/// Fetches keys that are missing, behaving as filler or waiter as told.
async fn fetcher(mut c: Clients, r: Arc<Recorder>, f: Arc<Mutex<Findings>>, running: Arc<AtomicBool>) {
    while running.load(Ordering::Relaxed) {
        // A new key every 500 ms: there is always a fill going on.
        let key = format!("fx:{}", r.origin.elapsed().as_millis() / 500);
        let fetch = proto::FetchRequest {
            key: key.clone(),
            fill_timeout: dur(Duration::from_millis(600)),
            max_wait: dur(MAX_WAIT),
        };
        let sent = Instant::now();
        let Ok(answer) = r.call("Cache.Fetch(check)", c.cache.fetch(req(fetch))).await else { continue };
        let took = sent.elapsed();
        {
            let mut f = f.lock().unwrap_or_else(PoisonError::into_inner);
            f.fetches += 1;
            let over = took.saturating_sub(MAX_WAIT).as_secs_f64() * 1000.0;
            f.worst_fetch_overshoot_ms = f.worst_fetch_overshoot_ms.max(over);
            if took > MAX_WAIT + FETCH_SLACK {
                f.late_fetches.push((r.now(), over));
            }
        }
        if answer.outcome != i32::from(proto::FetchOutcome::Fill) {
            continue;
        }
        let roll = rand::rng().random_range(0..10);
        let think = Duration::from_millis(rand::rng().random_range(0..400));
        tokio::time::sleep(think).await;
        match roll {
            0..6 => {
                let fill = proto::FillRequest {
                    key,
                    fill_token: answer.fill_token,
                    value: b"filled".to_vec(),
                    ttl: dur(Duration::from_secs(3)),
                    tags: Vec::new(),
                };
                let _ = r.call("Cache.Fill(check)", c.cache.fill(req(fill))).await;
            }
            6..8 => {
                let abandon = proto::AbandonFillRequest { key, fill_token: answer.fill_token };
                let _ = r.call("Cache.AbandonFill(check)", c.cache.abandon_fill(req(abandon))).await;
            }
            // The filler vanishes; its lease ends with its fill_timeout.
            _ => {}
        }
    }
}

/// Writes versioned values under a tag, recording when each write ended.
async fn tag_writer(
    mut c: Clients,
    r: Arc<Recorder>,
    f: Arc<Mutex<Findings>>,
    running: Arc<AtomicBool>,
    group: String,
) {
    let mut version = 0u64;
    while running.load(Ordering::Relaxed) {
        version += 1;
        let set = proto::SetRequest {
            key: format!("{group}:{}", version % 10),
            value: version.to_string().into_bytes(),
            ttl: dur(Duration::from_secs(60)),
            tags: vec![group.clone()],
            ..Default::default()
        };
        // A write that failed may still land later: only acknowledged ones
        // are checked.
        if r.call("Cache.Set(tagged)", c.cache.set(req(set))).await.is_ok() {
            let end = r.now();
            let mut f = f.lock().unwrap_or_else(PoisonError::into_inner);
            f.writes.entry(group.clone()).or_default().push(Write { version, end });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn invalidator(
    mut c: Clients,
    r: Arc<Recorder>,
    f: Arc<Mutex<Findings>>,
    running: Arc<AtomicBool>,
    group: String,
) {
    while running.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let start = r.now();
        let call = c.cache.invalidate_tags(req(proto::InvalidateTagsRequest { tags: vec![group.clone()] }));
        if r.call("Cache.InvalidateTags(check)", call).await.is_ok() {
            let end = r.now();
            f.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .invalidations
                .entry(group.clone())
                .or_default()
                .push((start, end));
        }
    }
}

async fn tag_reader(
    mut c: Clients,
    r: Arc<Recorder>,
    f: Arc<Mutex<Findings>>,
    running: Arc<AtomicBool>,
    group: String,
) {
    let mut i = 0u64;
    while running.load(Ordering::Relaxed) {
        i += 1;
        let start = r.now();
        let get = proto::GetRequest { key: format!("{group}:{}", i % 10) };
        if let Ok(answer) = r.call("Cache.Get(tagged)", c.cache.get(req(get))).await
            && answer.found
            && let Some(version) = std::str::from_utf8(&answer.value).ok().and_then(|v| v.parse().ok())
        {
            let read = Read { group: group.clone(), start, version, at: r.now() };
            f.lock().unwrap_or_else(PoisonError::into_inner).reads.push(read);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
