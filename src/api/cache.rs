//! `cachecoord.v1.CacheService`.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::{Limits, lock::stopped, to_proto_duration, wait_budget};
use crate::{
    metrics::{FillResult, LookupRpc},
    proto::{self, cache_service_server::CacheService},
    store::{
        cache::{CacheStore, Condition, Entry, Fetched, Write},
        invalidation::{Seen, Watch},
    },
};

/// The messages of one WatchInvalidations stream.
type InvalidationStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::WatchInvalidationsResponse, Status>> + Send>>;

/// Cache RPC handlers.
pub struct CacheApi {
    /// Shared with the lease guards of in-flight Fetch calls.
    store: Arc<CacheStore>,
    limits: Limits,
    /// TTL of entries written without one.
    default_ttl: Duration,
    /// Lifetime of a fill lease when the Fetch gives none.
    default_fill_timeout: Duration,
    /// Turns true as shutdown begins: watch streams end, so that draining
    /// does not wait for them.
    stopping: watch::Receiver<bool>,
}

impl CacheApi {
    /// Handlers over `store`.
    pub fn new(store: CacheStore, limits: Limits, default_ttl: Duration, default_fill_timeout: Duration) -> Self {
        Self { store: Arc::new(store), limits, default_ttl, default_fill_timeout, stopping: watch::channel(false).1 }
    }

    /// Ends watch streams once `stopping` turns true.
    pub fn until_stopping(self, stopping: watch::Receiver<bool>) -> Self {
        Self { stopping, ..self }
    }

    /// Checks one entry to write; `field` prefixes the names (`items[2].`).
    fn write<'a>(
        &self,
        limits: &Limits,
        field: &str,
        key: &'a str,
        value: &'a [u8],
        ttl: Option<prost_types::Duration>,
        tags: &'a [String],
    ) -> Result<Write<'a>, Status> {
        limits.key(|| format!("{field}key"), key)?;
        limits.value(|| format!("{field}value"), value)?;
        let ttl = limits.ttl(|| format!("{field}ttl"), ttl, self.default_ttl)?;
        if !tags.is_empty() {
            // Named only when there is something to check: most writes have no tags.
            let tags_field = format!("{field}tags");
            limits.script_batch(&tags_field, tags.len(), limits.max_tags, "--cache-max-tags")?;
            limits.keys(&tags_field, tags)?;
        }
        Ok(Write { key, value, ttl, tags })
    }
}

fn entry_parts(entry: Entry) -> (bool, Vec<u8>, Option<prost_types::Duration>) {
    let ttl = entry.ttl.map(to_proto_duration);
    match entry.value {
        Some(value) => (true, value, ttl),
        None => (false, Vec::new(), None),
    }
}

/// One watch stream's state between messages.
struct Watching {
    watch: Watch,
    /// The caller's key prefixes; empty: every key.
    prefixes: Vec<String>,
    stopping: watch::Receiver<bool>,
}

impl Watching {
    /// The next message, or the error that ends the stream.
    async fn next(&mut self) -> Result<proto::WatchInvalidationsResponse, Status> {
        loop {
            let seen = tokio::select! {
                biased;
                () = stopped(self.stopping.clone()) => return Err(Status::unavailable("the service is shutting down")),
                seen = self.watch.next() => seen?,
            };
            match seen {
                Seen::All => return Ok(proto::WatchInvalidationsResponse { keys: Vec::new(), all: true }),
                Seen::Keys(mut keys) => {
                    if !self.prefixes.is_empty() {
                        keys.retain(|key| self.prefixes.iter().any(|prefix| key.starts_with(prefix.as_str())));
                    }
                    if !keys.is_empty() {
                        return Ok(proto::WatchInvalidationsResponse { keys, all: false });
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl CacheService for CacheApi {
    type WatchInvalidationsStream = InvalidationStream;

    async fn watch_invalidations(
        &self,
        request: Request<proto::WatchInvalidationsRequest>,
    ) -> Result<Response<InvalidationStream>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.keys("prefixes", &request.prefixes)?;
        let watching = Watching {
            watch: self.store.watch(&space).await?,
            prefixes: request.prefixes,
            stopping: self.stopping.clone(),
        };
        // The first message says the watch is in force; then one per batch,
        // until an error ends the stream. No task: tonic polls this stream
        // only when the watch has something to say.
        let first = futures::stream::once(async { Ok(proto::WatchInvalidationsResponse::default()) });
        let changes = futures::stream::unfold(Some(watching), |state| async move {
            let mut watching = state?;
            match watching.next().await {
                Ok(message) => Some((Ok(message), Some(watching))),
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Response::new(Box::pin(first.chain(changes))))
    }

    async fn get(&self, request: Request<proto::GetRequest>) -> Result<Response<proto::GetResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "key".into(), &request.key)?;
        let entry = self
            .store
            .get_many(&space, std::slice::from_ref(&request.key))
            .await?
            .pop()
            .unwrap_or(Entry { value: None, ttl: None });
        let (found, value, ttl) = entry_parts(entry);
        self.store.metrics().cache_lookups(LookupRpc::Get, u64::from(found), u64::from(!found));
        Ok(Response::new(proto::GetResponse { found, value, ttl }))
    }

    async fn get_many(
        &self,
        request: Request<proto::GetManyRequest>,
    ) -> Result<Response<proto::GetManyResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.keys("keys", &request.keys)?;
        let entries = self.store.get_many(&space, &request.keys).await?;
        let hits = entries.iter().filter(|entry| entry.value.is_some()).count() as u64;
        self.store.metrics().cache_lookups(LookupRpc::GetMany, hits, entries.len() as u64 - hits);
        let entries = request
            .keys
            .into_iter()
            .zip(entries)
            .map(|(key, entry)| {
                let (found, value, ttl) = entry_parts(entry);
                proto::CacheEntry { key, found, value, ttl }
            })
            .collect();
        Ok(Response::new(proto::GetManyResponse { entries }))
    }

    async fn set(&self, request: Request<proto::SetRequest>) -> Result<Response<proto::SetResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        let condition = match proto::SetCondition::try_from(request.condition) {
            Ok(proto::SetCondition::Unspecified) => Condition::Always,
            Ok(proto::SetCondition::IfAbsent) => Condition::IfAbsent,
            Ok(proto::SetCondition::IfPresent) => Condition::IfPresent,
            Err(_) => return Err(Status::invalid_argument("condition: unknown value")),
        };
        let write = self.write(&limits, "", &request.key, &request.value, request.ttl, &request.tags)?;
        let stored = self.store.set(&space, &write, condition).await?;
        Ok(Response::new(proto::SetResponse { stored }))
    }

    async fn set_many(
        &self,
        request: Request<proto::SetManyRequest>,
    ) -> Result<Response<proto::SetManyResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.batch("items", request.items.len())?;
        let writes = request
            .items
            .iter()
            .enumerate()
            .map(|(i, item)| self.write(&limits, &format!("items[{i}]."), &item.key, &item.value, item.ttl, &item.tags))
            .collect::<Result<Vec<_>, _>>()?;
        let stored = self.store.set_many(&space, &writes).await?;
        Ok(Response::new(proto::SetManyResponse { stored }))
    }

    async fn delete(&self, request: Request<proto::DeleteRequest>) -> Result<Response<proto::DeleteResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.keys("keys", &request.keys)?;
        let deleted = self.store.delete(&space, &request.keys).await?;
        Ok(Response::new(proto::DeleteResponse { deleted }))
    }

    async fn touch(&self, request: Request<proto::TouchRequest>) -> Result<Response<proto::TouchResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "key".into(), &request.key)?;
        let ttl = request.ttl.ok_or_else(|| Status::invalid_argument("ttl: is required"))?;
        let ttl = limits.span(|| "ttl".into(), ttl, false)?;
        let found = self.store.touch(&space, &request.key, ttl).await?;
        Ok(Response::new(proto::TouchResponse { found }))
    }

    async fn fetch(&self, request: Request<proto::FetchRequest>) -> Result<Response<proto::FetchResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let budget = |wanted| wait_budget(&request, wanted);
        let body = request.get_ref();
        limits.key(|| "key".into(), &body.key)?;
        let fill_timeout = limits.ttl(|| "fill_timeout".into(), body.fill_timeout, self.default_fill_timeout)?;
        let max_wait = match body.max_wait {
            None => self.default_fill_timeout,
            Some(wait) => limits.span(|| "max_wait".into(), wait, true)?,
        };
        let max_wait = budget(max_wait);
        let response = match self.store.fetch(&space, &body.key, fill_timeout, max_wait).await? {
            Fetched::Hit(entry) => {
                let (_, value, ttl) = entry_parts(entry);
                proto::FetchResponse { outcome: proto::FetchOutcome::Hit.into(), value, ttl, ..Default::default() }
            }
            Fetched::Fill(fill_token) => {
                proto::FetchResponse { outcome: proto::FetchOutcome::Fill.into(), fill_token, ..Default::default() }
            }
            Fetched::Timeout => {
                proto::FetchResponse { outcome: proto::FetchOutcome::Timeout.into(), ..Default::default() }
            }
        };
        Ok(Response::new(response))
    }

    async fn fill(&self, request: Request<proto::FillRequest>) -> Result<Response<proto::FillResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        let write = self.write(&limits, "", &request.key, &request.value, request.ttl, &request.tags)?;
        limits.key(|| "fill_token".into(), &request.fill_token)?;
        let stored = self.store.fill(&space, &write, &request.fill_token).await?;
        self.store.metrics().cache_fill(if stored { FillResult::Stored } else { FillResult::Lost });
        Ok(Response::new(proto::FillResponse { stored }))
    }

    async fn abandon_fill(
        &self,
        request: Request<proto::AbandonFillRequest>,
    ) -> Result<Response<proto::AbandonFillResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "key".into(), &request.key)?;
        limits.key(|| "fill_token".into(), &request.fill_token)?;
        let released = self.store.abandon_fill(&space, &request.key, &request.fill_token).await?;
        if released {
            self.store.metrics().cache_fill(FillResult::Abandoned);
        }
        Ok(Response::new(proto::AbandonFillResponse { released }))
    }

    async fn invalidate_tags(
        &self,
        request: Request<proto::InvalidateTagsRequest>,
    ) -> Result<Response<proto::InvalidateTagsResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.keys("tags", &request.tags)?;
        let invalidated = self.store.invalidate_tags(&space, &request.tags).await?;
        self.store.metrics().cache_invalidated(u64::from(invalidated));
        Ok(Response::new(proto::InvalidateTagsResponse { invalidated }))
    }
}
