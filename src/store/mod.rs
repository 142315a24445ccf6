//! The store layer: the only code that speaks Redis.
//!
//! [`Redis`] (in `connection.rs`) owns the connections and bounds every
//! operation by the configured timeout, so a slow or absent Redis turns into
//! `Error::Unavailable` instead of a hung RPC. One file per service holds
//! that service's operations and scripts.

mod batch;
pub mod cache;
mod connection;
mod function;
pub mod invalidation;
pub mod lock;
pub mod rate_limit;
pub mod session;
pub mod stats;
mod topology;
mod wake;

use std::time::Duration;

pub use connection::{Conn, Redis};
pub(crate) use function::Function;
pub use topology::Topology;

/// Whole milliseconds (the scripts' unit), rounded up so a positive TTL never
/// becomes zero.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// A Lua script from `lua/<file>`, with its name remembered for trace spans
/// (`EVALSHA get`), since an invocation carries only the SHA1.
pub(crate) fn script(file: &'static str, code: &str) -> redis::Script {
    let script = redis::Script::new(code);
    crate::otel::register_script(script.get_hash(), file.trim_end_matches(".lua"));
    script
}

/// 128 random bits from the thread's CSPRNG, as 32 hex digits (URL-safe):
/// fill lease tokens and lock lease ids.
pub(crate) fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_up() {
        assert_eq!(millis(Duration::from_nanos(1)), 1);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
    }

    #[test]
    fn tokens_are_128_bits_of_hex() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
