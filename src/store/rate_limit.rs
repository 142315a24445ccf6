//! Rate-limit operations: one script invocation (one round trip) per call,
//! whatever the number of limits, when the limits share a hash slot (always
//! on a single server). On Redis Cluster, limits in different slots are
//! decided and consumed slot by slot, concurrently; if any slot denies, what
//! the others consumed is given back (`rate_limit_refund.lua`), so a Check
//! still never admits more than a limit allows, but may briefly over-deny a
//! concurrent Check between the consumption and the refund.

use std::time::Duration;

use deadpool_redis::redis::Script;

use super::{Function, Redis};
use crate::{
    error::{Error, Result},
    keys::Keys,
};

/// State keys one reset script clears: 100 caller keys' three states, a
/// multiple of 3 so a key's states (adjacent in a slot's group) stay in one
/// script.
const RESETS_PER_SCRIPT: usize = 300;

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
    /// The algorithm as a metrics label.
    pub fn label(self) -> crate::metrics::Algorithm {
        match self {
            Self::FixedWindow => crate::metrics::Algorithm::FixedWindow,
            Self::SlidingWindow => crate::metrics::Algorithm::SlidingWindow,
            Self::TokenBucket => crate::metrics::Algorithm::TokenBucket,
        }
    }

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

impl Part<'_> {
    /// The script's flags for this part.
    fn flags(&self) -> &'static str {
        match (self.peek, self.advisory) {
            (false, false) => "",
            (true, false) => "p",
            (false, true) => "a",
            (true, true) => "pa",
        }
    }

    /// Whether a check that went through consumed this part.
    fn consumed(&self, decision: &Decision) -> bool {
        decision.allowed && !self.peek
    }
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
    check: Function,
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
            check: Function::new("rate_limit_check.lua", include_str!("lua/rate_limit_check.lua")),
            reset: super::script("rate_limit_reset.lua", include_str!("lua/rate_limit_reset.lua")),
            refund: super::script("rate_limit_refund.lua", include_str!("lua/rate_limit_refund.lua")),
        }
    }

    /// The key space without a tenant; `Keys::tenant` derives a tenant's.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Counts one decision per limit, under its algorithm, for `api`.
    pub fn count<'a>(
        &self,
        api: crate::metrics::LimitApi,
        limits: impl IntoIterator<Item = &'a Limit<'a>>,
        decision: impl Fn(usize) -> crate::metrics::Decision,
    ) {
        let metrics = self.redis.metrics();
        if metrics.enabled() {
            for (i, limit) in limits.into_iter().enumerate() {
                metrics.rate_limit(api, limit.algorithm.label(), decision(i));
            }
        }
    }

    /// Decides `cost` against every limit and, unless `peek` or any limit
    /// denies, consumes it from all of them: one atomic step per hash slot
    /// (one in all on a single server). Verdicts come back in the order of
    /// `limits`.
    pub async fn check(&self, space: &Keys, limits: &[Limit<'_>], cost: u64, peek: bool) -> Result<Vec<Decision>> {
        let parts: Vec<Part<'_>> =
            limits.iter().map(|limit| Part { limit: limit.clone(), cost, peek, advisory: false }).collect();
        self.check_each(space, &parts).await
    }

    /// Decides every part against its own cost and, when every part that is
    /// not advisory allows, consumes each part's cost from every part that
    /// allows and is not peeked; otherwise consumes nothing. One atomic step
    /// per hash slot (one in all on a single server); a slot that consumed
    /// while another denied is refunded. Verdicts come back in the order of
    /// `parts`.
    pub async fn check_each(&self, space: &Keys, parts: &[Part<'_>]) -> Result<Vec<Decision>> {
        let keys: Vec<String> = parts.iter().map(|part| self.state_key(space, &part.limit)).collect();
        let groups = self.redis.slot_groups(keys.iter().map(String::as_str));
        if let [group] = groups.as_slice() {
            // One slot (always on a single server): the script alone is
            // all-or-nothing, and the group holds every part in order.
            let verdict = self.check_slot(&keys, parts, group).await?;
            return Ok(verdict.into_iter().map(|(decision, _)| decision).collect());
        }
        let runs = groups.iter().map(|group| self.check_slot(&keys, parts, group));
        let verdicts = futures::future::try_join_all(runs).await?;
        // A slot went through when every part of it that is not advisory allowed.
        let through = |group: &[usize], verdict: &[(Decision, i64)]| {
            group.iter().zip(verdict).all(|(&i, (decision, _))| decision.allowed || parts[i].advisory)
        };
        let allowed = groups.iter().zip(&verdicts).all(|(group, verdict)| through(group, verdict));
        let mut decisions: Vec<Option<Decision>> = vec![None; parts.len()];
        let mut refunds = Vec::new();
        for (group, verdict) in groups.iter().zip(verdicts) {
            // A slot that went through consumed; give it back if another
            // slot denied.
            let refund = !allowed && through(group, &verdict);
            if refund {
                let taken: Vec<(usize, i64)> = group
                    .iter()
                    .zip(&verdict)
                    .filter(|&(&i, (decision, _))| parts[i].consumed(decision))
                    .map(|(&i, (_, window))| (i, *window))
                    .collect();
                if !taken.is_empty() {
                    refunds.push(self.refund(taken, &keys, parts));
                }
            }
            for (&i, (mut decision, _)) in group.iter().zip(verdict) {
                if refund && parts[i].consumed(&decision) {
                    decision.remaining = decision.remaining.saturating_add(parts[i].cost);
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

    /// Decides (and, if all its enforced parts allow, consumes) the parts
    /// of one slot's `group` in one script call.
    async fn check_slot(&self, keys: &[String], parts: &[Part<'_>], group: &[usize]) -> Result<Vec<(Decision, i64)>> {
        let mut call = self.check.prepare_call();
        for &i in group {
            let part = &parts[i];
            let limit = &part.limit;
            call.key(&keys[i]);
            call.arg(limit.algorithm.code()).arg(limit.limit).arg(limit.period_ms).arg(limit.burst);
            call.arg(part.cost).arg(part.flags());
        }
        let reply: Vec<u8> = self.redis.call_function(&call).await?;
        parse_check(&reply, group.len())
    }

    /// Gives back what a check consumed from one slot's parts: `taken` holds
    /// each consumed part's index and the window it counted in.
    async fn refund(&self, taken: Vec<(usize, i64)>, keys: &[String], parts: &[Part<'_>]) -> Result<()> {
        let mut call = self.refund.prepare_invoke();
        for (i, window) in taken {
            let limit = &parts[i].limit;
            call.key(&keys[i]);
            call.arg(limit.algorithm.code()).arg(limit.limit).arg(limit.period_ms).arg(window).arg(parts[i].cost);
        }
        self.redis.invoke(&call).await
    }

    /// Clears every algorithm's state of each key; returns how many keys had
    /// any (a repeated key counts once). One script call per hash slot of
    /// the state keys and run of at most 100 caller keys, sent together;
    /// each call is atomic on its own.
    pub async fn reset(&self, space: &Keys, keys: &[String]) -> Result<u32> {
        let mut unique: Vec<&String> = keys.iter().collect();
        unique.sort_unstable();
        unique.dedup();
        let states: Vec<String> = unique
            .iter()
            .flat_map(|key| [space.rate_limit_fixed(key), space.rate_limit_sliding(key), space.rate_limit_bucket(key)])
            .collect();
        let groups: Vec<Vec<usize>> = self
            .redis
            .slot_groups(states.iter().map(String::as_str))
            .iter()
            .flat_map(|group| group.chunks(RESETS_PER_SCRIPT).map(<[usize]>::to_vec))
            .collect();
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
    fn state_key(&self, space: &Keys, limit: &Limit<'_>) -> String {
        match limit.algorithm {
            Algorithm::FixedWindow => space.rate_limit_fixed(limit.key),
            Algorithm::SlidingWindow => space.rate_limit_sliding(limit.key),
            Algorithm::TokenBucket => space.rate_limit_bucket(limit.key),
        }
    }
}

/// The verdicts of one check reply (five packed integers per limit): per
/// limit, its decision and the window it counted in.
fn parse_check(reply: &[u8], limits: usize) -> Result<Vec<(Decision, i64)>> {
    let mut values = super::unpack_integers(reply, limits * 5)
        .ok_or_else(|| Error::Internal(format!("check returned {} bytes for {limits} limits", reply.len())))?;
    let millis = |ms: i64| Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    Ok((0..limits)
        .map(|_| {
            // The length was checked: every limit has its five.
            let [allowed, remaining, reset_after, retry_after, window] =
                std::array::from_fn(|_| values.next().unwrap_or_default());
            let decision = Decision {
                allowed: allowed == 1,
                remaining: u64::try_from(remaining).unwrap_or(0),
                reset_after: millis(reset_after),
                retry_after: millis(retry_after),
            };
            (decision, window)
        })
        .collect())
}
