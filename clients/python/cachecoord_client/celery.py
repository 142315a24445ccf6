"""Celery integration: one run per argument set at a time, and rate-limited tasks.

Install with ``pip install 'cachecoord-client[celery]'``. Put the decorators under
``@app.task``::

    cachecoord = ProcessClient("cachecoord:50051")

    @app.task
    @single_instance(cachecoord, key="report:{report_id}", ttl=60)
    def build_report(report_id: int) -> None: ...

    @app.task(max_retries=None)
    @rate_limited(cachecoord, limit=10, period=1, key="smtp")
    def send_mail(to: str) -> None: ...

Both keep the task's signature, so Celery still checks the arguments of ``delay``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import socket
import threading
from typing import Any, Callable, Dict, Optional, TypeVar, Union, cast

from celery import Task, current_task

from . import _convert as cv
from .cache import KeySpec, _key_builder
from .client import Client
from .errors import LockNotAcquired

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
#: A Client, or a function answering one (``ProcessClient``).
ClientSource = Union[Client, Callable[[], Client]]


class ProcessClient:
    """A ``Client`` per process, opened on first use.

    Celery's default pool forks its workers, and a gRPC channel opened before a fork does
    not work after it; this opens one in each process that calls it (and again after a
    fork). Pass it wherever a ``ClientSource`` is taken.
    """

    def __init__(self, target: str, **kwargs: Any) -> None:
        self._target = target
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._pid: Optional[int] = None
        self._client: Optional[Client] = None

    def __call__(self) -> Client:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = Client(self._target, **self._kwargs)
                self._pid = os.getpid()
            return self._client


def _resolve(source: ClientSource) -> Client:
    return source if isinstance(source, Client) else source()


def _task_key(func: Callable[..., Any], key: KeySpec) -> Callable[..., str]:
    """Builds keys from a call's arguments, leaving out a bound task's ``self``."""
    build = _key_builder(func, key)

    def task_key(*args: Any, **kwargs: Any) -> str:
        if key is None and args and isinstance(args[0], Task):
            # A bound task's self has a per-process repr: keep it out of the digest.
            return build(None, *args[1:], **kwargs)
        return build(*args, **kwargs)

    return task_key


def _keep_signature(wrapper: Callable[..., Any], func: F) -> F:
    # Celery checks delay()'s arguments against the signature it reads without following
    # __wrapped__; give it the task function's own.
    wrapper.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    return cast(F, wrapper)


def _owner() -> str:
    task_id = getattr(getattr(current_task, "request", None), "id", None) or "-"
    return f"{socket.gethostname()}:{os.getpid()}:{task_id}"


def single_instance(
    client: ClientSource,
    *,
    key: KeySpec = None,
    ttl: cv.Seconds = 30,
    wait: Optional[cv.Seconds] = None,
    on_duplicate: str = "skip",
    retry_countdown: float = 10.0,
    timeout: Optional[float] = None,
) -> Callable[[F], F]:
    """Task decorator: at most one run per argument set at a time, across all workers.

    The run holds the lock ``celery:<key>`` through a Hold stream: the service renews the
    lease every ``ttl``/3 for as long as the task runs, however long, and releases it when
    the task ends. If the worker dies, its connection breaks and the service releases the
    lock at once; only if the worker's host vanishes without closing the connection does
    the lock wait for ``ttl`` to pass.

    ``key`` is a format string over the task's arguments (``"report:{report_id}"``), a
    function of them, or None: the task's module and name plus a hash of its arguments.
    ``wait``: how long a duplicate waits for the running one to finish (default: not at
    all). A duplicate that does not get the lock is skipped (returns None, logged) with
    ``on_duplicate="skip"``, or retried after ``retry_countdown`` seconds with
    ``"retry"``. If the lease is lost while the task runs, the task raises ``LockLost``.
    """
    if on_duplicate not in ("skip", "retry"):
        raise ValueError(f"on_duplicate must be 'skip' or 'retry', not {on_duplicate!r}")

    def decorate(func: F) -> F:
        build_key = _task_key(func, key)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = f"celery:{build_key(*args, **kwargs)}"
            held = contextlib.ExitStack()
            try:
                held.enter_context(
                    _resolve(client).locks.lock(
                        name, ttl, wait=wait, owner=_owner(), auto_renew=True, timeout=timeout
                    )
                )
            except LockNotAcquired:
                if on_duplicate == "retry":
                    log.info("%s is running already: retrying in %ss", name, retry_countdown)
                    raise current_task.retry(countdown=retry_countdown)
                log.info("%s is running already: skipped", name)
                return None
            with held:
                return func(*args, **kwargs)

        return _keep_signature(wrapper, func)

    return decorate


def rate_limited(
    client: ClientSource,
    limit: int,
    period: cv.Seconds,
    *,
    key: KeySpec = None,
    algorithm: str = "token_bucket",
    burst: Optional[int] = None,
    cost: int = 1,
    max_retries: Optional[int] = None,
    timeout: Optional[float] = None,
) -> Callable[[F], F]:
    """Task decorator: at most ``limit`` runs per ``period`` across all workers.

    Unlike Celery's own ``rate_limit`` option, which each worker applies alone, the limit
    is the service's, so it holds for the whole fleet. A run over the limit is retried
    (``task.retry``) when the limit would let it pass (``retry_after``). Each retry counts
    against the task's ``max_retries`` (Celery's default is 3): set ``max_retries=None``
    on the task for no bound, or pass ``max_retries`` here.

    ``key`` names the limit: a format string over the arguments (``"smtp:{domain}"``), a
    function of them, or None: the task's module and name (one limit for all its runs).
    ``algorithm`` defaults to ``token_bucket``: a steady rate with bursts of ``burst``
    (default ``limit``), and an exact ``retry_after``.
    """

    def decorate(func: F) -> F:
        name = f"{func.__module__}.{func.__qualname__}"
        build_key: Callable[..., str] = (lambda *a, **k: name) if key is None else _task_key(func, key)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = _resolve(client).rate_limit.check(
                f"celery:{build_key(*args, **kwargs)}",
                limit,
                period,
                algorithm=algorithm,
                burst=burst,
                cost=cost,
                timeout=timeout,
            )
            if not result.allowed:
                countdown = result.retry_after.total_seconds()
                options: Dict[str, Any] = {"countdown": countdown}
                if max_retries is not None:
                    options["max_retries"] = max_retries
                log.info("%s is over its rate limit: retrying in %.3fs", name, countdown)
                raise current_task.retry(**options)
            return func(*args, **kwargs)

        return _keep_signature(wrapper, func)

    return decorate


__all__ = ["ClientSource", "ProcessClient", "rate_limited", "single_instance"]
