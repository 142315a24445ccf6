//! `cachecoord.v1.RateLimitService`.

use std::{collections::HashMap, time::Duration};

use tonic::{Request, Response, Status};

use super::{Limits, to_proto_duration};
use crate::{
    error::Error,
    metrics::{Decision, LimitApi},
    proto::{self, rate_limit_service_server::RateLimitService},
    store::rate_limit::{Algorithm, Limit, RateLimitStore},
};

/// Largest `limit`, `burst` or `cost`: 2^53, the largest integer the Lua
/// script's doubles count exactly.
pub const MAX_UNITS: u64 = 1 << 53;

/// RateLimit RPC handlers.
pub struct RateLimitApi {
    store: RateLimitStore,
    limits: Limits,
    /// Answer `allowed, unchecked` instead of UNAVAILABLE when Redis is down.
    fail_open: bool,
}

impl RateLimitApi {
    /// Handlers over `store`.
    pub fn new(store: RateLimitStore, limits: Limits, fail_open: bool) -> Self {
        Self { store, limits, fail_open }
    }

    /// Checks one limit of a request; `i` is its index.
    fn limit<'a>(&self, limits: &Limits, i: usize, limit: &'a proto::Limit) -> Result<Limit<'a>, Error> {
        let field = |name: &str| format!("limits[{i}].{name}");
        limits.key(|| field("key"), &limit.key)?;
        units(|| field("limit"), limit.limit)?;
        let period = limit.period.ok_or_else(|| Error::invalid(field("period"), "is required"))?;
        let period = limits.span(|| field("period"), period, false)?;
        if period.subsec_nanos() % 1_000_000 != 0 {
            return Err(Error::invalid(field("period"), "must be a whole number of milliseconds"));
        }
        let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
        let algorithm = match proto::Algorithm::try_from(limit.algorithm) {
            Ok(proto::Algorithm::Unspecified | proto::Algorithm::SlidingWindow) => Algorithm::SlidingWindow,
            Ok(proto::Algorithm::FixedWindow) => Algorithm::FixedWindow,
            Ok(proto::Algorithm::TokenBucket) => Algorithm::TokenBucket,
            Err(_) => return Err(Error::invalid(field("algorithm"), "unknown value")),
        };
        let burst = match limit.burst {
            Some(_) if algorithm != Algorithm::TokenBucket => {
                return Err(Error::invalid(field("burst"), "is only for ALGORITHM_TOKEN_BUCKET"));
            }
            Some(burst) => {
                units(|| field("burst"), burst)?;
                // The bucket's state lives until it is full again, so that
                // must come within the longest TTL: burst x period / limit.
                let max_ms = limits.max_ttl.as_millis();
                if u128::from(burst) * u128::from(period_ms) > max_ms * u128::from(limit.limit) {
                    return Err(Error::invalid(
                        field("burst"),
                        format!(
                            "must refill within {} (burst x period / limit)",
                            humantime::format_duration(limits.max_ttl)
                        ),
                    ));
                }
                burst
            }
            None => limit.limit,
        };
        Ok(Limit { key: &limit.key, limit: limit.limit, period_ms, algorithm, burst })
    }

    /// Checks a whole Check request.
    fn request<'a>(&self, bounds: &Limits, request: &'a proto::CheckRequest) -> Result<(Vec<Limit<'a>>, u64), Error> {
        if request.limits.is_empty() {
            return Err(Error::invalid("limits", "must not be empty"));
        }
        bounds.batch("limits", request.limits.len())?;
        bounds.script_batch("limits", request.limits.len(), bounds.max_rate_limits, "--rate-limit-max-limits")?;
        let cost = request.cost.unwrap_or(1);
        units(|| "cost".into(), cost)?;
        let mut seen = HashMap::new();
        let mut limits = Vec::with_capacity(request.limits.len());
        for (i, limit) in request.limits.iter().enumerate() {
            let limit = self.limit(bounds, i, limit)?;
            // Most checks have one limit: it needs no map.
            let repeat = if request.limits.len() > 1 { seen.insert(limit.key, i) } else { None };
            if let Some(first) = repeat {
                return Err(Error::invalid(
                    format!("limits[{i}].key"),
                    format!("must be unique within the request (repeats limits[{first}].key)"),
                ));
            }
            let capacity = if limit.algorithm == Algorithm::TokenBucket { limit.burst } else { limit.limit };
            if cost > capacity {
                return Err(Error::invalid(
                    "cost",
                    format!("must be at most the capacity of limits[{i}] ({capacity}); it could never pass"),
                ));
            }
            limits.push(limit);
        }
        Ok((limits, cost))
    }
}

/// A count of units: 1..=MAX_UNITS. `field` names it, built only for an error.
fn units(field: impl Fn() -> String, value: u64) -> Result<(), Error> {
    if value == 0 {
        return Err(Error::invalid(field(), "must be at least 1"));
    }
    if value > MAX_UNITS {
        return Err(Error::invalid(field(), format!("must be at most {MAX_UNITS} (2^53)")));
    }
    Ok(())
}

#[tonic::async_trait]
impl RateLimitService for RateLimitApi {
    async fn check(&self, request: Request<proto::CheckRequest>) -> Result<Response<proto::CheckResponse>, Status> {
        let super::Scope { space, limits: bounds } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        let (limits, cost) = self.request(&bounds, &request)?;
        let decisions = match self.store.check(&space, &limits, cost, request.peek).await {
            Ok(decisions) => decisions,
            Err(Error::Unavailable(detail)) if self.fail_open => {
                tracing::warn!(%detail, "redis unavailable; rate limit check failed open");
                self.store.count(LimitApi::Check, &limits, |_| Decision::Unchecked);
                let statuses = limits
                    .iter()
                    .map(|limit| proto::LimitStatus { key: limit.key.to_string(), allowed: true, ..Default::default() })
                    .collect();
                return Ok(Response::new(proto::CheckResponse {
                    allowed: true,
                    statuses,
                    retry_after: Some(to_proto_duration(Duration::ZERO)),
                    unchecked: true,
                }));
            }
            Err(err) => return Err(err.into()),
        };
        let verdict = |i: usize| match decisions.get(i) {
            Some(d) if d.allowed => Decision::Allowed,
            _ => Decision::Denied,
        };
        self.store.count(LimitApi::Check, &limits, verdict);
        let allowed = decisions.iter().all(|d| d.allowed);
        let retry_after = decisions.iter().map(|d| d.retry_after).max().unwrap_or_default();
        let statuses = limits
            .iter()
            .zip(decisions)
            .map(|(limit, d)| proto::LimitStatus {
                key: limit.key.to_string(),
                allowed: d.allowed,
                remaining: d.remaining,
                reset_after: Some(to_proto_duration(d.reset_after)),
                retry_after: Some(to_proto_duration(d.retry_after)),
            })
            .collect();
        Ok(Response::new(proto::CheckResponse {
            allowed,
            statuses,
            retry_after: Some(to_proto_duration(retry_after)),
            unchecked: false,
        }))
    }

    async fn reset_limits(
        &self,
        request: Request<proto::ResetLimitsRequest>,
    ) -> Result<Response<proto::ResetLimitsResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        if request.keys.is_empty() {
            return Err(Error::invalid("keys", "must not be empty").into());
        }
        limits.keys("keys", &request.keys)?;
        let reset = self.store.reset(&space, &request.keys).await?;
        Ok(Response::new(proto::ResetLimitsResponse { reset }))
    }
}
