"""Conversions between Python types and protobuf well-known types."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Optional, Union

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

#: A duration given as a ``timedelta`` or as seconds.
Seconds = Union[timedelta, float, int]


def to_timedelta(value: Seconds) -> timedelta:
    """Seconds (int or float) or a timedelta, as a timedelta."""
    if isinstance(value, timedelta):
        return value
    return timedelta(seconds=value)


def duration(value: Optional[Seconds]) -> Optional[duration_pb2.Duration]:
    """A protobuf Duration, or None (field absent) for None."""
    if value is None:
        return None
    d = duration_pb2.Duration()
    d.FromTimedelta(to_timedelta(value))
    return d


def from_duration(msg: Any, field: str) -> Optional[timedelta]:
    """The timedelta of an optional Duration field, or None when absent."""
    if not msg.HasField(field):
        return None
    d: duration_pb2.Duration = getattr(msg, field)
    return d.ToTimedelta()


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


def from_timestamp(t: timestamp_pb2.Timestamp) -> datetime:
    """An aware UTC datetime."""
    return t.ToDatetime(tzinfo=timezone.utc)


def struct(data: Optional[Dict[str, Any]]) -> Optional[struct_pb2.Struct]:
    """A protobuf Struct from a JSON-like dict, or None."""
    if data is None:
        return None
    s = struct_pb2.Struct()
    s.update(data)
    return s


def from_struct(s: struct_pb2.Struct) -> Dict[str, Any]:
    """A dict from a Struct. Whole numbers come back as ``int``, not ``float``."""
    out: Dict[str, Any] = _ints(json_format.MessageToDict(s))
    return out


def _ints(value: Any) -> Any:
    # Struct carries numbers as doubles; the service stores whole numbers as JSON integers,
    # so give them back as int, the way json.loads would.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value
