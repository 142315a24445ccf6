//! Services whose issues have not landed: every RPC answers UNIMPLEMENTED
//! through the default methods `build.rs` generates.

use crate::proto::lock_service_server::LockService;

/// Placeholder for a service not implemented yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pending;

impl LockService for Pending {}
