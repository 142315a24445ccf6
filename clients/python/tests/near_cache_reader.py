"""A reader process for test_near_cache's zero-stale-reads test (run as a script).

Usage: near_cache_reader.py TARGET KEY SECONDS

Reads KEY (an integer version, written by one writer that only ever increases it)
through a near cache for SECONDS and prints a JSON report. A read is stale when it
returns a version below the number of invalidations of KEY this process had received
before the read began: each invalidation follows at least one more applied write, and
the first version was written before the watch started.
"""

from __future__ import annotations

import json
import sys
import time

from cachecoord_client import Client, NearCache, NearCacheStats


def main() -> None:
    target, key, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    client = Client(target, timeout=10.0, near_cache=NearCache(prefixes=[key]))

    def stats() -> NearCacheStats:
        snapshot = client.cache.near_stats
        assert snapshot is not None
        return snapshot

    deadline = time.monotonic() + 30
    while not stats().live:
        if time.monotonic() > deadline:
            raise SystemExit("the near cache never went live")
        time.sleep(0.005)
    print("ready", flush=True)
    reads = stale = backwards = 0
    last = -1
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen = stats().invalidations
        value = client.cache.get(key)
        version = int(value) if value is not None else -1
        reads += 1
        if version < seen:
            stale += 1
        if version < last:
            backwards += 1
        last = max(last, version)
    final = stats()
    client.close()
    report = {
        "reads": reads,
        "stale": stale,
        "backwards": backwards,
        "last": last,
        "hits": final.hits,
        "invalidations": final.invalidations,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
