//! Services whose issues have not landed: every RPC answers UNIMPLEMENTED
//! through the default methods `build.rs` generates.

use crate::proto::{
    lock_service_server::LockService, rate_limit_service_server::RateLimitService, stats_service_server::StatsService,
};

/// Placeholder for a service not implemented yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pending;

impl RateLimitService for Pending {}
impl LockService for Pending {}
impl StatsService for Pending {}
