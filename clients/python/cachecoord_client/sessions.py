"""SessionService facade: login sessions and token revocation."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _convert as cv
from ._core import AsyncRunner, Op, SyncRunner
from ._proto.cachecoord.v1 import session_pb2 as pb


@dataclass(frozen=True)
class Session:
    """One login session."""

    #: Opaque secret id (URL-safe base64).
    session_id: str
    #: The user it belongs to.
    user_id: str
    #: The session's data, a JSON object.
    data: Dict[str, Any]
    #: When it was created (aware, UTC).
    created_at: datetime
    #: When it expires unless touched before (aware, UTC).
    expires_at: datetime
    #: Only from ``create``: ids of this user's sessions evicted to stay within the
    #: per-user cap, oldest first.
    evicted_session_ids: Tuple[str, ...] = field(default=())


def _session(s: Any, evicted: Sequence[str] = ()) -> Session:
    return Session(
        session_id=s.session_id,
        user_id=s.user_id,
        data=cv.from_struct(s.data),
        created_at=cv.from_timestamp(s.created_at),
        expires_at=cv.from_timestamp(s.expires_at),
        evicted_session_ids=tuple(evicted),
    )


def _found(r: Any) -> Optional[Session]:
    return _session(r.session) if r.found else None


def op_create(user_id: str, data: Optional[Dict[str, Any]], ttl: Optional[cv.Seconds]) -> Op[Session]:
    req = pb.CreateSessionRequest(user_id=user_id, data=cv.struct(data), ttl=cv.duration(ttl))
    # Not retried: a retry after a lost answer would create a second session.
    return Op("sessions", "CreateSession", req, lambda r: _session(r.session, r.evicted_session_ids))


def op_get(session_id: str, touch: bool) -> Op[Optional[Session]]:
    return Op("sessions", "GetSession", pb.GetSessionRequest(session_id=session_id, touch=touch), _found, retry=True)


def op_touch(session_id: str, ttl: Optional[cv.Seconds]) -> Op[Optional[Session]]:
    req = pb.TouchSessionRequest(session_id=session_id, ttl=cv.duration(ttl))
    return Op("sessions", "TouchSession", req, _found, retry=True)


def op_update(session_id: str, data: Dict[str, Any], merge: bool) -> Op[Optional[Session]]:
    req = pb.UpdateSessionRequest(session_id=session_id, data=cv.struct(data), merge=merge)
    return Op("sessions", "UpdateSession", req, _found, retry=True)


def op_delete(session_id: str) -> Op[bool]:
    req = pb.DeleteSessionRequest(session_id=session_id)
    return Op("sessions", "DeleteSession", req, lambda r: bool(r.deleted), retry=True)


def op_list(user_id: str) -> Op[List[Session]]:
    req = pb.ListUserSessionsRequest(user_id=user_id)
    return Op("sessions", "ListUserSessions", req, lambda r: [_session(s) for s in r.sessions], retry=True)


def op_delete_for_user(user_id: str, keep: Optional[str]) -> Op[int]:
    req = pb.DeleteUserSessionsRequest(user_id=user_id)
    if keep is not None:
        req.keep_session_id = keep
    return Op("sessions", "DeleteUserSessions", req, lambda r: int(r.deleted), retry=True)


def op_revoke(token: str, expires_at: datetime) -> Op[bool]:
    req = pb.RevokeTokenRequest(token=token, expires_at=cv.timestamp(expires_at))
    return Op("sessions", "RevokeToken", req, lambda r: bool(r.revoked), retry=True)


def op_check(tokens: Sequence[str]) -> Op[List[bool]]:
    req = pb.CheckTokensRequest(tokens=list(tokens))
    return Op("sessions", "CheckTokens", req, lambda r: [bool(x) for x in r.revoked], retry=True)


class Sessions:
    """``client.sessions``: SessionService with Python types."""

    def __init__(self, runner: SyncRunner) -> None:
        self._run = runner.run

    def create(
        self,
        user_id: str,
        data: Optional[Dict[str, Any]] = None,
        ttl: Optional[cv.Seconds] = None,
        *,
        timeout: Optional[float] = None,
    ) -> Session:
        """Starts a session; ttl is the idle timeout (None: the server default)."""
        return self._run(op_create(user_id, data, ttl), timeout)

    def get(self, session_id: str, *, touch: bool = False, timeout: Optional[float] = None) -> Optional[Session]:
        """The session, or None; touch=True slides its idle timeout too."""
        return self._run(op_get(session_id, touch), timeout)

    def touch(
        self, session_id: str, ttl: Optional[cv.Seconds] = None, *, timeout: Optional[float] = None
    ) -> Optional[Session]:
        """Slides the idle timeout (optionally a new one); None when not found."""
        return self._run(op_touch(session_id, ttl), timeout)

    def update(
        self, session_id: str, data: Dict[str, Any], *, merge: bool = False, timeout: Optional[float] = None
    ) -> Optional[Session]:
        """Replaces the data, or merges top-level fields atomically; None when not found."""
        return self._run(op_update(session_id, data, merge), timeout)

    def delete(self, session_id: str, *, timeout: Optional[float] = None) -> bool:
        """Deletes a session; False when it did not exist."""
        return self._run(op_delete(session_id), timeout)

    def list_for_user(self, user_id: str, *, timeout: Optional[float] = None) -> List[Session]:
        """A user's live sessions, newest first."""
        return self._run(op_list(user_id), timeout)

    def delete_for_user(self, user_id: str, *, keep: Optional[str] = None, timeout: Optional[float] = None) -> int:
        """Deletes a user's sessions, except ``keep``; answers how many."""
        return self._run(op_delete_for_user(user_id, keep), timeout)

    def revoke_token(self, token: str, expires_at: datetime, *, timeout: Optional[float] = None) -> bool:
        """Denylists a token until it expires anyway; False when expires_at is past."""
        return self._run(op_revoke(token, expires_at), timeout)

    def is_revoked(self, token: str, *, timeout: Optional[float] = None) -> bool:
        """Whether one token is revoked."""
        return self._run(op_check([token]), timeout)[0]

    def check_tokens(self, tokens: Sequence[str], *, timeout: Optional[float] = None) -> List[bool]:
        """Revoked flags for tokens, in order, in one round trip."""
        return self._run(op_check(tokens), timeout)


class AsyncSessions:
    """``client.sessions`` on an AsyncClient: the methods of ``Sessions``, awaitable."""

    def __init__(self, runner: AsyncRunner) -> None:
        self._run = runner.run

    async def create(
        self,
        user_id: str,
        data: Optional[Dict[str, Any]] = None,
        ttl: Optional[cv.Seconds] = None,
        *,
        timeout: Optional[float] = None,
    ) -> Session:
        """See ``Sessions.create``."""
        return await self._run(op_create(user_id, data, ttl), timeout)

    async def get(self, session_id: str, *, touch: bool = False, timeout: Optional[float] = None) -> Optional[Session]:
        """See ``Sessions.get``."""
        return await self._run(op_get(session_id, touch), timeout)

    async def touch(
        self, session_id: str, ttl: Optional[cv.Seconds] = None, *, timeout: Optional[float] = None
    ) -> Optional[Session]:
        """See ``Sessions.touch``."""
        return await self._run(op_touch(session_id, ttl), timeout)

    async def update(
        self, session_id: str, data: Dict[str, Any], *, merge: bool = False, timeout: Optional[float] = None
    ) -> Optional[Session]:
        """See ``Sessions.update``."""
        return await self._run(op_update(session_id, data, merge), timeout)

    async def delete(self, session_id: str, *, timeout: Optional[float] = None) -> bool:
        """See ``Sessions.delete``."""
        return await self._run(op_delete(session_id), timeout)

    async def list_for_user(self, user_id: str, *, timeout: Optional[float] = None) -> List[Session]:
        """See ``Sessions.list_for_user``."""
        return await self._run(op_list(user_id), timeout)

    async def delete_for_user(
        self, user_id: str, *, keep: Optional[str] = None, timeout: Optional[float] = None
    ) -> int:
        """See ``Sessions.delete_for_user``."""
        return await self._run(op_delete_for_user(user_id, keep), timeout)

    async def revoke_token(self, token: str, expires_at: datetime, *, timeout: Optional[float] = None) -> bool:
        """See ``Sessions.revoke_token``."""
        return await self._run(op_revoke(token, expires_at), timeout)

    async def is_revoked(self, token: str, *, timeout: Optional[float] = None) -> bool:
        """See ``Sessions.is_revoked``."""
        return (await self._run(op_check([token]), timeout))[0]

    async def check_tokens(self, tokens: Sequence[str], *, timeout: Optional[float] = None) -> List[bool]:
        """See ``Sessions.check_tokens``."""
        return await self._run(op_check(tokens), timeout)
