"""FastAPI / Starlette integration: rate limits, server-side sessions, token revocation.

Install with ``pip install 'cachecoord-client[fastapi]'``; the rest of the package does not
need FastAPI. Every piece takes the ``AsyncClient`` from ``client=`` (a client, or a function
answering one), or else from ``app.state.cachecoord``, which the app's lifespan sets, because
a grpc.aio channel belongs to the event loop that serves the app::

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with AsyncClient("cachecoord:50051", timeout=0.5) as client:
            app.state.cachecoord = client
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(SessionMiddleware, ttl=timedelta(hours=24))

    @app.get("/api/items", dependencies=[Depends(RateLimit(Rate(100, 60), key=client_ip))])
    async def items(): ...

- ``RateLimit``: a dependency that checks every ``Rate`` in one atomic Check, answers 429 with
  ``Retry-After`` when denied, and sets the ``RateLimit-*`` fields of the IETF httpapi draft
  (``-06``: Limit, Remaining, Reset, Policy) on both answers.
- ``SessionMiddleware`` + ``current_session``: ``request.session`` is a ``ServerSession``
  loaded from a cookie (sliding its idle timeout in the same round trip), saved with a merge
  of only the fields the request changed, with its id rotated by ``await session.login()``.
- ``RevocationCheck``: a dependency answering 401 when the access token or the refresh token
  is revoked, both checked in one CheckTokens.

(No ``from __future__ import annotations`` here: FastAPI reads the dependencies' parameter
annotations at run time.)
"""

import http.cookies
import inspect
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Iterator,
    List,
    MutableMapping,
    Optional,
    Set,
    Union,
)

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import _convert as cv
from .client import AsyncClient
from .errors import DeadlineExceeded, Unavailable
from .rate_limit import Limit, RateLimitResult
from .sessions import Session

#: Where a helper gets its client: an AsyncClient, a function answering one, or None for
#: ``app.state.cachecoord``.
ClientSource = Union[AsyncClient, Callable[[], AsyncClient], None]
#: A function of the request answering a string (or None), plain or awaitable.
Extractor = Callable[[Request], Union[Optional[str], Awaitable[Optional[str]]]]

#: The errors after which the service's answer is unknown: the caller chooses fail open or
#: closed. Everything else (InvalidArgument, ...) is a bug and propagates.
_OUTAGES = (Unavailable, DeadlineExceeded)


def _resolve(source: ClientSource, app: Any) -> AsyncClient:
    if isinstance(source, AsyncClient):
        return source
    if source is not None:
        return source()
    client = getattr(getattr(app, "state", None), "cachecoord", None)
    if not isinstance(client, AsyncClient):
        raise RuntimeError(
            "no cachecoord client: set app.state.cachecoord = AsyncClient(...) in the app's lifespan, "
            "or pass client="
        )
    return client


async def _extract(extractor: Extractor, request: Request) -> Optional[str]:
    value = extractor(request)
    if inspect.isawaitable(value):
        value = await value
    return value


def _unavailable() -> HTTPException:
    return HTTPException(503, "Service Unavailable", headers={"Retry-After": "1"})


# --- extractors --------------------------------------------------------------------------


def client_ip(request: Request) -> Optional[str]:
    """The peer's address (behind a proxy, run uvicorn with ``--proxy-headers``)."""
    return request.client.host if request.client else None


def header(name: str) -> Extractor:
    """An extractor answering a request header, e.g. ``header("x-api-key")``."""

    def extract(request: Request) -> Optional[str]:
        return request.headers.get(name)

    return extract


def cookie(name: str) -> Extractor:
    """An extractor answering a cookie, e.g. ``cookie("refresh_token")``."""

    def extract(request: Request) -> Optional[str]:
        return request.cookies.get(name)

    return extract


def bearer_token(request: Request) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# --- rate limits --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """``limit`` units per ``period`` (seconds or a timedelta) for each caller."""

    #: Units allowed per period.
    limit: int
    #: The period; whole milliseconds.
    period: cv.Seconds
    #: "sliding_window" (default), "fixed_window" or "token_bucket".
    algorithm: str = "sliding_window"
    #: Token bucket capacity; None means ``limit``.
    burst: Optional[int] = None

    @property
    def capacity(self) -> int:
        """Units that may pass at once: ``burst`` for a token bucket, else ``limit``."""
        return self.burst if self.burst is not None else self.limit

    @property
    def period_ms(self) -> int:
        """The period in whole milliseconds."""
        return int(cv.to_timedelta(self.period) / timedelta(milliseconds=1))


def _seconds_up(delta: timedelta) -> int:
    return math.ceil(delta / timedelta(milliseconds=1) / 1000)


class RateLimit:
    """``Depends(RateLimit(Rate(100, 60), Rate(5000, 86400), key=client_ip))``.

    Each request is checked against every rate at once (all-or-nothing, one Redis script):
    allowed, it goes on, and the dependency answers the ``RateLimitResult``; denied, it gets
    429 with ``Retry-After`` (whole seconds, rounded up). Both answers carry
    ``RateLimit-Limit``, ``-Remaining`` and ``-Reset`` of the rate closest to its limit and
    ``RateLimit-Policy`` listing every rate (draft-ietf-httpapi-ratelimit-headers-06).
    (FastAPI adds them to the answer unless the route returns a Response of its own.)

    ``key`` names the caller: ``client_ip``, ``header("x-api-key")`` or any function of the
    request, plain or async; when it answers None the request is not limited here.
    ``scope`` separates the counters of different uses (default: the route's path template,
    so each route counts apart). The limit keys are ``{caller}:scope:period_ms``: one hash
    tag per caller, so a request's limits share a Redis Cluster slot.

    When the service cannot answer (Unavailable, DeadlineExceeded), ``fail_open=False``
    (default) answers 503; ``fail_open=True`` lets the request through and answers None.
    """

    def __init__(
        self,
        *rates: Rate,
        key: Extractor = client_ip,
        scope: Optional[str] = None,
        cost: int = 1,
        client: ClientSource = None,
        fail_open: bool = False,
        timeout: Optional[float] = None,
    ) -> None:
        if not rates:
            raise ValueError("give at least one Rate")
        self.rates = rates
        self.key = key
        self.scope = scope
        self.cost = cost
        self.client = client
        self.fail_open = fail_open
        self.timeout = timeout
        self._policy = ", ".join(f"{r.capacity};w={math.ceil(r.period_ms / 1000)}" for r in rates)

    def _scope(self, request: Request) -> str:
        if self.scope is not None:
            return self.scope
        route = request.scope.get("route")
        return str(getattr(route, "path", request.url.path))

    def limits(self, caller: str, scope: str) -> List[Limit]:
        """The limits checked for one caller in one scope."""
        return [
            Limit(f"{{{caller}}}:{scope}:{r.period_ms}", r.limit, r.period, r.algorithm, r.burst) for r in self.rates
        ]

    def headers(self, result: RateLimitResult) -> Dict[str, str]:
        """The RateLimit-* fields for a checked result."""
        pairs = list(zip(self.rates, result.statuses))
        if result.allowed:
            rate, status = min(pairs, key=lambda p: p[1].remaining)
        else:
            rate, status = max((p for p in pairs if not p[1].allowed), key=lambda p: p[1].retry_after)
        return {
            "RateLimit-Limit": str(rate.capacity),
            "RateLimit-Remaining": str(status.remaining),
            "RateLimit-Reset": str(_seconds_up(status.reset_after)),
            "RateLimit-Policy": self._policy,
        }

    async def __call__(self, request: Request, response: Response) -> Optional[RateLimitResult]:
        caller = await _extract(self.key, request)
        if caller is None:
            return None
        client = _resolve(self.client, request.app)
        try:
            result = await client.rate_limit.check_all(
                self.limits(caller, self._scope(request)), cost=self.cost, timeout=self.timeout
            )
        except _OUTAGES:
            if self.fail_open:
                return None
            raise _unavailable() from None
        if result.unchecked:  # the service failed open: no counts to report
            return result
        headers = self.headers(result)
        if not result.allowed:
            headers["Retry-After"] = str(result.retry_after_seconds)
            raise HTTPException(429, "Too Many Requests", headers=headers)
        response.headers.update(headers)
        return result


# --- token revocation ---------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """The tokens a ``RevocationCheck`` found unrevoked."""

    #: The access token.
    access: str
    #: The refresh token, when the request carried one and a refresh extractor was given.
    refresh: Optional[str] = None


class RevocationCheck:
    """``Depends(RevocationCheck(refresh=cookie("refresh_token")))``: 401 when revoked.

    Reads the access token (default: ``Authorization: Bearer``) and, when ``refresh`` is
    given, the refresh token, and checks both in one CheckTokens round trip. Answers 401
    with ``WWW-Authenticate: Bearer error="invalid_token"`` when either is revoked, or when
    there is no access token; otherwise the ``Tokens``. Extractors may answer the token or
    any string it was revoked under (a JWT's ``jti``), plain or async. Verifying the token's
    signature and expiry stays the app's job; this only consults the denylist.
    When the service cannot answer, it answers 503 (``fail_open=True``: lets it through).
    """

    def __init__(
        self,
        *,
        access: Extractor = bearer_token,
        refresh: Optional[Extractor] = None,
        client: ClientSource = None,
        fail_open: bool = False,
        timeout: Optional[float] = None,
    ) -> None:
        self.access = access
        self.refresh = refresh
        self.client = client
        self.fail_open = fail_open
        self.timeout = timeout

    async def __call__(self, request: Request) -> Tokens:
        access = await _extract(self.access, request)
        if not access:
            raise _unauthorized("missing token")
        refresh = await _extract(self.refresh, request) if self.refresh else None
        tokens = [access, refresh] if refresh else [access]
        try:
            revoked = await _resolve(self.client, request.app).sessions.check_tokens(tokens, timeout=self.timeout)
        except _OUTAGES:
            if self.fail_open:
                return Tokens(access, refresh)
            raise _unavailable() from None
        if any(revoked):
            raise _unauthorized("token revoked")
        return Tokens(access, refresh)


def _unauthorized(why: str) -> HTTPException:
    return HTTPException(
        401, "Unauthorized", headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{why}"'}
    )


# --- sessions -----------------------------------------------------------------------------


class ServerSession(MutableMapping[str, Any]):
    """``request.session`` under ``SessionMiddleware``: the session's data as a dict, plus
    ``login``/``logout``.

    Fields set or deleted are saved when the response starts: set fields with a merge (a
    concurrent request's other fields survive), and if any field was deleted, the whole
    object (the service's merge cannot remove fields, so there a concurrent merge can be
    lost; set a field to None instead to keep merges). A change inside a value
    (``session["cart"].append(x)``) is not seen: call ``mark_changed("cart")``.
    Without a session (no cookie, or an expired one) the data is empty and writing raises
    RuntimeError: ``await session.login(user_id)`` starts one.
    """

    def __init__(self, client: AsyncClient, ttl: Optional[cv.Seconds], timeout: Optional[float]) -> None:
        self._client = client
        self._ttl = ttl
        self._timeout = timeout
        self._data: Dict[str, Any] = {}
        self._changed: Set[str] = set()
        self._replace = False
        #: The live session, or None.
        self.current: Optional[Session] = None

    @property
    def session_id(self) -> Optional[str]:
        """The session's id (the cookie's value), or None without a session."""
        return self.current.session_id if self.current else None

    @property
    def user_id(self) -> Optional[str]:
        """The logged-in user, or None without a session."""
        return self.current.user_id if self.current else None

    def _load(self, session: Optional[Session]) -> None:
        self.current = session
        self._data = dict(session.data) if session else {}
        self._changed.clear()
        self._replace = False

    def _writable(self) -> None:
        if self.current is None:
            raise RuntimeError("no session to write to: call `await request.session.login(user_id)` first")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._writable()
        self._data[key] = value
        self._changed.add(key)

    def __delitem__(self, key: str) -> None:
        self._writable()
        del self._data[key]
        self._changed.discard(key)
        self._replace = True

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def mark_changed(self, key: str) -> None:
        """Saves ``key`` although only its value's insides changed."""
        self._writable()
        if key in self._data:
            self._changed.add(key)

    async def login(self, user_id: str, data: Optional[Dict[str, Any]] = None) -> Session:
        """Starts a session for user_id under a new id (the old one is deleted, so an id
        known before login is worthless after it: no session fixation). Keeps the data
        when the same user logs in again, drops it for another user; ``data`` is merged in."""
        keep = self._data if self.current is not None and self.current.user_id == user_id else {}
        new = await self._client.sessions.create(user_id, {**keep, **(data or {})}, self._ttl, timeout=self._timeout)
        if self.current is not None:
            await self._client.sessions.delete(self.current.session_id, timeout=self._timeout)
        self._load(new)
        return new

    async def logout(self) -> None:
        """Deletes the session; the response clears the cookie."""
        if self.current is not None:
            await self._client.sessions.delete(self.current.session_id, timeout=self._timeout)
        self._load(None)

    async def save(self) -> None:
        """Writes the request's changes (the middleware calls this as the response starts)."""
        if self.current is None or not (self._replace or self._changed):
            return
        if self._replace:
            data, merge = self._data, False
        else:
            data, merge = {k: self._data[k] for k in self._changed}, True
        saved = await self._client.sessions.update(self.current.session_id, data, merge=merge, timeout=self._timeout)
        self._load(saved)  # None when it expired meanwhile: the cookie is cleared


def current_session(request: Request) -> ServerSession:
    """Dependency: ``session: ServerSession = Depends(current_session)``."""
    session = request.scope.get("session")
    if not isinstance(session, ServerSession):
        raise RuntimeError("current_session needs SessionMiddleware")
    return session


class SessionMiddleware:
    """ASGI middleware: ``app.add_middleware(SessionMiddleware, ttl=timedelta(hours=24))``.

    Reads the session id from the cookie ``cookie_name`` and loads the session with
    GetSession(touch=True), which slides its idle timeout in the same round trip; sets
    ``request.session`` (``scope["session"]``) to a ``ServerSession``; saves the changes
    as the response starts and sends the cookie again with the new expiry (Max-Age), or
    clears it when the session is gone. ``ttl`` is the idle timeout of sessions started by
    ``login`` (None: the service's default). The cookie is HttpOnly, SameSite=Lax and
    Secure by default (``secure=False`` for plain-HTTP development).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: ClientSource = None,
        ttl: Optional[cv.Seconds] = None,
        cookie_name: str = "session",
        path: str = "/",
        domain: Optional[str] = None,
        secure: bool = True,
        samesite: str = "lax",
        timeout: Optional[float] = None,
    ) -> None:
        self.app = app
        self.client = client
        self.ttl = ttl
        self.cookie_name = cookie_name
        self.path = path
        self.domain = domain
        self.secure = secure
        self.samesite = samesite
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        session = ServerSession(_resolve(self.client, scope.get("app")), self.ttl, self.timeout)
        sent_id = HTTPConnection(scope).cookies.get(self.cookie_name)
        if sent_id:
            session._load(await session._client.sessions.get(sent_id, touch=True, timeout=self.timeout))
        scope["session"] = session

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                await session.save()
                cookie = self._cookie(session.current, had_cookie=bool(sent_id))
                if cookie is not None:
                    MutableHeaders(scope=message).append("set-cookie", cookie)
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _cookie(self, session: Optional[Session], had_cookie: bool) -> Optional[str]:
        if session is None:
            return self._format("", 0) if had_cookie else None
        left = (session.expires_at - datetime.now(timezone.utc)).total_seconds()
        return self._format(session.session_id, max(int(left), 0))

    def _format(self, value: str, max_age: int) -> str:
        jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
        jar[self.cookie_name] = value
        morsel = jar[self.cookie_name]
        morsel["max-age"] = max_age
        morsel["path"] = self.path
        morsel["httponly"] = True
        morsel["samesite"] = self.samesite
        if self.domain:
            morsel["domain"] = self.domain
        if self.secure:
            morsel["secure"] = True
        return jar.output(header="").strip()


__all__ = [
    "ClientSource",
    "Extractor",
    "Rate",
    "RateLimit",
    "RevocationCheck",
    "ServerSession",
    "SessionMiddleware",
    "Tokens",
    "bearer_token",
    "client_ip",
    "cookie",
    "current_session",
    "header",
]
