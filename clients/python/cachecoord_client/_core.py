"""How one RPC is described (``Op``) and run, sync or async, with deadlines and retries.

Each facade method builds an ``Op``: the stub method, the request, how to turn the response
into Python values, and whether the RPC may be retried. The sync and async facades share the
ops, so they cannot drift apart. A call's deadline (its ``timeout=`` or the client's default)
bounds the whole call, retries and their pauses included.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, Optional, Tuple, TypeVar

import grpc

from ._otel import with_trace_context
from .errors import from_rpc_error

T = TypeVar("T")


@dataclass(frozen=True)
class Op(Generic[T]):
    """One unary RPC call, described independently of how it is run."""

    #: Which service stub: "cache", "sessions", "rate_limit", "locks" or "stats".
    service: str
    #: The stub's method name, e.g. "Get".
    method: str
    #: The request message.
    request: Any
    #: Turns the response message into the facade's return value.
    convert: Callable[[Any], T]
    #: True when a retry after UNAVAILABLE cannot do harm (the RPC is idempotent).
    retry: bool = False
    #: Seconds the server may legitimately wait before answering (a Fetch's max_wait, an
    #: Acquire's wait); added to the default deadline so the wait is not cut short.
    server_wait: float = 0.0


@dataclass(frozen=True)
class CallPolicy:
    """Deadline and retry settings shared by every call of a client."""

    #: Default deadline of a call, in seconds (plus any server-side wait it asks for).
    timeout: float = 5.0
    #: How many times an idempotent call is retried after UNAVAILABLE.
    retries: int = 2
    #: First backoff in seconds; doubled each retry, with jitter.
    backoff: float = 0.05
    #: Metadata sent with every call (the API key), or None.
    metadata: Optional[Tuple[Tuple[str, str], ...]] = None

    def budget(self, op: Op[Any], timeout: Optional[float]) -> float:
        """Seconds the whole call (every attempt and pause) may take: the call's own
        ``timeout`` when given, else the default plus any server-side wait op asks for."""
        return timeout if timeout is not None else self.timeout + op.server_wait

    def attempts(self, op: Op[Any]) -> int:
        """How many attempts op gets."""
        return 1 + self.retries if op.retry else 1

    def pause(self, attempt: int) -> float:
        """Seconds to wait before retry number attempt (1-based)."""
        base: float = self.backoff * (2 ** (attempt - 1))
        return base * (0.5 + random.random())


def _retryable(err: grpc.RpcError) -> bool:
    return bool(err.code() == grpc.StatusCode.UNAVAILABLE)


class SyncRunner:
    """Runs ops on blocking stubs."""

    def __init__(self, stubs: Dict[str, Any], policy: CallPolicy) -> None:
        self.stubs = stubs
        self.policy = policy

    def run(self, op: Op[T], timeout: Optional[float] = None) -> T:
        """Calls op within its deadline, retrying if allowed; raises CachecoordError."""
        method = getattr(self.stubs[op.service], op.method)
        attempts = self.policy.attempts(op)
        end = time.monotonic() + self.policy.budget(op, timeout)
        metadata = with_trace_context(self.policy.metadata)
        for attempt in range(1, attempts + 1):
            try:
                response = method(op.request, timeout=max(end - time.monotonic(), 0.0), metadata=metadata)
            except grpc.RpcError as err:
                pause = self.policy.pause(attempt)
                if attempt < attempts and _retryable(err) and time.monotonic() + pause < end:
                    time.sleep(pause)
                    continue
                raise from_rpc_error(err, time.monotonic() >= end) from None
            return op.convert(response)
        raise AssertionError("unreachable")


class AsyncRunner:
    """Runs ops on grpc.aio stubs."""

    def __init__(self, stubs: Dict[str, Any], policy: CallPolicy) -> None:
        self.stubs = stubs
        self.policy = policy

    async def run(self, op: Op[T], timeout: Optional[float] = None) -> T:
        """Calls op within its deadline, retrying if allowed; raises CachecoordError.

        Cancelling the awaiting task cancels the RPC in flight (grpc.aio sends RST_STREAM,
        so the service stops waiting on the caller's behalf) and raises CancelledError.
        """
        method = getattr(self.stubs[op.service], op.method)
        attempts = self.policy.attempts(op)
        end = time.monotonic() + self.policy.budget(op, timeout)
        metadata = with_trace_context(self.policy.metadata)
        for attempt in range(1, attempts + 1):
            try:
                response = await method(op.request, timeout=max(end - time.monotonic(), 0.0), metadata=metadata)
            except grpc.RpcError as err:
                pause = self.policy.pause(attempt)
                if attempt < attempts and _retryable(err) and time.monotonic() + pause < end:
                    await asyncio.sleep(pause)
                    continue
                raise from_rpc_error(err, time.monotonic() >= end) from None
            return op.convert(response)
        raise AssertionError("unreachable")
