"""API keys against the real binary: every facade (a Hold stream included) presents the
key; no key, a wrong key and a key out of its scope raise the right errors; two tenants
using the same names never meet."""

import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest

from cachecoord_client import AsyncClient, Client, PermissionDenied, Unauthenticated

from conftest import Redis, Server, binary, run_async


def new_key(key_id: str, tenant: str, allow: str = "*") -> Tuple[str, str]:
    """``cachecoord keys new``: (the key, its keys-file entry)."""
    done = subprocess.run(
        [str(binary()), "keys", "new", "--id", key_id, "--tenant", tenant, "--allow", allow],
        check=True, capture_output=True, text=True,
    )
    return done.stderr.strip().splitlines()[-1], done.stdout


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    keys: List[Tuple[str, str]] = [
        new_key("alpha", "alpha"),
        new_key("beta", "beta"),
        new_key("cache-only", "alpha", "cachecoord.v1.CacheService"),
    ]
    path: Path = tmp_path_factory.mktemp("auth") / "keys.toml"
    path.write_text("".join(entry for _, entry in keys))
    redis = Redis()
    server = Server(redis, "--auth-keys-file", str(path))
    yield server, [key for key, _ in keys]
    server.close()
    redis.close()


def test_no_key_and_wrong_key_are_unauthenticated(secured) -> None:
    server, _ = secured
    with Client(server.target) as anonymous:
        with pytest.raises(Unauthenticated):
            anonymous.cache.get("k")
    wrong, _ = new_key("alpha", "alpha")
    with Client(server.target, api_key=wrong) as client:
        with pytest.raises(Unauthenticated):
            client.cache.get("k")
    with pytest.raises(ValueError):
        Client(server.target, api_key="")


def test_a_key_out_of_scope_is_permission_denied(secured) -> None:
    server, (_, _, cache_only) = secured
    with Client(server.target, api_key=cache_only) as client:
        client.cache.set("k", b"v")
        with pytest.raises(PermissionDenied):
            client.locks.acquire("l")


def test_tenants_with_the_same_names_never_meet(secured) -> None:
    server, (alpha_key, beta_key, _) = secured
    with Client(server.target, api_key=alpha_key) as alpha, Client(server.target, api_key=beta_key) as beta:
        alpha.cache.set("shared", b"alpha's")
        assert beta.cache.get("shared") is None
        beta.cache.set("shared", b"beta's")
        assert alpha.cache.get("shared") == b"alpha's"
        # A Hold stream presents the key too, and the lock names are per tenant.
        with alpha.locks.lock("job", ttl=5.0, auto_renew=True) as mine, beta.locks.lock(
            "job", ttl=5.0, auto_renew=True
        ) as theirs:
            assert mine.fencing_token >= 1 and theirs.fencing_token >= 1


def test_the_async_client_presents_its_key(secured) -> None:
    server, (alpha_key, _, _) = secured

    async def body(_client: AsyncClient) -> None:
        async with AsyncClient(server.target, api_key=alpha_key) as client:
            await client.cache.set("async", b"v")
            assert await client.cache.get("async") == b"v"
            async with client.locks.lock("async-job", ttl=5.0, auto_renew=True) as lease:
                assert lease.fencing_token >= 1
        async with AsyncClient(server.target) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.cache.get("async")

    run_async(server, body)


def test_the_near_cache_watch_presents_the_key(secured) -> None:
    import time

    server, (alpha_key, beta_key, _) = secured
    with Client(server.target, api_key=alpha_key, near_cache=True) as alpha, Client(
        server.target, api_key=beta_key
    ) as beta:
        deadline = time.monotonic() + 10
        while not alpha.cache.near_stats.live:  # the watch was admitted with the key
            assert time.monotonic() < deadline, "the watch never came into force"
            time.sleep(0.01)
        alpha.cache.set("near", b"1")
        while alpha.cache.near_stats.hits < 1:  # kept once no invalidation raced the read
            assert alpha.cache.get("near") == b"1"
            assert time.monotonic() < deadline, "never answered from the near cache"
        beta.cache.set("near", b"beta's")  # another tenant's key: never on alpha's stream (tests/invalidation.rs)
        assert alpha.cache.get("near") == b"1"
        alpha.cache.set("near", b"2")  # alpha's own write invalidates alpha's entry
        while alpha.cache.get("near") != b"2":
            assert time.monotonic() < deadline, "alpha's own write never reached its near cache"
            time.sleep(0.01)
