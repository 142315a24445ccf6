"""CacheService through client.cache: every RPC, errors, and the cached decorator."""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from cachecoord_client import InvalidArgument, Serializer


def test_get_miss_then_set_get_with_ttl(client, ns):
    key = ns + "user:1"
    assert client.cache.get(key) is None
    assert client.cache.get_entry(key) is None
    assert client.cache.set(key, '{"name":"Ada"}', ttl=60)
    assert client.cache.get(key) == b'{"name":"Ada"}'
    entry = client.cache.get_entry(key)
    assert entry is not None and entry.value == b'{"name":"Ada"}'
    assert timedelta(seconds=50) < entry.ttl <= timedelta(seconds=60)


def test_set_empty_value_is_a_hit(client, ns):
    assert client.cache.set(ns + "e", b"", ttl=timedelta(minutes=1))
    assert client.cache.get(ns + "e") == b""


def test_set_conditions(client, ns):
    key = ns + "k"
    assert not client.cache.set(key, b"x", if_present=True)
    assert client.cache.get(key) is None
    assert client.cache.set(key, b"a", if_absent=True)
    assert not client.cache.set(key, b"b", if_absent=True)
    assert client.cache.set(key, b"c", if_present=True)
    assert client.cache.get(key) == b"c"
    with pytest.raises(ValueError):
        client.cache.set(key, b"d", if_absent=True, if_present=True)


def test_get_many_in_request_order(client, ns):
    assert client.cache.set_many({ns + "a": b"1", ns + "b": "2"}, ttl=60) == 2
    got = client.cache.get_many([ns + "b", ns + "missing", ns + "a"])
    assert list(got) == [ns + "b", ns + "missing", ns + "a"]
    assert got == {ns + "b": b"2", ns + "missing": None, ns + "a": b"1"}


def test_delete_and_touch(client, ns):
    client.cache.set_many({ns + "a": b"1", ns + "b": b"2"}, ttl=60)
    assert client.cache.touch(ns + "a", 3600)
    entry = client.cache.get_entry(ns + "a")
    assert entry is not None and entry.ttl > timedelta(seconds=3500)
    assert not client.cache.touch(ns + "nope", 10)
    assert client.cache.delete(ns + "a", ns + "b", ns + "c") == 2
    assert client.cache.get(ns + "a") is None


def test_invalidate_tags(client, ns):
    client.cache.set(ns + "u1", b"1", tags=[ns + "team:7"])
    client.cache.set_many({ns + "u2": b"2"}, tags=[ns + "team:7", ns + "other"])
    client.cache.set(ns + "u3", b"3", tags=[ns + "other"])
    assert client.cache.invalidate_tags(ns + "team:7") == 2
    assert client.cache.get_many([ns + "u1", ns + "u2", ns + "u3"]) == {ns + "u1": None, ns + "u2": None, ns + "u3": b"3"}


def test_fetch_fill_and_abandon(client, ns):
    key = ns + "f"
    first = client.cache.fetch(key, fill_timeout=30)
    assert first.fill and first.fill_token
    # Another caller does not wait (max_wait 0) and is told someone else is filling.
    other = client.cache.fetch(key, max_wait=0)
    assert other.timeout
    assert client.cache.abandon_fill(key, first.fill_token)
    assert not client.cache.abandon_fill(key, first.fill_token)
    # The lease was handed back: the next caller gets it at once.
    second = client.cache.fetch(key, fill_timeout=30, max_wait=0)
    assert second.fill
    assert not client.cache.fill(key, first.fill_token, b"stale")
    assert client.cache.fill(key, second.fill_token, b"v", ttl=60)
    hit = client.cache.fetch(key)
    assert hit.hit and hit.value == b"v" and hit.ttl is not None


def test_set_voids_fill_lease(client, ns):
    key = ns + "f"
    lease = client.cache.fetch(key)
    assert lease.fill
    client.cache.set(key, b"direct")
    assert not client.cache.fill(key, lease.fill_token, b"late")
    assert client.cache.get(key) == b"direct"


def test_invalid_argument_names_the_field(client, ns):
    with pytest.raises(InvalidArgument, match="key"):
        client.cache.get("")
    assert client.cache.set("k" * 512, b"x", ttl=5)  # the boundary
    with pytest.raises(InvalidArgument, match="key"):
        client.cache.set("k" * 513, b"x")
    with pytest.raises(InvalidArgument, match="ttl"):
        client.cache.set(ns + "k", b"x", ttl=timedelta(days=31))
    assert client.cache.get(ns + "k") is None


def test_cached_json_and_key_template(client, ns):
    calls = []

    @client.cache.cached(ttl=60, key=ns + "user:{user_id}")
    def load_user(user_id: int, verbose: bool = False):
        calls.append(user_id)
        return {"id": user_id, "name": "Ada", "tags": ["x"]}

    assert load_user(1) == {"id": 1, "name": "Ada", "tags": ["x"]}
    assert load_user(1) == {"id": 1, "name": "Ada", "tags": ["x"]}
    assert load_user(user_id=2)["id"] == 2
    assert calls == [1, 2]
    # Stored as JSON that any other client can read.
    assert client.cache.get(ns + "user:1") == b'{"id":1,"name":"Ada","tags":["x"]}'


def test_cached_pluggable_serializer_and_default_key(client, ns):
    class Pickle(Serializer):
        def dumps(self, value):
            return pickle.dumps(value)

        def loads(self, data):
            return pickle.loads(data)

    calls = []

    @client.cache.cached(ttl=60, serializer=Pickle())
    def compute(a, b=ns):
        calls.append(a)
        return {a, b}

    assert compute(1) == {1, ns}
    assert compute(1) == {1, ns}
    assert compute(2) == {2, ns}
    assert calls == [1, 2]


def test_cached_stampede_computes_once_for_20_threads(client, ns):
    callers = 20
    entered = threading.Semaphore(0)
    calls = []
    lock = threading.Lock()

    @client.cache.cached(ttl=60, key=ns + "report", fill_timeout=30, max_wait=30)
    def report():
        with lock:
            calls.append(1)
        # Hold the lease until every caller has entered the decorated function, so the
        # others are really concurrent with the computation.
        for _ in range(callers - 1):
            assert entered.acquire(timeout=30)
        return {"rows": 42}

    def call():
        entered.release()
        return report()

    with ThreadPoolExecutor(callers) as pool:
        results = list(pool.map(lambda _: call(), range(callers)))
    assert results == [{"rows": 42}] * callers
    assert len(calls) == 1


def test_cached_exception_hands_the_lease_back(client, ns):
    key = ns + "flaky"
    attempts = []

    @client.cache.cached(ttl=60, key=key, fill_timeout=60)
    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("backend down")
        return "ok"

    with pytest.raises(RuntimeError, match="backend down"):
        flaky()
    # Abandoned, not left to expire after 60 s: a caller that does not wait gets the lease.
    probe = client.cache.fetch(key, max_wait=0)
    assert probe.fill
    client.cache.abandon_fill(key, probe.fill_token)
    assert flaky() == "ok"
    assert flaky() == "ok"
    assert len(attempts) == 2


def test_cached_exception_wakes_a_waiter_to_compute(client, ns):
    key = ns + "handoff"
    started = threading.Event()
    fail_now = threading.Event()
    calls = []

    @client.cache.cached(ttl=60, key=key, fill_timeout=60, max_wait=30)
    def compute(who):
        calls.append(who)
        if who == "first":
            started.set()
            assert fail_now.wait(30)
            raise RuntimeError("first failed")
        return who

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(compute, "first")
        assert started.wait(30)
        second = pool.submit(compute, "second")
        # The second caller is waiting server-side on the first's lease (or will find the
        # lease handed back); either way it computes at once, not after fill_timeout.
        fail_now.set()
        with pytest.raises(RuntimeError):
            first.result(30)
        assert second.result(30) == "second"
    assert calls == ["first", "second"]


def test_cached_rejects_async_function_on_sync_client(client):
    with pytest.raises(TypeError):

        @client.cache.cached(ttl=1)
        async def f():
            return 1


def test_cached_computes_uncached_when_another_fill_does_not_land(client, ns):
    key = ns + "slow"
    held = client.cache.fetch(key, fill_timeout=60)
    assert held.fill

    @client.cache.cached(ttl=60, key=key, max_wait=0)
    def compute():
        return [1, 2]

    assert compute() == [1, 2]  # TIMEOUT: computed without caching
    assert client.cache.get(key) is None
    assert client.cache.fill(key, held.fill_token, b"[3]")
    assert compute() == [3]
