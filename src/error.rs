//! The one error type of the service and its one mapping to gRPC statuses.
//!
//! Redis failures are classified here, once: anything transient (refused,
//! dropped, timed out, loading, failing over) is `Unavailable`, which clients
//! may retry; anything else is `Internal`. Neither carries Redis text to the
//! client; the detail goes to the log.

use deadpool_redis::redis::RedisError;

type PoolError = deadpool::managed::PoolError<RedisError>;
use tonic::Status;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request broke a rule; nothing was written.
    #[error("{field}: {rule}")]
    InvalidArgument {
        /// The offending field, as named in the proto (`items[3].key`).
        field: String,
        /// The rule it broke, in words.
        rule: String,
    },
    /// Redis could not be reached in time; safe to retry.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// A bug: an unexpected reply or state.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result of every store and service operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A bad request field.
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self::InvalidArgument { field: field.into(), rule: rule.into() }
    }
}

/// Error codes of a Redis that is up but refuses work for a while: out of
/// memory under `noeviction`, busy running a script, a failing RDB save that
/// blocks writes, too few replicas. redis-rs leaves these unclassified.
const REFUSING: [&str; 4] = ["OOM", "BUSY", "MISCONF", "NOREPLICAS"];

impl From<RedisError> for Error {
    fn from(err: RedisError) -> Self {
        use deadpool_redis::redis::RetryMethod;
        // A refused login (HELLO answers WRONGPASS/NOAUTH under RESP3) leaves
        // Redis unusable until an operator fixes the credentials: unavailable.
        let refused_login = matches!(err.code(), Some("WRONGPASS" | "NOAUTH"));
        // A script reaching a key of its slot that a live resharding already
        // moved to another cluster node; the scripts touch every key before
        // writing, so nothing was written and a retry lands once it is done.
        let migrating = err.detail().is_some_and(|d| d.contains("non local key"))
            || err.to_string().contains("access a non local key");
        let transient = err.is_io_error()
            || err.is_timeout()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || refused_login
            || migrating
            || !matches!(err.retry_method(), RetryMethod::NoRetry)
            || err.code().is_some_and(|code| REFUSING.contains(&code));
        if transient { Self::Unavailable(err.to_string()) } else { Self::Internal(err.to_string()) }
    }
}

impl From<PoolError> for Error {
    fn from(err: PoolError) -> Self {
        match err {
            PoolError::Backend(err) => err.into(),
            PoolError::Timeout(_) => Self::Unavailable("timed out waiting for a connection".into()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
            Error::Unavailable(detail) => {
                tracing::warn!(%detail, "redis unavailable");
                Status::unavailable("redis is unavailable; retry later")
            }
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
