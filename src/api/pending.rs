//! Services whose issues have not landed: every RPC answers UNIMPLEMENTED
//! through the default methods `build.rs` generates.

use crate::proto::{
    rate_limit_service_server::RateLimitService, session_service_server::SessionService,
    stats_service_server::StatsService,
};

/// Placeholder for a service not implemented yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pending;

impl SessionService for Pending {}
impl RateLimitService for Pending {}
impl StatsService for Pending {}
