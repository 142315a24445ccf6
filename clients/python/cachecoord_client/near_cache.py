"""The near cache: hot cache entries kept in this process, dropped the moment the service
reports them changed (``CacheService/WatchInvalidations``).

Turned on per client with ``near_cache=NearCache(...)`` (or ``near_cache=True`` for the
defaults). ``cache.get``, ``get_entry``, ``get_many`` and ``@cached`` answer from memory when
they can; every write still goes to the service, and every change of a held key, by any
caller through any service instance, removes it here.

What a reader can see (ARCHITECTURE.md, "Near cache"):

- Once the invalidation of a write has arrived in this process, no read here returns the
  value from before that write. Until it arrives (normally well under a millisecond after
  the writer's acknowledgement on one host), a read may still return the older value.
- An entry is never kept longer than ``max_staleness`` seconds after it was read from the
  service, nor past its Redis TTL (counted from before the read was sent).
- When the watch stream breaks, every entry is dropped before the next read is answered
  from memory, and nothing is kept until a new watch is in force.
- An entry read while an invalidation of its key arrived is not kept (it may predate it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import grpc

from ._proto.cachecoord.v1 import cache_pb2 as pb

log = logging.getLogger("cachecoord_client.near_cache")


@dataclass(frozen=True)
class NearCache:
    """Near-cache settings (``Client(..., near_cache=NearCache(...))``)."""

    #: Most entries held; past it, the entry stored longest ago is dropped first.
    max_entries: int = 10_000
    #: Seconds an entry may be served after it was read from the service, even if no
    #: invalidation came: the safety net against an invalidation that never arrives
    #: (a network path that dies silently). None: no such bound beyond the TTL.
    max_staleness: Optional[float] = 10.0
    #: Only keys starting with one of these are held (and watched); empty: every key.
    prefixes: Sequence[str] = ()
    #: Seconds to wait before watching again after the stream broke.
    reconnect_delay: float = 0.1

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if self.max_staleness is not None and self.max_staleness <= 0:
            raise ValueError("max_staleness must be positive")
        if any(not p for p in self.prefixes):
            raise ValueError("prefixes must not be empty strings")


NearCacheOption = Union[NearCache, bool, None]


def settings(option: NearCacheOption) -> Optional[NearCache]:
    """The settings a client's ``near_cache=`` argument asks for, or None (off)."""
    if option is None or option is False:
        return None
    if option is True:
        return NearCache()
    if isinstance(option, NearCache):
        return option
    raise TypeError("near_cache takes a NearCache, True or None")


@dataclass(frozen=True)
class NearCacheStats:
    """Counters of one client's near cache since it was created."""

    #: Reads answered from memory (``@cached`` calls included).
    hits: int
    #: Reads of keys it may hold that went to the service.
    misses: int
    #: Keys dropped because the service reported them changed.
    invalidations: int
    #: Times everything was dropped (stream broke, a flush, the client closed).
    resets: int
    #: Entries held now.
    size: int
    #: True while a watch is in force (entries can be kept).
    live: bool

    @property
    def hit_ratio(self) -> float:
        """hits / (hits + misses); 0.0 before any read."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class Pending:
    """A read in flight whose answer may be kept: see ``Store.begin``."""

    __slots__ = ("key", "generation", "sent")

    def __init__(self, key: str, generation: int, sent: float) -> None:
        self.key = key
        self.generation = generation
        self.sent = sent


class Store:
    """The entries and the rules for keeping them; shared by the sync and async clients.

    The hit path takes no lock (a dict lookup under the GIL); everything that changes the
    entries does, so an invalidation and the keeping of a read cannot interleave.
    """

    def __init__(self, config: NearCache) -> None:
        self.config = config
        self._prefixes: Tuple[str, ...] = tuple(config.prefixes)
        # key -> [value bytes, expires at (monotonic), decoded values by serializer id]
        self._entries: Dict[str, List[Any]] = {}
        # key -> the Pending read that may keep its answer
        self._pending: Dict[str, Pending] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self.live = False
        self.disabled = False
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self.resets = 0

    # --- reads ---------------------------------------------------------------------

    def lookup(self, key: str) -> Optional[List[Any]]:
        """The live entry of key, or None (counted as a miss when key is one it holds)."""
        entry = self._entries.get(key)
        if entry is not None:
            if entry[1] > time.monotonic():
                self.hits += 1
                return entry
            self._drop(key, entry)
        if self._holds(key):
            self.misses += 1
        return None

    def _holds(self, key: str) -> bool:
        return not self._prefixes or key.startswith(self._prefixes)

    def _drop(self, key: str, entry: List[Any]) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]

    def begin(self, key: str) -> Optional[Pending]:
        """Marks a read of key about to be sent; None when its answer may not be kept."""
        if not self.live or not self._holds(key):
            return None
        pending = Pending(key, self._generation, time.monotonic())
        with self._lock:
            self._pending[key] = pending
        return pending

    def keep(self, pending: Optional[Pending], value: Optional[bytes], ttl: Optional[float]) -> None:
        """Keeps the answer of a read begun with ``begin``, if nothing voided it meanwhile:
        an invalidation of its key, a reset, or a later read of the same key."""
        if pending is None:
            return
        with self._lock:
            if self._pending.get(pending.key) is not pending:
                return
            del self._pending[pending.key]
            if value is None or pending.generation != self._generation or not self.live:
                return
            expires = pending.sent + ttl if ttl is not None else float("inf")
            if self.config.max_staleness is not None:
                expires = min(expires, pending.sent + self.config.max_staleness)
            self._entries.pop(pending.key, None)
            while len(self._entries) >= self.config.max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[pending.key] = [value, expires, None]

    def abandon(self, pending: Optional[Pending]) -> None:
        """Forgets a read that failed."""
        if pending is not None:
            with self._lock:
                if self._pending.get(pending.key) is pending:
                    del self._pending[pending.key]

    def decoded(self, entry: List[Any], serializer: Any) -> Any:
        """The entry's value decoded by serializer, decoded once per entry."""
        memo = entry[2]
        if memo is not None and memo[0] is serializer:
            return memo[1]
        value = serializer.loads(entry[0])
        entry[2] = (serializer, value)
        return value

    # --- the watch -----------------------------------------------------------------

    def on_ready(self) -> None:
        """A watch is in force: reads from now on may be kept."""
        with self._lock:
            self.live = True

    def on_keys(self, keys: Iterable[str]) -> None:
        """The service reported these keys changed."""
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)
                self._pending.pop(key, None)
                self.invalidations += 1

    def reset(self, live: bool = False) -> None:
        """Drops everything (the watch broke, a flush); keeps nothing until ``live``."""
        with self._lock:
            self.live = live and self.live
            self._generation += 1
            self._entries.clear()
            self._pending.clear()
            self.resets += 1

    def stats(self) -> NearCacheStats:
        return NearCacheStats(
            hits=self.hits,
            misses=self.misses,
            invalidations=self.invalidations,
            resets=self.resets,
            size=len(self._entries),
            live=self.live,
        )


def _request(config: NearCache) -> Any:
    return pb.WatchInvalidationsRequest(prefixes=list(config.prefixes))


def _apply(store: Store, message: Any, first: bool) -> None:
    if first:
        store.on_ready()
    elif message.all:
        store.reset(live=True)
    elif message.keys:
        store.on_keys(message.keys)


def _unimplemented(err: grpc.RpcError, store: Store) -> bool:
    if err.code() == grpc.StatusCode.UNIMPLEMENTED:
        log.warning("near cache off: the service cannot watch invalidations (%s)", err.details())
        store.disabled = True
        return True
    return False


class SyncWatcher:
    """Keeps a watch open on a daemon thread, watching again after each break."""

    def __init__(self, stub: Any, store: Store, metadata: Any = None) -> None:
        self._stub = stub
        self._store = store
        self._metadata = metadata
        self._closed = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name="cachecoord-near-cache", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        store = self._store
        while not self._closed.is_set():
            try:
                call = self._stub.WatchInvalidations(_request(store.config), metadata=self._metadata)
                self._call = call
                if self._closed.is_set():
                    call.cancel()
                first = True
                for message in call:
                    _apply(store, message, first)
                    first = False
                store.reset()
            except grpc.RpcError as err:
                store.reset()
                if _unimplemented(err, store):
                    return
                if not self._closed.is_set():
                    log.debug("near-cache watch broke: %s", err.code())
            self._closed.wait(store.config.reconnect_delay)

    def close(self) -> None:
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5)
        self._store.reset()


class AsyncWatcher:
    """Keeps a watch open in an asyncio task, watching again after each break."""

    def __init__(self, stub: Any, store: Store, metadata: Any = None) -> None:
        self._stub = stub
        self._store = store
        self._metadata = metadata
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        store = self._store
        while not self._closed:
            try:
                call = self._stub.WatchInvalidations(_request(store.config), metadata=self._metadata)
                first = True
                async for message in call:
                    _apply(store, message, first)
                    first = False
                store.reset()
            except grpc.RpcError as err:
                store.reset()
                if _unimplemented(err, store):
                    return
                log.debug("near-cache watch broke: %s", err.code())
            except asyncio.CancelledError:
                store.reset()
                raise
            await asyncio.sleep(store.config.reconnect_delay)

    async def close(self) -> None:
        self._closed = True
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass
        self._store.reset()


__all__ = ["NearCache", "NearCacheStats"]
