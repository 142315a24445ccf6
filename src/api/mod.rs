//! The gRPC layer: one file per service. Handlers check the request against
//! [`Limits`], call the store, and convert the answer back; only this layer
//! sees prost types.

pub mod cache;
pub mod envoy;
pub mod lock;
pub mod rate_limit;
pub mod session;
pub mod stats;

use std::time::Duration;

use crate::keys::Keys;
use crate::{config::Config, error::Error};

/// The request limits of SPEC §1, from configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, name or tag, in bytes.
    pub max_key_bytes: usize,
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
    /// Most items in one batch.
    pub max_batch: usize,
    /// Longest TTL.
    pub max_ttl: Duration,
    /// Most limits in one rate-limit check (each check is one script).
    pub max_rate_limits: usize,
    /// Most deltas in one Stats Increment (one script).
    pub max_deltas: usize,
    /// Most tags on one cache entry (its write is one script).
    pub max_tags: usize,
}

impl Limits {
    /// The limits configured for this process.
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_key_bytes: config.max_key_bytes,
            max_value_bytes: config.max_value_bytes,
            max_batch: config.max_batch,
            max_ttl: config.max_ttl,
            max_rate_limits: config.rate_limit_max_limits,
            max_deltas: config.stats_max_deltas,
            max_tags: config.cache_max_tags,
        }
    }

    /// A key, name or tag: 1..=max_key_bytes bytes.
    pub fn key(&self, field: impl Fn() -> String, key: &str) -> Result<(), Error> {
        if key.is_empty() {
            return Err(Error::invalid(field(), "must not be empty"));
        }
        if key.len() > self.max_key_bytes {
            return Err(Error::invalid(field(), format!("must be at most {} bytes", self.max_key_bytes)));
        }
        // A key is the hash tag of its Redis keys (`{key}`); a leading `}`
        // would make that tag empty, and Redis Cluster would scatter the
        // keys that must share a slot.
        if key.starts_with('}') {
            return Err(Error::invalid(field(), "must not start with '}'"));
        }
        Ok(())
    }

    /// Each key of a list, named `field[i]`.
    pub fn keys(&self, field: &str, keys: &[String]) -> Result<(), Error> {
        self.batch(field, keys.len())?;
        for (i, key) in keys.iter().enumerate() {
            self.key(|| format!("{field}[{i}]"), key)?;
        }
        Ok(())
    }

    /// A value: at most max_value_bytes bytes.
    pub fn value(&self, field: impl Fn() -> String, value: &[u8]) -> Result<(), Error> {
        if value.len() > self.max_value_bytes {
            return Err(Error::invalid(field(), format!("must be at most {} bytes", self.max_value_bytes)));
        }
        Ok(())
    }

    /// A batch: at most max_batch items.
    pub fn batch(&self, field: &str, len: usize) -> Result<(), Error> {
        if len > self.max_batch {
            return Err(Error::invalid(field, format!("must have at most {} items", self.max_batch)));
        }
        Ok(())
    }

    /// A batch that runs as one script (atomic, so not split): at most `max`
    /// items; the message names the flag that sets `max`.
    pub fn script_batch(&self, field: &str, len: usize, max: usize, flag: &str) -> Result<(), Error> {
        if len > max {
            return Err(Error::invalid(field, format!("must have at most {max} items ({flag})")));
        }
        Ok(())
    }

    /// An optional TTL: absent → `default`; else positive and at most max_ttl.
    pub fn ttl(
        &self,
        field: impl Fn() -> String,
        ttl: Option<prost_types::Duration>,
        default: Duration,
    ) -> Result<Duration, Error> {
        match ttl {
            None => Ok(default),
            Some(ttl) => self.span(field, ttl, false),
        }
    }

    /// A required time span: positive (or zero when `zero_ok`), at most max_ttl.
    pub fn span(
        &self,
        field: impl Fn() -> String,
        span: prost_types::Duration,
        zero_ok: bool,
    ) -> Result<Duration, Error> {
        let rule = if zero_ok { "must be zero or positive" } else { "must be positive" };
        let span = Duration::try_from(span).map_err(|_| Error::invalid(field(), rule))?;
        if span.is_zero() && !zero_ok {
            return Err(Error::invalid(field(), rule));
        }
        if span > self.max_ttl {
            return Err(Error::invalid(
                field(),
                format!("must be at most {}", humantime::format_duration(self.max_ttl)),
            ));
        }
        Ok(span)
    }
}

/// A std duration as a protobuf Duration (saturating; ours are all small).
pub fn to_proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// How long until the caller's deadline (`grpc-timeout`), if it sent one.
pub fn caller_deadline<T>(request: &tonic::Request<T>) -> Option<Duration> {
    parse_grpc_timeout(request.metadata().get("grpc-timeout")?.to_str().ok()?)
}

/// A `grpc-timeout` header value (`250m`, `5S`, ...) as a duration.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // ASCII only, so the unit is one byte (found by the encoding fuzz target:
    // a multi-byte last character made split_at panic).
    if !value.is_ascii() {
        return None;
    }
    let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// What a request may touch: its tenant's key space and limits.
pub struct Scope {
    /// Where its Redis keys live.
    pub space: Keys,
    /// The request limits it is checked against.
    pub limits: Limits,
}

/// The scope of `request`: its caller's tenant space and limits when the auth
/// layer established a caller, else the base key space and `limits`. The
/// tenant comes from the caller's credential, never from the request body.
pub fn scope<T>(keys: &Keys, limits: &Limits, request: &tonic::Request<T>) -> Scope {
    match request.extensions().get::<Caller>() {
        Some(caller) => Scope { space: keys.tenant(&caller.tenant), limits: caller.limits },
        None => Scope { space: keys.clone(), limits: *limits },
    }
}

/// Who a request acts for, as the auth layer established it from the
/// credential: the key's id (for logs), its tenant, and the tenant's limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The API key's id (never its secret).
    pub key_id: String,
    /// The tenant whose key space the request uses.
    pub tenant: String,
    /// The process limits, tightened by the tenant's own.
    pub limits: Limits,
}

/// The longest a handler may wait server-side: `wanted`, cut short so the
/// answer reaches the caller before its deadline does.
pub fn wait_budget<T>(request: &tonic::Request<T>, wanted: Duration) -> Duration {
    // Leave room for the answer's trip back.
    const MARGIN: Duration = Duration::from_millis(20);
    match caller_deadline(request) {
        Some(deadline) => wanted.min(deadline.saturating_sub(MARGIN)),
        None => wanted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_key_bytes: 4,
            max_value_bytes: 8,
            max_batch: 2,
            max_ttl: Duration::from_secs(60),
            max_rate_limits: 2,
            max_deltas: 2,
            max_tags: 2,
        }
    }

    #[test]
    fn key_limits_hold_at_the_boundary() {
        let limits = limits();
        assert!(limits.key(|| "key".into(), "abcd").is_ok());
        assert!(limits.key(|| "key".into(), "abcde").unwrap_err().to_string().contains("key: must be at most 4 bytes"));
        assert!(limits.key(|| "key".into(), "").unwrap_err().to_string().contains("key: must not be empty"));
        assert!(limits.keys("keys", &["a".into(), "".into()]).unwrap_err().to_string().starts_with("keys[1]"));
        assert!(limits.keys("keys", &["a".into(), "b".into(), "c".into()]).is_err());
    }

    #[test]
    fn ttl_limits_hold_at_the_boundary() {
        let limits = limits();
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        let field = || "ttl".to_string();
        assert_eq!(limits.ttl(field, None, Duration::from_secs(5)).unwrap(), Duration::from_secs(5));
        assert_eq!(limits.ttl(field, Some(d(60, 0)), Duration::ZERO).unwrap(), Duration::from_secs(60));
        assert!(limits.ttl(field, Some(d(60, 1)), Duration::ZERO).is_err());
        assert!(limits.ttl(field, Some(d(0, 0)), Duration::ZERO).is_err());
        assert!(limits.ttl(field, Some(d(-1, 0)), Duration::ZERO).is_err());
        assert_eq!(limits.span(field, d(0, 0), true).unwrap(), Duration::ZERO);
    }

    #[test]
    fn grpc_timeout_headers_that_are_no_timeout_are_ignored() {
        for value in ["", "m", "5", "-5m", "5x", "5ʽ", "ʽ", "99999999999999999999S"] {
            assert_eq!(parse_grpc_timeout(value), None, "{value:?}");
        }
        assert_eq!(parse_grpc_timeout("18446744073709551615H"), Some(Duration::from_secs(u64::MAX)));
    }

    #[test]
    fn grpc_timeout_header_is_read() {
        let mut request = tonic::Request::new(());
        request.metadata_mut().insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(caller_deadline(&request), Some(Duration::from_millis(250)));
        assert_eq!(wait_budget(&request, Duration::from_secs(5)), Duration::from_millis(230));
    }
}
