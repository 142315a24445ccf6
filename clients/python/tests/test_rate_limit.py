"""RateLimitService through client.rate_limit: every RPC, errors, exact admission."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from cachecoord_client import InvalidArgument, Limit


def test_check_allowed_remaining_then_denied_with_retry_after(client, ns):
    key = ns + "login"
    for left in (2, 1, 0):
        r = client.rate_limit.check(key, limit=3, period=60, algorithm="token_bucket")
        assert r.allowed and bool(r) and r.remaining == left and r.retry_after == timedelta(0)
    denied = client.rate_limit.check(key, limit=3, period=60, algorithm="token_bucket")
    assert not denied.allowed and denied.remaining == 0
    assert timedelta(seconds=15) <= denied.retry_after <= timedelta(seconds=20)
    assert denied.retry_after_seconds in range(15, 21)
    assert not denied.unchecked


def test_peek_consumes_nothing(client, ns):
    key = ns + "peek"
    for _ in range(3):
        assert client.rate_limit.check(key, 2, 60, algorithm="fixed_window", peek=True).remaining == 2
    assert client.rate_limit.check(key, 2, 60, algorithm="fixed_window").remaining == 1


def test_check_all_is_all_or_nothing(client, ns):
    tight = Limit(ns + "{u}:tight", 1, timedelta(days=30), "token_bucket")
    wide = Limit(ns + "{u}:hour", 100, timedelta(hours=1))
    first = client.rate_limit.check_all([tight, wide])
    assert first.allowed and [s.key for s in first.statuses] == [tight.key, wide.key]
    assert first.remaining == 0  # the smallest remaining over the limits
    second = client.rate_limit.check_all([tight, wide])
    assert not second.allowed
    assert [s.allowed for s in second.statuses] == [False, True]
    assert second.statuses[1].remaining == 99  # the wide limit was not consumed


def test_cost_and_burst(client, ns):
    r = client.rate_limit.check(ns + "up", 100, 3600, algorithm="token_bucket", burst=10, cost=10)
    assert r.allowed and r.remaining == 0
    with pytest.raises(InvalidArgument, match="cost"):
        client.rate_limit.check(ns + "up", 100, 3600, algorithm="token_bucket", burst=10, cost=11)
    with pytest.raises(InvalidArgument, match="burst"):
        client.rate_limit.check(ns + "x", 100, 3600, algorithm="fixed_window", burst=10)


def test_reset(client, ns):
    key = ns + "r"
    client.rate_limit.check(key, 1, 3600)
    assert not client.rate_limit.check(key, 1, 3600).allowed
    assert client.rate_limit.reset(key, ns + "never") == 1
    assert client.rate_limit.check(key, 1, 3600).allowed


def test_admits_exactly_the_allowance_under_concurrency(client, ns):
    key = ns + "api"
    allowance, callers = 25, 100
    # Fixed window of 30 days: no window boundary or refill inside the test.
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(
                lambda _: client.rate_limit.check(key, allowance, timedelta(days=30), algorithm="token_bucket"),
                range(callers),
            )
        )
    assert sum(r.allowed for r in results) == allowance
    assert all(r.retry_after > timedelta(0) for r in results if not r.allowed)


def test_invalid_limits(client, ns):
    with pytest.raises(InvalidArgument, match="limit"):
        client.rate_limit.check(ns + "k", 0, 60)
    with pytest.raises(InvalidArgument, match="period"):
        client.rate_limit.check(ns + "k", 1, timedelta(days=31))
    with pytest.raises(ValueError):
        client.rate_limit.check(ns + "k", 1, 60, algorithm="leaky")
