"""The exceptions the client raises.

Every gRPC failure is turned into one of these, so callers catch ``CachecoordError``
(or a subclass) and never ``grpc.RpcError``. Expected outcomes (a cache miss, a lock not
acquired, a denied rate limit) are return values, never exceptions, except where a helper
says otherwise (``locks.lock`` raises ``LockNotAcquired``).
"""

from __future__ import annotations

from typing import Optional

import grpc


class CachecoordError(Exception):
    """Base of every error raised by the client."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        super().__init__(message)
        #: The gRPC status code, when the error came from a call.
        self.code = code


class InvalidArgument(CachecoordError):
    """The request broke a rule; the message names the field and the rule. Nothing was written."""


class Unavailable(CachecoordError):
    """The service or its Redis could not be reached in time. Safe to retry."""


class DeadlineExceeded(CachecoordError):
    """The call's deadline passed before the service answered."""


class Unimplemented(CachecoordError):
    """The server does not implement this RPC (an older server)."""


class Cancelled(CachecoordError):
    """The call was cancelled."""


class InternalError(CachecoordError):
    """Any other failure (INTERNAL, UNKNOWN, ...): a bug or a misconfiguration."""


class Unauthenticated(CachecoordError):
    """No API key, or one the service does not hold (UNAUTHENTICATED)."""


class PermissionDenied(CachecoordError):
    """The API key may not call this method (PERMISSION_DENIED)."""


class LockNotAcquired(CachecoordError):
    """``locks.lock(...)`` could not take the lock within its ``wait``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"lock {name!r} is held by someone else")
        #: The lock's name.
        self.name = name


class LockLost(CachecoordError):
    """A held lock's lease was lost (expired or taken) while the block was running."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def from_rpc_error(err: grpc.RpcError, deadline_passed: bool = False) -> CachecoordError:
    """Maps a ``grpc.RpcError`` (sync or aio) to the client's exception for its code.

    ``deadline_passed``: the call's deadline had passed when it failed. The server's gRPC
    layer (tonic) answers CANCELLED "Timeout expired" when the caller's deadline fires on
    its side first; that is the caller's deadline, so it becomes DeadlineExceeded.
    """
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    message = f"{getattr(code, 'name', 'UNKNOWN')}: {details or ''}".rstrip(": ")
    if deadline_passed and code == grpc.StatusCode.CANCELLED:
        return DeadlineExceeded(message, grpc.StatusCode.DEADLINE_EXCEEDED)
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, code)
