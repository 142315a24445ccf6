"""cachecoord_client.fastapi through FastAPI's TestClient against the real binary: the
rate-limit dependency, the session middleware, the token-revocation dependency."""

from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Dict, Optional

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from cachecoord_client import AsyncClient  # noqa: E402
from cachecoord_client.fastapi import (  # noqa: E402
    Rate,
    RateLimit,
    RevocationCheck,
    ServerSession,
    SessionMiddleware,
    Tokens,
    cookie,
    current_session,
    header,
)
from conftest import free_port, wait_until  # noqa: E402


def make_app(target: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncClient(target, timeout=5.0) as client:
            app.state.cachecoord = client
            yield

    return FastAPI(lifespan=lifespan)


# --- rate limits ---------------------------------------------------------------------------


@pytest.fixture()
def limited(server, ns):
    app = make_app(server.target)
    per_user = RateLimit(Rate(3, 60), key=header("x-user"), scope=ns + "items")

    @app.get("/items")
    async def items(result=Depends(per_user)) -> Dict[str, Any]:
        return {"remaining": result.remaining if result else None}

    two = RateLimit(Rate(5, 60), Rate(2, 3600, "token_bucket"), key=header("x-user"))

    @app.get("/a/{item}", dependencies=[Depends(two)])
    async def route_a(item: str) -> Dict[str, str]:
        return {"item": item}

    @app.get("/b/{item}", dependencies=[Depends(two)])
    async def route_b(item: str) -> Dict[str, str]:
        return {"item": item}

    with TestClient(app) as http:
        yield http


def test_rate_limit_allows_then_answers_429_with_retry_after(limited, ns):
    for remaining in (2, 1, 0):
        r = limited.get("/items", headers={"x-user": ns + "u1"})
        assert r.status_code == 200 and r.json() == {"remaining": remaining}
        assert r.headers["RateLimit-Limit"] == "3"
        assert r.headers["RateLimit-Remaining"] == str(remaining)
        assert r.headers["RateLimit-Policy"] == "3;w=60"
        assert 0 < int(r.headers["RateLimit-Reset"]) <= 120
        assert "Retry-After" not in r.headers
    denied = limited.get("/items", headers={"x-user": ns + "u1"})
    assert denied.status_code == 429
    # A sliding window forgets the previous window's count gradually: up to 2 periods.
    assert 1 <= int(denied.headers["Retry-After"]) <= 120
    assert denied.headers["RateLimit-Remaining"] == "0"
    assert denied.headers["RateLimit-Limit"] == "3"
    # Keyed by the caller: another user has their own allowance.
    assert limited.get("/items", headers={"x-user": ns + "u2"}).status_code == 200
    # No key (no header): not limited here, and no headers.
    r = limited.get("/items")
    assert r.status_code == 200 and r.json() == {"remaining": None} and "RateLimit-Limit" not in r.headers


def test_rate_limit_checks_all_rates_at_once_and_reports_the_closest(limited, ns):
    user = {"x-user": ns + "u"}
    r = limited.get("/a/1", headers=user)
    assert r.status_code == 200
    # The token bucket (2 per hour) is closer to its limit than the window (5 per minute).
    assert r.headers["RateLimit-Limit"] == "2" and r.headers["RateLimit-Remaining"] == "1"
    assert r.headers["RateLimit-Policy"] == "5;w=60, 2;w=3600"
    # The default scope is the route's path template: /a/1 and /a/2 share counters, /b not.
    assert limited.get("/a/2", headers=user).status_code == 200
    denied = limited.get("/a/3", headers=user)
    assert denied.status_code == 429 and denied.headers["RateLimit-Limit"] == "2"
    assert 1000 < int(denied.headers["Retry-After"]) <= 1800  # a token every 30 minutes
    assert limited.get("/b/1", headers=user).status_code == 200


def test_rate_limit_fails_closed_or_open_when_the_service_is_down(ns):
    dead = f"127.0.0.1:{free_port()}"
    app = make_app(dead)

    @app.get("/closed", dependencies=[Depends(RateLimit(Rate(1, 60), timeout=0.5))])
    async def closed() -> str:
        return "ok"

    @app.get("/open", dependencies=[Depends(RateLimit(Rate(1, 60), fail_open=True, timeout=0.5))])
    async def open_() -> str:
        return "ok"

    with TestClient(app) as http:
        r = http.get("/closed")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert http.get("/open").status_code == 200


def test_rate_limit_needs_a_client(ns):
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(RateLimit(Rate(1, 60)))])
    async def x() -> str:
        return "ok"

    with TestClient(app) as http, pytest.raises(RuntimeError, match="app.state.cachecoord"):
        http.get("/x")


# --- sessions ------------------------------------------------------------------------------


@pytest.fixture()
def site(server):
    app = make_app(server.target)
    app.add_middleware(SessionMiddleware, ttl=3600, secure=False)

    @app.post("/login/{user}")
    async def login(user: str, request: Request) -> Dict[str, Any]:
        session: ServerSession = request.session  # type: ignore[assignment]
        s = await session.login(user, {"logins": session.get("logins", 0) + 1})
        return {"id": s.session_id}

    @app.post("/logout")
    async def logout(session: ServerSession = Depends(current_session)) -> None:
        await session.logout()

    @app.get("/me")
    async def me(session: ServerSession = Depends(current_session)) -> Dict[str, Any]:
        expires = session.current.expires_at.isoformat() if session.current else None
        return {"user": session.user_id, "id": session.session_id, "data": dict(session), "expires": expires}

    @app.post("/set/{key}/{value}")
    async def set_(key: str, value: str, session: ServerSession = Depends(current_session)) -> None:
        session[key] = value

    @app.post("/del/{key}")
    async def del_(key: str, session: ServerSession = Depends(current_session)) -> None:
        del session[key]

    @app.post("/set-while-another-request-merges/{key}")
    async def racing(key: str, request: Request, session: ServerSession = Depends(current_session)) -> None:
        session[key] = "mine"
        # Another request (another worker) merges its own field before this one saves.
        client: AsyncClient = request.app.state.cachecoord
        assert session.session_id is not None
        await client.sessions.update(session.session_id, {"other": "theirs"}, merge=True)

    with TestClient(app) as http:
        yield http


def _cookie_header(response: Any) -> str:
    return next(v for k, v in response.headers.multi_items() if k == "set-cookie")


def test_session_login_sets_a_cookie_and_loads_on_later_requests(site, client, ns):
    assert site.get("/me").json()["user"] is None
    r = site.post(f"/login/{ns}u")
    sid = r.json()["id"]
    set_cookie = _cookie_header(r)
    assert set_cookie.startswith(f"session={sid};") and "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie
    assert 3500 < int(set_cookie.split("Max-Age=")[1].split(";")[0]) <= 3600
    me = site.get("/me").json()
    assert me["user"] == ns + "u" and me["id"] == sid and me["data"] == {"logins": 1}
    assert client.sessions.get(sid).user_id == ns + "u"


def test_session_changes_are_merged_so_concurrent_fields_survive(site, client, ns):
    sid = site.post(f"/login/{ns}u").json()["id"]
    assert site.post("/set/theme/dark").status_code == 200
    assert site.post("/set-while-another-request-merges/mine").status_code == 200
    data = client.sessions.get(sid).data
    assert data == {"logins": 1, "theme": "dark", "mine": "mine", "other": "theirs"}


def test_session_deleting_a_field_writes_the_whole_object(site, client, ns):
    sid = site.post(f"/login/{ns}u").json()["id"]
    site.post("/set/a/1")
    site.post("/set/b/2")
    site.post("/del/a")
    assert client.sessions.get(sid).data == {"logins": 1, "b": "2"}


def test_session_slides_its_idle_timeout(site, ns):
    site.post(f"/login/{ns}u")
    first = datetime.fromisoformat(site.get("/me").json()["expires"])
    wait_until(lambda: datetime.now(timezone.utc) > first - timedelta(seconds=3600) + timedelta(milliseconds=50),
               "the clock to move on")
    later = datetime.fromisoformat(site.get("/me").json()["expires"])
    assert later > first  # each request moved expires_at to now + 1 h


def test_session_login_rotates_the_id(site, client, ns):
    first = site.post(f"/login/{ns}u").json()["id"]
    site.post("/set/cart/3")
    second = site.post(f"/login/{ns}u").json()["id"]
    assert second != first
    assert client.sessions.get(first) is None  # the old id is worthless now
    # The same user keeps the data; the login counter came along and went up.
    assert client.sessions.get(second).data == {"logins": 2, "cart": "3"}


def test_session_login_as_another_user_drops_the_data(site, client, ns):
    site.post(f"/login/{ns}alice")
    site.post("/set/secret/1")
    bob = site.post(f"/login/{ns}bob").json()["id"]
    assert "secret" not in client.sessions.get(bob).data


def test_session_fixation_a_planted_id_is_replaced(site, client, ns):
    planted = client.sessions.create(ns + "attacker", {}).session_id
    site.cookies.set("session", planted)
    mine = site.post(f"/login/{ns}victim").json()["id"]
    assert mine != planted and client.sessions.get(planted) is None


def test_session_logout_deletes_it_and_clears_the_cookie(site, client, ns):
    sid = site.post(f"/login/{ns}u").json()["id"]
    r = site.post("/logout")
    assert "Max-Age=0" in _cookie_header(r)
    assert client.sessions.get(sid) is None
    assert site.get("/me").json()["user"] is None


def test_session_unknown_cookie_is_anonymous_and_cleared(site):
    site.cookies.set("session", "no-such-session")
    r = site.get("/me")
    assert r.json()["user"] is None and "Max-Age=0" in _cookie_header(r)


def test_session_writing_without_a_session_raises(site):
    with pytest.raises(RuntimeError, match="login"):
        site.post("/set/a/1")


def test_session_cookie_is_secure_by_default(server, ns):
    app = make_app(server.target)
    app.add_middleware(SessionMiddleware)

    @app.post("/login")
    async def login(session: ServerSession = Depends(current_session)) -> None:
        await session.login(ns + "u")

    with TestClient(app, base_url="https://testserver") as http:
        assert "Secure" in _cookie_header(http.post("/login"))


# --- token revocation ----------------------------------------------------------------------


@pytest.fixture()
def guarded(server):
    app = make_app(server.target)
    calls = []

    @app.get("/private")
    async def private(tokens: Tokens = Depends(RevocationCheck(refresh=cookie("refresh")))) -> Dict[str, Any]:
        return {"access": tokens.access, "refresh": tokens.refresh}

    @app.middleware("http")
    async def count_checks(request: Request, call_next: Any) -> Any:
        client: AsyncClient = request.app.state.cachecoord
        original = client.sessions.check_tokens
        if not getattr(original, "counted", False):

            async def counted(tokens: Any, *, timeout: Optional[float] = None) -> Any:
                calls.append(list(tokens))
                return await original(tokens, timeout=timeout)

            counted.counted = True  # type: ignore[attr-defined]
            client.sessions.check_tokens = counted  # type: ignore[method-assign]
        return await call_next(request)

    with TestClient(app) as http:
        yield http, calls


def _later() -> datetime:
    return datetime.now(timezone.utc) + timedelta(minutes=5)


def test_revocation_checks_access_and_refresh_in_one_call(guarded, client, ns):
    http, calls = guarded
    access, refresh = ns + "access", ns + "refresh"
    http.cookies.set("refresh", refresh)
    r = http.get("/private", headers={"Authorization": f"Bearer {access}"})
    assert r.status_code == 200 and r.json() == {"access": access, "refresh": refresh}
    assert calls == [[access, refresh]]  # one batched CheckTokens for the pair

    assert client.sessions.revoke_token(refresh, _later())
    r = http.get("/private", headers={"Authorization": f"Bearer {access}"})
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    # Without the refresh cookie, the access token alone is still good.
    http.cookies.clear()
    assert http.get("/private", headers={"Authorization": f"Bearer {access}"}).status_code == 200

    assert client.sessions.revoke_token(access, _later())
    assert http.get("/private", headers={"Authorization": f"Bearer {access}"}).status_code == 401


def test_revocation_without_a_token_is_401(guarded):
    http, calls = guarded
    assert http.get("/private").status_code == 401
    assert http.get("/private", headers={"Authorization": "Basic abc"}).status_code == 401
    assert calls == []
