"""StatsService through client.stats: every RPC and the series helper."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from cachecoord_client import InvalidArgument


def test_increment_and_totals(client, ns):
    name = ns + "api:/users"
    assert client.stats.increment(name) == 1
    assert client.stats.increment(name, 4) == 5
    assert client.stats.increment(name, -2) == 3
    assert client.stats.increment_many({name: 1, ns + "other": 7}) == [4, 7]
    assert client.stats.increment_many([(name, 1), (name, 1)]) == [5, 6]
    assert client.stats.totals(name, ns + "other", ns + "never") == {name: 6, ns + "other": 7, ns + "never": 0}


def test_concurrent_increments_all_count(client, ns):
    name = ns + "hits"
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: client.stats.increment(name), range(200)))
    assert client.stats.totals(name) == {name: 200}


def test_series_last_7_days(client, ns):
    name = ns + "api"
    client.stats.increment(name, 3)
    week = client.stats.series(name, "day", last=7)
    assert len(week.buckets) == 7
    assert week.values[-1] == 3 and sum(week.values[:-1]) == 0 and week.total == 3
    starts = [s for s, _ in week.buckets]
    assert starts == sorted(starts) and all(s.tzinfo is not None for s in starts)
    assert starts[-1] <= datetime.now(timezone.utc) < starts[-1] + timedelta(days=1)


def test_series_by_minute_and_hour_with_range(client, ns):
    name = ns + "m"
    client.stats.increment(name, 2)
    now = datetime.now(timezone.utc)
    minutes = client.stats.series(name, "minute", start=now - timedelta(minutes=59), end=now + timedelta(seconds=1))
    assert minutes.total == 2 and len(minutes.buckets) in (60, 61)
    hours = client.stats.series(name, "hour", last=24)
    assert hours.total == 2 and len(hours.buckets) == 24
    with pytest.raises(ValueError):
        client.stats.series(name, "week", last=2)


def test_active_members(client, ns):
    group = ns + "online"
    for member in ("u1", "u2", "u1"):
        client.stats.mark_active(group, member)
    assert client.stats.count_active(group, timedelta(minutes=5)) == 2
    assert client.stats.count_active(ns + "empty", 60) == 0


def test_unique_counts(client, ns):
    name = ns + "visitors"
    assert client.stats.add_unique(name, "a", "b", "c")
    client.stats.add_unique(name, "a")
    today = datetime.now(timezone.utc)
    assert client.stats.count_unique(name, today - timedelta(days=6), today) == 3
    assert client.stats.count_unique(ns + "none", today) == 0


def test_stats_errors_name_the_field(client, ns):
    with pytest.raises(InvalidArgument, match="name"):
        client.stats.increment("")
    with pytest.raises(InvalidArgument, match="window"):
        client.stats.count_active(ns + "g", timedelta(hours=25))
    with pytest.raises(InvalidArgument):
        client.stats.series(ns + "x", "minute", last=1001)
    assert client.stats.totals(ns + "x") == {ns + "x": 0}
