"""cachecoord_client.celery with a real Celery worker in-process (memory broker, a pool of
threads) and the real service holding the locks and limits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from typing import Dict, Iterator, List, Optional

import pytest

celery = pytest.importorskip("celery")
from celery import Celery  # noqa: E402
from celery.contrib.testing.worker import start_worker  # noqa: E402

from cachecoord_client import Client  # noqa: E402
from cachecoord_client.celery import ProcessClient, rate_limited, single_instance  # noqa: E402
from conftest import Server, wait_until  # noqa: E402

app = Celery("cachecoord-tests", broker="memory://", backend="cache+memory://")
app.conf.update(
    task_default_queue="cachecoord-tests",
    worker_prefetch_multiplier=1,
    broker_transport_options={"polling_interval": 0.01},  # the memory broker polls (1 s by default)
)

#: The client the tasks use; set by the worker fixture (tasks take it through a function,
#: as they would take a ProcessClient).
CLIENT: Dict[str, Client] = {}
#: Per test: which runs started, and an event each blocks on until the test releases it.
RUNS: List[str] = []
STARTED = threading.Condition()
RELEASE: Dict[str, threading.Event] = {}


def cachecoord() -> Client:
    return CLIENT["client"]


def _run(tag: str) -> str:
    with STARTED:
        RUNS.append(tag)
        STARTED.notify_all()
    RELEASE.setdefault(tag, threading.Event()).wait(30)
    return f"done:{tag}"


@app.task
@single_instance(cachecoord, key="{ns}report:{report_id}", ttl=1)
def build_report(ns: str, report_id: int) -> str:
    return _run(f"{ns}{report_id}")


@app.task(bind=True)
@single_instance(cachecoord)
def bound_default_key(self, ns: str, n: int) -> str:
    return _run(f"{ns}bound:{n}")


@app.task(max_retries=None)
@rate_limited(cachecoord, limit=1, period=0.3, key="{ns}tb")
def throttled(ns: str, i: int) -> int:
    return int(throttled.request.retries)


@pytest.fixture(scope="module")
def worker(server: Server) -> Iterator[None]:
    with Client(server.target, timeout=10) as client:
        CLIENT["client"] = client
        with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False):
            yield


def _wait_started(tag: str) -> None:
    with STARTED:
        assert STARTED.wait_for(lambda: tag in RUNS, timeout=30), f"{tag} never started"


def test_one_run_per_argument_set_duplicates_are_skipped(worker, client, ns):
    first = build_report.delay(ns, 7)
    _wait_started(f"{ns}7")
    info = client.locks.inspect(f"celery:{ns}report:7")
    assert info.held and info.owner.endswith(first.id)
    # The lease is 1 s; let it pass: the Hold stream renews it while the task runs.
    started = time.monotonic()
    wait_until(lambda: time.monotonic() > started + 1.5, "the 1 s lease to run out unless renewed")
    duplicate = build_report.delay(ns, 7)
    assert duplicate.get(timeout=30, interval=0.01) is None  # skipped: the first still runs
    other = build_report.delay(ns, 8)  # another argument set runs alongside
    _wait_started(f"{ns}8")
    assert client.locks.inspect(f"celery:{ns}report:7").fencing_token == info.fencing_token
    RELEASE[f"{ns}7"].set()
    RELEASE[f"{ns}8"].set()
    assert first.get(timeout=30, interval=0.01) == f"done:{ns}7" and other.get(timeout=30, interval=0.01) == f"done:{ns}8"
    assert [r for r in RUNS if r.startswith(ns)] == [f"{ns}7", f"{ns}8"]
    # Released when the task ended: the next run goes ahead.
    assert not client.locks.inspect(f"celery:{ns}report:7").held
    RELEASE[f"{ns}7"] = threading.Event()
    RELEASE[f"{ns}7"].set()
    assert build_report.delay(ns, 7).get(timeout=30, interval=0.01) == f"done:{ns}7"


def test_default_key_ignores_the_bound_task(worker, ns):
    first = bound_default_key.delay(ns, 1)
    _wait_started(f"{ns}bound:1")
    assert bound_default_key.delay(ns, 1).get(timeout=30, interval=0.01) is None
    RELEASE[f"{ns}bound:1"].set()
    assert first.get(timeout=30, interval=0.01) == f"done:{ns}bound:1"


def test_celery_still_checks_the_arguments(worker):
    with pytest.raises(TypeError):
        build_report.delay("only-one-argument")


def test_rate_limited_task_retries_until_the_limit_admits_it(worker, ns):
    # One run per 0.3 s across the fleet: of three sent at once, two must wait their turn.
    results = [throttled.delay(ns, i) for i in range(3)]
    retries = [r.get(timeout=60, interval=0.01) for r in results]
    assert sum(retries) >= 2 and 0 in retries


def test_a_crashed_worker_frees_the_lock_at_once(server, client, ns):
    """A process running a single_instance task is killed (SIGKILL): its connection breaks
    and the service releases the lock, long before the lease's 60 s would run out."""
    script = textwrap.dedent(
        f"""
        import sys, threading
        from cachecoord_client.celery import ProcessClient, single_instance

        @single_instance(ProcessClient({server.target!r}), key={ns + "crash"!r}, ttl=60)
        def task():
            print("holding", flush=True)
            threading.Event().wait()

        task()
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        assert client.locks.inspect(f"celery:{ns}crash").held
        child.kill()
        child.wait(10)
        lease: Optional[object] = client.locks.acquire(f"celery:{ns}crash", ttl=5, wait=15)
        assert lease is not None, "the crashed worker's lock was not released"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_process_client_opens_one_client_per_process(server):
    source = ProcessClient(server.target)
    assert source() is source()
