"""SessionService through client.sessions: every RPC, errors, eviction, revocation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from cachecoord_client import InvalidArgument
from conftest import Stack


def test_create_get_touch(client, ns):
    user = ns + "user"
    s = client.sessions.create(user, {"role": "admin", "n": 5, "nested": {"a": [1, "x", None]}}, ttl=600)
    assert s.user_id == user and s.session_id
    assert s.data == {"role": "admin", "n": 5, "nested": {"a": [1, "x", None]}}
    assert isinstance(s.data["n"], int)
    assert s.created_at.tzinfo is not None
    assert timedelta(seconds=590) < s.expires_at - s.created_at <= timedelta(seconds=600)
    assert s.evicted_session_ids == ()

    got = client.sessions.get(s.session_id)
    assert got is not None and got.data == s.data and got.expires_at == s.expires_at
    touched = client.sessions.get(s.session_id, touch=True)
    assert touched is not None and touched.expires_at >= s.expires_at
    longer = client.sessions.touch(s.session_id, ttl=3600)
    assert longer is not None and longer.expires_at - s.created_at > timedelta(seconds=3500)
    assert client.sessions.get("never-issued") is None
    assert client.sessions.touch("never-issued") is None


def test_update_replace_and_merge(client, ns):
    s = client.sessions.create(ns + "u", {"a": 1, "b": 2})
    merged = client.sessions.update(s.session_id, {"b": 3, "c": None}, merge=True)
    assert merged is not None and merged.data == {"a": 1, "b": 3, "c": None}
    assert merged.expires_at == s.expires_at
    replaced = client.sessions.update(s.session_id, {"z": "only"})
    assert replaced is not None and replaced.data == {"z": "only"}
    assert client.sessions.update("never-issued", {"x": 1}) is None


def test_concurrent_merges_all_survive(client, ns):
    s = client.sessions.create(ns + "u", {})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.sessions.update(s.session_id, {f"f{i}": i}, merge=True), range(40)))
    got = client.sessions.get(s.session_id)
    assert got is not None and got.data == {f"f{i}": i for i in range(40)}


def test_delete_list_and_delete_for_user(client, ns):
    user = ns + "u"
    ids = [client.sessions.create(user, {"i": i}).session_id for i in range(3)]
    listed = client.sessions.list_for_user(user)
    assert [x.session_id for x in listed] == list(reversed(ids))  # newest first
    assert client.sessions.delete(ids[0])
    assert not client.sessions.delete(ids[0])
    assert client.sessions.delete_for_user(user, keep=ids[2]) == 1
    assert [x.session_id for x in client.sessions.list_for_user(user)] == [ids[2]]
    assert client.sessions.delete_for_user(user) == 1
    assert client.sessions.list_for_user(user) == []


def test_per_user_cap_evicts_oldest(stacks, ns):
    stack = Stack("--session-max-per-user", "2")
    stacks.append(stack)
    sessions = stack.client.sessions
    a = sessions.create(ns + "u")
    b = sessions.create(ns + "u")
    c = sessions.create(ns + "u")
    assert c.evicted_session_ids == (a.session_id,)
    assert sessions.get(a.session_id) is None
    assert sessions.get(b.session_id) is not None


def test_revoke_and_check_tokens(client, ns):
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    jwt = ns + "eyJhbGciOi.jti-1"
    assert not client.sessions.is_revoked(jwt)
    assert client.sessions.revoke_token(jwt, soon)
    assert client.sessions.is_revoked(jwt)
    assert client.sessions.check_tokens([ns + "other", jwt]) == [False, True]
    assert client.sessions.check_tokens([]) == []
    # Already expired: nothing to store.
    assert not client.sessions.revoke_token(ns + "old", datetime.now(timezone.utc) - timedelta(seconds=5))
    # A naive datetime is taken as UTC.
    assert client.sessions.revoke_token(ns + "naive", datetime.utcnow() + timedelta(minutes=5))


def test_session_errors_name_the_field(client, ns):
    with pytest.raises(InvalidArgument, match="user_id"):
        client.sessions.create("")
    with pytest.raises(InvalidArgument, match="ttl"):
        client.sessions.create(ns + "u", ttl=timedelta(days=31))
    with pytest.raises(InvalidArgument, match="expires_at"):
        client.sessions.revoke_token(ns + "t", datetime.now(timezone.utc) + timedelta(days=400))
    assert client.sessions.list_for_user(ns + "u") == []
