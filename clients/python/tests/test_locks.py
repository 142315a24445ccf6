"""LockService through client.locks: every RPC, the lock context manager (sync and async),
exclusion across threads, auto-renewal through the Hold stream.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from cachecoord_client import AsyncClient, InvalidArgument, LockLost, LockNotAcquired
from conftest import Stack, wait_until


@pytest.fixture()
def locks(client):
    return client.locks


def test_acquire_inspect_extend_release(locks, ns):
    name = ns + "device:123:update"
    lease = locks.acquire(name, ttl=30, owner="worker-7")
    assert lease is not None and lease.fencing_token >= 1 and lease.lease_id
    assert timedelta(seconds=25) < lease.valid_for <= timedelta(seconds=30)
    info = locks.inspect(name)
    assert info.held and info.owner == "worker-7" and info.fencing_token == lease.fencing_token
    assert info.ttl_remaining is not None and info.ttl_remaining <= timedelta(seconds=30)
    assert locks.acquire(name, ttl=30) is None  # try once: held
    assert locks.extend(lease, ttl=120)
    info = locks.inspect(name)
    assert info.ttl_remaining is not None and info.ttl_remaining > timedelta(seconds=100)
    assert locks.release(lease)
    assert not locks.release(lease)
    assert not locks.extend(lease)
    assert not locks.inspect(name).held
    again = locks.acquire(name, ttl=30)
    assert again is not None and again.fencing_token > lease.fencing_token
    locks.release(again)


def test_acquire_waits_for_release(locks, ns):
    name = ns + "l"
    held = locks.acquire(name, ttl=30)
    assert held is not None
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(locks.acquire, name, 30, wait=20)
        # The waiter is blocked server-side until the release wakes it.
        wait_until(lambda: waiter.running(), "the waiter to start")
        assert locks.release(held)
        got = waiter.result(20)
    assert got is not None and got.fencing_token > held.fencing_token
    locks.release(got)


def test_lock_context_manager_excludes_across_threads(locks, ns):
    name = ns + "counter"
    state = {"inside": 0, "max_inside": 0, "count": 0}
    tokens = []

    def work(_):
        for _ in range(5):
            with locks.lock(name, ttl=30, wait=30) as lease:
                state["inside"] += 1
                state["max_inside"] = max(state["max_inside"], state["inside"])
                tokens.append(lease.fencing_token)
                value = state["count"]
                time.sleep(0.001)  # widen the race window a lock must close
                state["count"] = value + 1
                state["inside"] -= 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert state["count"] == 40 and state["max_inside"] == 1
    assert tokens == sorted(tokens) and len(set(tokens)) == 40
    assert not locks.inspect(name).held


def test_lock_not_acquired_is_a_clear_error(locks, ns):
    name = ns + "busy"
    with locks.lock(name, ttl=30):
        with pytest.raises(LockNotAcquired, match="busy"):
            with locks.lock(name, ttl=30, wait=0.05):
                pass
    # Released on exit, also when the block raised.
    with pytest.raises(KeyError):
        with locks.lock(name, ttl=30):
            raise KeyError("boom")
    assert not locks.inspect(name).held


def test_lease_expired_inside_block_raises_lock_lost(locks, ns):
    name = ns + "short"
    with pytest.raises(LockLost):
        with locks.lock(name, ttl=0.2):
            wait_until(lambda: not locks.inspect(name).held, "the lease to expire")


def test_auto_renew_holds_past_ttl_and_releases(locks, ns):
    name = ns + "renewed"
    with locks.lock(name, ttl=0.3, auto_renew=True, owner="holder") as lease:
        first_valid_until = lease.valid_until
        # Renewals every ttl/3 arrive on the stream; wait until the first lease would have
        # expired without them.
        wait_until(lambda: time.monotonic() > first_valid_until + 0.2, "the first lease's end")
        assert lease.valid_until > first_valid_until
        assert not lease.lost
        info = locks.inspect(name)
        assert info.held and info.fencing_token == lease.fencing_token and info.owner == "holder"
        with pytest.raises(LockNotAcquired):
            with locks.lock(name, ttl=30, auto_renew=True):
                pass
    wait_until(lambda: not locks.inspect(name).held, "the Hold stream's release")


def test_lock_errors_name_the_field(locks):
    with pytest.raises(InvalidArgument, match="name"):
        locks.acquire("")
    with pytest.raises(InvalidArgument, match="ttl"):
        locks.acquire("x", ttl=timedelta(days=31))


def test_async_lock_excludes_across_tasks_and_auto_renews(locks, server, ns):
    name = ns + "async"

    async def main():
        async with AsyncClient(server.target, timeout=10.0) as c:
            state = {"inside": 0, "max": 0}

            async def work():
                for _ in range(3):
                    async with c.locks.lock(name, ttl=30, wait=30):
                        state["inside"] += 1
                        state["max"] = max(state["max"], state["inside"])
                        await asyncio.sleep(0.001)
                        state["inside"] -= 1

            await asyncio.gather(*(work() for _ in range(6)))
            assert state["max"] == 1
            async with c.locks.lock(name, ttl=0.3, auto_renew=True) as lease:
                start = lease.valid_until
                while lease.valid_until == start:
                    await asyncio.sleep(0.02)
                assert (await c.locks.inspect(name)).held and not lease.lost
                with pytest.raises(LockNotAcquired):
                    async with c.locks.lock(name, wait=0):
                        pass
            for _ in range(250):
                if not (await c.locks.inspect(name)).held:
                    break
                await asyncio.sleep(0.02)
            assert not (await c.locks.inspect(name)).held

    asyncio.run(main())


def test_hold_not_acquired_raises(locks, ns):
    name = ns + "held"
    lease = locks.acquire(name, ttl=30)
    assert lease is not None
    done = threading.Event()
    with pytest.raises(LockNotAcquired):
        with locks.lock(name, ttl=30, wait=0.05, auto_renew=True):
            done.set()
    assert not done.is_set()
    locks.release(lease)


def test_auto_renewed_lease_lost_when_redis_goes_away(stacks, ns):
    stack = Stack("--redis-timeout", "200ms")
    stacks.append(stack)
    name = ns + "fragile"
    with pytest.raises(LockLost):
        with stack.client.locks.lock(name, ttl=0.6, auto_renew=True) as lease:
            assert not lease.lost
            stack.redis.stop()
            # Renewals fail; the service reports LOST once the last validity is over.
            wait_until(lambda: lease.lost, "the Hold stream to report the lease lost")
