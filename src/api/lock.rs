//! `cachecoord.v1.LockService`.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Limits, to_proto_duration, wait_budget};
use crate::{
    keys::Keys,
    proto::{self, HoldEvent, lock_service_server::LockService},
    store::lock::{Grant, LockStore, valid_for},
};

/// The shortest lease: Redis expiries have millisecond precision.
const MIN_TTL: Duration = Duration::from_millis(1);

/// Events a Hold stream may buffer for a client that does not read; one more
/// slot is always kept free for the final message.
const HOLD_BUFFER: usize = 4;

/// The events of one Hold stream.
type HoldStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::HoldResponse, Status>> + Send>>;

/// Lock RPC handlers.
pub struct LockApi {
    /// Shared with the Hold tasks.
    store: Arc<LockStore>,
    /// Request limits.
    limits: Limits,
    /// Lease of a lock acquired or extended without a TTL.
    default_ttl: Duration,
    /// Turns true as shutdown begins: waits give up and Hold streams release,
    /// so that draining does not wait for them.
    stopping: watch::Receiver<bool>,
}

/// A validated Acquire or Hold request.
struct Want<'a> {
    /// The caller's key space.
    space: Keys,
    /// The lock's name.
    name: &'a str,
    /// The holder's label.
    owner: &'a str,
    /// The lease's length, 1 ms ..= max TTL.
    ttl: Duration,
    /// Zero: try once.
    wait: Duration,
}

impl LockApi {
    /// Handlers over `store`.
    pub fn new(store: LockStore, limits: Limits, default_ttl: Duration) -> Self {
        Self { store: Arc::new(store), limits, default_ttl, stopping: watch::channel(false).1 }
    }

    /// Ends waits and Hold streams once `stopping` turns true.
    pub fn until_stopping(self, stopping: watch::Receiver<bool>) -> Self {
        Self { stopping, ..self }
    }

    fn name(&self, limits: &Limits, name: &str) -> Result<(), Status> {
        Ok(limits.key(|| "name".into(), name)?)
    }

    fn lease_id(&self, limits: &Limits, lease_id: &str) -> Result<(), Status> {
        Ok(limits.key(|| "lease_id".into(), lease_id)?)
    }

    /// A lease length: absent → the default; else 1 ms ..= max TTL.
    fn ttl(&self, limits: &Limits, ttl: Option<prost_types::Duration>) -> Result<Duration, Status> {
        let ttl = limits.ttl(|| "ttl".into(), ttl, self.default_ttl)?;
        if ttl < MIN_TTL {
            return Err(Status::invalid_argument("ttl: must be at least 1ms"));
        }
        Ok(ttl)
    }

    fn want<'a>(
        &self,
        scope: super::Scope,
        name: &'a str,
        owner: &'a str,
        ttl: Option<prost_types::Duration>,
        wait: Option<prost_types::Duration>,
    ) -> Result<Want<'a>, Status> {
        let super::Scope { space, limits } = scope;
        self.name(&limits, name)?;
        if owner.len() > limits.max_key_bytes {
            return Err(Status::invalid_argument(format!("owner: must be at most {} bytes", limits.max_key_bytes)));
        }
        let ttl = self.ttl(&limits, ttl)?;
        let wait = match wait {
            None => Duration::ZERO,
            Some(wait) => limits.span(|| "wait".into(), wait, true)?,
        };
        Ok(Want { space, name, owner, ttl, wait })
    }

    /// Acquires as asked, waiting at most `wait` from `arrived`; a wait
    /// ends unsuccessfully when shutdown begins.
    async fn acquire_wanted(&self, want: &Want<'_>, arrived: Instant) -> Result<Option<Grant>, Status> {
        let deadline = (!want.wait.is_zero()).then(|| arrived + want.wait);
        tokio::select! {
            // Shutdown first: a wait must not take a lock that a Hold stream
            // let go of because of that same shutdown.
            biased;
            // Dropping the acquire lets go of anything it was taking.
            () = stopped(self.stopping.clone()) => Ok(None),
            grant = self.store.acquire(&want.space, want.name, want.owner, want.ttl, deadline) => Ok(grant?),
        }
    }
}

#[tonic::async_trait]
impl LockService for LockApi {
    type HoldStream = HoldStream;

    async fn acquire(
        &self,
        request: Request<proto::AcquireRequest>,
    ) -> Result<Response<proto::AcquireResponse>, Status> {
        let arrived = Instant::now();
        let body = request.get_ref();
        let mut want = self.want(
            super::scope(self.store.keys(), &self.limits, &request),
            &body.name,
            &body.owner,
            body.ttl,
            body.wait,
        )?;
        want.wait = wait_budget(&request, want.wait);
        let response = match self.acquire_wanted(&want, arrived).await? {
            Some(grant) => proto::AcquireResponse {
                acquired: true,
                valid_for: Some(to_proto_duration(valid_for(grant.lease_floor, arrived))),
                lease_id: grant.lease_id,
                fencing_token: grant.fencing_token,
            },
            None => proto::AcquireResponse::default(),
        };
        Ok(Response::new(response))
    }

    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        self.name(&limits, &request.name)?;
        self.lease_id(&limits, &request.lease_id)?;
        let released = self.store.release(&space, &request.name, &request.lease_id).await?;
        Ok(Response::new(proto::ReleaseResponse { released }))
    }

    async fn extend(&self, request: Request<proto::ExtendRequest>) -> Result<Response<proto::ExtendResponse>, Status> {
        let arrived = Instant::now();
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        self.name(&limits, &request.name)?;
        self.lease_id(&limits, &request.lease_id)?;
        let ttl = self.ttl(&limits, request.ttl)?;
        let response = match self.store.extend(&space, &request.name, &request.lease_id, ttl).await? {
            Some(floor) => {
                proto::ExtendResponse { extended: true, valid_for: Some(to_proto_duration(valid_for(floor, arrived))) }
            }
            None => proto::ExtendResponse::default(),
        };
        Ok(Response::new(response))
    }

    async fn inspect(
        &self,
        request: Request<proto::InspectRequest>,
    ) -> Result<Response<proto::InspectResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        self.name(&limits, &request.name)?;
        let response = match self.store.inspect(&space, &request.name).await? {
            Some(holder) => proto::InspectResponse {
                held: true,
                owner: holder.owner,
                fencing_token: holder.fencing_token,
                ttl_remaining: holder.ttl_remaining.map(to_proto_duration),
            },
            None => proto::InspectResponse::default(),
        };
        Ok(Response::new(response))
    }

    async fn hold(&self, request: Request<Streaming<proto::HoldRequest>>) -> Result<Response<HoldStream>, Status> {
        // The call's deadline bounds the wait, counted from the call's start.
        let opened = Instant::now();
        let scope = super::scope(self.store.keys(), &self.limits, &request);
        let longest_wait = wait_budget(&request, scope.limits.max_ttl);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("request: the stream must start with a HoldRequest"))?;
        let arrived = Instant::now();
        let mut want = self.want(scope, &first.name, &first.owner, first.ttl, first.wait)?;
        want.wait = want.wait.min((opened + longest_wait).saturating_duration_since(arrived));

        // Acquire (and wait) before answering: a caller that gives up drops
        // this future, and the store then lets go of anything it took.
        let grant = self.acquire_wanted(&want, arrived).await?;
        let (tx, rx) = mpsc::channel(HOLD_BUFFER + 1);
        let Some(grant) = grant else {
            let _ = tx.try_send(Ok(proto::HoldResponse { event: HoldEvent::NotAcquired.into(), ..Default::default() }));
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        };
        // The buffer is empty, so this first event always fits.
        let _ = tx.try_send(Ok(proto::HoldResponse {
            event: HoldEvent::Acquired.into(),
            acquired: true,
            lease_id: grant.lease_id.clone(),
            fencing_token: grant.fencing_token,
            valid_for: Some(to_proto_duration(valid_for(grant.lease_floor, arrived))),
        }));
        let holding = Holding {
            store: Arc::clone(&self.store),
            space: want.space.clone(),
            name: want.name.to_string(),
            ttl: want.ttl,
            grant,
            tx,
            stopping: self.stopping.clone(),
        };
        tokio::spawn(holding.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A lease kept by an open Hold stream.
struct Holding {
    /// Where to renew and release.
    store: Arc<LockStore>,
    /// The holder's key space.
    space: Keys,
    /// The lock's name.
    name: String,
    /// The lease length each renewal sets.
    ttl: Duration,
    /// The lease held: its id and token stay the same for the whole stream.
    grant: Grant,
    /// The stream to the client; ends when this is dropped.
    tx: mpsc::Sender<Result<proto::HoldResponse, Status>>,
    /// Shutdown: release and end the stream.
    stopping: watch::Receiver<bool>,
}

impl Holding {
    /// Renews every ttl/3 until the client closes or breaks the stream (then
    /// releases) or the lease is lost (then says so). Lives no longer than
    /// the stream, plus one bounded release call.
    async fn run(self, mut inbound: Streaming<proto::HoldRequest>) {
        let interval = self.ttl / 3;
        let mut next_renewal = Instant::now() + interval;
        let mut lease_floor = self.grant.lease_floor;
        let ending = loop {
            tokio::select! {
                message = inbound.message() => break match message {
                    // The client closed its side: it is done with the lock.
                    Ok(None) => None,
                    Ok(Some(_)) => Some(Err(Status::invalid_argument(
                        "request: a Hold stream takes exactly one HoldRequest",
                    ))),
                    // Cancelled, disconnected or past its deadline.
                    Err(_) => None,
                },
                () = self.tx.closed() => break None,
                () = stopped(self.stopping.clone()) => {
                    break Some(Err(Status::unavailable("the service is shutting down; the lock was released")));
                }
                () = tokio::time::sleep_until(next_renewal) => {
                    match self.store.extend(&self.space, &self.name, &self.grant.lease_id, self.ttl).await {
                        Ok(Some(floor)) => {
                            lease_floor = floor;
                            self.store.metrics().lock_hold(crate::metrics::HoldEvent::Renewed);
                            next_renewal = Instant::now() + interval;
                            let validity = valid_for(floor, Instant::now());
                            self.event(HoldEvent::Renewed, Some(validity));
                        }
                        Ok(None) => return self.lost(),
                        Err(err) => {
                            let left = valid_for(lease_floor, Instant::now());
                            if left.is_zero() {
                                tracing::warn!(%err, name = %self.name, "hold: no renewal before the lease ran out");
                                return self.lost();
                            }
                            // Try again soon, and once more before the lease ends.
                            next_renewal = Instant::now() + left.min(interval).min(Duration::from_millis(100));
                        }
                    }
                }
            }
        };
        match self.store.release(&self.space, &self.name, &self.grant.lease_id).await {
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, name = %self.name, "hold: release failed; the lease ends with its TTL"),
        }
        if let Some(last) = ending {
            let _ = self.tx.try_send(last);
        }
    }

    /// Tells the client the lease is gone; the stream then ends with OK.
    fn lost(self) {
        self.store.metrics().lock_hold(crate::metrics::HoldEvent::Lost);
        let _ = self.tx.try_send(Ok(proto::HoldResponse {
            event: HoldEvent::Lost.into(),
            acquired: false,
            lease_id: self.grant.lease_id.clone(),
            fencing_token: self.grant.fencing_token,
            valid_for: None,
        }));
    }

    /// Sends an informational event, unless the client lags so far behind
    /// that only the slot for the final message is left.
    fn event(&self, event: HoldEvent, validity: Option<Duration>) {
        if self.tx.capacity() > 1 {
            let _ = self.tx.try_send(Ok(proto::HoldResponse {
                event: event.into(),
                acquired: true,
                lease_id: self.grant.lease_id.clone(),
                fencing_token: self.grant.fencing_token,
                valid_for: validity.map(to_proto_duration),
            }));
        }
    }
}

/// Resolves once shutdown has begun; never, if nobody will signal it.
pub(super) async fn stopped(mut stopping: watch::Receiver<bool>) {
    if stopping.wait_for(|stopping| *stopping).await.is_err() {
        std::future::pending::<()>().await;
    }
}
