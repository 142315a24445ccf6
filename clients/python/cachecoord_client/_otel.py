"""Passes the caller's OpenTelemetry trace context on to the service.

When the ``opentelemetry`` API package is importable (``pip install
cachecoord-client[otel]``), every call carries the current context in its metadata
(``traceparent``, ``tracestate``, through the globally configured propagator, W3C trace
context by default), so the service's span of the RPC continues the caller's trace.
Without the package, or with no span current, calls carry nothing extra.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

Metadata = Optional[Tuple[Tuple[str, str], ...]]

_inject: Optional[Callable[[Dict[str, str]], None]]
try:
    from opentelemetry.propagate import inject as _otel_inject

    _inject = _otel_inject
except ImportError:  # the API is an optional extra
    _inject = None


def with_trace_context(metadata: Metadata) -> Metadata:
    """``metadata`` plus the current trace context, if there is one to pass on."""
    if _inject is None:
        return metadata
    carrier: Dict[str, str] = {}
    _inject(carrier)
    if not carrier:
        return metadata
    # gRPC metadata keys are lowercase.
    return (metadata or ()) + tuple((key.lower(), value) for key, value in carrier.items())
