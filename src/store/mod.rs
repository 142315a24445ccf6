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

/// The integers a script packed with `struct.pack('<i8...')`: little-endian,
/// 8 bytes each. Scripts that answer many integers pack them, since the
/// RESP parser spends about 800 instructions on each reply item (callgrind),
/// more than Redis spends writing one; `None` when the length is not `n`
/// integers.
pub(crate) fn unpack_integers(bytes: &[u8], n: usize) -> Option<impl Iterator<Item = i64> + '_> {
    (bytes.len() == 8 * n).then(|| {
        bytes.chunks_exact(8).map(|chunk| {
            let mut le = [0; 8];
            le.copy_from_slice(chunk);
            i64::from_le_bytes(le)
        })
    })
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
    fn packed_integers_read_back_and_a_wrong_length_is_refused() {
        let bytes: Vec<u8> = [1i64, -2, i64::from(u32::MAX) + 7].iter().flat_map(|n| n.to_le_bytes()).collect();
        let read: Option<Vec<i64>> = unpack_integers(&bytes, 3).map(Iterator::collect);
        assert_eq!(read, Some(vec![1, -2, i64::from(u32::MAX) + 7]));
        assert!(unpack_integers(&bytes, 2).is_none());
        assert!(unpack_integers(&bytes[1..], 3).is_none());
    }

    #[test]
    fn tokens_are_128_bits_of_hex() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
