//! The store layer: the only code that speaks Redis.
//!
//! [`Redis`] owns the connection pool and bounds every operation by the
//! configured timeout, so a slow or absent Redis turns into
//! [`Error::Unavailable`] instead of a hung RPC. One file per service holds
//! that service's operations and scripts.

pub mod cache;
pub mod lock;
pub mod rate_limit;
pub mod session;
pub mod stats;
mod wake;

use std::{future::Future, time::Duration};

use deadpool::managed::{self, Metrics, Object, RecycleResult};
use deadpool_redis::{
    Runtime,
    redis::{
        self, AsyncConnectionConfig, FromRedisValue, RedisError, RedisResult, ScriptInvocation,
        aio::MultiplexedConnection,
    },
};

use crate::{
    config::Config,
    error::{Error, Result},
};

/// A bounded-time handle on Redis, cheap to clone.
#[derive(Clone)]
pub struct Redis {
    /// Multiplexed connections; several, so one slow reply does not queue
    /// every RPC behind it.
    pool: managed::Pool<Manager>,
    /// A client for dedicated connections (pub/sub), which the pool cannot lend.
    client: redis::Client,
    /// Upper bound on one operation, checkout included.
    timeout: Duration,
}

impl Redis {
    /// Builds the pool. No connection is opened yet: the service starts while
    /// Redis is down and reports it through health.
    pub fn new(config: &Config) -> Result<Self, String> {
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.redis_connect_timeout))
            .set_response_timeout(Some(config.redis_timeout));
        let client = redis::Client::open(config.redis_url.as_str()).map_err(|e| format!("--redis-url: {e}"))?;
        let manager = Manager { client: client.clone(), connection };
        let pool = managed::Pool::builder(manager)
            .max_size(config.redis_pool_size)
            .wait_timeout(Some(config.redis_timeout))
            .create_timeout(Some(config.redis_connect_timeout))
            .recycle_timeout(Some(config.redis_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| format!("redis pool: {e}"))?;
        Ok(Self { pool, client, timeout: config.redis_timeout })
    }

    /// Runs a script (EVALSHA, loading it on first use or after a restart).
    pub async fn invoke<T: FromRedisValue>(&self, script: &ScriptInvocation<'_>) -> Result<T> {
        self.bounded(async {
            let mut conn = self.pool.get().await?;
            let result = script.invoke_async(&mut *conn).await;
            Ok(discard_if_broken(conn, result)?)
        })
        .await
    }

    /// A pooled connection to keep using (a clone shares its socket), for
    /// calls that must reach Redis in the order they were sent: a follow-up
    /// to a call that was cut short, or the lock store's own connection.
    pub async fn connection(&self) -> Result<MultiplexedConnection> {
        let conn = self.bounded(async { Ok(self.pool.get().await?) }).await?;
        Ok((*conn).clone())
    }

    /// Runs a script on `conn` (from [`Redis::connection`], or a clone of
    /// one), bounded like [`Redis::invoke`].
    pub async fn invoke_on<T: FromRedisValue>(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        script: &ScriptInvocation<'_>,
    ) -> Result<T> {
        self.bounded(async { Ok(script.invoke_async(conn).await?) }).await
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        self.bounded(async {
            let mut conn = self.pool.get().await?;
            let result = cmd.query_async(&mut *conn).await;
            Ok(discard_if_broken(conn, result)?)
        })
        .await
    }

    /// True when Redis answers PING within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let probe = async {
            let mut conn = self.pool.get().await?;
            let result = redis::cmd("PING").query_async::<String>(&mut *conn).await;
            discard_if_broken(conn, result).map_err(Error::from)
        };
        matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(_)))
    }

    /// A dedicated pub/sub connection, opened within the timeout.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub> {
        self.bounded(async { Ok(self.client.get_async_pubsub().await?) }).await
    }

    async fn bounded<T>(&self, op: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.timeout, op)
            .await
            .unwrap_or_else(|_| Err(Error::Unavailable(format!("no reply within {:?}", self.timeout))))
    }
}

/// Whole milliseconds (the scripts' unit), rounded up so a positive TTL never
/// becomes zero.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// 128 random bits from the thread's CSPRNG, as 32 hex digits (URL-safe):
/// fill lease tokens and lock lease ids.
pub(crate) fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Opens multiplexed connections for the pool.
///
/// Unlike deadpool-redis's manager, it does not PING on every checkout
/// (that doubled the round trips of every RPC): a connection that has been
/// used within [`IDLE_CHECK_AFTER`] is handed out as is, and one that turns
/// out broken is dropped from the pool by [`discard_if_broken`].
struct Manager {
    /// Where to connect.
    client: redis::Client,
    /// Connect and response timeouts.
    connection: AsyncConnectionConfig,
}

/// A connection idle for longer than this is PINGed before reuse.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(1);

impl managed::Manager for Manager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        self.client.get_multiplexed_async_connection_with_config(&self.connection).await
    }

    async fn recycle(&self, conn: &mut MultiplexedConnection, metrics: &Metrics) -> RecycleResult<RedisError> {
        if metrics.last_used() > IDLE_CHECK_AFTER {
            redis::cmd("PING").query_async::<String>(conn).await?;
        }
        Ok(())
    }
}

/// Passes `result` through; if it shows the connection itself is broken
/// (closed socket, protocol error), removes the connection from the pool so
/// the next checkout opens a fresh one.
fn discard_if_broken<T>(conn: Object<Manager>, result: RedisResult<T>) -> RedisResult<T> {
    if let Err(err) = &result
        && (err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error())
    {
        let _ = Object::take(conn);
    }
    result
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
