"""Python client for cachecoord.

``Client`` / ``AsyncClient`` expose one facade per service (``cache``, ``sessions``,
``rate_limit``, ``locks``, ``stats``) with Python types, deadlines on every call, retries
only for idempotent RPCs, and the exceptions of ``cachecoord_client.errors``. The generated
stubs are under ``cachecoord_client._proto.cachecoord.v1`` for direct use.
"""

from .cache import JSON, Entry, FetchResult, Serializer
from .client import AsyncClient, Client
from .errors import (
    CachecoordError,
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    LockLost,
    LockNotAcquired,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .locks import Lease, LockInfo
from .near_cache import NearCache, NearCacheStats
from .rate_limit import Limit, LimitStatus, RateLimitResult
from .sessions import Session
from .stats import Series
from .tls import TLS

__all__ = [
    "AsyncClient",
    "CachecoordError",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "Entry",
    "FetchResult",
    "InternalError",
    "InvalidArgument",
    "JSON",
    "Lease",
    "Limit",
    "LimitStatus",
    "LockInfo",
    "LockLost",
    "LockNotAcquired",
    "NearCache",
    "NearCacheStats",
    "PermissionDenied",
    "RateLimitResult",
    "Series",
    "Serializer",
    "Session",
    "TLS",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
