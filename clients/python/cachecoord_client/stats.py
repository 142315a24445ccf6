"""StatsService facade: counters with time series, online-now sets, daily uniques."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import _convert as cv
from ._core import AsyncRunner, Op, SyncRunner
from ._proto.cachecoord.v1 import stats_pb2 as pb

_GRANULARITY = {
    "minute": (pb.GRANULARITY_MINUTE, timedelta(minutes=1)),
    "hour": (pb.GRANULARITY_HOUR, timedelta(hours=1)),
    "day": (pb.GRANULARITY_DAY, timedelta(days=1)),
}


@dataclass(frozen=True)
class Series:
    """A counter's buckets over a range."""

    #: (bucket start, value), oldest first, zeros included.
    buckets: List[Tuple[datetime, int]]
    #: The sum of the values.
    total: int

    @property
    def values(self) -> List[int]:
        """Just the values, oldest first."""
        return [v for _, v in self.buckets]


def _range(
    granularity: str, start: Optional[datetime], end: Optional[datetime], last: Optional[int]
) -> Tuple[datetime, datetime]:
    if granularity not in _GRANULARITY:
        raise ValueError(f"granularity must be one of {sorted(_GRANULARITY)}, not {granularity!r}")
    if last is not None:
        if start is not None:
            raise ValueError("give last or start, not both")
        if last < 1:
            raise ValueError("last must be at least 1")
        end = end or datetime.now(timezone.utc)
        # Every bucket overlapping [start, end] is returned, so this is the current bucket
        # and the last-1 before it.
        return end - (last - 1) * _GRANULARITY[granularity][1], end
    if start is None:
        raise ValueError("give start (and end), or last")
    return start, end or datetime.now(timezone.utc)


def op_increment(deltas: Sequence[Tuple[str, int]]) -> Op[List[int]]:
    req = pb.IncrementRequest(deltas=[pb.Delta(name=n, amount=a) for n, a in deltas])
    # Not retried: a retry after a lost answer would count twice.
    return Op("stats", "Increment", req, lambda r: [int(v) for v in r.values])


def op_series(name: str, granularity: str, start: datetime, end: datetime) -> Op[Series]:
    req = pb.GetSeriesRequest(
        name=name, granularity=_GRANULARITY[granularity][0], start=cv.timestamp(start), end=cv.timestamp(end)
    )
    return Op(
        "stats",
        "GetSeries",
        req,
        lambda r: Series([(cv.from_timestamp(b.start), int(b.value)) for b in r.buckets], int(r.total)),
        retry=True,
    )


def op_totals(names: Sequence[str]) -> Op[Dict[str, int]]:
    names = list(names)
    return Op(
        "stats",
        "GetTotals",
        pb.GetTotalsRequest(names=names),
        lambda r: {n: int(v) for n, v in zip(names, r.values)},
        retry=True,
    )


def op_mark_active(group: str, member: str) -> Op[None]:
    return Op("stats", "MarkActive", pb.MarkActiveRequest(group=group, member=member), lambda r: None, retry=True)


def op_count_active(group: str, window: cv.Seconds) -> Op[int]:
    req = pb.CountActiveRequest(group=group, window=cv.duration(window))
    return Op("stats", "CountActive", req, lambda r: int(r.count), retry=True)


def op_add_unique(name: str, members: Iterable[str]) -> Op[bool]:
    req = pb.AddUniqueRequest(name=name, members=list(members))
    return Op("stats", "AddUnique", req, lambda r: bool(r.added), retry=True)


def op_count_unique(name: str, start: datetime, end: datetime) -> Op[int]:
    req = pb.CountUniqueRequest(name=name, start=cv.timestamp(start), end=cv.timestamp(end))
    return Op("stats", "CountUnique", req, lambda r: int(r.count), retry=True)


Deltas = Union[Mapping[str, int], Sequence[Tuple[str, int]]]


def _pairs(deltas: Deltas) -> List[Tuple[str, int]]:
    return list(deltas.items()) if isinstance(deltas, Mapping) else list(deltas)


class Stats:
    """``client.stats``: StatsService with Python types."""

    def __init__(self, runner: SyncRunner) -> None:
        self._run = runner.run

    def increment(self, name: str, amount: int = 1, *, timeout: Optional[float] = None) -> int:
        """Adds amount to a counter; answers its new all-time total."""
        return self._run(op_increment([(name, amount)]), timeout)[0]

    def increment_many(self, deltas: Deltas, *, timeout: Optional[float] = None) -> List[int]:
        """Applies many deltas atomically in one round trip; answers the totals in order."""
        return self._run(op_increment(_pairs(deltas)), timeout)

    def series(
        self,
        name: str,
        granularity: str = "day",
        *,
        last: Optional[int] = None,
        start: Optional[datetime] = None,
        end: Optional[datetime] = None,
        timeout: Optional[float] = None,
    ) -> Series:
        """A counter's buckets: ``series("api:/users", "day", last=7)`` is the last 7 days
        (today included); or give ``start`` and ``end`` (default now)."""
        s, e = _range(granularity, start, end, last)
        return self._run(op_series(name, granularity, s, e), timeout)

    def totals(self, *names: str, timeout: Optional[float] = None) -> Dict[str, int]:
        """All-time totals by name."""
        return self._run(op_totals(names), timeout)

    def mark_active(self, group: str, member: str, *, timeout: Optional[float] = None) -> None:
        """Records member as seen now in group."""
        self._run(op_mark_active(group, member), timeout)

    def count_active(self, group: str, window: cv.Seconds, *, timeout: Optional[float] = None) -> int:
        """How many members of group were seen within window."""
        return self._run(op_count_active(group, window), timeout)

    def add_unique(self, name: str, *members: str, timeout: Optional[float] = None) -> bool:
        """Adds members to today's unique set; True when the estimate changed."""
        return self._run(op_add_unique(name, members), timeout)

    def count_unique(
        self, name: str, start: datetime, end: Optional[datetime] = None, *, timeout: Optional[float] = None
    ) -> int:
        """Estimated distinct members over the days from start to end (default now)."""
        return self._run(op_count_unique(name, start, end or datetime.now(timezone.utc)), timeout)


class AsyncStats:
    """``client.stats`` on an AsyncClient: the methods of ``Stats``, awaitable."""

    def __init__(self, runner: AsyncRunner) -> None:
        self._run = runner.run

    async def increment(self, name: str, amount: int = 1, *, timeout: Optional[float] = None) -> int:
        """See ``Stats.increment``."""
        return (await self._run(op_increment([(name, amount)]), timeout))[0]

    async def increment_many(self, deltas: Deltas, *, timeout: Optional[float] = None) -> List[int]:
        """See ``Stats.increment_many``."""
        return await self._run(op_increment(_pairs(deltas)), timeout)

    async def series(
        self,
        name: str,
        granularity: str = "day",
        *,
        last: Optional[int] = None,
        start: Optional[datetime] = None,
        end: Optional[datetime] = None,
        timeout: Optional[float] = None,
    ) -> Series:
        """See ``Stats.series``."""
        s, e = _range(granularity, start, end, last)
        return await self._run(op_series(name, granularity, s, e), timeout)

    async def totals(self, *names: str, timeout: Optional[float] = None) -> Dict[str, int]:
        """See ``Stats.totals``."""
        return await self._run(op_totals(names), timeout)

    async def mark_active(self, group: str, member: str, *, timeout: Optional[float] = None) -> None:
        """See ``Stats.mark_active``."""
        await self._run(op_mark_active(group, member), timeout)

    async def count_active(self, group: str, window: cv.Seconds, *, timeout: Optional[float] = None) -> int:
        """See ``Stats.count_active``."""
        return await self._run(op_count_active(group, window), timeout)

    async def add_unique(self, name: str, *members: str, timeout: Optional[float] = None) -> bool:
        """See ``Stats.add_unique``."""
        return await self._run(op_add_unique(name, members), timeout)

    async def count_unique(
        self, name: str, start: datetime, end: Optional[datetime] = None, *, timeout: Optional[float] = None
    ) -> int:
        """See ``Stats.count_unique``."""
        return await self._run(op_count_unique(name, start, end or datetime.now(timezone.utc)), timeout)


__all__ = ["Stats", "AsyncStats", "Series"]
