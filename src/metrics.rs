//! Prometheus metrics: every metric the service exports, the tower layer
//! that counts gRPC calls, and the `/metrics` endpoint (`--metrics-listen`).
//!
//! Every metric is listed once, in [`DEFS`], with its type, labels and help
//! text; the README table, the alert rules and the Grafana dashboard are
//! checked against that list (`tests/metrics.rs`), as `keys.rs` holds every
//! Redis key.
//!
//! Recording is cheap: each series is registered once (at start-up, or on
//! first use for a status code) with a per-server `metrics-exporter-prometheus`
//! recorder, and recording is an atomic add on the handle held here: no
//! global registry lookup, no label formatting on the request path. With
//! `--metrics-listen` unset, [`Metrics`] is empty and every call is one branch.
//! The recorder is the server's own, not the process-global one, so several
//! servers in one process (tests, the bench) never mix their counts.
//!
//! Labels take values from fixed sets only (RPC names from the compiled
//! descriptors, status codes, outcome names): never a key, a name or a
//! tenant.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http_body::{Body, Frame};
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use prost::Message;
use tower::{Layer, Service};

/// What kind of series a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric.
#[derive(Clone, Copy, Debug)]
pub struct Def {
    /// The name as Prometheus sees it (histograms add `_bucket`, `_sum`, `_count`).
    pub name: &'static str,
    pub kind: Kind,
    /// Its label names; every value comes from a fixed set.
    pub labels: &'static [&'static str],
    /// What it counts, for `# HELP` and the README.
    pub help: &'static str,
}

const fn def(name: &'static str, kind: Kind, labels: &'static [&'static str], help: &'static str) -> Def {
    Def { name, kind, labels, help }
}

use Kind::{Counter as C, Gauge as G, Histogram as H};

pub const GRPC_STARTED: &str = "grpc_server_started_total";
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
pub const GRPC_SECONDS: &str = "grpc_server_handling_seconds";
pub const REDIS_SECONDS: &str = "cachecoord_redis_command_duration_seconds";
pub const REDIS_ERRORS: &str = "cachecoord_redis_errors_total";
pub const REDIS_OPEN: &str = "cachecoord_redis_connections_open";
pub const REDIS_RECONNECTS: &str = "cachecoord_redis_reconnects_total";
pub const REDIS_IN_FLIGHT: &str = "cachecoord_redis_commands_in_flight";
pub const HEALTH: &str = "cachecoord_health_serving";
pub const CACHE_LOOKUPS: &str = "cachecoord_cache_lookups_total";
pub const CACHE_FETCHES: &str = "cachecoord_cache_fetch_total";
pub const CACHE_FETCH_WAIT: &str = "cachecoord_cache_fetch_wait_seconds";
pub const CACHE_FILLS: &str = "cachecoord_cache_fills_total";
pub const CACHE_INVALIDATED: &str = "cachecoord_cache_tag_invalidated_entries_total";
pub const RATE_LIMIT: &str = "cachecoord_rate_limit_decisions_total";
pub const LOCK_ACQUIRES: &str = "cachecoord_lock_acquires_total";
pub const LOCK_WAIT: &str = "cachecoord_lock_wait_seconds";
pub const LOCK_HOLD: &str = "cachecoord_lock_hold_events_total";
pub const SESSIONS: &str = "cachecoord_session_events_total";
pub const TOKENS: &str = "cachecoord_token_events_total";
pub const STATS_INCREMENTS: &str = "cachecoord_stats_increments_total";

/// Every metric the service exports.
pub const DEFS: &[Def] = &[
    def(GRPC_STARTED, C, &["grpc_type", "grpc_service", "grpc_method"], "RPCs started."),
    def(
        GRPC_HANDLED,
        C,
        &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
        "RPCs completed, by status code (streams count when they end).",
    ),
    def(
        GRPC_SECONDS,
        H,
        &["grpc_type", "grpc_service", "grpc_method"],
        "Time from request to status (for streams, the whole stream), in seconds.",
    ),
    def(
        REDIS_SECONDS,
        H,
        &["kind"],
        "Redis round trip of one script (kind=script) or command (kind=command), in seconds.",
    ),
    def(
        REDIS_ERRORS,
        C,
        &["kind"],
        "Failed Redis calls: connection, timeout, refusing (OOM/BUSY/LOADING...), connect, other.",
    ),
    def(REDIS_OPEN, G, &[], "Redis connections open (shared multiplexed or cluster connections)."),
    def(REDIS_RECONNECTS, C, &[], "Dead Redis connections replaced by a new one."),
    def(REDIS_IN_FLIGHT, G, &[], "Redis commands sent and not yet answered (bounded by --redis-max-in-flight)."),
    def(HEALTH, G, &["service"], "1 while the service reports SERVING (Redis answers the probe), else 0."),
    def(CACHE_LOOKUPS, C, &["rpc", "result"], "Cache keys looked up by Get/GetMany: result=hit|miss."),
    def(
        CACHE_FETCHES,
        C,
        &["outcome"],
        "Fetch answers: hit, fill, waited_hit, waited_fill (after waiting for another filler), timeout.",
    ),
    def(CACHE_FETCH_WAIT, H, &[], "Time a Fetch waited for another caller's fill, in seconds."),
    def(CACHE_FILLS, C, &["result"], "Fill and AbandonFill calls: stored, lost (lease voided), abandoned."),
    def(CACHE_INVALIDATED, C, &[], "Cache entries removed by InvalidateTags."),
    def(
        RATE_LIMIT,
        C,
        &["api", "algorithm", "decision"],
        "Rate-limit decisions per limit: allowed, denied, unchecked (Redis down, fail-open).",
    ),
    def(
        LOCK_ACQUIRES,
        C,
        &["result"],
        "Lock acquisitions: immediate, after_wait, timed_out, busy (held; the caller did not wait).",
    ),
    def(LOCK_WAIT, H, &["result"], "Time an Acquire waited for a held lock (after_wait, timed_out), in seconds."),
    def(LOCK_HOLD, C, &["event"], "Hold streams: renewed (lease extended), lost (lease gone or Redis down too long)."),
    def(SESSIONS, C, &["event"], "Sessions created, and evicted because the user had --session-max-per-user."),
    def(TOKENS, C, &["event"], "Tokens revoked, and revoked tokens seen by CheckTokens (revoked_hit)."),
    def(STATS_INCREMENTS, C, &[], "Counters incremented by Stats Increment."),
];

/// Buckets for calls that mostly take well under a millisecond.
const FAST_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Buckets for waits (Fetch, locks): milliseconds to a minute.
const WAIT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// gRPC status code names as grpc-go and Prometheus dashboards spell them.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The service's metrics, or nothing when `--metrics-listen` is unset.
/// Cheap to clone; every clone records into the same series.
#[derive(Clone, Default)]
pub struct Metrics(Option<Arc<Inner>>);

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Index into `methods` by request path.
    paths: HashMap<String, usize>,
    /// Per RPC; index 0 is every path not in the descriptors.
    methods: Vec<MethodMetrics>,
    redis: RedisMetrics,
    domain: Domain,
}

/// The series of one RPC.
struct MethodMetrics {
    labels: [Label; 3],
    started: Counter,
    seconds: Histogram,
    /// `grpc_server_handled_total` by code, registered at the first call
    /// that ends with it (so a scrape lists codes seen, not 17 zeros per RPC).
    handled: [OnceLock<Counter>; 17],
}

struct RedisMetrics {
    script_seconds: Histogram,
    command_seconds: Histogram,
    errors: [Counter; RedisError::ALL.len()],
    open: Gauge,
    reconnects: Counter,
    in_flight: Gauge,
}

struct Domain {
    /// [rpc][hit=0, miss=1]
    lookups: [[Counter; 2]; 2],
    fetches: [Counter; FetchOutcome::ALL.len()],
    fetch_wait: Histogram,
    fills: [Counter; FillResult::ALL.len()],
    invalidated: Counter,
    /// [api][algorithm][decision]
    rate_limit: [[[Counter; 3]; 3]; 2],
    lock_acquires: [Counter; 4],
    lock_wait: [Histogram; 2],
    lock_hold: [Counter; 2],
    sessions: [Counter; 2],
    tokens: [Counter; 2],
    stats_increments: Counter,
}

/// Which lookup RPC.
#[derive(Clone, Copy, Debug)]
pub enum LookupRpc {
    Get = 0,
    GetMany = 1,
}

/// How a Fetch ended.
#[derive(Clone, Copy, Debug)]
pub enum FetchOutcome {
    Hit,
    Fill,
    WaitedHit,
    WaitedFill,
    Timeout,
}

impl FetchOutcome {
    const ALL: [&'static str; 5] = ["hit", "fill", "waited_hit", "waited_fill", "timeout"];
}

/// What a Fill or AbandonFill did.
#[derive(Clone, Copy, Debug)]
pub enum FillResult {
    Stored,
    Lost,
    Abandoned,
}

impl FillResult {
    const ALL: [&'static str; 3] = ["stored", "lost", "abandoned"];
}

/// Which API decided a rate limit.
#[derive(Clone, Copy, Debug)]
pub enum LimitApi {
    /// cachecoord.v1.RateLimitService/Check
    Check = 0,
    /// envoy.service.ratelimit.v3 ShouldRateLimit
    Envoy = 1,
}

/// A rate-limit algorithm, as a label.
#[derive(Clone, Copy, Debug)]
pub enum Algorithm {
    FixedWindow = 0,
    SlidingWindow = 1,
    TokenBucket = 2,
}

/// A rate-limit decision.
#[derive(Clone, Copy, Debug)]
pub enum Decision {
    Allowed = 0,
    Denied = 1,
    /// Redis was unreachable and `--rate-limit-fail-open` let it through.
    Unchecked = 2,
}

/// How a lock acquisition ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    Immediate = 0,
    AfterWait = 1,
    TimedOut = 2,
    /// Held, and the caller did not wait.
    Busy = 3,
}

/// A Hold stream event.
#[derive(Clone, Copy, Debug)]
pub enum HoldEvent {
    Renewed = 0,
    Lost = 1,
}

/// A session event.
#[derive(Clone, Copy, Debug)]
pub enum SessionEvent {
    Created = 0,
    Evicted = 1,
}

/// A token event.
#[derive(Clone, Copy, Debug)]
pub enum TokenEvent {
    Revoked = 0,
    RevokedHit = 1,
}

/// How a Redis call failed, as a label.
#[derive(Clone, Copy, Debug)]
pub enum RedisError {
    /// Socket closed, reset, refused.
    Connection = 0,
    /// No reply within --redis-timeout.
    Timeout = 1,
    /// Redis up but refusing work: OOM, BUSY, LOADING, MISCONF, NOREPLICAS, TRYAGAIN...
    Refusing = 2,
    /// Opening a connection failed.
    Connect = 3,
    /// Anything else (a script error, an unexpected reply).
    Other = 4,
}

impl RedisError {
    const ALL: [&'static str; 5] = ["connection", "timeout", "refusing", "connect", "other"];

    /// The label value (also the trace layer's error description).
    pub fn name(self) -> &'static str {
        Self::ALL[self as usize]
    }

    /// Classifies a redis-rs error.
    pub fn of(err: &redis::RedisError) -> Self {
        if err.is_timeout() {
            Self::Timeout
        } else if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() {
            Self::Connection
        } else if err.code().is_some_and(|code| {
            matches!(
                code,
                "OOM" | "BUSY" | "MISCONF" | "NOREPLICAS" | "LOADING" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN"
            )
        }) {
            Self::Refusing
        } else {
            Self::Other
        }
    }
}

impl Metrics {
    /// No metrics: every recording call does nothing.
    pub fn off() -> Self {
        Self(None)
    }

    /// A fresh set of series, with the RPCs of `descriptor_sets` (encoded
    /// `FileDescriptorSet`s) pre-registered.
    pub fn new(descriptor_sets: &[&[u8]]) -> Result<Self, String> {
        let mut builder = PrometheusBuilder::new();
        for (name, buckets) in [
            (GRPC_SECONDS, FAST_BUCKETS),
            (REDIS_SECONDS, FAST_BUCKETS),
            (CACHE_FETCH_WAIT, WAIT_BUCKETS),
            (LOCK_WAIT, WAIT_BUCKETS),
        ] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
                .map_err(|e| format!("metrics: {e}"))?;
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        for d in DEFS {
            let unit = d.name.ends_with("_seconds").then_some(Unit::Seconds);
            match d.kind {
                Kind::Counter => recorder.describe_counter(d.name.into(), unit, d.help.into()),
                Kind::Gauge => recorder.describe_gauge(d.name.into(), unit, d.help.into()),
                Kind::Histogram => recorder.describe_histogram(d.name.into(), unit, d.help.into()),
            }
        }

        let mut paths = HashMap::new();
        let mut methods = vec![MethodMetrics::new(&recorder, "unary", "unknown", "unknown")];
        for set in descriptor_sets {
            let set = prost_types::FileDescriptorSet::decode(*set).map_err(|e| format!("descriptor set: {e}"))?;
            for file in &set.file {
                for service in &file.service {
                    let full = match file.package() {
                        "" => service.name().to_string(),
                        package => format!("{package}.{}", service.name()),
                    };
                    for method in &service.method {
                        let path = format!("/{full}/{}", method.name());
                        if paths.contains_key(&path) {
                            continue;
                        }
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => "unary",
                            (false, true) => "server_stream",
                            (true, false) => "client_stream",
                            (true, true) => "bidi_stream",
                        };
                        paths.insert(path, methods.len());
                        methods.push(MethodMetrics::new(&recorder, kind, &full, method.name()));
                    }
                }
            }
        }

        let counter = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            recorder.register_counter(&key(name, labels), &META)
        };
        let histogram = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            recorder.register_histogram(&key(name, labels), &META)
        };
        let redis = RedisMetrics {
            script_seconds: histogram(REDIS_SECONDS, &[("kind", "script")]),
            command_seconds: histogram(REDIS_SECONDS, &[("kind", "command")]),
            errors: RedisError::ALL.map(|kind| counter(REDIS_ERRORS, &[("kind", kind)])),
            open: recorder.register_gauge(&key(REDIS_OPEN, &[]), &META),
            reconnects: counter(REDIS_RECONNECTS, &[]),
            in_flight: recorder.register_gauge(&key(REDIS_IN_FLIGHT, &[]), &META),
        };
        let apis = ["check", "envoy"];
        let algorithms = ["fixed_window", "sliding_window", "token_bucket"];
        let decisions = ["allowed", "denied", "unchecked"];
        let domain = Domain {
            lookups: ["Get", "GetMany"]
                .map(|rpc| ["hit", "miss"].map(|result| counter(CACHE_LOOKUPS, &[("rpc", rpc), ("result", result)]))),
            fetches: FetchOutcome::ALL.map(|outcome| counter(CACHE_FETCHES, &[("outcome", outcome)])),
            fetch_wait: histogram(CACHE_FETCH_WAIT, &[]),
            fills: FillResult::ALL.map(|result| counter(CACHE_FILLS, &[("result", result)])),
            invalidated: counter(CACHE_INVALIDATED, &[]),
            rate_limit: apis.map(|api| {
                algorithms.map(|algorithm| {
                    decisions.map(|decision| {
                        counter(RATE_LIMIT, &[("api", api), ("algorithm", algorithm), ("decision", decision)])
                    })
                })
            }),
            lock_acquires: ["immediate", "after_wait", "timed_out", "busy"]
                .map(|result| counter(LOCK_ACQUIRES, &[("result", result)])),
            lock_wait: ["after_wait", "timed_out"].map(|result| histogram(LOCK_WAIT, &[("result", result)])),
            lock_hold: ["renewed", "lost"].map(|event| counter(LOCK_HOLD, &[("event", event)])),
            sessions: ["created", "evicted"].map(|event| counter(SESSIONS, &[("event", event)])),
            tokens: ["revoked", "revoked_hit"].map(|event| counter(TOKENS, &[("event", event)])),
            stats_increments: counter(STATS_INCREMENTS, &[]),
        };
        Ok(Self(Some(Arc::new(Inner { recorder, handle, paths, methods, redis, domain }))))
    }

    /// True when recording.
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        match &self.0 {
            Some(inner) => {
                inner.handle.run_upkeep();
                inner.handle.render()
            }
            None => String::new(),
        }
    }

    /// Folds recorded histogram samples into their buckets (the exporter
    /// keeps them in a queue until then); called periodically so an
    /// unscraped server does not accumulate samples.
    pub fn upkeep(&self) {
        if let Some(inner) = &self.0 {
            inner.handle.run_upkeep();
        }
    }

    /// The layer that counts every gRPC call.
    pub fn layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer { metrics: self.clone() }
    }

    // --- Redis (store/connection.rs) ---

    /// When a Redis call starts, if recording.
    pub fn redis_start(&self) -> Option<Instant> {
        self.0.as_ref().map(|inner| {
            inner.redis.in_flight.increment(1.0);
            Instant::now()
        })
    }

    /// A Redis call that started at `start` got its reply (or failed).
    pub fn redis_done(&self, start: Option<Instant>, script: bool) {
        if let (Some(inner), Some(start)) = (&self.0, start) {
            let seconds = start.elapsed().as_secs_f64();
            if script { &inner.redis.script_seconds } else { &inner.redis.command_seconds }.record(seconds);
        }
    }

    /// A command's place in flight was given back.
    pub fn redis_landed(&self) {
        if let Some(inner) = &self.0 {
            inner.redis.in_flight.decrement(1.0);
        }
    }

    /// A Redis call failed.
    pub fn redis_error(&self, kind: RedisError) {
        if let Some(inner) = &self.0 {
            inner.redis.errors[kind as usize].increment(1);
        }
    }

    /// A connection opened (`+1`) or closed (`-1`).
    pub fn redis_connections(&self, delta: f64) {
        if let Some(inner) = &self.0 {
            inner.redis.open.increment(delta);
        }
    }

    /// A dead connection was replaced.
    pub fn redis_reconnect(&self) {
        if let Some(inner) = &self.0 {
            inner.redis.reconnects.increment(1);
        }
    }

    /// The health status of `service` ("" for overall).
    pub fn health(&self, service: &'static str, serving: bool) {
        if let Some(inner) = &self.0 {
            let gauge = inner.recorder.register_gauge(&key(HEALTH, &[("service", service)]), &META);
            gauge.set(if serving { 1.0 } else { 0.0 });
        }
    }

    // --- domain ---

    /// Keys a Get or GetMany found and missed.
    pub fn cache_lookups(&self, rpc: LookupRpc, hits: u64, misses: u64) {
        if let Some(inner) = &self.0 {
            let [hit, miss] = &inner.domain.lookups[rpc as usize];
            hit.increment(hits);
            miss.increment(misses);
        }
    }

    /// How a Fetch ended, and how long it waited for another filler.
    pub fn cache_fetch(&self, outcome: FetchOutcome, waited: Option<Duration>) {
        if let Some(inner) = &self.0 {
            inner.domain.fetches[outcome as usize].increment(1);
            if let Some(waited) = waited {
                inner.domain.fetch_wait.record(waited.as_secs_f64());
            }
        }
    }

    /// What a Fill or AbandonFill did.
    pub fn cache_fill(&self, result: FillResult) {
        if let Some(inner) = &self.0 {
            inner.domain.fills[result as usize].increment(1);
        }
    }

    /// Entries removed by InvalidateTags.
    pub fn cache_invalidated(&self, entries: u64) {
        if let Some(inner) = &self.0 {
            inner.domain.invalidated.increment(entries);
        }
    }

    /// One rate-limit decision.
    pub fn rate_limit(&self, api: LimitApi, algorithm: Algorithm, decision: Decision) {
        if let Some(inner) = &self.0 {
            inner.domain.rate_limit[api as usize][algorithm as usize][decision as usize].increment(1);
        }
    }

    /// How an Acquire (or a Hold's acquire) ended, after waiting `waited`.
    pub fn lock_acquire(&self, result: Acquired, waited: Duration) {
        if let Some(inner) = &self.0 {
            inner.domain.lock_acquires[result as usize].increment(1);
            if matches!(result, Acquired::AfterWait | Acquired::TimedOut) {
                inner.domain.lock_wait[result as usize - 1].record(waited.as_secs_f64());
            }
        }
    }

    /// A Hold stream renewed or lost its lease.
    pub fn lock_hold(&self, event: HoldEvent) {
        if let Some(inner) = &self.0 {
            inner.domain.lock_hold[event as usize].increment(1);
        }
    }

    /// Sessions created or evicted.
    pub fn sessions(&self, event: SessionEvent, count: u64) {
        if let Some(inner) = &self.0 {
            inner.domain.sessions[event as usize].increment(count);
        }
    }

    /// Tokens revoked, or revoked tokens seen.
    pub fn tokens(&self, event: TokenEvent, count: u64) {
        if let Some(inner) = &self.0 {
            inner.domain.tokens[event as usize].increment(count);
        }
    }

    /// Counters incremented by one Stats Increment.
    pub fn stats_increments(&self, count: u64) {
        if let Some(inner) = &self.0 {
            inner.domain.stats_increments.increment(count);
        }
    }
}

static META: Metadata<'static> = Metadata::new("cachecoord", Level::INFO, None);

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|&(k, v)| Label::new(k, v)).collect();
    Key::from_parts(name, labels)
}

impl MethodMetrics {
    fn new(recorder: &PrometheusRecorder, kind: &str, service: &str, method: &str) -> Self {
        let labels = [
            Label::new("grpc_type", kind.to_string()),
            Label::new("grpc_service", service.to_string()),
            Label::new("grpc_method", method.to_string()),
        ];
        Self {
            started: recorder.register_counter(&Key::from_parts(GRPC_STARTED, labels.to_vec()), &META),
            seconds: recorder.register_histogram(&Key::from_parts(GRPC_SECONDS, labels.to_vec()), &META),
            handled: Default::default(),
            labels,
        }
    }
}

impl Inner {
    fn handled(&self, method: usize, code: tonic::Code) {
        let Some(m) = self.methods.get(method) else { return };
        let code = (code as usize).min(CODE_NAMES.len() - 1);
        m.handled[code]
            .get_or_init(|| {
                let mut labels = m.labels.to_vec();
                labels.push(Label::new("grpc_code", CODE_NAMES[code]));
                self.recorder.register_counter(&Key::from_parts(GRPC_HANDLED, labels), &META)
            })
            .increment(1);
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    use http_body_util::Full;
    use hyper::{Response, StatusCode, body::Bytes};

    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = upkeep.tick() => {
                metrics.upkeep();
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let response = if request.uri().path() == "/metrics" && request.method() == hyper::Method::GET {
                    let mut response = Response::new(Full::new(Bytes::from(metrics.render())));
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                } else {
                    let mut response = Response::new(Full::new(Bytes::from_static(b"not found; try /metrics\n")));
                    *response.status_mut() = StatusCode::NOT_FOUND;
                    response
                };
                std::future::ready(Ok::<_, std::convert::Infallible>(response))
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

// --- the gRPC layer ---

/// Counts every gRPC call: started, handled by code, handling time.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Metrics,
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner, metrics: self.metrics.clone() }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Metrics,
}

/// One call being counted: ends (records its code and time) exactly once.
pub struct Call {
    inner: Arc<Inner>,
    method: usize,
    start: Instant,
}

/// What a layer does once a call's gRPC status is known: [`StatusFuture`]
/// and [`StatusBody`] call [`CallEnd::end`] exactly once per call, so the
/// metrics layer and the trace layer (`otel.rs`) read the status one way.
pub trait CallEnd {
    fn end(self, code: tonic::Code);
}

impl CallEnd for Call {
    fn end(self, code: tonic::Code) {
        let m = &self.inner.methods[self.method];
        m.seconds.record(self.start.elapsed().as_secs_f64());
        self.inner.handled(self.method, code);
    }
}

/// The `grpc-status` of a header map, if it has one.
pub fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?;
    let code = value.to_str().ok().and_then(|v| v.parse::<i32>().ok()).unwrap_or(2);
    Some(tonic::Code::from_i32(code))
}

impl<S, B, RB> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<StatusBody<RB, Call>>;
    type Error = S::Error;
    type Future = StatusFuture<S::Future, Call>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = self.metrics.0.as_ref().map(|inner| {
            let method = inner.paths.get(request.uri().path()).copied().unwrap_or(0);
            inner.methods[method].started.increment(1);
            Call { inner: Arc::clone(inner), method, start: Instant::now() }
        });
        StatusFuture::new(self.inner.call(request), call)
    }
}

pin_project_lite::pin_project! {
    /// A response future that ends `call` with the status of a
    /// trailers-only response, or hands it to the body ([`StatusBody`]).
    pub struct StatusFuture<F, C> {
        #[pin]
        inner: F,
        call: Option<C>,
    }
}

impl<F, C> StatusFuture<F, C> {
    /// Watches `inner`'s response for the status of `call` (`None`: nothing to end).
    pub fn new(inner: F, call: Option<C>) -> Self {
        Self { inner, call }
    }
}

impl<F, RB, E, C: CallEnd> Future for StatusFuture<F, C>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<StatusBody<RB, C>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response (every error, and tonic's early
                // answers) has its status in the headers; otherwise the
                // status comes in the trailers at the end of the body.
                let call = match (call, status_of(response.headers())) {
                    (Some(call), Some(code)) => {
                        call.end(code);
                        None
                    }
                    (call, _) => call,
                };
                Ok(response.map(|body| StatusBody { inner: body, call }))
            }
            Err(err) => {
                if let Some(call) = call {
                    call.end(tonic::Code::Unknown);
                }
                Err(err)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call's status when the trailers
    /// pass, or `Canceled` if it is dropped before (the client went away).
    pub struct StatusBody<B, C: CallEnd> {
        #[pin]
        inner: B,
        call: Option<C>,
    }

    impl<B, C: CallEnd> PinnedDrop for StatusBody<B, C> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.end(tonic::Code::Cancelled);
            }
        }
    }
}

impl<B: Body, C: CallEnd> Body for StatusBody<B, C> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if this.call.is_some() {
            let code = match &frame {
                Some(Ok(frame)) => frame.trailers_ref().map(|trailers| status_of(trailers).unwrap_or(tonic::Code::Ok)),
                Some(Err(_)) => Some(tonic::Code::Unknown),
                // The body ended without trailers: no status was sent.
                None => Some(tonic::Code::Unknown),
            };
            if let Some(code) = code
                && let Some(call) = this.call.take()
            {
                call.end(code);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The metrics `config` asks for: with `--metrics-listen`, a fresh set
/// served at `/metrics` on that address (bound now, so a bad address fails
/// the start) until the returned [`Endpoint`] is dropped; without,
/// [`Metrics::off`].
pub async fn start(config: &crate::config::Config) -> Result<(Metrics, Endpoint), String> {
    let Some(addr) = config.metrics_listen else { return Ok((Metrics::off(), Endpoint(None))) };
    let metrics = Metrics::new(&[
        crate::proto::FILE_DESCRIPTOR_SET,
        crate::proto::ENVOY_RLS_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ])?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
    tracing::info!(%addr, "metrics at /metrics");
    let serving = tokio::spawn(serve(listener, metrics.clone()));
    Ok((metrics, Endpoint(Some(serving.abort_handle()))))
}

/// The `/metrics` listener; dropping it closes the listener.
pub struct Endpoint(Option<tokio::task::AbortHandle>);

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(serving) = self.0.take() {
            serving.abort();
        }
    }
}
