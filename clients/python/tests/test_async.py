"""AsyncClient: every facade through grpc.aio, and the async cached decorator."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from cachecoord_client import InvalidArgument
from conftest import run_async


def test_async_facades(server, ns):
    async def body(c):
        assert await c.cache.set(ns + "k", "v", ttl=60)
        assert await c.cache.get(ns + "k") == b"v"
        assert (await c.cache.get_entry(ns + "k")).ttl <= timedelta(seconds=60)
        assert await c.cache.set_many({ns + "a": b"1"}, tags=[ns + "t"]) == 1
        assert await c.cache.get_many([ns + "a", ns + "k"]) == {ns + "a": b"1", ns + "k": b"v"}
        assert await c.cache.touch(ns + "k", 10)
        assert await c.cache.invalidate_tags(ns + "t") == 1
        assert await c.cache.delete(ns + "k") == 1
        lease = await c.cache.fetch(ns + "f")
        assert lease.fill
        assert await c.cache.abandon_fill(ns + "f", lease.fill_token)
        lease = await c.cache.fetch(ns + "f")
        assert await c.cache.fill(ns + "f", lease.fill_token, b"x")
        with pytest.raises(InvalidArgument, match="key"):
            await c.cache.get("")

        s = await c.sessions.create(ns + "u", {"a": 1})
        assert (await c.sessions.get(s.session_id, touch=True)).data == {"a": 1}
        assert (await c.sessions.touch(s.session_id, 60)) is not None
        assert (await c.sessions.update(s.session_id, {"b": 2}, merge=True)).data == {"a": 1, "b": 2}
        assert [x.session_id for x in await c.sessions.list_for_user(ns + "u")] == [s.session_id]
        assert await c.sessions.delete(s.session_id)
        await c.sessions.create(ns + "u")
        assert await c.sessions.delete_for_user(ns + "u") == 1
        assert await c.sessions.revoke_token(ns + "tok", datetime.now(timezone.utc) + timedelta(minutes=1))
        assert await c.sessions.is_revoked(ns + "tok")
        assert await c.sessions.check_tokens([ns + "tok", ns + "x"]) == [True, False]

        r = await c.rate_limit.check(ns + "rl", 1, 3600)
        assert r.allowed and r.remaining == 0
        assert not (await c.rate_limit.check(ns + "rl", 1, 3600)).allowed
        assert await c.rate_limit.reset(ns + "rl") == 1

        assert await c.stats.increment(ns + "n", 2) == 2
        assert await c.stats.increment_many({ns + "n": 1}) == [3]
        assert (await c.stats.series(ns + "n", "day", last=7)).total == 3
        assert await c.stats.totals(ns + "n") == {ns + "n": 3}
        await c.stats.mark_active(ns + "g", "m")
        assert await c.stats.count_active(ns + "g", 60) == 1
        assert await c.stats.add_unique(ns + "uq", "a", "b")
        assert await c.stats.count_unique(ns + "uq", datetime.now(timezone.utc)) == 2

    run_async(server, body)


def test_async_cached_stampede_computes_once(server, ns):
    async def body(c):
        calls = []
        callers = 20
        entered = asyncio.Semaphore(0)

        @c.cache.cached(ttl=60, key=ns + "user:{uid}", fill_timeout=30, max_wait=30)
        async def load(uid):
            calls.append(uid)
            for _ in range(callers - 1):
                await asyncio.wait_for(entered.acquire(), 30)
            return {"uid": uid}

        async def call():
            entered.release()
            return await load(7)

        results = await asyncio.gather(*(call() for _ in range(callers)))
        assert results == [{"uid": 7}] * callers
        assert calls == [7]

        @c.cache.cached(ttl=60, key=ns + "boom", fill_timeout=60)
        async def boom():
            raise ValueError("no")

        with pytest.raises(ValueError):
            await boom()
        assert (await c.cache.fetch(ns + "boom", max_wait=0)).fill  # lease handed back

        with pytest.raises(TypeError):

            @c.cache.cached(ttl=1)
            def sync_fn():
                return 1

    run_async(server, body)
