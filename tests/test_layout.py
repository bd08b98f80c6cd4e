"""The package's layout keeps its promises: a core free of Celery, stable public names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import celery_warmpool

from .import_graph import ImportGraph

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


# -- who imports whom -------------------------------------------------------------------

PACKAGE_ROOT = Path(celery_warmpool.__file__).parent
CORE = "celery_warmpool.core"


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph.of_package(PACKAGE_ROOT)


def test_no_circle_among_the_modules_of_the_core(graph):
    assert graph.circles(within=CORE) == []


def test_the_core_imports_nothing_of_the_package_above_it(graph):
    assert graph.imports_outside(CORE) == []


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    # The two tests above pass vacuously if the reader misses imports: here it must
    # find a circle made only of a type-only and a function-level import, and a
    # layer broken by a relative import two levels up.
    package = tmp_path / "pkg"
    (package / "core").mkdir(parents=True)
    (package / "side").mkdir()
    for init in (package / "__init__.py", package / "core" / "__init__.py",
                 package / "side" / "__init__.py"):
        init.write_text("")
    (package / "core" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (package / "core" / "b.py").write_text("def f():\n    from . import c\n")
    (package / "core" / "c.py").write_text(
        "import pkg.core.a\nfrom ..side.d import D\nfrom ..core import e\n")
    (package / "core" / "e.py").write_text("import os\nfrom pkg import side\n")
    (package / "side" / "d.py").write_text("from ..core.a import A\n")

    found = ImportGraph.of_package(package)

    assert found.circles(within="pkg.core") == [["pkg.core.a", "pkg.core.b", "pkg.core.c"]]
    assert found.imports_of("pkg.core.c") == {"pkg.core.a", "pkg.side.d", "pkg.core.e"}
    assert found.imports_outside("pkg.core") == [
        "pkg.core.c -> pkg.side.d (line 2)", "pkg.core.e -> pkg.side (line 2)"]
    assert found.circles() == [["pkg.core.a", "pkg.core.b", "pkg.core.c", "pkg.side.d"]]


def test_no_circle_anywhere_in_the_package(graph):
    assert graph.circles() == []


def test_the_wire_imports_only_the_core(graph):
    assert graph.imports_outside("celery_warmpool.wire", allowed=[CORE]) == []


@pytest.mark.parametrize("side", ["client", "worker"])
def test_each_side_imports_only_the_wire_the_core_and_the_configuration(graph, side):
    # Neither the other side, nor the front door (http) or operations (ops) above them.
    assert graph.imports_outside(f"celery_warmpool.{side}", allowed=[
        CORE, "celery_warmpool.wire", "celery_warmpool.configuration"]) == []


def test_no_class_of_the_package_is_over_400_lines():
    import ast

    long = []
    for path in PACKAGE_ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 400:
                    long.append(f"{path.relative_to(PACKAGE_ROOT)}:{node.name} ({lines})")
    assert long == []
