"""Agents for worker tests that need setup failures to happen an exact number of times."""

from __future__ import annotations

import itertools
import os

from tests.integration_app import CounterAgent

_setups = itertools.count(1)


class FlakySetupAgent(CounterAgent):
    """Its first ``WARMPOOL_TEST_SETUP_FAILURES`` setups in a process fail, then all work."""

    def setup(self) -> None:
        if next(_setups) <= int(os.environ.get("WARMPOOL_TEST_SETUP_FAILURES", "0")):
            raise ConnectionError("model server not up yet")
        super().setup()
