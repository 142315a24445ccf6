"""RateLimitService facade."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional, Sequence

from . import _convert as cv
from ._core import AsyncRunner, Op, SyncRunner
from ._proto.cachecoord.v1 import rate_limit_pb2 as pb

_ALGORITHMS = {
    "fixed_window": pb.ALGORITHM_FIXED_WINDOW,
    "sliding_window": pb.ALGORITHM_SLIDING_WINDOW,
    "token_bucket": pb.ALGORITHM_TOKEN_BUCKET,
}


@dataclass(frozen=True)
class Limit:
    """One limit: ``limit`` units per ``period`` under ``key``."""

    #: The limit's key, e.g. ``user:42:api``.
    key: str
    #: Units allowed per period.
    limit: int
    #: The period (seconds or a timedelta; whole milliseconds).
    period: cv.Seconds
    #: "sliding_window" (default), "fixed_window" or "token_bucket".
    algorithm: str = "sliding_window"
    #: Token bucket capacity (token_bucket only); None means ``limit``.
    burst: Optional[int] = None

    def to_proto(self) -> Any:
        """The protobuf Limit."""
        if self.algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be one of {sorted(_ALGORITHMS)}, not {self.algorithm!r}")
        msg = pb.Limit(
            key=self.key, limit=self.limit, period=cv.duration(self.period), algorithm=_ALGORITHMS[self.algorithm]
        )
        if self.burst is not None:
            msg.burst = self.burst
        return msg


@dataclass(frozen=True)
class LimitStatus:
    """One limit's state after a check."""

    #: The limit's key.
    key: str
    #: Whether this limit alone allows the request.
    allowed: bool
    #: Units it would still admit now.
    remaining: int
    #: Time until it is back to its full allowance.
    reset_after: timedelta
    #: Time until it would allow the same request.
    retry_after: timedelta


@dataclass(frozen=True)
class RateLimitResult:
    """The decision of a check."""

    #: Whether the request may proceed.
    allowed: bool
    #: The smallest ``remaining`` over the limits.
    remaining: int
    #: How long to wait before retrying; zero when allowed.
    retry_after: timedelta
    #: One status per limit, in request order.
    statuses: List[LimitStatus]
    #: True when the server failed open without checking (Redis down, fail-open configured).
    unchecked: bool

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def retry_after_seconds(self) -> int:
        """``retry_after`` rounded up to whole seconds, for a Retry-After header."""
        ms = int(self.retry_after / timedelta(milliseconds=1))
        return -(-ms // 1000)


def _result(r: Any) -> RateLimitResult:
    statuses = [
        LimitStatus(
            key=s.key,
            allowed=s.allowed,
            remaining=int(s.remaining),
            reset_after=s.reset_after.ToTimedelta(),
            retry_after=s.retry_after.ToTimedelta(),
        )
        for s in r.statuses
    ]
    return RateLimitResult(
        allowed=r.allowed,
        remaining=min((s.remaining for s in statuses), default=0),
        retry_after=r.retry_after.ToTimedelta(),
        statuses=statuses,
        unchecked=r.unchecked,
    )


def op_check(limits: Sequence[Limit], cost: int, peek: bool) -> Op[RateLimitResult]:
    req = pb.CheckRequest(limits=[lim.to_proto() for lim in limits], cost=cost, peek=peek)
    # A retried consuming check could consume twice; a peek consumes nothing.
    return Op("rate_limit", "Check", req, _result, retry=peek)


def op_reset(keys: Sequence[str]) -> Op[int]:
    return Op("rate_limit", "ResetLimits", pb.ResetLimitsRequest(keys=list(keys)), lambda r: int(r.reset), retry=True)


class RateLimits:
    """``client.rate_limit``: RateLimitService with Python types."""

    def __init__(self, runner: SyncRunner) -> None:
        self._run = runner.run

    def check(
        self,
        key: str,
        limit: int,
        period: cv.Seconds,
        *,
        algorithm: str = "sliding_window",
        burst: Optional[int] = None,
        cost: int = 1,
        peek: bool = False,
        timeout: Optional[float] = None,
    ) -> RateLimitResult:
        """Checks (and unless peek, consumes) ``cost`` against one limit."""
        return self._run(op_check([Limit(key, limit, period, algorithm, burst)], cost, peek), timeout)

    def check_all(
        self, limits: Sequence[Limit], *, cost: int = 1, peek: bool = False, timeout: Optional[float] = None
    ) -> RateLimitResult:
        """Checks several limits at once, all-or-nothing."""
        return self._run(op_check(limits, cost, peek), timeout)

    def reset(self, *keys: str, timeout: Optional[float] = None) -> int:
        """Clears keys' state; answers how many had state."""
        return self._run(op_reset(keys), timeout)


class AsyncRateLimits:
    """``client.rate_limit`` on an AsyncClient: the methods of ``RateLimits``, awaitable."""

    def __init__(self, runner: AsyncRunner) -> None:
        self._run = runner.run

    async def check(
        self,
        key: str,
        limit: int,
        period: cv.Seconds,
        *,
        algorithm: str = "sliding_window",
        burst: Optional[int] = None,
        cost: int = 1,
        peek: bool = False,
        timeout: Optional[float] = None,
    ) -> RateLimitResult:
        """See ``RateLimits.check``."""
        return await self._run(op_check([Limit(key, limit, period, algorithm, burst)], cost, peek), timeout)

    async def check_all(
        self, limits: Sequence[Limit], *, cost: int = 1, peek: bool = False, timeout: Optional[float] = None
    ) -> RateLimitResult:
        """See ``RateLimits.check_all``."""
        return await self._run(op_check(limits, cost, peek), timeout)

    async def reset(self, *keys: str, timeout: Optional[float] = None) -> int:
        """See ``RateLimits.reset``."""
        return await self._run(op_reset(keys), timeout)
