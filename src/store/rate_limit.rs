//! Rate-limit operations: one script invocation (one round trip) per call,
//! whatever the number of limits, when the limits share a hash slot (always
//! on a single server). On Redis Cluster, limits in different slots are
//! decided and consumed slot by slot, concurrently; if any slot denies, what
//! the others consumed is given back (`rate_limit_refund.lua`), so a Check
//! still never admits more than a limit allows, but may briefly over-deny a
//! concurrent Check between the consumption and the refund.

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
    /// Gives back a consumption (`lua/rate_limit_refund.lua`).
    refund: Script,
}

impl RateLimitStore {
    /// A store under `keys`.
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self {
            redis,
            keys,
            check: Script::new(include_str!("lua/rate_limit_check.lua")),
            reset: Script::new(include_str!("lua/rate_limit_reset.lua")),
            refund: Script::new(include_str!("lua/rate_limit_refund.lua")),
        }
    }

    /// Decides `cost` against every limit and, unless `peek` or any limit
    /// denies, consumes it from all of them: one atomic step per hash slot
    /// (one in all on a single server). Verdicts come back in the order of
    /// `limits`.
    pub async fn check(&self, limits: &[Limit<'_>], cost: u64, peek: bool) -> Result<Vec<Decision>> {
        let keys: Vec<String> = limits.iter().map(|limit| self.state_key(limit)).collect();
        let groups = self.redis.slot_groups(keys.iter().map(String::as_str));
        let keys = &keys;
        let runs = groups.iter().map(|group| async move {
            let mut call = self.check.prepare_invoke();
            call.arg(cost).arg(if peek { "1" } else { "0" });
            for &i in group {
                let limit = &limits[i];
                call.key(&keys[i]);
                call.arg(limit.algorithm.code()).arg(limit.limit).arg(limit.period_ms).arg(limit.burst);
            }
            let reply: Vec<i64> = self.redis.invoke(&call).await?;
            parse_check(&reply, group.len())
        });
        let verdicts = futures::future::try_join_all(runs).await?;
        let allowed = verdicts.iter().flatten().all(|(decision, _)| decision.allowed);
        let mut decisions: Vec<Option<Decision>> = vec![None; limits.len()];
        let mut refunds = Vec::new();
        for (group, verdict) in groups.iter().zip(verdicts) {
            // A slot whose limits all allowed consumed; give it back if
            // another slot denied.
            let consumed = !peek && verdict.iter().all(|(decision, _)| decision.allowed);
            let refund = consumed && !allowed;
            if refund {
                let windows = verdict.iter().map(|(_, window)| *window).collect();
                refunds.push(self.refund(group, keys, limits, cost, windows));
            }
            for (&i, (mut decision, _)) in group.iter().zip(verdict) {
                if refund {
                    decision.remaining = decision.remaining.saturating_add(cost);
                }
                decisions[i] = Some(decision);
            }
        }
        futures::future::try_join_all(refunds).await?;
        decisions
            .into_iter()
            .map(|decision| decision.ok_or_else(|| Error::Internal("a limit without a verdict".into())))
            .collect()
    }

    /// Gives back what a Check consumed from one slot's limits.
    async fn refund(
        &self,
        group: &[usize],
        keys: &[String],
        limits: &[Limit<'_>],
        cost: u64,
        windows: Vec<i64>,
    ) -> Result<()> {
        let mut call = self.refund.prepare_invoke();
        call.arg(cost);
        for (&i, window) in group.iter().zip(windows) {
            let limit = &limits[i];
            call.key(&keys[i]);
            call.arg(limit.algorithm.code()).arg(limit.limit).arg(limit.period_ms).arg(window);
        }
        self.redis.invoke(&call).await
    }

    /// Clears every algorithm's state of each key; returns how many keys had
    /// any (a repeated key counts once). One script call per hash slot of
    /// the state keys, sent together.
    pub async fn reset(&self, keys: &[String]) -> Result<u32> {
        let mut unique: Vec<&String> = keys.iter().collect();
        unique.sort_unstable();
        unique.dedup();
        let states: Vec<String> = unique
            .iter()
            .flat_map(|key| {
                [self.keys.rate_limit_fixed(key), self.keys.rate_limit_sliding(key), self.keys.rate_limit_bucket(key)]
            })
            .collect();
        let groups = self.redis.slot_groups(states.iter().map(String::as_str));
        let states = &states;
        let calls = groups.iter().map(|group| async move {
            let mut call = self.reset.prepare_invoke();
            for &i in group {
                call.key(&states[i]);
            }
            self.redis.invoke::<Vec<i64>>(&call).await
        });
        let mut existed = vec![false; states.len()];
        for (group, flags) in groups.iter().zip(futures::future::try_join_all(calls).await?) {
            for (&i, flag) in group.iter().zip(flags) {
                existed[i] = flag == 1;
            }
        }
        let reset = existed.chunks(3).filter(|key| key.iter().any(|&had| had)).count();
        Ok(u32::try_from(reset).unwrap_or(u32::MAX))
    }

    /// The state key of a limit.
    fn state_key(&self, limit: &Limit<'_>) -> String {
        match limit.algorithm {
            Algorithm::FixedWindow => self.keys.rate_limit_fixed(limit.key),
            Algorithm::SlidingWindow => self.keys.rate_limit_sliding(limit.key),
            Algorithm::TokenBucket => self.keys.rate_limit_bucket(limit.key),
        }
    }
}

/// The verdicts of one check script reply: per limit, its decision and the
/// window it counted in.
fn parse_check(reply: &[i64], limits: usize) -> Result<Vec<(Decision, i64)>> {
    if reply.len() != limits * 5 {
        return Err(Error::Internal(format!("check returned {} values for {limits} limits", reply.len())));
    }
    let millis = |ms: i64| Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    Ok(reply
        .chunks_exact(5)
        .map(|row| {
            let decision = Decision {
                allowed: row[0] == 1,
                remaining: u64::try_from(row[1]).unwrap_or(0),
                reset_after: millis(row[2]),
                retry_after: millis(row[3]),
            };
            (decision, row[4])
        })
        .collect())
}
