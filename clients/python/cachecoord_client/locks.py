"""LockService facade and the ``lock`` context manager."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, AsyncIterator, Iterator, Optional

import grpc

from . import _convert as cv
from ._core import AsyncRunner, Op, SyncRunner
from ._otel import with_trace_context
from ._proto.cachecoord.v1 import lock_pb2 as pb
from .errors import DeadlineExceeded, LockLost, LockNotAcquired, from_rpc_error


@dataclass
class Lease:
    """A held lock. Pass ``fencing_token`` to the resource you guard."""

    #: The lock's name.
    name: str
    #: The secret proving the lease (do not log it).
    lease_id: str
    #: Strictly increasing per lock name; guard writes with it.
    fencing_token: int
    #: How long the lease is valid at least, from when the request was sent.
    valid_for: timedelta
    #: time.monotonic() before which the lease is certainly still held (absent renewals).
    valid_until: float
    #: Set when an auto-renewed lease (Hold stream) was lost.
    _lost: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def lost(self) -> bool:
        """True once an auto-renewed lease has been lost (always False without auto-renew)."""
        return self._lost.is_set()


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock (from ``inspect``)."""

    #: Whether someone holds it now.
    held: bool
    #: The holder's owner label.
    owner: str
    #: The holder's fencing token; 0 when not held.
    fencing_token: int
    #: Time until the holder's lease expires; None when not held.
    ttl_remaining: Optional[timedelta]


def _seconds(value: Optional[cv.Seconds]) -> float:
    return cv.to_timedelta(value).total_seconds() if value is not None else 0.0


def op_acquire(name: str, ttl: Optional[cv.Seconds], wait: Optional[cv.Seconds], owner: str) -> Op[Optional[Lease]]:
    req = pb.AcquireRequest(name=name, ttl=cv.duration(ttl), wait=cv.duration(wait), owner=owner)
    sent = time.monotonic()

    def convert(r: Any) -> Optional[Lease]:
        if not r.acquired:
            return None
        valid_for = r.valid_for.ToTimedelta()
        return Lease(name, r.lease_id, int(r.fencing_token), valid_for, sent + valid_for.total_seconds())

    # Not retried: a lost answer may have granted a lease nobody knows the id of.
    return Op("locks", "Acquire", req, convert, server_wait=_seconds(wait))


def op_release(name: str, lease_id: str) -> Op[bool]:
    req = pb.ReleaseRequest(name=name, lease_id=lease_id)
    return Op("locks", "Release", req, lambda r: bool(r.released))


def op_extend(name: str, lease_id: str, ttl: Optional[cv.Seconds]) -> Op[Optional[timedelta]]:
    req = pb.ExtendRequest(name=name, lease_id=lease_id, ttl=cv.duration(ttl))
    return Op("locks", "Extend", req, lambda r: r.valid_for.ToTimedelta() if r.extended else None, retry=True)


def op_inspect(name: str) -> Op[LockInfo]:
    return Op(
        "locks",
        "Inspect",
        pb.InspectRequest(name=name),
        lambda r: LockInfo(r.held, r.owner, int(r.fencing_token), cv.from_duration(r, "ttl_remaining")),
        retry=True,
    )


def _hold_request(name: str, ttl: Optional[cv.Seconds], wait: Optional[cv.Seconds], owner: str) -> Any:
    return pb.HoldRequest(name=name, ttl=cv.duration(ttl), wait=cv.duration(wait), owner=owner)


def _lease_from_hold(name: str, r: Any, sent: float) -> Lease:
    valid_for = r.valid_for.ToTimedelta()
    return Lease(name, r.lease_id, int(r.fencing_token), valid_for, sent + valid_for.total_seconds())


class _SyncHold:
    """One Hold stream: the service renews the lease until ``close`` half-closes it."""

    def __init__(
        self, stub: Any, name: str, req: Any, first_timeout: float, metadata: Any = None
    ) -> None:
        self._closing = threading.Event()
        self._ended = threading.Event()

        def requests() -> Iterator[Any]:
            yield req
            # Ending this iterator half-closes the stream: the service then releases.
            self._closing.wait()

        sent = time.monotonic()
        # No deadline on the call: it would bound the whole hold. Only the wait for the
        # first answer is bounded, by cancelling the call when it runs out (the service
        # then gives up the wait, or releases a lock it granted just then).
        self._call = stub.Hold(requests(), metadata=with_trace_context(metadata))
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            self._call.cancel()

        timer = threading.Timer(first_timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            first = next(self._call)
        except grpc.RpcError as err:
            self._closing.set()
            raise from_rpc_error(err, expired.is_set()) from None
        except StopIteration:
            self._closing.set()
            raise LockLost(f"lock {name!r}: Hold stream ended before answering") from None
        finally:
            timer.cancel()
        if first.event != pb.HOLD_EVENT_ACQUIRED:
            self._closing.set()
            self.lease: Optional[Lease] = None
            return
        self.lease = _lease_from_hold(name, first, sent)
        threading.Thread(target=self._watch, args=(self.lease,), daemon=True).start()

    def _watch(self, lease: Lease) -> None:
        try:
            for r in self._call:
                if r.event == pb.HOLD_EVENT_RENEWED:
                    lease.valid_for = r.valid_for.ToTimedelta()
                    lease.valid_until = time.monotonic() + lease.valid_for.total_seconds()
                elif r.event == pb.HOLD_EVENT_LOST:
                    lease._lost.set()
            if not self._closing.is_set():
                lease._lost.set()  # the stream ended while we still wanted the lock
        except grpc.RpcError:
            if not self._closing.is_set():
                lease._lost.set()
        finally:
            self._ended.set()

    def close(self, timeout: float) -> None:
        """Half-closes the stream and waits (up to timeout) for the service to release."""
        self._closing.set()
        if self.lease is not None and not self._ended.wait(timeout):
            self._call.cancel()  # the service releases on cancel too


class Locks:
    """``client.locks``: LockService with Python types."""

    def __init__(self, runner: SyncRunner) -> None:
        self._runner = runner
        self._run = runner.run

    def acquire(
        self,
        name: str,
        ttl: Optional[cv.Seconds] = None,
        *,
        wait: Optional[cv.Seconds] = None,
        owner: str = "",
        timeout: Optional[float] = None,
    ) -> Optional[Lease]:
        """Takes the lock (waiting up to ``wait`` server-side); None when it stayed held."""
        return self._run(op_acquire(name, ttl, wait, owner), timeout)

    def release(self, lease: Lease, *, timeout: Optional[float] = None) -> bool:
        """Releases a lease; False when it was no longer held."""
        return self._run(op_release(lease.name, lease.lease_id), timeout)

    def extend(self, lease: Lease, ttl: Optional[cv.Seconds] = None, *, timeout: Optional[float] = None) -> bool:
        """Resets the lease to expire ttl from now; False when it was no longer held."""
        sent = time.monotonic()
        valid_for = self._run(op_extend(lease.name, lease.lease_id, ttl), timeout)
        if valid_for is None:
            return False
        lease.valid_for, lease.valid_until = valid_for, sent + valid_for.total_seconds()
        return True

    def inspect(self, name: str, *, timeout: Optional[float] = None) -> LockInfo:
        """Who holds the lock."""
        return self._run(op_inspect(name), timeout)

    @contextlib.contextmanager
    def lock(
        self,
        name: str,
        ttl: Optional[cv.Seconds] = None,
        *,
        wait: Optional[cv.Seconds] = None,
        owner: str = "",
        auto_renew: bool = False,
        timeout: Optional[float] = None,
    ) -> Iterator[Lease]:
        """``with client.locks.lock("device:123:update", ttl=30, wait=5) as lease:``

        Raises ``LockNotAcquired`` when the lock stayed held for ``wait``. Releases on exit;
        raises ``LockLost`` on exit (unless the block raised) when the lease had run out
        before the release, so the block may have overlapped another holder.
        With ``auto_renew=True`` the lock is held through a Hold stream that the service
        renews every ttl/3 until the block ends; ``lease.lost`` turns True if it is lost.
        ``timeout`` bounds taking the lock (default: the client's timeout plus ``wait``) and
        releasing it (default: the client's timeout), not the block.
        """
        if auto_renew:
            policy = self._runner.policy
            first = timeout if timeout is not None else policy.timeout + _seconds(wait)
            hold = _SyncHold(
                self._runner.stubs["locks"],
                name,
                _hold_request(name, ttl, wait, owner),
                first,
                self._runner.policy.metadata,
            )
            if hold.lease is None:
                raise LockNotAcquired(name)
            ok = False
            try:
                yield hold.lease
                ok = True
            finally:
                hold.close(timeout if timeout is not None else policy.timeout)
            if ok and hold.lease.lost:
                raise LockLost(f"lock {name!r} was lost while held")
            return
        lease = self.acquire(name, ttl, wait=wait, owner=owner, timeout=timeout)
        if lease is None:
            raise LockNotAcquired(name)
        try:
            yield lease
        except BaseException:
            with contextlib.suppress(Exception):
                self.release(lease, timeout=timeout)
            raise
        if not self.release(lease, timeout=timeout):
            raise LockLost(f"lock {name!r}: the lease expired before it was released")


class _AsyncHold:
    """One Hold stream on grpc.aio."""

    def __init__(self, call: Any, lease: Optional[Lease]) -> None:
        self._call = call
        self.lease = lease
        self._closing = False
        self._task: Optional[asyncio.Task[None]] = None
        if lease is not None:
            self._task = asyncio.ensure_future(self._watch(lease))

    @classmethod
    async def open(
        cls, stub: Any, name: str, req: Any, first_timeout: float, metadata: Any = None
    ) -> "_AsyncHold":
        # No deadline on the call (it would bound the whole hold); only the wait for the
        # first answer is bounded. A timeout or a cancelled task cancels the call, and the
        # service then gives up the wait (or releases a lock it granted just then).
        call = stub.Hold(metadata=with_trace_context(metadata))
        sent = time.monotonic()

        async def first_answer() -> Any:
            await call.write(req)
            return await call.read()

        try:
            first = await asyncio.wait_for(first_answer(), first_timeout)
        except asyncio.TimeoutError:
            call.cancel()
            raise DeadlineExceeded(
                f"DEADLINE_EXCEEDED: lock {name!r}: no answer within {first_timeout:g}s",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        if first is grpc.aio.EOF:
            raise LockLost(f"lock {name!r}: Hold stream ended before answering")
        if first.event != pb.HOLD_EVENT_ACQUIRED:
            with contextlib.suppress(Exception):
                await call.done_writing()
            return cls(call, None)
        return cls(call, _lease_from_hold(name, first, sent))

    async def _watch(self, lease: Lease) -> None:
        try:
            while True:
                r = await self._call.read()
                if r is grpc.aio.EOF:
                    break
                if r.event == pb.HOLD_EVENT_RENEWED:
                    lease.valid_for = r.valid_for.ToTimedelta()
                    lease.valid_until = time.monotonic() + lease.valid_for.total_seconds()
                elif r.event == pb.HOLD_EVENT_LOST:
                    lease._lost.set()
            if not self._closing:
                lease._lost.set()
        except (grpc.RpcError, asyncio.CancelledError):
            if not self._closing:
                lease._lost.set()

    async def close(self, timeout: float) -> None:
        """Half-closes the stream and waits (up to timeout) for the service to release."""
        self._closing = True
        if self._task is None:
            return
        try:
            await self._call.done_writing()
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except Exception:
            self._call.cancel()


class AsyncLocks:
    """``client.locks`` on an AsyncClient: the methods of ``Locks``, awaitable;
    ``async with client.locks.lock(...) as lease:``."""

    def __init__(self, runner: AsyncRunner) -> None:
        self._runner = runner
        self._run = runner.run

    async def acquire(
        self,
        name: str,
        ttl: Optional[cv.Seconds] = None,
        *,
        wait: Optional[cv.Seconds] = None,
        owner: str = "",
        timeout: Optional[float] = None,
    ) -> Optional[Lease]:
        """See ``Locks.acquire``."""
        return await self._run(op_acquire(name, ttl, wait, owner), timeout)

    async def release(self, lease: Lease, *, timeout: Optional[float] = None) -> bool:
        """See ``Locks.release``."""
        return await self._run(op_release(lease.name, lease.lease_id), timeout)

    async def extend(self, lease: Lease, ttl: Optional[cv.Seconds] = None, *, timeout: Optional[float] = None) -> bool:
        """See ``Locks.extend``."""
        sent = time.monotonic()
        valid_for = await self._run(op_extend(lease.name, lease.lease_id, ttl), timeout)
        if valid_for is None:
            return False
        lease.valid_for, lease.valid_until = valid_for, sent + valid_for.total_seconds()
        return True

    async def inspect(self, name: str, *, timeout: Optional[float] = None) -> LockInfo:
        """See ``Locks.inspect``."""
        return await self._run(op_inspect(name), timeout)

    @contextlib.asynccontextmanager
    async def lock(
        self,
        name: str,
        ttl: Optional[cv.Seconds] = None,
        *,
        wait: Optional[cv.Seconds] = None,
        owner: str = "",
        auto_renew: bool = False,
        timeout: Optional[float] = None,
    ) -> AsyncIterator[Lease]:
        """See ``Locks.lock``."""
        if auto_renew:
            policy = self._runner.policy
            first = timeout if timeout is not None else policy.timeout + _seconds(wait)
            hold = await _AsyncHold.open(
                self._runner.stubs["locks"], name, _hold_request(name, ttl, wait, owner), first, policy.metadata
            )
            if hold.lease is None:
                raise LockNotAcquired(name)
            ok = False
            try:
                yield hold.lease
                ok = True
            finally:
                await hold.close(timeout if timeout is not None else policy.timeout)
            if ok and hold.lease.lost:
                raise LockLost(f"lock {name!r} was lost while held")
            return
        lease = await self.acquire(name, ttl, wait=wait, owner=owner, timeout=timeout)
        if lease is None:
            raise LockNotAcquired(name)
        try:
            yield lease
        except BaseException:
            with contextlib.suppress(Exception):
                await self.release(lease, timeout=timeout)
            raise
        if not await self.release(lease, timeout=timeout):
            raise LockLost(f"lock {name!r}: the lease expired before it was released")
