//! Assembles the gRPC server and runs it until shutdown.

use std::{future::Future, time::Duration};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer as EnvoyRateLimitServiceServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::ServingStatus;
use tower_http::trace::TraceLayer;

use crate::{
    api::{
        Limits, cache::CacheApi, envoy::EnvoyRateLimitApi, lock::LockApi, rate_limit::RateLimitApi,
        session::SessionApi, stats::StatsApi,
    },
    auth::{self, AuthLayer},
    calendar::Calendar,
    config::Config,
    deadline::DeadlineLayer,
    health,
    keys::Keys,
    otel::{RpcTraceId, Tracing},
    proto::{
        self, cache_service_server::CacheServiceServer, lock_service_server::LockServiceServer,
        rate_limit_service_server::RateLimitServiceServer, session_service_server::SessionServiceServer,
        stats_service_server::StatsServiceServer,
    },
    rls,
    store::{
        Redis,
        cache::CacheStore,
        lock::LockStore,
        rate_limit::RateLimitStore,
        session::SessionStore,
        stats::{Retention, StatsStore},
    },
};

/// How many streams a client may open and reset before the server has taken
/// them up, per connection, before the connection is closed with
/// ENHANCE_YOUR_CALM (HTTP/2's rapid-reset guard). h2's default, 20, is met by
/// honest clients whenever an instance stalls (a pause, CPU throttling): every
/// caller's deadline passes and its reset is read in the same burst as its
/// request, and the whole connection, with the calls still in flight on it,
/// fails RESOURCE_EXHAUSTED. A bound stays, so the queue's memory stays bounded.
pub const MAX_PENDING_RESET_STREAMS: usize = 1024;

/// Serves on `listener` until `shutdown` resolves, then reports NOT_SERVING,
/// lets in-flight RPCs finish for up to `--shutdown-grace`, and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // rediss:// needs a process-wide TLS crypto provider; installing twice
    // (several servers in one test process) is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (metrics, _metrics_endpoint) = crate::metrics::start(&config).await?;
    let tracing = Tracing::start(&config)?;
    let redis = Redis::with_telemetry(&config, metrics.clone(), tracing.clone())?;
    let tls = crate::tls::TlsServer::start(&config.tls)?;
    let keys = Keys::new(&config.key_prefix);
    let limits = Limits::from_config(&config);
    let auth = match &config.auth_keys_file {
        Some(path) => AuthLayer::new(
            auth::watch_keys(path.clone(), config.auth_keys_poll, limits)?,
            config.auth_health_needs_key,
            config.auth_reflection_needs_key,
        ),
        None => {
            tracing::warn!(
                listen = %config.listen,
                "authentication is OFF (no --auth-keys-file): anyone who can reach the port can read and change everything"
            );
            AuthLayer::off()
        }
    };

    // Envoy's rate limit protocol, served only when configured (an Envoy
    // pointed at an unconfigured instance gets UNIMPLEMENTED, not OKs).
    let envoy = if config.rls_config.is_empty() {
        None
    } else {
        let rules = rls::reload::watch(config.rls_config.clone(), config.rls_config_poll)
            .map_err(|errors| format!("--rls-config: {errors}"))?;
        Some(EnvoyRateLimitApi::new(
            RateLimitStore::new(redis.clone(), keys.clone()),
            rules,
            Limits::from_config(&config),
            config.rls_response_headers,
        ))
    };
    let mut health_names = health::SERVICE_NAMES.to_vec();
    if envoy.is_some() {
        health_names.push(<EnvoyRateLimitServiceServer<()> as NamedService>::NAME);
    }

    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::set_all(&reporter, &health_names, ServingStatus::NotServing).await;
    let probe = tokio::spawn(health::probe(redis.clone(), reporter.clone(), health_names.clone()));

    let reflection = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        if envoy.is_some() {
            builder.register_encoded_file_descriptor_set(proto::ENVOY_RLS_DESCRIPTOR_SET)
        } else {
            builder
        }
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let sessions = SessionApi::new(
        SessionStore::new(
            redis.clone(),
            keys.clone(),
            config.session_max_per_user,
            config.session_max_data_bytes,
            config.max_revocation_ttl,
        ),
        limits,
        config.session_default_ttl.min(config.max_ttl),
        config.session_max_data_bytes,
    );
    // WAIT holds the connection it runs on: locks that wait for replicas get
    // connections of their own.
    let lock_redis = if config.lock_replicas > 0 {
        Redis::with_telemetry(&config, metrics.clone(), tracing.clone())?
    } else {
        redis.clone()
    };
    let lock_store = LockStore::new(lock_redis, keys.clone(), config.lock_replicas);
    let locks = LockApi::new(lock_store, limits, config.lock_default_ttl);
    let cache = CacheApi::new(
        CacheStore::new(redis.clone(), keys.clone()),
        limits,
        config.cache_default_ttl,
        config.cache_fill_timeout,
    );
    let calendar = Calendar::new(jiff::tz::TimeZone::get(&config.stats_time_zone)?);
    let retention = Retention {
        minute: config.stats_retention_minute,
        hour: config.stats_retention_hour,
        day: config.stats_retention_day,
    };
    let stats = StatsApi::new(
        StatsStore::new(redis.clone(), keys.clone(), calendar.clone(), retention, config.stats_active_window_max),
        Limits::from_config(&config),
        calendar,
        config.stats_max_buckets,
        config.stats_active_window_max,
    );
    let rate_limit = RateLimitApi::new(
        RateLimitStore::new(redis.clone(), keys.clone()),
        Limits::from_config(&config),
        config.rate_limit_fail_open,
    );
    let max = config.max_message_bytes;
    macro_rules! sized {
        ($server:expr) => {
            $server.max_decoding_message_size(max).max_encoding_message_size(max)
        };
    }

    // Shutdown order: health first (so balancers stop sending), then the
    // server stops accepting and drains.
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let stop_reporter = reporter.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: NOT_SERVING, draining in-flight RPCs");
        probe.abort();
        health::set_all(&stop_reporter, &health_names, ServingStatus::NotServing).await;
        let _ = stopping_tx.send(true);
    });
    let mut drained_rx = stopping_rx.clone();

    // Outermost: the RPC's trace span covers everything below, and its
    // trace id reaches the log span made next.
    let router = Server::builder()
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS))
        .layer(tracing.layer())
        .layer(
            TraceLayer::new_for_grpc()
                .make_span_with(rpc_log_span)
                .on_request(())
                .on_response(log_response)
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
        .layer(metrics.layer())
        .layer(DeadlineLayer)
        .layer(auth)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(sized!(CacheServiceServer::new(cache.until_stopping(stopping_rx.clone()))))
        .add_service(sized!(SessionServiceServer::new(sessions)))
        .add_service(sized!(RateLimitServiceServer::new(rate_limit)))
        .add_service(sized!(LockServiceServer::new(locks.until_stopping(stopping_rx.clone()))))
        .add_service(sized!(StatsServiceServer::new(stats)))
        .add_optional_service(envoy.map(|envoy| sized!(EnvoyRateLimitServiceServer::new(envoy))));
    let stopped = async move {
        let _ = stopping_rx.wait_for(|stopping| *stopping).await;
    };
    // With TLS, connections come handshaken from our own accept loop (so
    // certificates can be reloaded); otherwise straight from the listener.
    let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(tls.incoming(listener), stopped)),
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    };

    let grace = config.shutdown_grace;
    tokio::select! {
        result = server => result?,
        () = async move {
            let _ = drained_rx.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(?grace, "grace period over; abandoning RPCs still running"),
    }
    tracing.shutdown().await;
    Ok(())
}

/// The log span of one RPC: its method, and its trace id when tracing is on
/// (so the log line can be found from the trace, and back).
fn rpc_log_span<B>(request: &http::Request<B>) -> tracing::Span {
    let method = request.uri().path();
    match request.extensions().get::<RpcTraceId>() {
        Some(RpcTraceId(trace_id)) => {
            tracing::info_span!("rpc", method = %method, trace_id = %trace_id, key = tracing::field::Empty)
        }
        None => tracing::info_span!("rpc", method = %method, key = tracing::field::Empty),
    }
}

/// The one log line per RPC: method (from the span), gRPC code, latency.
fn log_response<B>(response: &http::Response<B>, latency: Duration, _span: &tracing::Span) {
    // Errors travel as trailers-only responses, so the code is in the headers;
    // a response without one is a success whose OK comes in the trailers.
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    if matches!(code, tonic::Code::Internal | tonic::Code::Unknown) {
        tracing::error!(code = ?code, latency_us = micros, "rpc");
    } else {
        tracing::info!(code = ?code, latency_us = micros, "rpc");
    }
}
