//! cachecoord: one gRPC contract in front of Redis for caching, sessions and
//! token revocation, rate limiting, distributed locks and counters.
//!
//! # Layout
//! - [`config`]: flags and environment, validated once.
//! - [`server`]: assembles health, reflection, logging and the services.
//! - [`api`]: one file per gRPC service; converts proto ⇄ domain, checks limits.
//! - [`store`]: the only code that speaks Redis; Lua scripts in `store/lua/`.
//! - [`keys`]: every Redis key name.
//! - [`error`]: the one error type and its mapping to gRPC statuses.
//! - [`codec`]: protobuf decoding; a request that does not decode is `INVALID_ARGUMENT`.
//! - [`deadline`]: `DEADLINE_EXCEEDED` when the caller's deadline passes.
//! - [`metrics`]: Prometheus metrics, the gRPC metrics layer, `/metrics`.
//! - [`otel`]: OpenTelemetry traces: a span per RPC and per Redis call, OTLP export.
//! - [`health`]: grpc.health.v1 statuses that follow a Redis probe.
//! - [`calendar`]: Stats time buckets in the configured time zone.
//! - [`rls`]: Envoy's rate limit service: YAML config, matching, reload.
//! - [`tls`]: TLS on the gRPC port: certificates, reloads, the accept loop.
//!
//! `server::run` takes the listener and a shutdown future, so tests start the
//! real server in-process on port 0.

pub mod api;
pub mod auth;
pub mod calendar;
pub mod codec;
pub mod config;
pub mod deadline;
pub mod error;
pub mod health;
pub mod keys;
pub mod metrics;
pub mod otel;
pub mod proto;
pub mod reload;
pub mod rls;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
