//! `cachecoord.v1.StatsService`.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::Limits;
use crate::{
    calendar::{Calendar, Granularity, RangeError},
    error::Error,
    proto::{self, stats_service_server::StatsService},
    store::stats::StatsStore,
};

/// Stats RPC handlers.
pub struct StatsApi {
    store: StatsStore,
    limits: Limits,
    /// Lists the buckets a range covers (the store only reads them).
    calendar: Calendar,
    /// Most buckets or days one GetSeries or CountUnique may span.
    max_buckets: usize,
    /// Longest CountActive window.
    active_window_max: Duration,
}

impl StatsApi {
    /// Handlers over `store`.
    pub fn new(
        store: StatsStore,
        limits: Limits,
        calendar: Calendar,
        max_buckets: usize,
        active_window_max: Duration,
    ) -> Self {
        Self { store, limits, calendar, max_buckets, active_window_max }
    }

    /// The starts of the buckets of `g` overlapping `[start, end]`, checked.
    fn range(
        &self,
        g: Granularity,
        start: Option<prost_types::Timestamp>,
        end: Option<prost_types::Timestamp>,
        unit: &str,
    ) -> Result<Vec<i64>, Error> {
        let start = instant("start", start)?;
        let end = instant("end", end)?;
        if end < start {
            return Err(Error::invalid("end", "must not be before start"));
        }
        let out_of_range = |field: &str| Error::invalid(field, "must lie within years 0001..9999");
        self.calendar.bucket_start(g, start).map_err(|_| out_of_range("start"))?;
        self.calendar.buckets(g, start, end, self.max_buckets).map_err(|e| match e {
            RangeError::TooMany(max) => Error::invalid("end", format!("the range may cover at most {max} {unit}")),
            RangeError::OutOfRange => out_of_range("end"),
        })
    }

    /// A list of names, members or deltas: 1..=max_batch items.
    fn non_empty_batch(&self, limits: &Limits, field: &str, len: usize) -> Result<(), Error> {
        if len == 0 {
            return Err(Error::invalid(field, "must have at least 1 item"));
        }
        limits.batch(field, len)
    }
}

/// A required timestamp as Unix ms.
fn instant(field: &str, t: Option<prost_types::Timestamp>) -> Result<i64, Error> {
    let t = t.ok_or_else(|| Error::invalid(field, "is required"))?;
    let t = jiff::Timestamp::new(t.seconds, t.nanos)
        .map_err(|_| Error::invalid(field, "must be a valid timestamp within years 0001..9999"))?;
    Ok(t.as_millisecond())
}

fn granularity(value: i32) -> Result<Granularity, Error> {
    match proto::Granularity::try_from(value) {
        Ok(proto::Granularity::Minute) => Ok(Granularity::Minute),
        Ok(proto::Granularity::Hour) => Ok(Granularity::Hour),
        Ok(proto::Granularity::Day) => Ok(Granularity::Day),
        Ok(proto::Granularity::Unspecified) => Err(Error::invalid("granularity", "is required")),
        Err(_) => Err(Error::invalid("granularity", "unknown value")),
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

#[tonic::async_trait]
impl StatsService for StatsApi {
    async fn increment(
        &self,
        request: Request<proto::IncrementRequest>,
    ) -> Result<Response<proto::IncrementResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        self.non_empty_batch(&limits, "deltas", request.deltas.len())?;
        let deltas = request
            .deltas
            .iter()
            .enumerate()
            .map(|(i, delta)| {
                limits.key(|| format!("deltas[{i}].name"), &delta.name)?;
                Ok((delta.name.as_str(), delta.amount.unwrap_or(1)))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let values = self.store.increment(&space, &deltas).await?;
        Ok(Response::new(proto::IncrementResponse { values }))
    }

    async fn get_series(
        &self,
        request: Request<proto::GetSeriesRequest>,
    ) -> Result<Response<proto::GetSeriesResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "name".into(), &request.name)?;
        let g = granularity(request.granularity)?;
        let starts = self.range(g, request.start, request.end, "buckets")?;
        let values = self.store.series(&space, &request.name, g, &starts).await?;
        let total = values.iter().fold(0i64, |sum, v| sum.saturating_add(*v));
        let buckets =
            starts.iter().zip(values).map(|(start, value)| proto::Bucket { start: Some(timestamp(*start)), value });
        Ok(Response::new(proto::GetSeriesResponse { buckets: buckets.collect(), total }))
    }

    async fn get_totals(
        &self,
        request: Request<proto::GetTotalsRequest>,
    ) -> Result<Response<proto::GetTotalsResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        self.non_empty_batch(&limits, "names", request.names.len())?;
        limits.keys("names", &request.names)?;
        let values = self.store.totals(&space, &request.names).await?;
        Ok(Response::new(proto::GetTotalsResponse { values }))
    }

    async fn mark_active(
        &self,
        request: Request<proto::MarkActiveRequest>,
    ) -> Result<Response<proto::MarkActiveResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "group".into(), &request.group)?;
        limits.key(|| "member".into(), &request.member)?;
        self.store.mark_active(&space, &request.group, &request.member).await?;
        Ok(Response::new(proto::MarkActiveResponse {}))
    }

    async fn count_active(
        &self,
        request: Request<proto::CountActiveRequest>,
    ) -> Result<Response<proto::CountActiveResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "group".into(), &request.group)?;
        let window = request.window.ok_or_else(|| Error::invalid("window", "is required"))?;
        let window = Duration::try_from(window).map_err(|_| Error::invalid("window", "must be positive"))?;
        if window < Duration::from_millis(1) {
            return Err(Error::invalid("window", "must be at least 1ms").into());
        }
        if window > self.active_window_max {
            let max = humantime::format_duration(self.active_window_max);
            return Err(Error::invalid("window", format!("must be at most {max}")).into());
        }
        let count = self.store.count_active(&space, &request.group, window).await?;
        Ok(Response::new(proto::CountActiveResponse { count }))
    }

    async fn add_unique(
        &self,
        request: Request<proto::AddUniqueRequest>,
    ) -> Result<Response<proto::AddUniqueResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "name".into(), &request.name)?;
        self.non_empty_batch(&limits, "members", request.members.len())?;
        limits.keys("members", &request.members)?;
        let added = self.store.add_unique(&space, &request.name, &request.members).await?;
        Ok(Response::new(proto::AddUniqueResponse { added }))
    }

    async fn count_unique(
        &self,
        request: Request<proto::CountUniqueRequest>,
    ) -> Result<Response<proto::CountUniqueResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "name".into(), &request.name)?;
        let days = self.range(Granularity::Day, request.start, request.end, "days")?;
        let count = self.store.count_unique(&space, &request.name, &days).await?;
        Ok(Response::new(proto::CountUniqueResponse { count }))
    }
}
