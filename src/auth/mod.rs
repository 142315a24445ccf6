//! Who is calling: every call presents an API key (`authorization: Bearer
//! <key>`, or Dapr's `dapr-api-token: <key>`), checked here, before any
//! handler runs, against the keys file in force. An admitted call carries its
//! [`Caller`] (tenant and limits) in its extensions; handlers take the tenant
//! from there and nowhere else.

pub mod keyring;

use std::{
    path::PathBuf,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{Either, Ready, ready};
use tokio::sync::watch;
use tower::{Layer, Service};

use crate::api::{Caller, Limits};
pub use keyring::{KeyRing, Refusal};

/// Services that answer without a key unless configured otherwise: what an
/// orchestrator's probe and grpcurl's discovery need, and nothing private.
const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION: [&str; 2] = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

/// Loads the keys file (an error stops start-up) and keeps it current: on
/// SIGHUP and when it changes (checked every `poll`). A file that fails to
/// parse keeps the keys in force.
pub fn watch_keys(path: PathBuf, poll: Duration, limits: Limits) -> Result<watch::Receiver<Arc<KeyRing>>, String> {
    let shown = path.display().to_string();
    let at = shown.clone();
    crate::reload::watch(
        "API keys file",
        poll,
        move || std::fs::read_to_string(&path).map_err(|err| format!("{}: {err}", path.display())),
        move |text: &String| KeyRing::parse(text, &limits).map_err(|err| format!("{at}: {err}")),
        move |ring: &KeyRing| {
            if ring.is_empty() {
                tracing::warn!(file = %shown, "API keys file loaded with no keys: every call is refused");
            } else {
                tracing::info!(file = %shown, keys = ring.len(), "API keys loaded");
            }
        },
    )
}

/// Requires a key in force for every call but those to open services; or,
/// [`AuthLayer::off`], admits everyone.
#[derive(Clone)]
pub struct AuthLayer {
    state: Option<Arc<State>>,
}

struct State {
    keys: watch::Receiver<Arc<KeyRing>>,
    /// Services that answer without a key.
    open: Vec<&'static str>,
}

impl AuthLayer {
    /// Checks calls against `keys`; health and reflection stay open unless
    /// `health_needs_key` / `reflection_needs_key`.
    pub fn new(keys: watch::Receiver<Arc<KeyRing>>, health_needs_key: bool, reflection_needs_key: bool) -> Self {
        let mut open = Vec::new();
        if !health_needs_key {
            open.push(HEALTH);
        }
        if !reflection_needs_key {
            open.extend(REFLECTION);
        }
        Self { state: Some(Arc::new(State { keys, open })) }
    }

    /// Admits every call, without a tenant (authentication off).
    pub fn off() -> Self {
        Self { state: None }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, state: self.state.clone() }
    }
}

/// A service that only admits callers with a key in force.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    state: Option<Arc<State>>,
}

type Answer<E> = Result<http::Response<tonic::body::Body>, E>;

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Answer<S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let Some(state) = &self.state else {
            return Either::Right(self.inner.call(request));
        };
        match state.admit(&request) {
            Ok(Some(caller)) => {
                tracing::Span::current().record("key", caller.key_id.as_str());
                request.extensions_mut().insert(caller);
            }
            Ok(None) => {}
            Err(status) => return Either::Left(ready(Ok(status.into_http()))),
        }
        Either::Right(self.inner.call(request))
    }
}

impl State {
    /// The caller of `request`, `None` for an open service, or the refusal.
    fn admit<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, tonic::Status> {
        let path = request.uri().path();
        let service = path.trim_start_matches('/').split('/').next().unwrap_or_default();
        if self.open.contains(&service) {
            return Ok(None);
        }
        let presented = presented_key(request.headers()).unwrap_or_default();
        match self.keys.borrow().admit(presented, path) {
            Ok(caller) => Ok(Some(caller.clone())),
            Err(Refusal::Unauthenticated) => Err(tonic::Status::unauthenticated(
                "a valid API key is required: send it as 'authorization: Bearer <key>'",
            )),
            Err(Refusal::Denied) => Err(tonic::Status::permission_denied(format!(
                "this API key may not call {}",
                path.trim_start_matches('/')
            ))),
        }
    }
}

/// The key a call presents: `authorization: Bearer <key>` (the scheme in
/// any case), else `dapr-api-token: <key>`.
fn presented_key(headers: &http::HeaderMap) -> Option<&str> {
    let bearer = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, key) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
    });
    bearer.or_else(|| headers.get("dapr-api-token").and_then(|v| v.to_str().ok()).map(str::trim))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (http::HeaderName::from_static(name), http::HeaderValue::from_static(value)))
            .collect()
    }

    #[test]
    fn the_key_comes_from_bearer_or_dapr_api_token() {
        assert_eq!(presented_key(&headers(&[("authorization", "Bearer cc.a.b")])), Some("cc.a.b"));
        assert_eq!(presented_key(&headers(&[("authorization", "bearer  cc.a.b ")])), Some("cc.a.b"));
        assert_eq!(presented_key(&headers(&[("dapr-api-token", "cc.a.b")])), Some("cc.a.b"));
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer cc.x.y"), ("dapr-api-token", "cc.a.b")])),
            Some("cc.x.y"),
            "authorization wins"
        );
        assert_eq!(presented_key(&headers(&[("authorization", "Basic dXNlcjpwYXNz")])), None);
        assert_eq!(presented_key(&headers(&[])), None);
    }
}
