"""Error mapping, deadlines and retries."""

from __future__ import annotations

import threading

import grpc
import pytest

from cachecoord_client import Client, DeadlineExceeded, Unavailable
from cachecoord_client._core import CallPolicy, Op, SyncRunner
from conftest import Stack, free_port, wait_until


def test_redis_down_is_unavailable_and_recovers(stacks, ns):
    stack = Stack("--redis-timeout", "500ms")
    stacks.append(stack)
    assert stack.client.cache.set(ns + "k", b"v")
    stack.redis.stop()
    with pytest.raises(Unavailable):
        stack.client.cache.get(ns + "k")
    with pytest.raises(Unavailable):
        stack.client.stats.increment(ns + "n")
    stack.redis.start()

    def recovered():
        try:
            return stack.client.cache.set(ns + "k", b"again")
        except Unavailable:
            return False

    wait_until(recovered, "the service to reach the restarted Redis")
    assert stack.client.cache.get(ns + "k") == b"again"


def test_no_server_is_unavailable():
    with Client(f"127.0.0.1:{free_port()}", timeout=2, retries=1) as c:
        with pytest.raises(Unavailable):
            c.cache.get("k")


def test_deadline_exceeded_while_redis_stalls(stacks, ns):
    stack = Stack("--redis-timeout", "5s")
    stacks.append(stack)
    stalled = threading.Thread(target=stack.redis.command, args=("DEBUG", "SLEEP", "3"))
    stalled.start()
    wait_until(lambda: not stack.redis.ping(), "DEBUG SLEEP to take hold")
    with Client(stack.server.target, timeout=0.3, retries=0) as c:
        with pytest.raises(DeadlineExceeded):
            c.cache.get(ns + "k")
    stalled.join()


class _Err(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "injected"


class _FlakyStub:
    """Fails the first `failures` calls with UNAVAILABLE, then answers."""

    def __init__(self, failures):
        self.failures = failures
        self.calls = 0

    def Method(self, request, timeout, metadata=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise _Err(grpc.StatusCode.UNAVAILABLE)
        return "response"


def test_idempotent_calls_are_retried_after_unavailable():
    stub = _FlakyStub(failures=2)
    runner = SyncRunner({"s": stub}, CallPolicy(retries=2, backoff=0.001))
    assert runner.run(Op("s", "Method", None, lambda r: r, retry=True)) == "response"
    assert stub.calls == 3


def test_retries_are_bounded():
    stub = _FlakyStub(failures=5)
    runner = SyncRunner({"s": stub}, CallPolicy(retries=2, backoff=0.001))
    with pytest.raises(Unavailable, match="injected"):
        runner.run(Op("s", "Method", None, lambda r: r, retry=True))
    assert stub.calls == 3


def test_unsafe_calls_are_not_retried():
    stub = _FlakyStub(failures=1)
    runner = SyncRunner({"s": stub}, CallPolicy(retries=2, backoff=0.001))
    with pytest.raises(Unavailable):
        runner.run(Op("s", "Method", None, lambda r: r, retry=False))
    assert stub.calls == 1


def test_which_rpcs_retry():
    from cachecoord_client import cache, locks, rate_limit, sessions, stats

    assert cache.op_get("k").retry and cache.op_set("k", b"", None, False, False, ()).retry
    assert not cache.op_set("k", b"", None, True, False, ()).retry
    assert not cache.op_fetch("k", None, None).retry and not cache.op_fill("k", "t", b"", None, ()).retry
    assert not sessions.op_create("u", None, None).retry and sessions.op_get("s", False).retry
    assert not rate_limit.op_check([], 1, False).retry and rate_limit.op_check([], 1, True).retry
    assert not stats.op_increment([("n", 1)]).retry and stats.op_totals(["n"]).retry
    assert not locks.op_acquire("n", None, None, "").retry and not locks.op_release("n", "l").retry
    assert locks.op_extend("n", "l", None).retry and locks.op_inspect("n").retry


def test_async_runner_retries_idempotent_calls_only():
    import asyncio

    from cachecoord_client._core import AsyncRunner

    class AsyncFlaky(_FlakyStub):
        async def Method(self, request, timeout, metadata=None):  # type: ignore[override]
            return super().Method(request, timeout, metadata)

    async def main():
        stub = AsyncFlaky(failures=1)
        runner = AsyncRunner({"s": stub}, CallPolicy(retries=2, backoff=0.001))
        assert await runner.run(Op("s", "Method", None, lambda r: r, retry=True)) == "response"
        assert stub.calls == 2
        stub = AsyncFlaky(failures=1)
        runner = AsyncRunner({"s": stub}, CallPolicy(retries=2, backoff=0.001))
        with pytest.raises(Unavailable):
            await runner.run(Op("s", "Method", None, lambda r: r, retry=False))
        assert stub.calls == 1

    asyncio.run(main())


def test_fastapi_example_compiles():
    import py_compile
    from pathlib import Path

    py_compile.compile(str(Path(__file__).parents[1] / "examples" / "fastapi_rate_limit.py"), doraise=True)
