//! OpenTelemetry traces, exported by OTLP/gRPC when a collector is
//! configured (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
//!
//! - [`OtelLayer`]: one server span per RPC, named `package.Service/Method`,
//!   continuing the caller's W3C `traceparent`/`tracestate`, with the RPC
//!   semantic-convention attributes and the gRPC status (read as the metrics
//!   layer reads it, see [`crate::metrics::CallEnd`]).
//! - [`Tracing::traced`] and [`Tracing::redis_op`]: a client span per Redis
//!   call made under an RPC's span (`store/connection.rs`), named by the
//!   command, or `EVALSHA <script>` / `FCALL <script>`. Never keys, values,
//!   tags or arguments: keys are tenants' data.
//!
//! Like [`crate::metrics::Metrics`], the tracer is the server's own, never
//! the process-global one, so several servers in one process (tests) keep
//! their spans apart. With no endpoint, [`Tracing`] is empty: the layer and
//! every Redis call pay one branch, no propagation, no context switching.

use std::{
    borrow::Cow,
    collections::HashMap,
    pin::Pin,
    sync::{Arc, OnceLock, RwLock},
    task::{Context as TaskContext, Poll},
};

use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, TextMapPropagator},
    trace::{Span as _, SpanKind, Status, TraceContextExt, TraceId, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{SdkTracer, SdkTracerProvider},
};
use redis::{Cmd, RedisFuture, RedisResult, Value, aio::ConnectionLike};
use tower::{Layer, Service};

use crate::metrics::{self, CallEnd, StatusBody, StatusFuture};

/// The service's tracer, or nothing when no collector is configured.
/// Cheap to clone.
#[derive(Clone, Default)]
pub struct Tracing(Option<Arc<Inner>>);

struct Inner {
    /// Owns the batch processor; shut down (flushed) when the server stops.
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

/// The trace id of an RPC's span, in its request's extensions (for the
/// per-RPC log line).
#[derive(Clone, Copy, Debug)]
pub struct RpcTraceId(pub TraceId);

impl Tracing {
    /// No tracing: every call does nothing.
    pub fn off() -> Self {
        Self(None)
    }

    /// Whether spans are being made.
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Tracing as `config` and the standard `OTEL_*` variables ask for:
    /// off without an endpoint. Must run inside the Tokio runtime (the
    /// exporter's channel lives there); a bad endpoint fails the start.
    pub fn start(config: &crate::config::Config) -> Result<Self, String> {
        let endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .ok()
            .or_else(|| config.otlp_endpoint.clone())
            .filter(|endpoint| !endpoint.trim().is_empty());
        let Some(endpoint) = endpoint else {
            tracing::info!("tracing off (no OTEL_EXPORTER_OTLP_ENDPOINT)");
            return Ok(Self::off());
        };
        // Headers (OTEL_EXPORTER_OTLP_HEADERS), timeout and compression come
        // from the standard variables, read by the exporter itself.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| {
                // Its text would repeat the whole endpoint, user info included.
                let reason = match e {
                    opentelemetry_otlp::ExporterBuildError::InvalidUri(_, reason) => format!("invalid URI: {reason}"),
                    other => other.to_string(),
                };
                format!("--otlp-endpoint {}: {reason}", redacted(&endpoint))
            })?;
        // service.name from OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES,
        // else ours rather than the SDK's "unknown_service".
        let mut resource = Resource::builder().build();
        let service = resource.get(&opentelemetry::Key::new("service.name"));
        if service.is_none_or(|name| name.as_str().starts_with("unknown_service")) {
            resource = Resource::builder().with_service_name("cachecoord").build();
        }
        let service = resource.get(&opentelemetry::Key::new("service.name")).map(|v| v.to_string());
        // The SDK reads OTEL_TRACES_SAMPLER(_ARG) (default: parent-based,
        // always on) and OTEL_BSP_* for the batch processor.
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        let tracer = provider.tracer("cachecoord");
        // Never the headers: they may carry a collector's token.
        tracing::info!(endpoint = %redacted(&endpoint), service = service.as_deref().unwrap_or(""), "tracing on: OTLP/gRPC");
        Ok(Self(Some(Arc::new(Inner { provider, tracer, propagator: TraceContextPropagator::new() }))))
    }

    /// The layer that makes one server span per RPC.
    pub fn layer(&self) -> OtelLayer {
        OtelLayer { tracing: self.clone() }
    }

    /// Exports the spans still queued and stops the exporter.
    pub async fn shutdown(&self) {
        let Some(inner) = &self.0 else { return };
        let provider = inner.provider.clone();
        // shutdown() blocks until the batch thread has exported, which needs
        // the runtime free to drive the exporter's connection.
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "tracing: flushing spans at shutdown failed"),
            Err(err) => tracing::warn!(%err, "tracing: flushing spans at shutdown failed"),
        }
    }

    // --- Redis (store/connection.rs) ---

    /// The current RPC's context, if tracing is on and a recorded span is
    /// current: Redis calls outside an RPC (health probes, background
    /// listeners) make no spans of their own.
    fn redis_parent(&self) -> Option<(&Inner, Context)> {
        let inner = self.0.as_deref()?;
        let cx = Context::current();
        cx.span().is_recording().then_some((inner, cx))
    }

    /// `wire` with a span per command sent on it, when there is an RPC span
    /// to hang them under; `None` (send on `wire` itself) otherwise.
    pub fn traced<'w, C: ConnectionLike>(&'w self, wire: &'w mut C) -> Option<Traced<'w, C>> {
        let (inner, parent) = self.redis_parent()?;
        Some(Traced { wire, tracer: &inner.tracer, parent })
    }

    /// Runs `op`, a Redis operation named `name` (a fixed word, never an
    /// argument), in a span of its own when under an RPC's span.
    pub async fn redis_op<T>(&self, name: &'static str, op: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
        let Some((inner, parent)) = self.redis_parent() else { return op.await };
        let mut span = redis_span(&inner.tracer, &parent, Cow::Borrowed(name), None);
        let result = op.await;
        end_redis_span(&mut span, &result);
        result
    }
}

/// The endpoint for the log: scheme, host and port, without any user info.
fn redacted(endpoint: &str) -> String {
    match endpoint.parse::<http::Uri>() {
        Ok(uri) => {
            let scheme = uri.scheme_str().unwrap_or("http");
            let host = uri.host().unwrap_or("?");
            match uri.port_u16() {
                Some(port) => format!("{scheme}://{host}:{port}"),
                None => format!("{scheme}://{host}"),
            }
        }
        Err(_) => "(unparsable)".into(),
    }
}

// --- Redis spans ---

/// Script names by SHA1 (and Redis Functions' file names by function name),
/// registered as the stores make them (`store::script`, `Function::new`), so
/// a span says `EVALSHA get` rather than a hash.
fn scripts() -> &'static RwLock<HashMap<String, &'static str>> {
    static SCRIPTS: OnceLock<RwLock<HashMap<String, &'static str>>> = OnceLock::new();
    SCRIPTS.get_or_init(Default::default)
}

/// Remembers the name of the script whose SHA1 (or function name) is `hash`.
pub fn register_script(hash: &str, name: &'static str) {
    if let Ok(mut scripts) = scripts().write() {
        scripts.insert(hash.to_string(), name);
    }
}

/// A connection that makes a child span of `parent` for every command.
pub struct Traced<'w, C> {
    wire: &'w mut C,
    tracer: &'w SdkTracer,
    parent: Context,
}

impl<C: ConnectionLike> ConnectionLike for Traced<'_, C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let (name, script) = operation(cmd);
        let mut span = redis_span(self.tracer, &self.parent, name, script);
        let reply = self.wire.req_packed_command(cmd);
        Box::pin(async move {
            let result = reply.await;
            end_redis_span(&mut span, &result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let mut span = redis_span(self.tracer, &self.parent, Cow::Borrowed("pipeline"), None);
        let replies = self.wire.req_packed_commands(pipeline, offset, count);
        Box::pin(async move {
            let result = replies.await;
            end_redis_span(&mut span, &result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.wire.get_db()
    }
}

/// The command's name (`EVALSHA`, `PING`, `SCRIPT LOAD`...) and, for
/// EVALSHA, the script's. Only the command word (and the subcommand of a
/// container command) is read: the arguments are keys and values.
fn operation(cmd: &Cmd) -> (Cow<'static, str>, Option<&'static str>) {
    let mut args = cmd.args_iter().map(|arg| match arg {
        redis::Arg::Simple(bytes) => bytes,
        _ => b"",
    });
    let word = |bytes: &[u8]| {
        (!bytes.is_empty() && bytes.len() <= 32 && bytes.iter().all(u8::is_ascii_alphanumeric))
            .then(|| String::from_utf8_lossy(bytes).to_ascii_uppercase())
    };
    let Some(name) = args.next().and_then(word) else { return (Cow::Borrowed("unknown"), None) };
    match name.as_str() {
        "EVALSHA" | "FCALL" => {
            let script = args
                .next()
                .and_then(|hash| std::str::from_utf8(hash).ok())
                .and_then(|hash| scripts().read().ok()?.get(hash).copied());
            let operation = if name == "FCALL" { "FCALL" } else { "EVALSHA" };
            (Cow::Borrowed(operation), Some(script.unwrap_or("unknown")))
        }
        "SCRIPT" | "FUNCTION" | "CLIENT" | "CONFIG" => match args.next().and_then(word) {
            Some(sub) => (Cow::Owned(format!("{name} {sub}")), None),
            None => (Cow::Owned(name), None),
        },
        _ => (Cow::Owned(name), None),
    }
}

fn redis_span(
    tracer: &SdkTracer,
    parent: &Context,
    operation: Cow<'static, str>,
    script: Option<&'static str>,
) -> opentelemetry_sdk::trace::Span {
    let name = match script {
        Some(script) => Cow::Owned(format!("{operation} {script}")),
        None => operation.clone(),
    };
    let mut attributes = vec![KeyValue::new("db.system", "redis"), KeyValue::new("db.operation", operation)];
    if let Some(script) = script {
        attributes.push(KeyValue::new("cachecoord.script", script));
    }
    tracer.span_builder(name).with_kind(SpanKind::Client).with_attributes(attributes).start_with_context(tracer, parent)
}

fn end_redis_span<T>(span: &mut opentelemetry_sdk::trace::Span, result: &RedisResult<T>) {
    if let Err(err) = result {
        // The error's class only: Redis error messages can quote arguments.
        span.set_status(Status::error(metrics::RedisError::of(err).name()));
    }
    span.end();
}

// --- the gRPC layer ---

/// Makes one server span per RPC (see the module doc).
#[derive(Clone)]
pub struct OtelLayer {
    tracing: Tracing,
}

impl<S> Layer<S> for OtelLayer {
    type Service = Otel<S>;

    fn layer(&self, inner: S) -> Otel<S> {
        Otel { inner, tracing: self.tracing.clone() }
    }
}

/// See [`OtelLayer`].
#[derive(Clone)]
pub struct Otel<S> {
    inner: S,
    tracing: Tracing,
}

/// An RPC's span, ended with its gRPC status.
pub struct RpcSpan(Context);

impl CallEnd for RpcSpan {
    fn end(self, code: tonic::Code) {
        let span = self.0.span();
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        // The semantic conventions' server-side rule: only codes that mean
        // the server failed are errors; NOT_FOUND or INVALID_ARGUMENT are
        // answers. The description is the code, never the message.
        if matches!(
            code,
            tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::Unavailable
                | tonic::Code::DataLoss
        ) {
            span.set_status(Status::error(format!("{code:?}")));
        }
        span.end();
    }
}

/// Reads `traceparent`/`tracestate` from gRPC metadata (HTTP/2 headers).
struct Headers<'a> {
    headers: &'a http::HeaderMap,
    /// The `traceparent` with its flags cut to the sampled bit, when others
    /// were set (see [`Headers::new`]).
    traceparent: Option<String>,
}

impl<'a> Headers<'a> {
    /// W3C Trace Context says a receiver ignores flags it does not know, but
    /// opentelemetry_sdk 0.31 rejects a version-00 `traceparent` with flags
    /// above 02, and the Python SDK sends 03 (sampled + random trace id):
    /// the caller's trace would be lost. Fixed upstream in a release that
    /// needs a newer Rust (opentelemetry-rust#3435); until then, keep only
    /// the sampled bit here.
    fn new(headers: &'a http::HeaderMap) -> Self {
        let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(|value| {
            let (head, flags) = value.trim().rsplit_once('-')?;
            let flags = u8::from_str_radix(flags, 16).ok()?;
            (head.starts_with("00-") && flags > 1).then(|| format!("{head}-{:02x}", flags & 1))
        });
        Self { headers, traceparent }
    }
}

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match &self.traceparent {
            Some(traceparent) if key == "traceparent" => Some(traceparent),
            _ => self.headers.get(key).and_then(|value| value.to_str().ok()),
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.headers.keys().map(http::HeaderName::as_str).collect()
    }
}

impl<S, B, RB> Service<http::Request<B>> for Otel<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<StatusBody<RB, RpcSpan>>;
    type Error = S::Error;
    type Future = StatusFuture<InContext<S::Future>, RpcSpan>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // Health checks (a probe every few seconds) and reflection would be
        // a trace each, of no interest: untraced.
        let untraced = |path: &str| path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.");
        let inner = match &self.tracing.0 {
            Some(inner) if !untraced(request.uri().path()) => inner,
            _ => return StatusFuture::new(InContext { inner: self.inner.call(request), cx: None }, None),
        };
        let parent = inner.propagator.extract(&Headers::new(request.headers()));
        let path = request.uri().path();
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
        let attributes = [
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_string()),
            KeyValue::new("rpc.method", method.to_string()),
        ];
        let span = inner
            .tracer
            .span_builder(path.trim_start_matches('/').to_string())
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&inner.tracer, &parent);
        let cx = parent.with_span(span);
        request.extensions_mut().insert(RpcTraceId(cx.span().span_context().trace_id()));
        // The handler's future is made and polled with the RPC's span
        // current, so the Redis calls it makes find their parent.
        let future = {
            let _current = cx.clone().attach();
            self.inner.call(request)
        };
        StatusFuture::new(InContext { inner: future, cx: Some(cx.clone()) }, Some(RpcSpan(cx)))
    }
}

pin_project_lite::pin_project! {
    /// A future polled with `cx` (if any) as the current context.
    pub struct InContext<F> {
        #[pin]
        inner: F,
        cx: Option<Context>,
    }
}

impl<F: Future> Future for InContext<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, task: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _current = this.cx.as_ref().map(|cx| cx.clone().attach());
        this.inner.poll(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent_of(traceparent: &str) -> opentelemetry::trace::SpanContext {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", traceparent.parse().expect("ascii"));
        TraceContextPropagator::new().extract(&Headers::new(&headers)).span().span_context().clone()
    }

    #[test]
    fn traceparent_with_unknown_flags_is_continued() {
        for (flags, sampled) in [("00", false), ("01", true), ("02", false), ("03", true), ("ff", true)] {
            let parent = parent_of(&format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"));
            assert!(parent.is_valid(), "flags {flags}");
            assert_eq!(parent.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(parent.is_sampled(), sampled, "flags {flags}");
        }
        assert!(!parent_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz").is_valid());
        assert!(!parent_of("garbage").is_valid());
    }

    #[test]
    fn operations_name_the_command_never_its_arguments() {
        let mut get = redis::cmd("get");
        get.arg("tenant:secret");
        assert_eq!(operation(&get), (Cow::Borrowed("GET"), None));
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg("return 1");
        assert_eq!(operation(&load).0, "SCRIPT LOAD");
        let script = crate::store::script("probe.lua", "return 'probe'");
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha.arg(script.get_hash()).arg(1).arg("tenant:secret");
        assert_eq!(operation(&evalsha), (Cow::Borrowed("EVALSHA"), Some("probe")));
        let function = crate::store::Function::new("fprobe.lua", "redis.register_function(FUNCTION_NAME, f)");
        let mut fcall = function.prepare_call().command();
        fcall.arg("tenant:secret");
        assert_eq!(operation(&fcall), (Cow::Borrowed("FCALL"), Some("fprobe")));
        let mut load = redis::cmd("FUNCTION");
        load.arg("LOAD").arg("REPLACE").arg("#!lua name=x");
        assert_eq!(operation(&load).0, "FUNCTION LOAD");
        let mut weird = redis::cmd("tenant:key with spaces");
        weird.arg("x");
        assert_eq!(operation(&weird).0, "unknown");
    }
}
