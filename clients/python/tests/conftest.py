"""Fixtures: a throwaway redis-server and the real cachecoord binary on free ports.

The binary is ``target/release/cachecoord`` under the repository root (built here with
``cargo build --release --bin cachecoord`` when missing), or ``$CACHECOORD_BIN``.
One server serves the whole session; every test gets its own key namespace (``ns``), so
tests never see each other's data. Tests that need other flags or a Redis they can stop
start their own with ``start_server`` / ``Stack``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Optional

import grpc
import pytest

from cachecoord_client import AsyncClient, Client

REPO_ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition, what: str, timeout: float = 30.0, interval: float = 0.02) -> None:
    """Polls condition (bounded) where no event exists to wait on."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def binary() -> Path:
    path = Path(os.environ.get("CACHECOORD_BIN", REPO_ROOT / "target" / "release" / "cachecoord"))
    if not path.exists() and "CACHECOORD_BIN" not in os.environ:
        subprocess.run(
            ["cargo", "build", "--release", "--locked", "--bin", "cachecoord"], cwd=REPO_ROOT, check=True
        )
    if not path.exists():
        raise RuntimeError(f"cachecoord binary not found at {path}")
    return path


class Redis:
    """A throwaway redis-server on a free port, with no persistence."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cc-py-redis-")
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--enable-debug-command", "yes", "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL,
        )
        wait_until(self.ping, "redis-server to answer PING")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Runs one command with redis-cli (for test setup only)."""
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], check=True, capture_output=True
        ).stdout

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Server:
    """The cachecoord binary on a free port against a Redis."""

    def __init__(self, redis: Redis, *flags: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="cc-py-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [str(binary()), "--listen", self.target, "--redis-url", redis.url, *flags],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        if "--tls-cert" in flags:
            # A plaintext channel never becomes ready on a TLS port: wait for the port.
            try:
                wait_until(self.listening, "cachecoord to listen")
            except TimeoutError:
                raise RuntimeError(f"cachecoord did not start:\n{self.output()}") from None
            return
        with grpc.insecure_channel(self.target) as ch:
            try:
                grpc.channel_ready_future(ch).result(timeout=30)
            except grpc.FutureTimeoutError:
                raise RuntimeError(f"cachecoord did not start:\n{self.output()}") from None

    def listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log.name)


class Stack:
    """A Redis of its own and a server on it (for fault tests and non-default flags)."""

    def __init__(self, *flags: str) -> None:
        self.redis = Redis()
        self.server = Server(self.redis, *flags)
        self.client = Client(self.server.target, timeout=5.0)

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.redis.close()


@pytest.fixture(scope="session")
def redis() -> Iterator[Redis]:
    r = Redis()
    yield r
    r.close()


@pytest.fixture(scope="session")
def server(redis: Redis) -> Iterator[Server]:
    s = Server(redis)
    yield s
    s.close()


@pytest.fixture()
def client(server: Server) -> Iterator[Client]:
    with Client(server.target, timeout=10.0) as c:
        yield c


@pytest.fixture()
def ns(request: pytest.FixtureRequest) -> str:
    """A key namespace of this test: keys, names, users and tags start with it."""
    return f"t:{request.node.name}:{uuid.uuid4().hex[:8]}:"


@pytest.fixture()
def stacks() -> Iterator[List[Stack]]:
    """Start own stacks with ``stacks.append(Stack(...))``; all are closed after the test."""
    started: List[Stack] = []
    yield started
    for s in started:
        s.close()


def run_async(server: Server, body) -> object:
    """Runs ``await body(client)`` with an AsyncClient on a fresh event loop."""
    import asyncio

    async def main():
        async with AsyncClient(server.target, timeout=10.0) as c:
            return await body(c)

    return asyncio.run(main())
