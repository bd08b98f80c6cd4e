"""A pytest plugin for testing your own agents and pools (registered as ``celery_warmpool``).

Fixtures:

- ``agent_pool_factory``: ``agent_pool_factory(MyAgent, size=2, ...)`` builds and starts an
  in-process :class:`~celery_warmpool.pool.AgentPool`, closed after the test.
- ``warm_worker_factory``: ``warm_worker_factory("proj.app", pool="prefork",
  concurrency=2, broker=..., backend=...)`` starts a real ``celery worker`` subprocess
  with your pools and returns a :class:`WorkerProcess` once it is ready (its agents warm);
  it is stopped after the test.
- ``warmpool_broker_url`` / ``warmpool_backend_url``: from ``WARMPOOL_TEST_BROKER`` and
  ``WARMPOOL_TEST_BACKEND`` (default: the local Redis).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from .agent import Agent
from .pool import AgentPool

__all__ = ["WorkerProcess", "child_pids"]

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/1"


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux ``/proc``)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry.name))
    return sorted(children)


class WorkerProcess:
    """A real ``celery worker`` subprocess for tests.

    ``start()`` returns once the worker logs that it is ready, which with warm pools
    means its agents are warm.
    """

    def __init__(self, app: str, *, pool: str = "prefork", concurrency: int = 2,
                 broker: str = DEFAULT_BROKER, backend: str = DEFAULT_BACKEND,
                 nodename: str | None = None, env: dict[str, str] | None = None,
                 args: Sequence[str] = (), cwd: str | os.PathLike[str] | None = None,
                 loglevel: str = "INFO") -> None:
        self.app = app
        self.pool = pool
        self.concurrency = concurrency
        self.nodename = nodename or f"warm-{uuid.uuid4().hex[:8]}@%h"
        # CELERY_BROKER_URL and CELERY_RESULT_BACKEND take precedence over the app's own
        # configuration, so any app runs against the broker given here.
        self.env = {**os.environ, "CELERY_BROKER_URL": broker,
                    "CELERY_RESULT_BACKEND": backend, "WARMPOOL_BROKER_URL": broker,
                    "WARMPOOL_RESULT_BACKEND": backend, **(env or {})}
        self.args = list(args)
        self.cwd = cwd
        self.loglevel = loglevel
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="warmpool-worker-", suffix=".log")[1])

    @property
    def command(self) -> list[str]:
        """The command line that starts the worker."""
        return [sys.executable, "-m", "celery", "-A", self.app, "worker", "-P", self.pool,
                "-c", str(self.concurrency), "-n", self.nodename,
                f"--loglevel={self.loglevel}", "--without-gossip", "--without-mingle",
                "--without-heartbeat", *self.args]

    @property
    def hostname(self) -> str:
        """The node name as the worker reports it (``%h`` expanded)."""
        import socket

        return self.nodename.replace("%h", socket.gethostname())

    @property
    def pid(self) -> int:
        assert self.process is not None, "worker not started"
        return self.process.pid

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        """Start the worker; wait until it is ready (or fail with its log)."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.cwd, start_new_session=True)
        if not self._wait_until_ready(timeout):
            output = self.log()
            self.kill()
            raise RuntimeError(f"celery worker did not become ready in {timeout}s:\n{output}")
        return self

    def _wait_until_ready(self, timeout: float) -> bool:
        # "ready." is logged at INFO; a quieter worker is asked with a ping instead.
        if self.loglevel.upper() in ("DEBUG", "INFO"):
            return self.wait_for_log(" ready.", timeout=timeout)
        from celery import Celery

        control = Celery(broker=self.env["WARMPOOL_BROKER_URL"], set_as_current=False)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    return False
                if control.control.ping(destination=[self.hostname], timeout=0.5):
                    return True
            return False
        finally:
            control.close()

    def log(self) -> str:
        """Everything the worker printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0, count: int = 1) -> bool:
        """Wait until ``text`` appears ``count`` times in the log; false on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return True
            if self.process is not None and self.process.poll() is not None:
                return self.log().count(text) >= count
            time.sleep(0.05)
        return False

    def children(self) -> list[int]:
        """The worker's execution pool children (prefork)."""
        return child_pids(self.pid)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown (SIGTERM); kill if it does not exit in ``timeout`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """Kill the worker and its children at once."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def remove_log(self) -> None:
        """Delete the worker's log file (once nothing needs to read it)."""
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self.remove_log()


@pytest.fixture
def warmpool_broker_url() -> str:
    """The broker URL for worker fixtures (``WARMPOOL_TEST_BROKER``)."""
    return os.environ.get("WARMPOOL_TEST_BROKER", DEFAULT_BROKER)


@pytest.fixture
def warmpool_backend_url() -> str:
    """The result backend URL for worker fixtures (``WARMPOOL_TEST_BACKEND``)."""
    return os.environ.get("WARMPOOL_TEST_BACKEND", DEFAULT_BACKEND)


@pytest.fixture
def agent_pool_factory() -> Iterator[Callable[..., AgentPool[Any]]]:
    """Build and start in-process pools; every one is closed after the test."""
    pools: list[AgentPool[Any]] = []

    def factory(agent: Callable[[], Agent[Any]], **options: Any) -> AgentPool[Any]:
        pool: AgentPool[Any] = AgentPool(agent, **options)
        pools.append(pool)
        return pool.start()

    yield factory
    for pool in pools:
        pool.close()


@pytest.fixture
def warm_worker_factory(warmpool_broker_url: str, warmpool_backend_url: str,
                        ) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real ``celery worker`` subprocesses; every one is stopped after the test."""
    workers: list[WorkerProcess] = []

    def factory(app: str, **options: Any) -> WorkerProcess:
        options.setdefault("broker", warmpool_broker_url)
        options.setdefault("backend", warmpool_backend_url)
        worker = WorkerProcess(app, **options)
        workers.append(worker)
        return worker.start()

    yield factory
    for worker in workers:
        worker.stop()
        worker.remove_log()
