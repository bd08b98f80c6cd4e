"""What each example needs to run from one command: a broker, and a worker to serve it.

By default an example runs on the embedded broker and result store (files in a temporary
directory, see :mod:`celery_warmpool.ops.embedded`), so nothing has to be installed or
running. ``--broker redis://127.0.0.1:6379/0 --backend redis://127.0.0.1:6379/1`` runs
it on Redis instead.

The example's process and the worker it starts agree on the broker through the
environment: ``WARMPOOL_BROKER_URL``, ``WARMPOOL_RESULT_BACKEND`` and, for the embedded
broker, ``WARMPOOL_EMBEDDED_DIR``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

from celery_warmpool.ops.embedded import embedded_config, is_embedded
from celery_warmpool.ops.processes import WorkerProcess

__all__ = ["ROOT", "BrokerChoice", "example_app", "parse_options", "python_path",
           "running_worker"]

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = "filesystem://"


@dataclass(frozen=True)
class BrokerChoice:
    """Where the example's messages and results go."""

    broker: str
    backend: str
    directory: str | None  # the embedded broker's folder, or None

    @property
    def embedded(self) -> bool:
        return self.directory is not None

    @property
    def label(self) -> str:
        if self.embedded:
            return f"embedded broker and result store in {self.directory}"
        return f"broker {self.broker}, results {self.backend}"

    def environment(self) -> dict[str, str]:
        """The variables that make a worker (or this process) use this broker."""
        variables = {"WARMPOOL_BROKER_URL": self.broker, "WARMPOOL_RESULT_BACKEND": self.backend}
        if self.directory is not None:
            variables["WARMPOOL_EMBEDDED_DIR"] = self.directory
        return variables


def settings(broker: str | None, backend: str | None,
             directory: str | None) -> dict[str, Any]:
    """Celery settings for ``broker``/``backend`` (the embedded store in ``directory``)."""
    if is_embedded(broker):
        if directory is None:
            # Imported with no example running (`celery -A examples.x --help`, a linter):
            # create no folder at import time; nothing will be sent.
            return {"broker_url": EMBEDDED, "result_backend": "disabled://"}
        config = embedded_config(directory)
        if backend and not backend.startswith("file://"):
            config["result_backend"] = backend
        return config
    return {"broker_url": broker, "result_backend": backend or _default_backend(broker or ""),
            "broker_connection_retry_on_startup": True}


def _default_backend(broker: str) -> str:
    # Redis serves both; over AMQP the replies come back on the broker itself.
    return broker if broker.startswith(("redis://", "rediss://")) else "rpc://"


def example_app(name: str) -> Celery:
    """The example's Celery app, on the broker the environment names (embedded by default).

    The worker imports the example module with the environment :func:`running_worker`
    gives it; the example's own process reconfigures the app in :func:`parse_options`.
    """
    app = Celery(name, set_as_current=False)
    app.conf.update(_from_environment())
    app.conf.result_expires = 600
    return app


def _from_environment() -> dict[str, Any]:
    return settings(os.environ.get("WARMPOOL_BROKER_URL"),
                    os.environ.get("WARMPOOL_RESULT_BACKEND"),
                    os.environ.get("WARMPOOL_EMBEDDED_DIR"))


def parse_options(app: Celery, description: str, argv: Sequence[str] | None = None, *,
                  parser: argparse.ArgumentParser | None = None,
                  default_broker: str | None = None,
                  ) -> tuple[argparse.Namespace, BrokerChoice]:
    """Read ``--broker``/``--backend`` and point ``app`` (and its future worker) at them.

    Without ``--broker`` a fresh embedded broker directory is made (or ``default_broker``
    is used, for an example that needs a server); :func:`running_worker` removes it when
    the example ends.

    Arguments:
        parser: holds the example's own options (a new parser when omitted).
        default_broker: the broker URL when ``--broker`` is not given.
    """
    parser = parser or argparse.ArgumentParser(description=description)
    parser.add_argument("--broker", default=default_broker,
                        help="broker URL, e.g. redis://127.0.0.1:6379/0 (default: "
                             + (default_broker or "an embedded broker, no server needed")
                             + ")")
    parser.add_argument("--backend", default=None,
                        help="result backend URL, e.g. redis://127.0.0.1:6379/1 "
                             "(default: the broker for Redis, rpc:// for AMQP, files when "
                             "embedded)")
    options = parser.parse_args(argv)
    if is_embedded(options.broker):
        directory = tempfile.mkdtemp(prefix="warmpool-example-")
        config = settings(EMBEDDED, options.backend, directory)
    else:
        directory = None
        config = settings(options.broker, options.backend, None)
    choice = BrokerChoice(config["broker_url"], config["result_backend"], directory)
    app.conf.update(config)
    return options, choice


@contextmanager
def running_worker(app: Celery, module: str, choice: BrokerChoice, *, pool: str = "threads",
                   concurrency: int = 2, env: dict[str, str] | None = None,
                   args: Sequence[str] = ()) -> Iterator[WorkerProcess]:
    """Run ``celery -A module worker`` until the block ends; its agents are warm inside.

    Prints progress while the agents warm up; stops the worker with a warm shutdown
    (its agents are torn down) and removes the embedded broker's folder afterwards.
    """
    environment = {**choice.environment(), "PYTHONPATH": python_path(), **(env or {})}
    worker = WorkerProcess(module, pool=pool, concurrency=concurrency, broker=choice.broker,
                           backend=choice.backend, env=environment, args=args, cwd=ROOT)
    print(f"starting a worker ({pool}, concurrency {concurrency}) on the {choice.label};")
    print("  its agents warm up before it takes any message...", flush=True)
    started = time.monotonic()
    try:
        worker.start(timeout=60)
        print(f"  worker {worker.hostname} ready in {time.monotonic() - started:.1f}s",
              flush=True)
        yield worker
    finally:
        code = worker.shutdown(app)
        print(f"worker stopped (exit status {code})", flush=True)
        log = worker.log()
        worker.log_path.unlink(missing_ok=True)
        if choice.directory is not None:
            shutil.rmtree(choice.directory, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"the worker did not shut down cleanly (exit status {code}):\n{log}")


def python_path() -> str:
    """``PYTHONPATH`` with the repository first, so that ``examples.*`` imports anywhere."""
    existing = os.environ.get("PYTHONPATH")
    return f"{ROOT}{os.pathsep}{existing}" if existing else str(ROOT)
