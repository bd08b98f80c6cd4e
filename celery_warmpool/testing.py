"""A pytest plugin for testing your own agents and pools (registered as ``celery_warmpool``).

Fixtures:

- ``agent_pool_factory``: ``agent_pool_factory(MyAgent, size=2, ...)`` builds and starts an
  in-process :class:`~celery_warmpool.core.pool.AgentPool`, closed after the test.
- ``warm_worker_factory``: ``warm_worker_factory("proj.app", pool="prefork",
  concurrency=2, broker=..., backend=...)`` starts a real ``celery worker`` subprocess
  with your pools and returns a :class:`WorkerProcess` once it is ready (its agents warm);
  it is stopped after the test.
- ``warmpool_broker_url`` / ``warmpool_backend_url``: from ``WARMPOOL_TEST_BROKER`` and
  ``WARMPOOL_TEST_BACKEND`` (default: the local Redis).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .core import Agent, AgentPool
from .ops.processes import DEFAULT_BACKEND, DEFAULT_BROKER, WorkerProcess, child_pids

__all__ = ["WorkerProcess", "child_pids"]


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
