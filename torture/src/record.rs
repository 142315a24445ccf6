//! What every call of a scenario did: successes per 10 ms slot (for
//! throughput and recovery times), every error with its time and code,
//! calls that outlived their deadline, and latency histograms per window.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tonic::{Code, Response, Status};

/// Width of one throughput slot.
pub const SLOT: Duration = Duration::from_millis(10);
/// Width of one latency window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Every call carries this deadline (the service's Redis timeout is 1 s).
pub const DEADLINE: Duration = Duration::from_secs(2);
/// A call answered later than its deadline plus this has hung.
pub const HANG_SLACK: Duration = Duration::from_millis(250);
/// Error events kept (the counts go on past it).
const MAX_EVENTS: usize = 500_000;

/// One failed call.
#[derive(Clone, Debug)]
pub struct ErrorEvent {
    /// Seconds since the recorder's origin, when the answer came.
    pub at: f64,
    pub op: &'static str,
    /// The gRPC code; `client-deadline` when the client cut the call.
    pub code: String,
    pub message: String,
    /// How long the call took, seconds.
    pub took: f64,
}

/// The calls of one scenario.
pub struct Recorder {
    pub origin: Instant,
    ok: Vec<AtomicU32>,
    err: Vec<AtomicU32>,
    events: Mutex<Vec<ErrorEvent>>,
    /// Errors by code, all of them.
    codes: Mutex<BTreeMap<String, u64>>,
    /// Calls answered after their deadline + [`HANG_SLACK`].
    pub hung: AtomicU64,
    latency: Mutex<Vec<Histogram<u64>>>,
}

impl Recorder {
    /// A recorder for a scenario of at most `span`.
    pub fn new(span: Duration) -> Self {
        let slots = (span.as_millis() / SLOT.as_millis()) as usize + 1;
        let windows = (span.as_secs() / WINDOW.as_secs()) as usize + 1;
        Self {
            origin: Instant::now(),
            ok: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            err: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            events: Mutex::new(Vec::new()),
            codes: Mutex::new(BTreeMap::new()),
            hung: AtomicU64::new(0),
            latency: Mutex::new(
                (0..windows).map(|_| Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds")).collect(),
            ),
        }
    }

    /// Seconds since the origin.
    pub fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    fn slot(&self, at: Instant) -> usize {
        ((at - self.origin).as_millis() / SLOT.as_millis()) as usize
    }

    /// Runs one call with [`DEADLINE`], records it, and hands back its answer.
    pub async fn call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, Status> {
        let sent = Instant::now();
        // The outer timeout only catches a call the client failed to cut.
        let result = match tokio::time::timeout(DEADLINE + Duration::from_secs(5), call).await {
            Ok(result) => result.map(Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded("torture: no answer 5 s past the deadline")),
        };
        self.record(op, sent, result.as_ref().err());
        result
    }

    /// Records a call sent at `sent` that ended now with `error`.
    pub fn record(&self, op: &'static str, sent: Instant, error: Option<&Status>) {
        let now = Instant::now();
        let took = now - sent;
        if took > DEADLINE + HANG_SLACK {
            self.hung.fetch_add(1, Ordering::Relaxed);
        }
        let slot = self.slot(now).min(self.ok.len() - 1);
        match error {
            None => {
                self.ok[slot].fetch_add(1, Ordering::Relaxed);
                let window = ((now - self.origin).as_secs() / WINDOW.as_secs()) as usize;
                let mut latency = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(h) = latency.get_mut(window) {
                    let _ = h.record(took.as_micros() as u64);
                }
            }
            Some(status) => {
                self.err[slot].fetch_add(1, Ordering::Relaxed);
                let code = code_name(status);
                *self.codes.lock().unwrap_or_else(PoisonError::into_inner).entry(code.clone()).or_default() += 1;
                let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
                if events.len() < MAX_EVENTS {
                    events.push(ErrorEvent {
                        at: (now - self.origin).as_secs_f64(),
                        op,
                        code,
                        message: status.message().chars().take(120).collect(),
                        took: took.as_secs_f64(),
                    });
                }
            }
        }
    }

    /// Successes per slot from `from` to `to` seconds.
    pub fn ok_between(&self, from: f64, to: f64) -> u64 {
        self.sum(&self.ok, from, to)
    }

    /// Errors per slot from `from` to `to` seconds.
    pub fn err_between(&self, from: f64, to: f64) -> u64 {
        self.sum(&self.err, from, to)
    }

    fn sum(&self, slots: &[AtomicU32], from: f64, to: f64) -> u64 {
        let first = (from / SLOT.as_secs_f64()).max(0.0) as usize;
        let last = ((to / SLOT.as_secs_f64()) as usize).min(slots.len());
        slots[first.min(last)..last].iter().map(|s| u64::from(s.load(Ordering::Relaxed))).sum()
    }

    /// The first slot start at or after `from` (seconds) with a success.
    pub fn first_ok_after(&self, from: f64) -> Option<f64> {
        let first = (from / SLOT.as_secs_f64()).ceil() as usize;
        (first..self.ok.len()).find(|&i| self.ok[i].load(Ordering::Relaxed) > 0).map(|i| i as f64 * SLOT.as_secs_f64())
    }

    /// The first instant at or after `from` from which a 500 ms stretch
    /// reaches `fraction` of `rate` (successes per second) with no error.
    pub fn full_rate_after(&self, from: f64, rate: f64, fraction: f64, until: f64) -> Option<f64> {
        let mut t = from;
        while t + 0.5 <= until {
            if self.ok_between(t, t + 0.5) as f64 >= rate * 0.5 * fraction && self.err_between(t, t + 0.5) == 0 {
                return Some(t);
            }
            t += SLOT.as_secs_f64();
        }
        None
    }

    /// Error events within `[from, to)` seconds.
    pub fn events_between(&self, from: f64, to: f64) -> Vec<ErrorEvent> {
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        events.iter().filter(|e| e.at >= from && e.at < to).cloned().collect()
    }

    /// Errors by code over the whole run.
    pub fn codes(&self) -> BTreeMap<String, u64> {
        self.codes.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// (calls, p50 ms, p99 ms, max ms) per latency window so far.
    pub fn latency_windows(&self) -> Vec<(u64, f64, f64, f64)> {
        let latency = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
        latency
            .iter()
            .map(|h| {
                let ms = |v: u64| v as f64 / 1000.0;
                (h.len(), ms(h.value_at_quantile(0.5)), ms(h.value_at_quantile(0.99)), ms(h.max()))
            })
            .collect()
    }
}

/// A short name for a failed call's code; a call the client had to cut at
/// its deadline is told apart from one the server answered.
pub fn code_name(status: &Status) -> String {
    match status.code() {
        Code::Cancelled if status.message().contains("Timeout expired") => "client-deadline".into(),
        // tonic's client reports a connection reset mid-call (a killed
        // instance) so; the service never answered these.
        Code::Unknown if status.message() == "transport error" => "client-transport".into(),
        Code::Cancelled if status.message() == "operation was canceled" => "client-transport".into(),
        code => format!("{code:?}"),
    }
}

/// Whether an error code is one a fault may cause (UNAVAILABLE,
/// DEADLINE_EXCEEDED, the client cutting a call at its deadline, or the
/// client losing the connection of a killed instance).
pub fn fault_code(code: &str) -> bool {
    matches!(code, "Unavailable" | "DeadlineExceeded" | "client-deadline" | "client-transport")
}

/// `errors by code` as `Unavailable 12, DeadlineExceeded 3`.
pub fn by_code(events: &[ErrorEvent]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events {
        *counts.entry(e.code.as_str()).or_default() += 1;
    }
    if counts.is_empty() {
        return "none".into();
    }
    counts.iter().map(|(code, n)| format!("{code} {n}")).collect::<Vec<_>>().join(", ")
}

/// A request with the scenario's deadline.
pub fn req<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(DEADLINE);
    request
}

/// A protobuf Duration.
pub fn dur(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 })
}
