"""TLS: Client and AsyncClient against the real binary started with --tls-cert/--tls-key
(and --tls-client-ca), with certificates made here by the openssl command line."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Tuple

import grpc
import pytest

from cachecoord_client import TLS, AsyncClient, Client, Unavailable
from conftest import Redis, Server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
             cwd=d)


def _leaf(d: Path, ca: str, name: str, usage: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cc-py-tls-"))
    _ca(d, "ca")
    _ca(d, "client-ca")
    _ca(d, "other-ca")
    _leaf(d, "ca", "server", "serverAuth")
    _leaf(d, "client-ca", "client", "clientAuth")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _tls_server(redis: Redis, certs: Path, *flags: str) -> Server:
    return Server(redis, "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"), *flags)


@pytest.fixture(scope="module")
def tls_stack(certs: Path) -> Iterator[Tuple[Redis, Server]]:
    """A server requiring client certificates of client-ca."""
    redis = Redis()
    server = _tls_server(redis, certs, "--tls-client-ca", str(certs / "client-ca.pem"))
    yield redis, server
    server.close()
    redis.close()


def test_client_with_ca_and_client_certificate(tls_stack, certs, ns):
    _, server = tls_stack
    settings = TLS(ca=certs / "ca.pem", cert=str(certs / "client.pem"), key=(certs / "client.key").read_bytes(),
                   server_name="localhost")
    with Client(server.target, tls=settings, timeout=10.0) as c:
        assert c.cache.set(ns + "k", b"v", ttl=60)
        assert c.cache.get(ns + "k") == b"v"


def test_async_client_with_tls(tls_stack, certs, ns):
    _, server = tls_stack
    settings = TLS(ca=str(certs / "ca.pem"), cert=str(certs / "client.pem"), key=str(certs / "client.key"))

    async def main() -> bytes:
        async with AsyncClient(f"localhost:{server.port}", tls=settings, timeout=10.0) as c:
            await c.cache.set(ns + "k", b"async", ttl=60)
            return await c.cache.get(ns + "k")

    assert asyncio.run(main()) == b"async"


def test_refused_without_client_certificate_or_with_the_wrong_ca(tls_stack, certs, ns):
    _, server = tls_stack
    for settings in (TLS(ca=str(certs / "ca.pem"), server_name="localhost"),
                     TLS(ca=str(certs / "other-ca.pem"), cert=str(certs / "client.pem"),
                         key=str(certs / "client.key"), server_name="localhost")):
        with Client(server.target, tls=settings, timeout=3.0, retries=0) as c:
            with pytest.raises(Unavailable):
                c.cache.get(ns + "k")


def test_plaintext_client_is_refused(tls_stack, ns):
    _, server = tls_stack
    with Client(server.target, timeout=3.0, retries=0) as c:
        with pytest.raises(Unavailable):
            c.cache.get(ns + "k")


def test_tls_true_uses_the_system_roots(certs, ns):
    # The test CA is not among gRPC's default roots: the handshake must fail.
    redis = Redis()
    server = _tls_server(redis, certs)
    try:
        with Client(f"localhost:{server.port}", tls=True, timeout=3.0, retries=0) as c:
            with pytest.raises(Unavailable):
                c.cache.get(ns + "k")
    finally:
        server.close()
        redis.close()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="cert and key"):
        TLS(cert="client.pem")
    with pytest.raises(ValueError, match="not both"):
        Client("localhost:1", tls=True, credentials=grpc.ssl_channel_credentials())


def test_tls_and_api_key_together(tls_stack, certs, ns, tmp_path):
    from cachecoord_client import Unauthenticated
    from conftest import binary

    made = subprocess.run([str(binary()), "keys", "new", "--id", "tls-user", "--tenant", "tls-tenant"],
                          check=True, capture_output=True, text=True)
    key, entry = made.stderr.strip().splitlines()[-1], made.stdout
    keys = tmp_path / "keys.toml"
    keys.write_text(entry)
    redis, _ = tls_stack
    server = _tls_server(redis, certs, "--tls-client-ca", str(certs / "client-ca.pem"), "--auth-keys-file", str(keys))
    settings = TLS(ca=str(certs / "ca.pem"), cert=str(certs / "client.pem"), key=str(certs / "client.key"),
                   server_name="localhost")
    try:
        with Client(server.target, tls=settings, api_key=key, timeout=10.0) as c:
            assert c.cache.set(ns + "k", b"v", ttl=60)
            assert c.cache.get(ns + "k") == b"v"
        with Client(server.target, tls=settings, timeout=10.0, retries=0) as c:
            with pytest.raises(Unauthenticated):
                c.cache.get(ns + "k")
    finally:
        server.close()
