//! Answers `DEADLINE_EXCEEDED` when the caller's deadline passes.
//!
//! tonic enforces `grpc-timeout` itself but answers `CANCELLED`; SPEC §1
//! promises `DEADLINE_EXCEEDED`. This layer runs the call under the same
//! deadline, a millisecond sooner, so its answer is the one that goes out.
//! Dropping the call's future is what cancels its work; the stores are
//! cancel-safe (see the Fetch and Lock guards).

use std::{
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{Either, FutureExt, Map};
use tokio::time::{Timeout, error::Elapsed};
use tower::{Layer, Service};

use crate::api::parse_grpc_timeout;

/// Wraps every service in [`Deadline`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// A service whose calls end with `DEADLINE_EXCEEDED` at the caller's deadline.
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
}

/// How much sooner than tonic's own timer this one fires.
const MARGIN: Duration = Duration::from_millis(2);

type Answer<E> = Result<http::Response<tonic::body::Body>, E>;

/// The call, under a timer when it has a deadline; no allocation per call.
type DeadlineFuture<F, E> = Either<Map<Timeout<F>, fn(Result<Answer<E>, Elapsed>) -> Answer<E>>, F>;

impl<S, B> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Counted from now, as tonic counts its own timer, and a little
        // sooner, so this answer is the one that goes out.
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|d| tokio::time::Instant::now() + d.saturating_sub(MARGIN));
        let call = self.inner.call(request);
        match deadline {
            None => Either::Right(call),
            Some(deadline) => Either::Left(tokio::time::timeout_at(deadline, call).map(passed_deadline::<S::Error>)),
        }
    }
}

/// The call's own answer, or `DEADLINE_EXCEEDED` once the deadline passed.
fn passed_deadline<E>(outcome: Result<Answer<E>, Elapsed>) -> Answer<E> {
    outcome.unwrap_or_else(|_| Ok(tonic::Status::deadline_exceeded("the caller's deadline passed").into_http()))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// A service that never answers.
    #[derive(Clone)]
    struct Never;

    impl Service<http::Request<()>> for Never {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::future::Pending<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::pending()
        }
    }

    fn grpc_status(response: &http::Response<tonic::body::Body>) -> Option<&str> {
        response.headers().get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_deadline_is_deadline_exceeded() {
        let request = http::Request::builder().header("grpc-timeout", "250m").body(()).unwrap();
        let started = tokio::time::Instant::now();
        let response = DeadlineLayer.layer(Never).call(request).await.unwrap();
        assert_eq!(grpc_status(&response), Some("4"), "DEADLINE_EXCEEDED");
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(250) && waited >= Duration::from_millis(240), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_the_call_is_left_alone() {
        let request = http::Request::builder().body(()).unwrap();
        let call = DeadlineLayer.layer(Never).call(request);
        assert!(tokio::time::timeout(Duration::from_secs(3600), call).await.is_err(), "still running an hour later");
    }
}
