//! `envoy.service.ratelimit.v3.RateLimitService`: Envoy's rate limit
//! protocol, decided by the `--rls-config` rules ([`crate::rls`]) on the
//! RateLimit store's fixed windows.

use std::{sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::core::v3::HeaderValue,
        service::ratelimit::v3::{
            RateLimitRequest, RateLimitResponse,
            rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit::Unit as ProtoUnit},
            rate_limit_service_server::RateLimitService,
        },
        r#type::v3::RateLimitUnit,
    },
    google::protobuf::Duration as ProtoDuration,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::{Limits, rate_limit::MAX_UNITS};
use crate::{
    config::RlsHeaders,
    error::Error,
    rls::{self, Descriptor, Rules, Unit},
    store::rate_limit::{Algorithm, Limit, Part, RateLimitStore},
};

/// ShouldRateLimit handler.
pub struct EnvoyRateLimitApi {
    store: RateLimitStore,
    /// The rules in force; replaced whole on reload.
    rules: watch::Receiver<Arc<Rules>>,
    limits: Limits,
    /// Which rate-limit headers to add, if any.
    headers: RlsHeaders,
}

impl EnvoyRateLimitApi {
    /// Handlers over `store`, following `rules`.
    pub fn new(store: RateLimitStore, rules: watch::Receiver<Arc<Rules>>, limits: Limits, headers: RlsHeaders) -> Self {
        Self { store, rules, limits, headers }
    }

    /// Checks the request against the protocol's rules and our limits.
    fn descriptors<'a>(&self, limits: &Limits, request: &'a RateLimitRequest) -> Result<Vec<Descriptor<'a>>, Error> {
        limits.key(|| "domain".into(), &request.domain)?;
        if request.descriptors.is_empty() {
            return Err(Error::invalid("descriptors", "must not be empty"));
        }
        limits.batch("descriptors", request.descriptors.len())?;
        let (len, max) = (request.descriptors.len(), limits.max_rate_limits);
        limits.script_batch("descriptors", len, max, "--rate-limit-max-limits")?;
        let default_hits = u64::from(request.hits_addend.max(1));
        request
            .descriptors
            .iter()
            .enumerate()
            .map(|(i, descriptor)| {
                let field = |name: &str| format!("descriptors[{i}].{name}");
                if descriptor.entries.is_empty() {
                    return Err(Error::invalid(field("entries"), "must not be empty"));
                }
                if descriptor.entries.len() > limits.max_batch {
                    // Named only for the error: most requests pass.
                    limits.batch(&field("entries"), descriptor.entries.len())?;
                }
                for (j, entry) in descriptor.entries.iter().enumerate() {
                    limits.key(|| field(&format!("entries[{j}].key")), &entry.key)?;
                    if entry.value.len() > limits.max_key_bytes {
                        let rule = format!("must be at most {} bytes", limits.max_key_bytes);
                        return Err(Error::invalid(field(&format!("entries[{j}].value")), rule));
                    }
                }
                if descriptor.is_negative_hits {
                    return Err(Error::invalid(field("is_negative_hits"), "is not supported"));
                }
                let hits = descriptor.hits_addend.map_or(default_hits, |h| h.value);
                if hits > MAX_UNITS {
                    return Err(Error::invalid(field("hits_addend"), format!("must be at most {MAX_UNITS} (2^53)")));
                }
                let limit_override = match &descriptor.limit {
                    None => None,
                    Some(limit) => {
                        let unit = match RateLimitUnit::try_from(limit.unit) {
                            Ok(RateLimitUnit::Second) => Unit::Second,
                            Ok(RateLimitUnit::Minute) => Unit::Minute,
                            Ok(RateLimitUnit::Hour) => Unit::Hour,
                            Ok(RateLimitUnit::Day) => Unit::Day,
                            Ok(RateLimitUnit::Month) => Unit::Month,
                            Ok(RateLimitUnit::Year) => Unit::Year,
                            Ok(RateLimitUnit::Unknown) | Err(_) => {
                                return Err(Error::invalid(
                                    field("limit.unit"),
                                    "must be SECOND, MINUTE, HOUR, DAY, MONTH or YEAR",
                                ));
                            }
                        };
                        Some((limit.requests_per_unit, unit))
                    }
                };
                let entries = descriptor.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())).collect();
                Ok(Descriptor { entries, hits, limit_override })
            })
            .collect()
    }

    /// The rate-limit headers for the most constrained descriptor.
    fn headers(&self, statuses: &[rls::Status]) -> Vec<HeaderValue> {
        let prefix = match self.headers {
            RlsHeaders::Off => return Vec::new(),
            RlsHeaders::Draft => "RateLimit",
            RlsHeaders::X => "X-RateLimit",
        };
        let Some(status) = rls::header_status(statuses) else { return Vec::new() };
        let requests = status.limit.as_ref().map_or(0, |(requests, _, _)| *requests);
        let reset = status.reset.unwrap_or_default();
        let reset = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
        let header =
            |name: &str, value: String| HeaderValue { key: format!("{prefix}-{name}"), value, raw_value: Vec::new() };
        vec![
            header("Limit", requests.to_string()),
            header("Remaining", status.remaining.to_string()),
            header("Reset", reset.to_string()),
        ]
    }
}

#[tonic::async_trait]
impl RateLimitService for EnvoyRateLimitApi {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let crate::api::Scope { space, limits } = crate::api::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        let descriptors = self.descriptors(&limits, &request)?;
        let rules = Arc::clone(&self.rules.borrow());
        let plan = rls::plan(&rules, &request.domain, &descriptors);
        let parts: Vec<Part<'_>> = plan
            .counters
            .iter()
            .map(|c| Part {
                limit: Limit {
                    key: &c.key,
                    limit: c.limit,
                    period_ms: c.period_ms,
                    algorithm: Algorithm::FixedWindow,
                    burst: 0,
                },
                cost: c.cost,
                peek: c.peek,
                advisory: c.advisory,
            })
            .collect();
        // Redis down is UNAVAILABLE (never an OK or UNKNOWN overall code), so
        // Envoy's failure_mode_deny decides.
        let decisions = self.store.check_each(&space, &parts).await?;
        self.store.count(crate::metrics::LimitApi::Envoy, parts.iter().map(|part| &part.limit), |i| {
            match decisions.get(i) {
                Some(d) if d.allowed => crate::metrics::Decision::Allowed,
                _ => crate::metrics::Decision::Denied,
            }
        });
        let statuses = rls::answer(&request.domain, &plan, &decisions);
        let over = statuses.iter().any(|s| s.over);
        Ok(Response::new(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok }.into(),
            response_headers_to_add: self.headers(&statuses),
            statuses: statuses.iter().map(to_proto).collect(),
            ..Default::default()
        }))
    }
}

fn to_proto(status: &rls::Status) -> DescriptorStatus {
    DescriptorStatus {
        code: if status.over { Code::OverLimit } else { Code::Ok }.into(),
        current_limit: status.limit.as_ref().map(|(requests, unit, name)| RateLimit {
            name: name.clone().unwrap_or_default(),
            requests_per_unit: *requests,
            unit: unit_to_proto(*unit).into(),
        }),
        limit_remaining: status.remaining,
        duration_until_reset: status.reset.map(duration_to_proto),
        quota: None,
    }
}

fn unit_to_proto(unit: Unit) -> ProtoUnit {
    match unit {
        Unit::Second => ProtoUnit::Second,
        Unit::Minute => ProtoUnit::Minute,
        Unit::Hour => ProtoUnit::Hour,
        Unit::Day => ProtoUnit::Day,
        Unit::Week => ProtoUnit::Week,
        Unit::Month => ProtoUnit::Month,
        Unit::Year => ProtoUnit::Year,
    }
}

fn duration_to_proto(d: Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
