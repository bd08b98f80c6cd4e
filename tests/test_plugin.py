"""The pytest plugin's fixtures, as a user of the package would use them."""

from __future__ import annotations

from typing import Any

import pytest

from celery_warmpool.testing import WorkerProcess
from tests.conftest import REDIS_BACKEND, REDIS_BROKER, ROOT
from tests.core_agents import CounterAgent

INCREMENT = {"type": "counter.increment", "data": {"by": 1}}


@pytest.fixture
def warmpool_broker_url(clean_redis: None) -> str:
    return REDIS_BROKER


@pytest.fixture
def warmpool_backend_url() -> str:
    return REDIS_BACKEND


def test_agent_pool_factory_gives_a_started_pool_closed_after_the_test(agent_pool_factory):
    pool = agent_pool_factory(CounterAgent, name="counter", size=2)
    assert pool.status().available == 2
    assert pool.call(INCREMENT).state["count"] == 1
    assert not pool.closed


@pytest.mark.integration
def test_warm_worker_factory_starts_a_ready_worker_with_warm_agents(warm_worker_factory,
                                                                    client: Any):
    worker: WorkerProcess = warm_worker_factory(
        "tests.integration_app", pool="threads", concurrency=2, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)})
    _, warm = client()
    status = warm.status("counter")
    assert (status.available, status.state) == (1, "ready")
    assert warm.call("counter", INCREMENT).node == worker.hostname
