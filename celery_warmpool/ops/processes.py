"""Running a ``celery worker`` (or any helper program) as a subprocess, and stopping it.

One life cycle for the demo, the examples, the pytest plugin and the tests: the program
runs in its own session (a Ctrl-C in the terminal is the caller's to handle) with its
output in a log file; it is stopped with SIGTERM (a warm shutdown for a worker), then
killed with its whole process group if it does not exit in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

__all__ = ["DEFAULT_BACKEND", "DEFAULT_BROKER", "ManagedProcess", "WorkerProcess",
           "child_pids"]

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


class ManagedProcess:
    """A program in its own session, its output in a log file, stopped on request."""

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.command = list(command)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.log_path = Path(log_path) if log_path is not None else Path(
            tempfile.mkstemp(prefix="warmpool-process-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None
        self._read = 0
        self._partial = ""

    @property
    def pid(self) -> int:
        """The process id (once launched)."""
        assert self.process is not None, "process not launched"
        return self.process.pid

    def launch(self) -> Self:
        """Start the program in the background; return at once."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    def exited(self) -> bool:
        """Whether the program has ended (or never started)."""
        return self.process is None or self.process.poll() is not None

    def log(self) -> str:
        """Everything the program printed so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log().splitlines()[-lines:])

    def new_lines(self) -> list[str]:
        """The complete lines printed since the last call."""
        with self.log_path.open("rb") as log:
            log.seek(self._read)
            chunk = log.read()
        self._read += len(chunk)
        lines = (self._partial + chunk.decode(errors="replace")).split("\n")
        self._partial = lines.pop()
        return lines

    def wait_for_log(self, text: str, timeout: float = 30.0, count: int = 1) -> bool:
        """Wait until ``text`` appears ``count`` times in the log; false on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return True
            if self.exited():
                return self.log().count(text) >= count
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 30.0, *, group: bool = False) -> int | None:
        """SIGTERM (to the whole process group if ``group``), then kill if still running.

        Returns the exit status, or ``None`` if the program had to be killed.
        """
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.process.pid, signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """Kill the program and everything it started, at once."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def remove_log(self) -> None:
        """Delete the log file (once nothing needs to read it)."""
        self.log_path.unlink(missing_ok=True)


class WorkerProcess(ManagedProcess):
    """A real ``celery worker`` subprocess.

    :meth:`start` returns once the worker is ready, which with warm pools means its
    agents are warm. The broker and result backend are given through the environment
    (``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND`` and their ``WARMPOOL_`` twins), so
    any app runs against the broker given here; ``None`` leaves it to the app.
    """

    def __init__(self, app: str, *, pool: str = "prefork", concurrency: int = 2,
                 broker: str | None = DEFAULT_BROKER, backend: str | None = DEFAULT_BACKEND,
                 nodename: str | None = None, env: Mapping[str, str] | None = None,
                 args: Sequence[str] = (), cwd: str | os.PathLike[str] | None = None,
                 loglevel: str = "INFO",
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.app = app
        self.pool = pool
        self.concurrency = concurrency
        self.broker = broker
        self.nodename = nodename or f"warm-{uuid.uuid4().hex[:8]}@%h"
        self.loglevel = loglevel
        self.args = list(args)
        given = {"CELERY_BROKER_URL": broker, "WARMPOOL_BROKER_URL": broker,
                 "CELERY_RESULT_BACKEND": backend, "WARMPOOL_RESULT_BACKEND": backend}
        environment = {**os.environ, **{key: value for key, value in given.items() if value},
                       **(env or {})}
        super().__init__(self.worker_command(), env=environment, cwd=cwd, log_path=log_path)

    def worker_command(self) -> list[str]:
        """The command line that starts the worker."""
        return [sys.executable, "-m", "celery", "-A", self.app, "worker", "-P", self.pool,
                "-c", str(self.concurrency), "-n", self.nodename,
                f"--loglevel={self.loglevel}", "--without-gossip", "--without-mingle",
                "--without-heartbeat", *self.args]

    @property
    def hostname(self) -> str:
        """The node name as the worker reports it (``%h`` expanded)."""
        return self.nodename.replace("%h", socket.gethostname())

    def start(self, timeout: float = 90.0) -> Self:
        """Start the worker; wait until it is ready (or raise with its log)."""
        self.launch()
        if not self.wait_until_ready(timeout):
            output = self.log()
            self.kill()
            raise RuntimeError(f"celery worker did not become ready in {timeout}s:\n{output}")
        return self

    def wait_until_ready(self, timeout: float) -> bool:
        """Wait until the worker takes messages; false if it exits or the time runs out."""
        if self.loglevel.upper() in ("DEBUG", "INFO"):
            return self.wait_for_log(" ready.", timeout=timeout)
        # "ready." is logged at INFO: a quieter worker is asked with a ping instead.
        from celery import Celery

        control = Celery(broker=self.broker or self.env.get("CELERY_BROKER_URL"),
                         set_as_current=False)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.exited():
                    return False
                if control.control.ping(destination=[self.hostname], timeout=0.5):
                    return True
            return False
        finally:
            control.close()

    def children(self) -> list[int]:
        """The worker's execution pool children (prefork)."""
        return child_pids(self.pid)

    def shutdown(self, app: Any, timeout: float = 30.0) -> int | None:
        """Warm shutdown through Celery's ``shutdown`` control command, else SIGTERM.

        A worker on a polling transport (the embedded broker) notices SIGTERM only when
        its drain loop comes round; the control command arrives as a message at once.
        """
        if self.exited():
            return self.stop()
        assert self.process is not None
        with contextlib.suppress(Exception):  # no broker, or no answer: SIGTERM below
            app.control.shutdown(destination=[self.hostname])
            return self.process.wait(timeout / 2)
        return self.stop(timeout / 2)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self.remove_log()
