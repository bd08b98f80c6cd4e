"""The package's layout keeps its promises: a core free of Celery, stable public names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import celery_warmpool

#: Every name the package exported before its modules moved into subpackages.
PUBLIC_NAMES = {
    "Action", "ActionContext", "ActionFailed", "Agent", "AgentPool", "AgentReply",
    "AgentState", "CallTimeout", "CheckoutTimeout", "ConfigurationError", "InvalidSignal",
    "NoParams", "NotCheckedOut", "PoolClosed", "PoolCounters", "PoolError", "PoolExhausted",
    "PoolOptions", "PoolSpec", "PoolStartError", "PoolStatus", "Signal", "SignalError",
    "UnknownPool", "UnknownSignal", "WarmPool", "WarmPoolError", "resource", "telemetry",
    "Cancellation", "Stream", "StreamNotFinished",
}
CELERY_FAMILY = {"celery", "kombu", "billiard", "vine", "click", "amqp"}


def top_level_modules_after(statement: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after ``statement``."""
    code = (f"{statement}\nimport json, sys\n"
            "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("statement", [
    "import celery_warmpool.core",
    "from celery_warmpool.core import AgentPool, Signal, telemetry",
    "import celery_warmpool",  # WarmPool is loaded on first use only
])
def test_the_core_loads_nothing_of_celery(statement):
    loaded = top_level_modules_after(statement)
    assert "celery_warmpool" in loaded
    assert loaded & CELERY_FAMILY == set()


def test_the_celery_side_does_load_celery():
    # The check above would pass vacuously if the probe could not see Celery at all.
    loaded = top_level_modules_after("from celery_warmpool import WarmPool")
    assert {"celery", "kombu", "billiard"} <= loaded


def test_every_public_name_is_still_exported():
    assert set(celery_warmpool.__all__) >= PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert getattr(celery_warmpool, name) is not None, name


def test_every_module_is_in_the_docs_layout_table():
    package = Path(celery_warmpool.__file__).parent
    page = (package.parent / "docs" / "architecture.md").read_text()
    layout = page[page.index("## Layout"):]
    modules = {path.relative_to(package).as_posix() for path in package.rglob("*.py")
               if path.name not in ("__init__.py", "__main__.py")}
    missing = sorted(module for module in modules if f"`{module}`" not in layout)
    assert not missing, f"modules docs/architecture.md's layout table does not name: {missing}"
