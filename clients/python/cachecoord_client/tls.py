"""TLS settings for ``Client(..., tls=...)`` / ``AsyncClient(..., tls=...)``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import grpc

#: A PEM file's path, or the PEM itself as bytes.
PEM = Union[str, "os.PathLike[str]", bytes]


def _pem(value: Optional[PEM]) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class TLS:
    """How to speak TLS to a cachecoord started with ``--tls-cert``/``--tls-key``.

    ``ca``: the CA that signed the server's certificate (default: gRPC's default roots).
    ``cert``/``key``: a client certificate, for a server with ``--tls-client-ca``.
    ``server_name``: the name the server's certificate must carry, when it is not the
    host of the target (e.g. connecting to an IP address). Each PEM is a file path or
    the PEM bytes themselves; files are read when the client is created.
    """

    ca: Optional[PEM] = None
    cert: Optional[PEM] = None
    key: Optional[PEM] = None
    server_name: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: cert and key go together")

    def credentials(self) -> grpc.ChannelCredentials:
        """The grpc channel credentials these settings describe."""
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca),
            private_key=_pem(self.key),
            certificate_chain=_pem(self.cert),
        )

    def options(self) -> List[Tuple[str, Any]]:
        """Channel options these settings need (the server name override)."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def channel_security(
    tls: Union[bool, TLS, None],
    credentials: Optional[grpc.ChannelCredentials],
    options: Optional[Any],
) -> Tuple[Optional[grpc.ChannelCredentials], List[Tuple[str, Any]]]:
    """Credentials (``None``: plaintext) and options from the client's arguments."""
    opts = list(options or [])
    if tls is None or tls is False:
        return credentials, opts
    if credentials is not None:
        raise ValueError("give tls= or credentials=, not both")
    settings = TLS() if tls is True else tls
    if not isinstance(settings, TLS):
        raise TypeError("tls must be True, False, None or a cachecoord_client.TLS")
    return settings.credentials(), opts + settings.options()
