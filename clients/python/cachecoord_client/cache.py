"""CacheService facade and the stampede-safe ``cached`` decorator."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from . import _convert as cv
from ._core import AsyncRunner, Op, SyncRunner
from ._proto.cachecoord.v1 import cache_pb2 as pb
from .near_cache import NearCacheStats, Store

#: A value to store: bytes as they are, str as UTF-8.
Value = Union[bytes, str]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    """A live cache entry."""

    #: The stored bytes.
    value: bytes
    #: Time left before it expires; None when it has no expiry.
    ttl: Optional[timedelta]


@dataclass(frozen=True)
class FetchResult:
    """The answer of ``fetch``: exactly one of hit / fill / timeout is true."""

    #: The entry exists; ``value`` (and ``ttl``) are set.
    hit: bool
    #: This caller holds the fill lease: compute, then ``fill`` or ``abandon_fill``.
    fill: bool
    #: Another caller's fill did not land within max_wait.
    timeout: bool
    #: The value, on a hit.
    value: bytes = b""
    #: Remaining TTL on a hit, when the entry has one.
    ttl: Optional[timedelta] = None
    #: The lease to pass to fill/abandon_fill, on fill.
    fill_token: str = ""


class Serializer:
    """How ``cached`` turns values into bytes and back. The default is JSON."""

    def dumps(self, value: Any) -> bytes:
        """Encodes a value."""
        return json.dumps(value, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> Any:
        """Decodes a value."""
        return json.loads(data)


JSON = Serializer()


def _bytes(value: Value) -> bytes:
    return value.encode() if isinstance(value, str) else value


# --- ops -------------------------------------------------------------------------------


def _entry(r: Any) -> Optional[Entry]:
    return Entry(r.value, cv.from_duration(r, "ttl")) if r.found else None


def op_get(key: str) -> Op[Optional[Entry]]:
    return Op("cache", "Get", pb.GetRequest(key=key), _entry, retry=True)


def _value(r: Any) -> Optional[bytes]:
    return r.value if r.found else None


def op_get_value(key: str) -> Op[Optional[bytes]]:
    """Get without the TTL: the hot path of ``get`` without a near cache."""
    return Op("cache", "Get", pb.GetRequest(key=key), _value, retry=True)


def op_get_many(keys: Sequence[str]) -> Op[Dict[str, Optional[bytes]]]:
    return Op(
        "cache",
        "GetMany",
        pb.GetManyRequest(keys=list(keys)),
        lambda r: {e.key: (e.value if e.found else None) for e in r.entries},
        retry=True,
    )


def _seconds(ttl: Optional[timedelta]) -> Optional[float]:
    return ttl.total_seconds() if ttl is not None else None


def op_get_many_entries(keys: Sequence[str]) -> Op[List[Tuple[str, Optional[bytes], Optional[float]]]]:
    """GetMany with each entry's TTL in seconds, for the near cache."""
    return Op(
        "cache",
        "GetMany",
        pb.GetManyRequest(keys=list(keys)),
        lambda r: [
            (e.key, e.value, _seconds(cv.from_duration(e, "ttl"))) if e.found else (e.key, None, None)
            for e in r.entries
        ],
        retry=True,
    )


def op_set(
    key: str,
    value: Value,
    ttl: Optional[cv.Seconds],
    if_absent: bool,
    if_present: bool,
    tags: Iterable[str],
) -> Op[bool]:
    if if_absent and if_present:
        raise ValueError("if_absent and if_present exclude each other")
    condition = (
        pb.SET_CONDITION_IF_ABSENT
        if if_absent
        else pb.SET_CONDITION_IF_PRESENT if if_present else pb.SET_CONDITION_UNSPECIFIED
    )
    req = pb.SetRequest(key=key, value=_bytes(value), ttl=cv.duration(ttl), condition=condition, tags=list(tags))
    # An unconditional write repeated is the same write; a conditional one may answer
    # false after its own first attempt landed, so it is not retried.
    return Op("cache", "Set", req, lambda r: bool(r.stored), retry=condition == pb.SET_CONDITION_UNSPECIFIED)


def op_set_many(items: Mapping[str, Value], ttl: Optional[cv.Seconds], tags: Iterable[str]) -> Op[int]:
    tag_list = list(tags)
    req = pb.SetManyRequest(
        items=[pb.SetItem(key=k, value=_bytes(v), ttl=cv.duration(ttl), tags=tag_list) for k, v in items.items()]
    )
    return Op("cache", "SetMany", req, lambda r: int(r.stored), retry=True)


def op_delete(keys: Sequence[str]) -> Op[int]:
    return Op("cache", "Delete", pb.DeleteRequest(keys=list(keys)), lambda r: int(r.deleted), retry=True)


def op_touch(key: str, ttl: cv.Seconds) -> Op[bool]:
    return Op("cache", "Touch", pb.TouchRequest(key=key, ttl=cv.duration(ttl)), lambda r: bool(r.found), retry=True)


def _fetch_result(r: Any) -> FetchResult:
    return FetchResult(
        hit=r.outcome == pb.FETCH_OUTCOME_HIT,
        fill=r.outcome == pb.FETCH_OUTCOME_FILL,
        timeout=r.outcome == pb.FETCH_OUTCOME_TIMEOUT,
        value=r.value,
        ttl=cv.from_duration(r, "ttl"),
        fill_token=r.fill_token,
    )


def op_fetch(key: str, fill_timeout: Optional[cv.Seconds], max_wait: Optional[cv.Seconds]) -> Op[FetchResult]:
    req = pb.FetchRequest(key=key, fill_timeout=cv.duration(fill_timeout), max_wait=cv.duration(max_wait))
    # Not retried: a lost answer may have granted this caller a lease it never learns of.
    # The server may wait up to max_wait (default: its fill timeout, 10 s) before answering.
    wait = cv.to_timedelta(max_wait).total_seconds() if max_wait is not None else 10.0
    return Op("cache", "Fetch", req, _fetch_result, server_wait=wait)


def op_fill(key: str, token: str, value: Value, ttl: Optional[cv.Seconds], tags: Iterable[str]) -> Op[bool]:
    req = pb.FillRequest(key=key, fill_token=token, value=_bytes(value), ttl=cv.duration(ttl), tags=list(tags))
    return Op("cache", "Fill", req, lambda r: bool(r.stored))


def op_abandon_fill(key: str, token: str) -> Op[bool]:
    req = pb.AbandonFillRequest(key=key, fill_token=token)
    return Op("cache", "AbandonFill", req, lambda r: bool(r.released))


def op_invalidate_tags(tags: Sequence[str]) -> Op[int]:
    req = pb.InvalidateTagsRequest(tags=list(tags))
    return Op("cache", "InvalidateTags", req, lambda r: int(r.invalidated), retry=True)


# --- key building for cached -----------------------------------------------------------

KeySpec = Union[str, Callable[..., str], None]

_PLAIN = (str, int)


def _key_builder(func: Callable[..., Any], key: KeySpec) -> Callable[..., str]:
    if callable(key):
        return key
    sig = inspect.signature(func)
    if isinstance(key, str):
        template = key
        params = list(sig.parameters.values())
        # Every argument given positionally, none left to a default: the arguments by
        # name without binding (the hot path of a near-cached call).
        names = tuple(p.name for p in params)
        positional = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)

        # Keys already built for arguments that are all str or int (exact types: their
        # text never changes, and True or 1.0 never stand in for 1); bounded.
        built: Dict[Tuple[Any, ...], str] = {}

        def from_template(*args: Any, **kwargs: Any) -> str:
            if positional and not kwargs and len(args) == len(names):
                for a in args:
                    if type(a) not in _PLAIN:
                        return template.format_map(dict(zip(names, args)))
                k = built.get(args)
                if k is None:
                    k = template.format_map(dict(zip(names, args)))
                    if len(built) >= 4096:
                        built.clear()
                    built[args] = k
                return k
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            return template.format(**bound.arguments)

        return from_template
    prefix = f"{func.__module__}.{func.__qualname__}"

    def default(*args: Any, **kwargs: Any) -> str:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        digest = hashlib.sha256(json.dumps(bound.arguments, sort_keys=True, default=repr).encode()).hexdigest()
        return f"{prefix}:{digest[:32]}"

    return default


# --- facades ---------------------------------------------------------------------------


class Cache:
    """``client.cache``: CacheService with Python types."""

    def __init__(self, runner: SyncRunner, near: Optional[Store] = None) -> None:
        self._run = runner.run
        self._near = near

    @property
    def near_stats(self) -> Optional[NearCacheStats]:
        """The near cache's counters now (hit ratio, size, ...); None when it is off."""
        return self._near.stats() if self._near is not None else None

    def get(self, key: str, *, timeout: Optional[float] = None) -> Optional[bytes]:
        """The value under key, or None on a miss. With a near cache, a held entry is
        answered from memory."""
        near = self._near
        if near is None:
            return self._run(op_get_value(key), timeout)
        held = near.lookup(key)
        if held is not None:
            return held[0]  # type: ignore[no-any-return]
        pending = near.begin(key)
        try:
            entry = self._run(op_get(key), timeout)
        except BaseException:
            near.abandon(pending)
            raise
        if entry is None:
            near.abandon(pending)
            return None
        near.keep(pending, entry.value, _seconds(entry.ttl))
        return entry.value

    def get_entry(self, key: str, *, timeout: Optional[float] = None) -> Optional[Entry]:
        """The entry (value and remaining TTL), or None on a miss."""
        return self._run(op_get(key), timeout)

    def get_many(self, keys: Sequence[str], *, timeout: Optional[float] = None) -> Dict[str, Optional[bytes]]:
        """Values by key (None for misses), in one round trip (none when the near cache
        holds them all)."""
        near = self._near
        if near is None:
            return self._run(op_get_many(keys), timeout)
        found, missing = _near_split(near, keys)
        if missing:
            pendings = [near.begin(k) for k in missing]
            try:
                entries = self._run(op_get_many_entries(missing), timeout)
            except BaseException:
                for p in pendings:
                    near.abandon(p)
                raise
            _near_keep(near, pendings, entries, found)
        return {k: found.get(k) for k in keys}

    def set(
        self,
        key: str,
        value: Value,
        ttl: Optional[cv.Seconds] = None,
        *,
        if_absent: bool = False,
        if_present: bool = False,
        tags: Iterable[str] = (),
        timeout: Optional[float] = None,
    ) -> bool:
        """Writes value (str as UTF-8); ttl None means the server default. False when the
        condition did not hold."""
        return self._run(op_set(key, value, ttl, if_absent, if_present, tags), timeout)

    def set_many(
        self,
        items: Mapping[str, Value],
        ttl: Optional[cv.Seconds] = None,
        *,
        tags: Iterable[str] = (),
        timeout: Optional[float] = None,
    ) -> int:
        """Writes all items in one round trip; answers how many were written."""
        return self._run(op_set_many(items, ttl, tags), timeout)

    def delete(self, *keys: str, timeout: Optional[float] = None) -> int:
        """Deletes keys; answers how many had a live entry."""
        return self._run(op_delete(keys), timeout)

    def touch(self, key: str, ttl: cv.Seconds, *, timeout: Optional[float] = None) -> bool:
        """Gives an entry a new TTL; False when it does not exist."""
        return self._run(op_touch(key, ttl), timeout)

    def fetch(
        self,
        key: str,
        *,
        fill_timeout: Optional[cv.Seconds] = None,
        max_wait: Optional[cv.Seconds] = None,
        timeout: Optional[float] = None,
    ) -> FetchResult:
        """The stampede-safe read (see ``cached`` for the usual way to use it)."""
        return self._run(op_fetch(key, fill_timeout, max_wait), timeout)

    def fill(
        self,
        key: str,
        fill_token: str,
        value: Value,
        ttl: Optional[cv.Seconds] = None,
        *,
        tags: Iterable[str] = (),
        timeout: Optional[float] = None,
    ) -> bool:
        """Stores a value under a fill lease; False when the lease is no longer current."""
        return self._run(op_fill(key, fill_token, value, ttl, tags), timeout)

    def abandon_fill(self, key: str, fill_token: str, *, timeout: Optional[float] = None) -> bool:
        """Hands a fill lease back so a waiter gets it at once."""
        return self._run(op_abandon_fill(key, fill_token), timeout)

    def invalidate_tags(self, *tags: str, timeout: Optional[float] = None) -> int:
        """Deletes every entry carrying any of tags; answers how many."""
        return self._run(op_invalidate_tags(tags), timeout)

    def cached(
        self,
        ttl: Optional[cv.Seconds] = None,
        key: KeySpec = None,
        *,
        tags: Iterable[str] = (),
        serializer: Serializer = JSON,
        fill_timeout: Optional[cv.Seconds] = None,
        max_wait: Optional[cv.Seconds] = None,
        timeout: Optional[float] = None,
    ) -> Callable[[F], F]:
        """Decorator: caches a function's result under ``key``, stampede-safe.

        ``key`` is a format string over the function's arguments (``"user:{user_id}"``),
        a callable taking the same arguments, or None (module.qualname plus a hash of the
        arguments). On a miss exactly one caller runs the function and fills the value;
        concurrent callers wait for it server-side. If the function raises, the lease is
        handed back (AbandonFill) so a waiter can compute at once, and the exception
        propagates. If another caller's fill does not land within ``max_wait``, the
        function runs without caching its result. ``timeout`` is the deadline of each of
        its calls to the service (a waiter answers just before it).
        """
        tag_list = list(tags)

        def decorate(func: F) -> F:
            if inspect.iscoroutinefunction(func):
                raise TypeError("cached on a sync Client decorates sync functions; use AsyncClient for async ones")
            build_key = _key_builder(func, key)

            near = self._near

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                k = build_key(*args, **kwargs)
                pending = None
                if near is not None:
                    held = near.lookup(k)
                    if held is not None:
                        return near.decoded(held, serializer)
                    pending = near.begin(k)
                try:
                    r = self.fetch(k, fill_timeout=fill_timeout, max_wait=max_wait, timeout=timeout)
                except BaseException:
                    if near is not None:
                        near.abandon(pending)
                    raise
                if r.hit:
                    if near is not None:
                        near.keep(pending, r.value, _seconds(r.ttl))
                    return serializer.loads(r.value)
                if near is not None:
                    near.abandon(pending)
                if r.timeout:
                    return func(*args, **kwargs)
                try:
                    result = func(*args, **kwargs)
                    data = serializer.dumps(result)
                except BaseException:
                    _quietly(lambda: self.abandon_fill(k, r.fill_token, timeout=timeout))
                    raise
                self.fill(k, r.fill_token, data, ttl, tags=tag_list, timeout=timeout)
                return result

            return wrapper  # type: ignore[return-value]

        return decorate


class AsyncCache:
    """``client.cache`` on an AsyncClient: the same methods as ``Cache``, awaitable."""

    def __init__(self, runner: AsyncRunner, near: Optional[Store] = None) -> None:
        self._run = runner.run
        self._near = near

    @property
    def near_stats(self) -> Optional[NearCacheStats]:
        """See ``Cache.near_stats``."""
        return self._near.stats() if self._near is not None else None

    async def get(self, key: str, *, timeout: Optional[float] = None) -> Optional[bytes]:
        """See ``Cache.get``."""
        near = self._near
        if near is None:
            return await self._run(op_get_value(key), timeout)
        held = near.lookup(key)
        if held is not None:
            return held[0]  # type: ignore[no-any-return]
        pending = near.begin(key)
        try:
            entry = await self._run(op_get(key), timeout)
        except BaseException:
            near.abandon(pending)
            raise
        if entry is None:
            near.abandon(pending)
            return None
        near.keep(pending, entry.value, _seconds(entry.ttl))
        return entry.value

    async def get_entry(self, key: str, *, timeout: Optional[float] = None) -> Optional[Entry]:
        """See ``Cache.get_entry``."""
        return await self._run(op_get(key), timeout)

    async def get_many(self, keys: Sequence[str], *, timeout: Optional[float] = None) -> Dict[str, Optional[bytes]]:
        """See ``Cache.get_many``."""
        near = self._near
        if near is None:
            return await self._run(op_get_many(keys), timeout)
        found, missing = _near_split(near, keys)
        if missing:
            pendings = [near.begin(k) for k in missing]
            try:
                entries = await self._run(op_get_many_entries(missing), timeout)
            except BaseException:
                for p in pendings:
                    near.abandon(p)
                raise
            _near_keep(near, pendings, entries, found)
        return {k: found.get(k) for k in keys}

    async def set(
        self,
        key: str,
        value: Value,
        ttl: Optional[cv.Seconds] = None,
        *,
        if_absent: bool = False,
        if_present: bool = False,
        tags: Iterable[str] = (),
        timeout: Optional[float] = None,
    ) -> bool:
        """See ``Cache.set``."""
        return await self._run(op_set(key, value, ttl, if_absent, if_present, tags), timeout)

    async def set_many(
        self,
        items: Mapping[str, Value],
        ttl: Optional[cv.Seconds] = None,
        *,
        tags: Iterable[str] = (),
        timeout: Optional[float] = None,
    ) -> int:
        """See ``Cache.set_many``."""
        return await self._run(op_set_many(items, ttl, tags), timeout)

    async def delete(self, *keys: str, timeout: Optional[float] = None) -> int:
        """See ``Cache.delete``."""
        return await self._run(op_delete(keys), timeout)

    async def touch(self, key: str, ttl: cv.Seconds, *, timeout: Optional[float] = None) -> bool:
        """See ``Cache.touch``."""
        return await self._run(op_touch(key, ttl), timeout)

    async def fetch(
        self,
        key: str,
        *,
        fill_timeout: Optional[cv.Seconds] = None,
        max_wait: Optional[cv.Seconds] = None,
        timeout: Optional[float] = None,
    ) -> FetchResult:
        """See ``Cache.fetch``."""
        return await self._run(op_fetch(key, fill_timeout, max_wait), timeout)

    async def fill(
        self,
        key: str,
        fill_token: str,
        value: Value,
        ttl: Optional[cv.Seconds] = None,
        *,
        tags: Iterable[str] = (),
        timeout: Optional[float] = None,
    ) -> bool:
        """See ``Cache.fill``."""
        return await self._run(op_fill(key, fill_token, value, ttl, tags), timeout)

    async def abandon_fill(self, key: str, fill_token: str, *, timeout: Optional[float] = None) -> bool:
        """See ``Cache.abandon_fill``."""
        return await self._run(op_abandon_fill(key, fill_token), timeout)

    async def invalidate_tags(self, *tags: str, timeout: Optional[float] = None) -> int:
        """See ``Cache.invalidate_tags``."""
        return await self._run(op_invalidate_tags(tags), timeout)

    def cached(
        self,
        ttl: Optional[cv.Seconds] = None,
        key: KeySpec = None,
        *,
        tags: Iterable[str] = (),
        serializer: Serializer = JSON,
        fill_timeout: Optional[cv.Seconds] = None,
        max_wait: Optional[cv.Seconds] = None,
        timeout: Optional[float] = None,
    ) -> Callable[[F], F]:
        """See ``Cache.cached``; decorates ``async def`` functions."""
        tag_list = list(tags)

        def decorate(func: F) -> F:
            if not inspect.iscoroutinefunction(func):
                raise TypeError("cached on an AsyncClient decorates async functions; use Client for sync ones")
            build_key = _key_builder(func, key)

            near = self._near

            @functools.wraps(func)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                k = build_key(*args, **kwargs)
                pending = None
                if near is not None:
                    held = near.lookup(k)
                    if held is not None:
                        return near.decoded(held, serializer)
                    pending = near.begin(k)
                try:
                    r = await self.fetch(k, fill_timeout=fill_timeout, max_wait=max_wait, timeout=timeout)
                except BaseException:
                    if near is not None:
                        near.abandon(pending)
                    raise
                if r.hit:
                    if near is not None:
                        near.keep(pending, r.value, _seconds(r.ttl))
                    return serializer.loads(r.value)
                if near is not None:
                    near.abandon(pending)
                if r.timeout:
                    return await func(*args, **kwargs)
                try:
                    result = await func(*args, **kwargs)
                    data = serializer.dumps(result)
                except BaseException:
                    await _aquietly(self.abandon_fill(k, r.fill_token, timeout=timeout))
                    raise
                await self.fill(k, r.fill_token, data, ttl, tags=tag_list, timeout=timeout)
                return result

            return wrapper  # type: ignore[return-value]

        return decorate


def _near_split(near: Store, keys: Sequence[str]) -> Tuple[Dict[str, Optional[bytes]], List[str]]:
    """The values the near cache holds, and the keys to read from the service."""
    found: Dict[str, Optional[bytes]] = {}
    missing: List[str] = []
    for k in keys:
        held = near.lookup(k)
        if held is not None:
            found[k] = held[0]
        elif k not in found:
            missing.append(k)
    return found, missing


def _near_keep(
    near: Store,
    pendings: List[Any],
    entries: List[Tuple[str, Optional[bytes], Optional[float]]],
    found: Dict[str, Optional[bytes]],
) -> None:
    for pending, (k, value, ttl) in zip(pendings, entries):
        near.keep(pending, value, ttl)
        found[k] = value


def _quietly(call: Callable[[], Any]) -> None:
    # Handing a lease back is best effort: if it fails, the lease expires after
    # fill_timeout, and the caller's own exception is the one worth seeing.
    try:
        call()
    except Exception:
        pass


async def _aquietly(call: Awaitable[Any]) -> None:
    try:
        await call
    except Exception:
        pass


__all__ = ["Cache", "AsyncCache", "Entry", "FetchResult", "Serializer", "JSON"]
