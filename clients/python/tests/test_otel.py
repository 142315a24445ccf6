"""Trace context: with the ``opentelemetry`` API installed, calls carry the caller's
``traceparent``, and the service's span of the RPC continues the caller's trace (its
per-RPC log line names the caller's trace id).

The spans come from an SDK tracer provider of the test's own (never set globally); the
service exports to a port where nothing listens, which costs it nothing but failed exports.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from cachecoord_client import AsyncClient, Client
from cachecoord_client._otel import with_trace_context
from conftest import Stack, free_port, wait_until

pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

tracer = TracerProvider().get_tracer("cachecoord-client-tests")


def trace_id_of(span) -> str:
    return format(span.get_span_context().trace_id, "032x")


@pytest.fixture()
def traced(stacks):
    """A stack whose service traces (it logs each RPC's trace id)."""
    stack = Stack("--otlp-endpoint", f"http://127.0.0.1:{free_port()}")
    stacks.append(stack)
    return stack


def logged(stack: Stack, method: str, trace_id: str) -> None:
    """Waits for the service's log line of ``method`` under ``trace_id``."""
    line = re.compile(rf"method=/cachecoord\.v1\.{method} trace_id={trace_id}\b")
    wait_until(lambda: line.search(stack.server.output()) is not None, f"{method} logged with trace {trace_id}")


def test_metadata_carries_the_current_span_and_keeps_the_api_key():
    auth = (("authorization", "Bearer k"),)
    assert with_trace_context(auth) == auth, "no span current: nothing added"
    assert with_trace_context(None) is None
    with tracer.start_as_current_span("caller") as span:
        metadata = dict(with_trace_context(auth) or ())
    assert metadata["authorization"] == "Bearer k"
    span_id = format(span.get_span_context().span_id, "016x")
    version, trace_id, parent_id, flags = metadata["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", trace_id_of(span), span_id)
    assert int(flags, 16) & 1, "sampled (newer SDKs also set 02, the random trace id flag)"


def test_sync_call_continues_the_callers_trace(traced, ns):
    with tracer.start_as_current_span("caller") as span:
        traced.client.cache.set(ns + "k", b"v")
    logged(traced, "CacheService/Set", trace_id_of(span))


def test_async_call_continues_the_callers_trace(traced, ns):
    async def main() -> str:
        async with AsyncClient(traced.server.target, timeout=10.0) as client:
            with tracer.start_as_current_span("caller") as span:
                await client.cache.get(ns + "k")
            return trace_id_of(span)

    logged(traced, "CacheService/Get", asyncio.run(main()))


def test_hold_stream_continues_the_callers_trace(traced, ns):
    with tracer.start_as_current_span("caller") as span:
        with traced.client.locks.lock(ns + "lock", ttl=5, auto_renew=True):
            logged(traced, "LockService/Hold", trace_id_of(span))


def test_async_hold_stream_continues_the_callers_trace(traced, ns):
    async def main() -> None:
        async with AsyncClient(traced.server.target, timeout=10.0) as client:
            with tracer.start_as_current_span("caller") as span:
                async with client.locks.lock(ns + "lock", ttl=5, auto_renew=True):
                    logged(traced, "LockService/Hold", trace_id_of(span))

    asyncio.run(main())


def test_without_a_span_the_service_starts_its_own_trace(traced, ns):
    with Client(traced.server.target) as client:
        client.cache.delete(ns + "k")
    wait_until(
        lambda: re.search(r"method=/cachecoord\.v1\.CacheService/Delete trace_id=[0-9a-f]{32}\b", traced.server.output()),
        "Delete logged with a trace id of the service's own",
    )
