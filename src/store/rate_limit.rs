//! Rate-limit operations: one script invocation (one round trip) per call,
//! whatever the number of limits.

use std::time::Duration;

use deadpool_redis::redis::Script;

use super::Redis;
use crate::{
    error::{Error, Result},
    keys::Keys,
};

/// How a limit counts (see `rate_limit_check.lua` for the state each keeps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Windows of `period` aligned to the Unix epoch.
    FixedWindow,
    /// Weighted two-window counter.
    SlidingWindow,
    /// GCRA with a capacity of `burst`.
    TokenBucket,
}

impl Algorithm {
    /// The letter the script knows the algorithm by.
    fn code(self) -> &'static str {
        match self {
            Self::FixedWindow => "f",
            Self::SlidingWindow => "s",
            Self::TokenBucket => "t",
        }
    }
}

/// One validated limit of a Check.
#[derive(Clone, Debug)]
pub struct Limit<'a> {
    /// The caller's key.
    pub key: &'a str,
    /// Units allowed per period; at least 1.
    pub limit: u64,
    /// The period, in whole milliseconds (the script's unit); at least 1.
    pub period_ms: u64,
    /// How it counts.
    pub algorithm: Algorithm,
    /// Token-bucket capacity; ignored by the windows.
    pub burst: u64,
}

/// One limit of a [`RateLimitStore::check_each`], with its own cost and role.
#[derive(Clone, Debug)]
pub struct Part<'a> {
    /// The limit.
    pub limit: Limit<'a>,
    /// Units this request takes from it (0 takes nothing).
    pub cost: u64,
    /// Decided but never consumed.
    pub peek: bool,
    /// Its denial is reported but does not deny the request, and a limit
    /// that denies is not consumed (Envoy's `shadow_mode`).
    pub advisory: bool,
}

/// One limit's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether this limit on its own allows the request.
    pub allowed: bool,
    /// Units it would still admit now, after this request if it was consumed.
    pub remaining: u64,
    /// Time until it is back to its full allowance if nothing more is spent.
    pub reset_after: Duration,
    /// Time until it would allow the same request; zero when it does.
    pub retry_after: Duration,
}

/// The RateLimit service's data in Redis.
pub struct RateLimitStore {
    redis: Redis,
    keys: Keys,
    /// Decides and consumes all limits of a Check (`lua/rate_limit_check.lua`).
    check: Script,
    /// Clears keys (`lua/rate_limit_reset.lua`).
    reset: Script,
}

impl RateLimitStore {
    /// A store under `keys`.
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self {
            redis,
            keys,
            check: Script::new(include_str!("lua/rate_limit_check.lua")),
            reset: Script::new(include_str!("lua/rate_limit_reset.lua")),
        }
    }

    /// Decides `cost` against every limit in one atomic step and, unless
    /// `peek` or any limit denies, consumes it from all of them. Verdicts
    /// come back in the order of `limits`.
    pub async fn check(&self, limits: &[Limit<'_>], cost: u64, peek: bool) -> Result<Vec<Decision>> {
        let parts: Vec<Part<'_>> =
            limits.iter().map(|limit| Part { limit: limit.clone(), cost, peek, advisory: false }).collect();
        self.check_each(&parts).await
    }

    /// Decides every part against its own cost in one atomic step and, when
    /// every part that is not advisory allows, consumes each part's cost
    /// from every part that allows and is not peeked; otherwise consumes
    /// nothing. Verdicts come back in the order of `parts`.
    pub async fn check_each(&self, parts: &[Part<'_>]) -> Result<Vec<Decision>> {
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.check.prepare_invoke();
        for part in parts {
            let limit = &part.limit;
            let flags = match (part.peek, part.advisory) {
                (false, false) => "",
                (true, false) => "p",
                (false, true) => "a",
                (true, true) => "pa",
            };
            call.key(self.state_key(limit));
            call.arg(limit.algorithm.code()).arg(limit.limit).arg(limit.period_ms).arg(limit.burst);
            call.arg(part.cost).arg(flags);
        }
        let reply: Vec<i64> = self.redis.invoke(&call).await?;
        if reply.len() != parts.len() * 4 {
            return Err(Error::Internal(format!("check returned {} values for {} limits", reply.len(), parts.len())));
        }
        let millis = |ms: i64| Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        Ok(reply
            .chunks_exact(4)
            .map(|row| Decision {
                allowed: row[0] == 1,
                remaining: u64::try_from(row[1]).unwrap_or(0),
                reset_after: millis(row[2]),
                retry_after: millis(row[3]),
            })
            .collect())
    }

    /// Clears every algorithm's state of each key; returns how many keys had
    /// any.
    pub async fn reset(&self, keys: &[String]) -> Result<u32> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut call = self.reset.prepare_invoke();
        for key in keys {
            call.key(self.keys.rate_limit_fixed(key))
                .key(self.keys.rate_limit_sliding(key))
                .key(self.keys.rate_limit_bucket(key));
        }
        self.redis.invoke(&call).await
    }

    fn state_key(&self, limit: &Limit<'_>) -> String {
        match limit.algorithm {
            Algorithm::FixedWindow => self.keys.rate_limit_fixed(limit.key),
            Algorithm::SlidingWindow => self.keys.rate_limit_sliding(limit.key),
            Algorithm::TokenBucket => self.keys.rate_limit_bucket(limit.key),
        }
    }
}
