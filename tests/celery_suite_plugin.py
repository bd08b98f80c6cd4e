"""A pytest plugin that installs a ``WarmPool`` of one pool on the apps of Celery's own
integration suite (``pytest -p tests.celery_suite_plugin``; see ``scripts/celery-suite``).

Celery's suite builds its apps with the fixtures of ``celery.contrib.pytest``: a session
app that its in-process worker runs, and an app per test that its tests publish with. Each
gets ``WarmPool(app, pools=[one pool of size 1])`` as it is built, before any task module
is imported and before the worker starts, as a user's app would have it. Nothing else of
the suite changes.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from celery_warmpool import Agent, AgentState, PoolSpec, WarmPool

#: The fixtures of ``celery.contrib.pytest`` that build the suite's apps.
APP_FIXTURES = ("celery_app", "celery_session_app")
#: The one pool installed on each app.
POOL = "suite"


class SuiteAgent(Agent[AgentState]):
    """An agent that does nothing: the suite only needs a pool to be there."""

    signal_routes: dict[str, Any] = {}


def install(app: Any) -> WarmPool:
    """Install a ``WarmPool`` of one pool of one agent on ``app``."""
    return WarmPool(app, pools=[PoolSpec(POOL, SuiteAgent, size=1)])


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Generator[None, Any, None]:
    """Each app of the suite gets its ``WarmPool`` as its fixture makes it."""
    outcome = yield
    if fixturedef.argname in APP_FIXTURES and outcome.excinfo is None:
        app = outcome.get_result()
        if getattr(app, "warmpool", None) is None:
            install(app)
