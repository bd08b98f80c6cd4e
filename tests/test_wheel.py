"""The release artifacts: an sdist and a wheel that install and run away from the source tree.

One module-scoped virtualenv (a minute or two, most of it pip): ``python -m build`` makes the
sdist and, from it, the wheel; ``twine check`` reads both; the wheel goes into a fresh
virtualenv created and used in a temporary folder, with no ``PYTHONPATH`` and no clone
beside it, and the demo, the CLI and the pytest plugin run from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import celery_warmpool

# The first test builds and installs (about a minute here, more with a cold pip cache).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
VERSION = celery_warmpool.__version__
PLUGIN_TEST = '''
from celery_warmpool import Agent, AgentState


class Idle(Agent[AgentState]):
    signal_routes = {}


def test_the_plugin_gives_a_started_pool(agent_pool_factory):
    pool = agent_pool_factory(Idle, name="idle", size=2)
    assert pool.status().available == 2
'''


@dataclass(frozen=True)
class Release:
    """The built artifacts and the virtualenv the wheel is installed in."""

    sdist: Path
    wheel: Path
    environment: Path
    folder: Path

    def run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a program of the virtualenv in the empty folder, away from the source tree."""
        env = {key: value for key, value in os.environ.items()
               if key != "PYTHONPATH" and not key.startswith("WARMPOOL_")}
        env.update(TMPDIR=str(self.folder), VIRTUAL_ENV=str(self.environment))
        program = self.environment / "bin" / command[0]
        return subprocess.run([str(program), *command[1:]], cwd=self.folder, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)


def checked(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """``done``, once it is known to have exited 0 (else fail with its output)."""
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n" \
        f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """Build the sdist and the wheel, and install the wheel into a fresh virtualenv."""
    dist = tmp_path_factory.mktemp("dist")
    checked(subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
                           capture_output=True, text=True, timeout=600, check=False))
    sdist = dist / f"celery_warmpool-{VERSION}.tar.gz"
    wheel = dist / f"celery_warmpool-{VERSION}-py3-none-any.whl"
    checked(subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                            str(sdist), str(wheel)],
                           capture_output=True, text=True, timeout=120, check=False))
    environment = tmp_path_factory.mktemp("venv")
    venv.create(environment, with_pip=True)
    built = Release(sdist, wheel, environment, tmp_path_factory.mktemp("elsewhere"))
    checked(built.run("python", "-m", "pip", "install", "--quiet", str(wheel), "pytest",
                      timeout=600))
    return built


def test_the_sdist_holds_the_package_and_its_papers_not_the_test_suite(release: Release,
                                                                        ) -> None:
    with tarfile.open(release.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml",
            "celery_warmpool/py.typed", "celery_warmpool/__init__.py"} <= names
    assert not [name for name in names if name.startswith(("tests/", "bench/", "examples/"))]


def test_the_wheel_holds_the_package_its_types_and_its_license(release: Release) -> None:
    names = set(zipfile.ZipFile(release.wheel).namelist())
    assert "celery_warmpool/py.typed" in names
    assert f"celery_warmpool-{VERSION}.dist-info/licenses/LICENSE" in names
    assert not [name for name in names if name.startswith(("tests/", "bench/", "examples/"))]


def test_the_installed_package_is_the_wheel_not_the_source_tree(release: Release) -> None:
    done = checked(release.run("python", "-c", "import celery_warmpool as p; "
                               "print(p.__version__, p.__file__)"))
    version, location = done.stdout.split()
    assert version == VERSION
    assert Path(location).is_relative_to(release.environment)


def test_the_demo_runs_from_the_wheel(release: Release) -> None:
    done = checked(release.run("python", "-m", "celery_warmpool.demo", timeout=180))
    assert "worker ready: 4 agents warm, taking signals" in done.stdout


def test_the_celery_command_has_warmpool(release: Release) -> None:
    done = checked(release.run("celery", "warmpool", "--help"))
    for command in ("status", "resize", "drain", "dead-letters"):
        assert command in done.stdout


def test_the_pytest_plugin_works_from_the_wheel(release: Release) -> None:
    (release.folder / "test_plugin_use.py").write_text(PLUGIN_TEST)
    done = checked(release.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "test_plugin_use.py"))
    assert "1 passed" in done.stdout
