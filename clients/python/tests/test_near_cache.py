"""The near cache: reads from memory, dropped by every write path through another service
instance, expiry, stream loss, the async client, and zero stale reads across processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from cachecoord_client import AsyncClient, Client, NearCache

from conftest import Redis, Server, Stack, wait_until

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def other(redis: Redis) -> Iterator[Server]:
    """A second service instance on the session's Redis."""
    s = Server(redis)
    yield s
    s.close()


def near_client(server: Server, **settings) -> Client:
    c = Client(server.target, timeout=10.0, near_cache=NearCache(**settings))
    wait_until(lambda: c.cache.near_stats.live, "the near cache to go live")
    return c


def held(c: Client, key: str) -> bool:
    return key in c.cache._near._entries  # type: ignore[union-attr]


def hold(c: Client, key: str) -> None:
    """Reads key until the near cache holds it: a read during which an invalidation of
    the key arrives (the write that just made it) is, rightly, not kept."""
    wait_until(lambda: c.cache.get(key) is not None and held(c, key), f"{key} to be held")


def test_reads_come_from_memory_until_another_instance_writes(client, other, ns):
    key = ns + "user"
    client.cache.set(key, b'{"v":1}')
    with near_client(other) as reader:
        assert reader.cache.get(key) == b'{"v":1}'
        assert reader.cache.get(key) == b'{"v":1}'
        stats = reader.cache.near_stats
        assert (stats.hits, stats.misses, stats.size) == (1, 1, 1)
        assert stats.hit_ratio == 0.5
        client.cache.set(key, b'{"v":2}')
        wait_until(lambda: not held(reader, key), "the invalidation")
        assert reader.cache.get(key) == b'{"v":2}'


def test_every_write_path_invalidates(client, other, ns):
    with near_client(other) as reader:

        def check(key: str, write) -> None:
            before = reader.cache.near_stats.invalidations
            client.cache.set(key, b"old", tags=[ns + "tag"])
            wait_until(lambda: reader.cache.near_stats.invalidations > before, "the first write's invalidation")
            hold(reader, key)
            before = reader.cache.near_stats.invalidations
            write()
            wait_until(lambda: not held(reader, key), f"the invalidation of {key}")
            assert reader.cache.near_stats.invalidations > before

        check(ns + "set", lambda: client.cache.set(ns + "set", b"new"))
        check(ns + "many", lambda: client.cache.set_many({ns + "many": b"new", ns + "x": b"x"}))
        check(ns + "delete", lambda: client.cache.delete(ns + "delete"))
        check(ns + "touch", lambda: client.cache.touch(ns + "touch", 30))
        check(ns + "tag", lambda: client.cache.invalidate_tags(ns + "tag"))

        def fill() -> None:
            client.cache.delete(ns + "fill")
            wait_until(lambda: not held(reader, ns + "fill"), "the delete's invalidation")
            assert reader.cache.get(ns + "fill") is None
            r = client.cache.fetch(ns + "fill")
            assert r.fill
            assert client.cache.fill(ns + "fill", r.fill_token, b"filled")

        client.cache.set(ns + "fill", b"old")
        hold(reader, ns + "fill")
        fill()
        wait_until(
            lambda: reader.cache.get(ns + "fill") == b"filled" and held(reader, ns + "fill"), "the filled value held"
        )


def test_get_many_mixes_memory_and_one_call(client, other, ns):
    keys = [ns + str(i) for i in range(4)]
    client.cache.set_many({k: k.encode() for k in keys[:3]})
    with near_client(other) as reader:
        assert reader.cache.get_many(keys[:2]) == {keys[0]: keys[0].encode(), keys[1]: keys[1].encode()}
        hits = reader.cache.near_stats.hits
        got = reader.cache.get_many(keys)
        assert got == {keys[0]: keys[0].encode(), keys[1]: keys[1].encode(), keys[2]: keys[2].encode(), keys[3]: None}
        assert list(got) == keys
        assert reader.cache.near_stats.hits == hits + 2
        client.cache.delete(keys[0])
        wait_until(lambda: not held(reader, keys[0]), "the invalidation")
        assert reader.cache.get_many(keys)[keys[0]] is None


def test_cached_calls_once_until_invalidated(client, other, ns):
    with near_client(other) as reader:
        calls = []

        @reader.cache.cached(ttl=60, key=ns + "user:{uid}")
        def load(uid: int) -> dict:
            calls.append(uid)
            return {"uid": uid, "n": len(calls)}

        assert load(1) == {"uid": 1, "n": 1}
        # From the service (a hit) until held (the fill's own invalidation may void a read).
        wait_until(lambda: load(1) == {"uid": 1, "n": 1} and held(reader, ns + "user:1"), "the entry held")
        assert load(1) is load(1)  # from memory, decoded once
        assert calls == [1]
        client.cache.delete(ns + "user:1")
        wait_until(lambda: not held(reader, ns + "user:1"), "the invalidation")
        assert load(1) == {"uid": 1, "n": 2}


def test_entries_expire_with_their_ttl_and_max_staleness(client, other, ns):
    with near_client(other, max_staleness=0.3) as reader:
        client.cache.set(ns + "short", b"v", ttl=0.2)
        client.cache.set(ns + "long", b"v", ttl=60)
        assert reader.cache.get(ns + "short") == b"v"
        assert reader.cache.get(ns + "long") == b"v"
        misses = reader.cache.near_stats.misses
        # The short entry goes at its TTL; the long one is read again after max_staleness.
        wait_until(lambda: reader.cache.get(ns + "short") is None, "the TTL to pass")
        wait_until(
            lambda: reader.cache.get(ns + "long") == b"v" and reader.cache.near_stats.misses > misses + 1,
            "max_staleness to pass",
        )
        assert not held(reader, ns + "short")


def test_prefixes_limit_what_is_held(client, other, ns):
    with near_client(other, prefixes=[ns + "hot:"]) as reader:
        client.cache.set_many({ns + "hot:1": b"1", ns + "cold:1": b"1"})
        hold(reader, ns + "hot:1")
        assert reader.cache.get(ns + "cold:1") == b"1"
        assert not held(reader, ns + "cold:1")


def test_max_entries_bounds_memory(client, other, ns):
    with near_client(other, max_entries=3) as reader:
        keys = [ns + str(i) for i in range(5)]
        before = reader.cache.near_stats.invalidations
        client.cache.set_many({k: b"v" for k in keys})
        wait_until(lambda: reader.cache.near_stats.invalidations >= before + 5, "the writes' invalidations")
        for k in keys:
            hold(reader, k)
        assert reader.cache.near_stats.size == 3
        assert [held(reader, k) for k in keys] == [False, False, True, True, True]


def test_a_broken_stream_empties_the_near_cache_and_it_recovers(stacks, ns):
    stack = Stack()
    stacks.append(stack)
    with near_client(stack.server) as reader:
        stack.client.cache.set(ns + "k", b"1")
        hold(reader, ns + "k")
        # Kill the service's tracking connection: it may have missed changes.
        clients = stack.redis.command("CLIENT", "LIST").decode()
        tracking = [
            line.split("id=")[1].split(" ")[0]
            for line in clients.splitlines()
            if any(f.startswith("flags=") and "t" in f for f in line.split(" "))
        ]
        assert len(tracking) == 1, clients
        stack.redis.command("CLIENT", "KILL", "ID", tracking[0])
        wait_until(lambda: reader.cache.near_stats.resets >= 1, "the reset")
        assert not held(reader, ns + "k")
        wait_until(lambda: reader.cache.near_stats.live, "a new watch")
        stack.client.cache.set(ns + "k", b"2")
        wait_until(lambda: reader.cache.get(ns + "k") == b"2" and held(reader, ns + "k"), "the new value held")
        stack.client.cache.set(ns + "k", b"3")
        wait_until(lambda: not held(reader, ns + "k"), "the invalidation on the new watch")


def test_async_client_near_cache(client, other, ns):
    key = ns + "a"
    client.cache.set(key, b"1")

    async def body() -> None:
        async with AsyncClient(other.target, timeout=10.0, near_cache=True) as reader:
            while not reader.cache.near_stats.live:
                await asyncio.sleep(0.005)
            assert await reader.cache.get(key) == b"1"
            assert await reader.cache.get(key) == b"1"
            assert reader.cache.near_stats.hits == 1
            assert await reader.cache.get_many([key]) == {key: b"1"}
            client.cache.set(key, b"2")
            while key in reader.cache._near._entries:  # type: ignore[union-attr]
                await asyncio.sleep(0.001)
            assert await reader.cache.get(key) == b"2"

            @reader.cache.cached(ttl=60, key=ns + "c:{x}")
            async def f(x: int) -> int:
                return x * 2

            hits = reader.cache.near_stats.hits
            for _ in range(1000):
                assert await f(2) == 4
                if reader.cache.near_stats.hits > hits + 1:
                    break
            assert reader.cache.near_stats.hits > hits + 1

    asyncio.run(body())


def test_near_cache_settings_are_checked():
    with pytest.raises(ValueError):
        NearCache(max_entries=0)
    with pytest.raises(ValueError):
        NearCache(max_staleness=0)
    with pytest.raises(ValueError):
        NearCache(prefixes=[""])
    with pytest.raises(TypeError):
        Client("127.0.0.1:1", near_cache="yes")  # type: ignore[arg-type]


def test_zero_stale_reads_with_a_writer_and_8_readers_in_processes(client, other, ns):
    """One writer raises a version through one instance; 8 reader processes read it through
    a near cache watching another instance. No read may return a version older than what
    an invalidation already received proves was written."""
    key = ns + "version"
    client.cache.set(key, b"0")
    readers = [
        subprocess.Popen(
            [sys.executable, str(HERE / "near_cache_reader.py"), other.target, key, "3"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    for r in readers:
        assert r.stdout is not None and r.stdout.readline().strip() == "ready"
    written = 0
    end = time.monotonic() + 3
    while time.monotonic() < end:
        written += 1
        client.cache.set(key, str(written).encode())
        if written % 4 == 0:
            time.sleep(0.001)  # let readers hit between writes too
    reports = []
    for r in readers:
        out, _ = r.communicate(timeout=60)
        assert r.returncode == 0
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert all(rep["stale"] == 0 and rep["backwards"] == 0 for rep in reports), reports
    assert all(rep["reads"] > 0 and rep["hits"] > 0 and rep["invalidations"] > 0 for rep in reports), reports
    assert max(rep["last"] for rep in reports) <= written


def test_template_keys_built_once_stay_exact():
    from cachecoord_client.cache import _key_builder

    def f(uid, kind="a"):  # type: ignore[no-untyped-def]
        return None

    build = _key_builder(f, "u:{uid}:{kind}")
    assert [build(1, "a"), build(True, "a"), build(1.0, "a"), build(1, "a")] == ["u:1:a", "u:True:a", "u:1.0:a", "u:1:a"]
    assert build(1) == "u:1:a" and build(uid=2) == "u:2:a" and build([1], "b") == "u:[1]:b"
