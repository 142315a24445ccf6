"""Per-call deadlines (``timeout=`` on every facade method) and asyncio cancellation."""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any, List, Optional, Tuple

import grpc
import pytest

from cachecoord_client import AsyncClient, DeadlineExceeded, Lease, Limit, Unavailable
from cachecoord_client._core import CallPolicy, Op, SyncRunner
from cachecoord_client.cache import AsyncCache, Cache
from cachecoord_client.locks import AsyncLocks, Locks
from cachecoord_client.rate_limit import AsyncRateLimits, RateLimits
from cachecoord_client.sessions import AsyncSessions, Sessions
from cachecoord_client.stats import AsyncStats, Stats
from conftest import run_async
from test_errors import _Err

FACADES = [Cache, AsyncCache, Sessions, AsyncSessions, RateLimits, AsyncRateLimits, Locks, AsyncLocks, Stats, AsyncStats]


def _rpc_methods(cls: type) -> List[Tuple[str, Any]]:
    """The public methods that make calls (the decorator and context manager included)."""
    return [(n, m) for n, m in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")]


def _sample(param: inspect.Parameter) -> Any:
    """A value of the annotated type, to call a method with."""
    ann = str(param.annotation)
    if "Lease" in ann:
        return Lease("n", "l", 1, timedelta(0), 0.0)
    if "datetime" in ann:
        return datetime.now(timezone.utc)
    if "Sequence[Limit]" in ann:
        return [Limit("k", 1, 1)]
    if "Mapping" in ann or "Deltas" in ann or "Dict" in ann:
        return {"k": 1} if "Deltas" in ann else {"k": b"v"} if "Value" in ann else {}
    if "Sequence[str]" in ann:
        return ["k"]
    if "Seconds" in ann or ann == "int":
        return 1
    if "Value" in ann:
        return b"v"
    return "x"


class _Recorder:
    """A runner that records the timeout of each call and answers a stand-in response."""

    def __init__(self, is_async: bool) -> None:
        self.timeouts: List[Optional[float]] = []
        self.is_async = is_async
        self.policy = CallPolicy()
        self.stubs: dict = {}

    def _answer(self, op: Op[Any], timeout: Optional[float]) -> Any:
        self.timeouts.append(timeout)
        from unittest.mock import MagicMock

        return MagicMock()

    def run(self, op: Op[Any], timeout: Optional[float] = None) -> Any:
        if self.is_async:

            async def answer() -> Any:
                return self._answer(op, timeout)

            return answer()
        return self._answer(op, timeout)


@pytest.mark.parametrize("cls", FACADES, ids=lambda c: c.__name__)
def test_every_facade_method_passes_its_timeout_to_the_call(cls):
    is_async = cls.__name__.startswith("Async")
    for name, method in _rpc_methods(cls):
        if name in ("cached", "lock"):
            assert inspect.signature(method).parameters["timeout"].kind == inspect.Parameter.KEYWORD_ONLY
            continue
        params = list(inspect.signature(method).parameters.values())[1:]
        timeout = params[-1]
        assert timeout.name == "timeout" and timeout.kind == inspect.Parameter.KEYWORD_ONLY, name
        args = [_sample(p) for p in params if p.default is inspect.Parameter.empty and p.kind != p.VAR_POSITIONAL]
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            args.append("x")
        recorder = _Recorder(is_async)
        facade = cls(recorder)
        extra = {"last": 7} if name == "series" else {}
        result = getattr(facade, name)(*args, **extra, timeout=0.123)
        if is_async:
            asyncio.run(result)
        assert recorder.timeouts == [0.123], f"{cls.__name__}.{name}"


class _AlwaysUnavailable:
    def __init__(self) -> None:
        self.deadlines: List[float] = []

    def Method(self, request: Any, timeout: float, metadata: Any = None) -> Any:
        self.deadlines.append(timeout)
        raise _Err(grpc.StatusCode.UNAVAILABLE)


def test_one_deadline_covers_every_retry():
    stub = _AlwaysUnavailable()
    runner = SyncRunner({"s": stub}, CallPolicy(timeout=60, retries=3, backoff=0.001))
    with pytest.raises(Unavailable):
        runner.run(Op("s", "Method", None, lambda r: r, retry=True), timeout=0.5)
    assert len(stub.deadlines) == 4
    # Each attempt gets what is left of the one deadline, never a fresh one.
    assert stub.deadlines[0] <= 0.5
    assert all(later < earlier for earlier, later in zip(stub.deadlines, stub.deadlines[1:]))


def test_no_retry_when_the_pause_would_pass_the_deadline():
    stub = _AlwaysUnavailable()
    runner = SyncRunner({"s": stub}, CallPolicy(timeout=60, retries=3, backoff=10))
    with pytest.raises(Unavailable):
        runner.run(Op("s", "Method", None, lambda r: r, retry=True), timeout=1.0)
    assert len(stub.deadlines) == 1


def test_a_per_call_timeout_overrides_the_client_default(server, client, ns):
    """A waiting Acquire ends at the call's own deadline, not the client's default (10 s)
    plus its 60 s wait."""
    name = ns + "busy"
    held = client.locks.acquire(name, ttl=60)
    assert held is not None
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(lambda: client.locks.acquire(name, ttl=60, wait=60, timeout=0.5))
        try:
            got = waiter.result(timeout=20)  # far below 60 s: the per-call deadline applied
        except DeadlineExceeded:
            got = None
    assert got is None
    assert client.locks.release(held)
    # The waiter left nothing behind: the lock is free.
    assert client.locks.acquire(name, ttl=60) is not None


def test_async_per_call_timeout(server, ns):
    async def body(c: AsyncClient) -> None:
        name = ns + "busy"
        held = await c.locks.acquire(name, ttl=60)
        assert held is not None
        try:
            got = await asyncio.wait_for(c.locks.acquire(name, ttl=60, wait=60, timeout=0.5), 20)
        except DeadlineExceeded:
            got = None
        assert got is None
        with pytest.raises(DeadlineExceeded):
            async with c.locks.lock(name, ttl=60, wait=60, auto_renew=True, timeout=0.5):
                pass
        assert await c.locks.release(held)

    run_async(server, body)


def test_sync_hold_first_answer_is_bounded(client, ns):
    name = ns + "busy"
    held = client.locks.acquire(name, ttl=60)
    assert held is not None
    with pytest.raises(DeadlineExceeded):
        with client.locks.lock(name, ttl=60, wait=60, auto_renew=True, timeout=0.5):
            pass
    assert client.locks.release(held)
    assert client.locks.acquire(name, ttl=60) is not None  # the cancelled Hold took nothing


@pytest.mark.parametrize("how", ["acquire", "hold"])
def test_cancelling_a_task_cancels_its_waiting_rpc(server, ns, how):
    """A task waiting server-side for a lock is cancelled; when the lock is then released,
    the cancelled wait must not take it (it would hold it for 60 s): a fresh waiter gets it
    at once."""

    async def body(c: AsyncClient) -> None:
        name = ns + "l"
        held = await c.locks.acquire(name, ttl=60)
        assert held is not None

        async def wait_for_lock() -> None:
            if how == "acquire":
                await c.locks.acquire(name, ttl=60, wait=60)
            else:
                async with c.locks.lock(name, ttl=60, wait=60, auto_renew=True):
                    await asyncio.sleep(3600)

        task = asyncio.ensure_future(wait_for_lock())
        # Let the task send its request, then make a call on the same connection: the
        # server reads the waiting request's frames first.
        await asyncio.sleep(0)
        await c.locks.inspect(name)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await c.locks.release(held)
        fresh = await c.locks.acquire(name, ttl=60, wait=10)
        assert fresh is not None, "the cancelled wait took the lock"
        assert await c.locks.release(fresh)

    run_async(server, body)


def test_cancelling_a_cached_computation_hands_the_lease_back(server, ns):
    async def body(c: AsyncClient) -> None:
        started = asyncio.Event()

        @c.cache.cached(ttl=60, key=ns + "slow", fill_timeout=60)
        async def slow() -> int:
            started.set()
            await asyncio.sleep(3600)
            return 1

        task = asyncio.ensure_future(slow())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The lease came back at once (AbandonFill), not after its 60 s fill timeout.
        assert (await c.cache.fetch(ns + "slow", max_wait=0)).fill

    run_async(server, body)


def test_sync_client_timeout_keyword(client, ns):
    assert client.cache.set(ns + "k", b"v", timeout=2.0)
    assert client.cache.get(ns + "k", timeout=2.0) == b"v"
