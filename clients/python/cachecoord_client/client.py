"""``Client`` (blocking) and ``AsyncClient`` (grpc.aio)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import grpc

from ._core import AsyncRunner, CallPolicy, SyncRunner
from ._proto.cachecoord.v1 import (
    cache_pb2_grpc,
    lock_pb2_grpc,
    rate_limit_pb2_grpc,
    session_pb2_grpc,
    stats_pb2_grpc,
)
from .cache import AsyncCache, Cache
from .locks import AsyncLocks, Locks
from .near_cache import AsyncWatcher, NearCacheOption, Store, SyncWatcher, settings
from .rate_limit import AsyncRateLimits, RateLimits
from .sessions import AsyncSessions, Sessions
from .stats import AsyncStats, Stats
from .tls import TLS, channel_security

Options = Sequence[Tuple[str, Any]]


def _stubs(channel: Any) -> Dict[str, Any]:
    return {
        "cache": cache_pb2_grpc.CacheServiceStub(channel),
        "sessions": session_pb2_grpc.SessionServiceStub(channel),
        "rate_limit": rate_limit_pb2_grpc.RateLimitServiceStub(channel),
        "locks": lock_pb2_grpc.LockServiceStub(channel),
        "stats": stats_pb2_grpc.StatsServiceStub(channel),
    }


def _auth_metadata(api_key: Optional[str]) -> Optional[Tuple[Tuple[str, str], ...]]:
    """The metadata that presents api_key (``authorization: Bearer <key>``), if any."""
    if api_key is None:
        return None
    if not api_key or any(c.isspace() for c in api_key):
        raise ValueError("api_key must be a non-empty key without whitespace")
    return (("authorization", f"Bearer {api_key}"),)


class Client:
    """A blocking client for cachecoord, safe to share between threads.

    ``Client("localhost:50051")`` opens a plaintext channel; ``tls=True`` speaks TLS
    trusting gRPC's default roots, ``tls=TLS(ca=..., cert=..., key=...)`` with a CA and
    client certificate of your own (or pass grpc ``credentials``, or a ``channel`` of
    your own). ``timeout`` is the default deadline of every call in
    seconds (calls that wait server-side get that wait on top); ``retries`` is how often
    idempotent calls are retried after UNAVAILABLE. ``api_key`` is sent with every call
    (``authorization: Bearer <key>``) to a service that requires keys; without one, or
    with one it does not hold, calls raise ``Unauthenticated``, and ``PermissionDenied``
    when the key may not call the method. ``near_cache`` (a ``NearCache``, or True for its
    defaults) keeps hot cache entries in this process, dropped as soon as the service
    reports them changed (see ``cachecoord_client.near_cache``). Use as a context manager
    or ``close()``.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = 5.0,
        retries: int = 2,
        tls: Union[bool, TLS, None] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        options: Optional[Options] = None,
        channel: Optional[grpc.Channel] = None,
        api_key: Optional[str] = None,
        near_cache: NearCacheOption = None,
    ) -> None:
        if channel is None:
            credentials, opts = channel_security(tls, credentials, options)
            channel = (
                grpc.secure_channel(target, credentials, opts)
                if credentials is not None
                else grpc.insecure_channel(target, opts)
            )
        self._channel = channel
        stubs = _stubs(channel)
        metadata = _auth_metadata(api_key)
        runner = SyncRunner(stubs, CallPolicy(timeout=timeout, retries=retries, metadata=metadata))
        config = settings(near_cache)
        near = Store(config) if config is not None else None
        self._watcher = SyncWatcher(stubs["cache"], near, metadata) if near is not None else None
        #: CacheService.
        self.cache = Cache(runner, near)
        #: SessionService.
        self.sessions = Sessions(runner)
        #: RateLimitService.
        self.rate_limit = RateLimits(runner)
        #: LockService.
        self.locks = Locks(runner)
        #: StatsService.
        self.stats = Stats(runner)

    def close(self) -> None:
        """Stops the near cache's watch (if any) and closes the channel."""
        if self._watcher is not None:
            self._watcher.close()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient:
    """The asyncio client (grpc.aio); the same facades with awaitable methods.

    Create it inside the running event loop; ``async with AsyncClient(...) as client:``
    or ``await client.close()``. The arguments are those of ``Client``.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = 5.0,
        retries: int = 2,
        tls: Union[bool, TLS, None] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        options: Optional[Options] = None,
        channel: Optional[grpc.aio.Channel] = None,
        api_key: Optional[str] = None,
        near_cache: NearCacheOption = None,
    ) -> None:
        if channel is None:
            credentials, opts = channel_security(tls, credentials, options)
            channel = (
                grpc.aio.secure_channel(target, credentials, opts)
                if credentials is not None
                else grpc.aio.insecure_channel(target, opts)
            )
        self._channel = channel
        stubs = _stubs(channel)
        metadata = _auth_metadata(api_key)
        runner = AsyncRunner(stubs, CallPolicy(timeout=timeout, retries=retries, metadata=metadata))
        config = settings(near_cache)
        near = Store(config) if config is not None else None
        self._watcher = AsyncWatcher(stubs["cache"], near, metadata) if near is not None else None
        #: CacheService.
        self.cache = AsyncCache(runner, near)
        #: SessionService.
        self.sessions = AsyncSessions(runner)
        #: RateLimitService.
        self.rate_limit = AsyncRateLimits(runner)
        #: LockService.
        self.locks = AsyncLocks(runner)
        #: StatsService.
        self.stats = AsyncStats(runner)

    async def close(self) -> None:
        """Stops the near cache's watch (if any) and closes the channel."""
        if self._watcher is not None:
            await self._watcher.close()
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
