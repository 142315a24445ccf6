//! Traces: the service exports, by OTLP/gRPC, to a tiny collector running
//! in this test; the span tree of one RPC continues the caller's trace.
//! Each test has its own collector and server, and each server its own
//! tracer provider (never the process-global one), so tests run in parallel.

mod common;

use cachecoord::proto::{GetRequest, SetRequest};
use common::{RedisServer, TestServer};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use tokio::sync::mpsc;

/// The caller's trace: id, and the id of the caller's span.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// An OTLP trace receiver on a free port; every span it receives, with its
/// resource's service.name, goes to the channel.
struct Collector(mpsc::UnboundedSender<(String, Span)>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(text)
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                let _ = self.0.send((service.clone(), span));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn start_collector() -> (String, mpsc::UnboundedReceiver<(String, Span)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (format!("http://{addr}"), rx)
}

/// Every span received so far (the server has shut down, so flushed).
fn received(rx: &mut mpsc::UnboundedReceiver<(String, Span)>) -> Vec<(String, Span)> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).map(text)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn with_traceparent<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01").parse().expect("ascii");
    request.metadata_mut().insert("traceparent", traceparent);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_span_continues_the_callers_trace_with_redis_children() {
    let (endpoint, mut spans) = start_collector().await;
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--otlp-endpoint", &endpoint]).await;
    let mut cache = server.cache();
    let key = "tenant-secret-key-1";
    cache
        .set(SetRequest { key: key.into(), value: b"private-value".to_vec(), ..Default::default() })
        .await
        .expect("set");
    let got = cache.get(with_traceparent(GetRequest { key: key.into() })).await.expect("get").into_inner();
    assert!(got.found);
    // An INVALID_ARGUMENT answer: its code recorded, the span not an error.
    let bad = cache.get(with_traceparent(GetRequest { key: String::new() })).await;
    assert_eq!(bad.expect_err("empty key").code(), tonic::Code::InvalidArgument);
    server.shutdown().await; // flushes the batch

    let spans = received(&mut spans);
    assert!(spans.iter().all(|(service, _)| service == "cachecoord"), "service.name");
    let ours: Vec<&Span> = spans.iter().map(|(_, span)| span).filter(|span| hex(&span.trace_id) == TRACE_ID).collect();
    let rpcs: Vec<&&Span> = ours.iter().filter(|span| span.kind == SpanKind::Server as i32).collect();
    assert_eq!(rpcs.len(), 2, "two RPCs carried the traceparent: {ours:#?}");

    let get = rpcs.iter().find(|span| attr(span, "rpc.grpc.status_code").as_deref() == Some("0")).expect("Get OK");
    assert_eq!(get.name, "cachecoord.v1.CacheService/Get");
    assert_eq!(hex(&get.parent_span_id), PARENT_ID, "the caller's span is the parent");
    assert_eq!(attr(get, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attr(get, "rpc.service").as_deref(), Some("cachecoord.v1.CacheService"));
    assert_eq!(attr(get, "rpc.method").as_deref(), Some("Get"));
    assert_ne!(get.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));

    let children: Vec<&&Span> = ours.iter().filter(|span| span.parent_span_id == get.span_id).collect();
    assert!(!children.is_empty(), "Redis calls under the Get span: {ours:#?}");
    for child in &children {
        assert_eq!(child.kind, SpanKind::Client as i32);
        assert_eq!(attr(child, "db.system").as_deref(), Some("redis"));
        assert!(child.start_time_unix_nano >= get.start_time_unix_nano);
        assert!(child.end_time_unix_nano <= get.end_time_unix_nano);
    }
    assert!(
        children.iter().any(|child| child.name == "EVALSHA get"
            && attr(child, "db.operation").as_deref() == Some("EVALSHA")
            && attr(child, "cachecoord.script").as_deref() == Some("get")),
        "the get script by name: {children:#?}"
    );

    let invalid = rpcs.iter().find(|span| span.span_id != get.span_id).expect("the invalid Get");
    assert_eq!(attr(invalid, "rpc.grpc.status_code").as_deref(), Some("3"));
    assert_ne!(invalid.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));
    assert!(ours.iter().all(|span| span.parent_span_id != invalid.span_id), "rejected before Redis");

    // The Set had no traceparent: a trace of its own, with Redis spans too.
    let set = spans.iter().map(|(_, span)| span).find(|span| span.name == "cachecoord.v1.CacheService/Set");
    let set = set.expect("Set span");
    assert_ne!(hex(&set.trace_id), TRACE_ID);
    assert!(set.parent_span_id.is_empty(), "a root span");

    // The health checks TestServer made while starting are not traced.
    assert!(spans.iter().all(|(_, span)| !span.name.starts_with("grpc.health.")), "health untraced");

    // Keys and values never leave the service.
    for (_, span) in &spans {
        let everything = format!("{span:?}");
        assert!(!everything.contains(key) && !everything.contains("private-value"), "{span:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_marks_the_rpc_span_an_error() {
    let (endpoint, mut spans) = start_collector().await;
    let mut redis = RedisServer::start().await;
    let server = TestServer::start_with(&redis, &["--otlp-endpoint", &endpoint, "--redis-timeout", "500ms"]).await;
    redis.stop();
    let failed = server.cache().get(with_traceparent(GetRequest { key: "k".into() })).await;
    assert_eq!(failed.expect_err("Redis is down").code(), tonic::Code::Unavailable);
    server.shutdown().await;

    let spans = received(&mut spans);
    let get = spans
        .iter()
        .map(|(_, span)| span)
        .find(|span| hex(&span.trace_id) == TRACE_ID && span.kind == SpanKind::Server as i32)
        .expect("the Get span");
    assert_eq!(attr(get, "rpc.grpc.status_code").as_deref(), Some("14"));
    let status = get.status.as_ref().expect("status");
    assert_eq!(status.code, StatusCode::Error as i32);
    assert_eq!(status.message, "Unavailable");
}

#[tokio::test]
async fn no_endpoint_no_trace_id_in_the_way() {
    // Tracing off: the RPC works and nothing is exported (nowhere to).
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let got = server.cache().get(with_traceparent(GetRequest { key: "k".into() })).await.expect("get");
    assert!(!got.into_inner().found);
    server.shutdown().await;
}
