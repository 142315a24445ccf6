//! grpc.health.v1 statuses that follow Redis.
//!
//! A probe PINGs Redis every [`PROBE_INTERVAL`] with a short timeout and
//! sets the overall status and every service's status together, so a change
//! shows within about one interval plus one timeout (well under 2 s).

use std::time::Duration;

use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    proto::{
        cache_service_server::CacheServiceServer, lock_service_server::LockServiceServer,
        rate_limit_service_server::RateLimitServiceServer, session_service_server::SessionServiceServer,
        stats_service_server::StatsServiceServer,
    },
    store::Redis,
};

/// Time between two probes.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Longest wait for one probe's PING.
const PROBE_TIMEOUT: Duration = Duration::from_millis(900);

/// The names health reports on: the overall "" and each service (plus
/// Envoy's rate limit service when it is served).
pub const SERVICE_NAMES: [&str; 6] = [
    "",
    <CacheServiceServer<()> as NamedService>::NAME,
    <SessionServiceServer<()> as NamedService>::NAME,
    <RateLimitServiceServer<()> as NamedService>::NAME,
    <LockServiceServer<()> as NamedService>::NAME,
    <StatsServiceServer<()> as NamedService>::NAME,
];

/// Sets every name to `status`.
pub async fn set_all(reporter: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    for &name in names {
        reporter.set_service_status(name, status).await;
    }
}

/// Probes Redis forever, publishing each change of reachability for `names`.
pub async fn probe(redis: Redis, reporter: HealthReporter, names: Vec<&'static str>) {
    let mut last = None;
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let ping = redis.ping(PROBE_TIMEOUT).await;
        let up = ping.is_ok();
        if last != Some(up) {
            match ping {
                Ok(()) => tracing::info!("redis reachable: SERVING"),
                // The reason matters most when Redis was never reached: a
                // refused TLS certificate, a wrong password, a wrong port.
                Err(reason) => tracing::warn!(%reason, "redis unreachable: NOT_SERVING"),
            }
            set_all(&reporter, &names, if up { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
            for &name in &names {
                redis.metrics().health(name, up);
            }
            last = Some(up);
        }
    }
}
