//! The store layer: the only code that speaks Redis.
//!
//! [`Redis`] owns the connection pool and bounds every operation by the
//! configured timeout, so a slow or absent Redis turns into
//! [`Error::Unavailable`] instead of a hung RPC. One file per service holds
//! that service's operations and scripts.

pub mod cache;
pub mod lock;
mod wake;

use std::{future::Future, time::Duration};

use deadpool_redis::{
    Manager, Pool, Runtime,
    redis::{self, AsyncConnectionConfig, FromRedisValue, ScriptInvocation},
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
    pool: Pool,
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
        let manager =
            Manager::new_with_config(config.redis_url.as_str(), connection).map_err(|e| format!("--redis-url: {e}"))?;
        let pool = Pool::builder(manager)
            .max_size(config.redis_pool_size)
            .wait_timeout(Some(config.redis_timeout))
            .create_timeout(Some(config.redis_connect_timeout))
            .recycle_timeout(Some(config.redis_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| format!("redis pool: {e}"))?;
        let client = redis::Client::open(config.redis_url.as_str()).map_err(|e| format!("--redis-url: {e}"))?;
        Ok(Self { pool, client, timeout: config.redis_timeout })
    }

    /// Runs a script (EVALSHA, loading it on first use or after a restart).
    pub async fn invoke<T: FromRedisValue>(&self, script: &ScriptInvocation<'_>) -> Result<T> {
        self.bounded(async {
            let mut conn = self.pool.get().await?;
            Ok(script.invoke_async(&mut conn).await?)
        })
        .await
    }

    /// Checks a connection out of the pool, for a caller that keeps one of
    /// its own (the lock store): one connection delivers its commands in
    /// order, and using it again skips the PING of every pool checkout.
    pub async fn connection(&self) -> Result<deadpool_redis::Connection> {
        self.bounded(async { Ok(self.pool.get().await?) }).await
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
            Ok(cmd.query_async(&mut conn).await?)
        })
        .await
    }

    /// True when Redis answers PING within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let probe = async {
            let mut conn = self.pool.get().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await.map_err(Error::from)
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
