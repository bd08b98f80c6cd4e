"""Celery's own integration tests, run as they are and again with a WarmPool installed.

Runs ``t/integration/test_tasks.py`` and ``t/integration/test_worker.py`` of the source
distribution of the installed Celery twice against a real broker and result store: once
as they are, once with ``tests.celery_suite_plugin`` installing a ``WarmPool`` of one pool
on the suite's apps. Prints each run's counts and the tests whose outcome differs, and
exits 1 if any does (2 if a run could not report at all).

The source distribution is downloaded once (``pip download``) into a folder outside the
repository: ``$WARMPOOL_CELERY_SUITE_DIR``, else ``~/.cache/celery-warmpool``. Only its
``t/`` and ``pyproject.toml`` are unpacked, so that the installed Celery is the one tested.

The broker is ``$TEST_BROKER``, else ``$WARMPOOL_TEST_RABBITMQ_BROKER``, else the local
RabbitMQ; the result store ``$TEST_BACKEND``, else ``$WARMPOOL_TEST_REDIS_BACKEND``, else
database 3 of the local Redis (the suite's own Redis client uses database 0 there).
Arguments after ``--`` go to both pytest runs (``-- -k replace``, say).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("t/integration/test_tasks.py", "t/integration/test_worker.py")
PLUGIN = "tests.celery_suite_plugin"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/3"
#: Seconds any one test may take before pytest-timeout fails it (the suite's own marks
#: are shorter): a hung test must not hang the script.
TEST_TIMEOUT = 300


@dataclass
class Run:
    """One run of the suite: each test's outcome and how long the run took."""

    label: str
    outcomes: dict[str, str]
    seconds: float

    def counts(self) -> str:
        counted = Counter(self.outcomes.values())
        return ", ".join(f"{counted[outcome]} {outcome}" for outcome in sorted(counted))


def celery_version() -> str:
    import celery

    return str(celery.__version__)


def cache_folder(version: str) -> Path:
    base = os.environ.get("WARMPOOL_CELERY_SUITE_DIR")
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = str(Path(cache) / "celery-warmpool")
    return Path(base) / f"celery-{version}"


def fetch_suite(version: str) -> Path:
    """The suite's folder (``t/`` and ``pyproject.toml``), downloaded if not there yet."""
    folder = cache_folder(version)
    suite = folder / "suite"
    if (suite / "t" / "integration").is_dir():
        return suite
    folder.mkdir(parents=True, exist_ok=True)
    sdists = sorted(folder.glob("celery-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"celery=={version}", "-d", str(folder)],
                       check=True)
        sdists = sorted(folder.glob("celery-*.tar.gz"))
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        with tarfile.open(sdists[0]) as archive:
            wanted = [member for member in archive.getmembers()
                      if _inside(member.name) in ("pyproject.toml",)
                      or _inside(member.name).startswith("t/")]
            archive.extractall(scratch, wanted, filter="data")
        top = next(Path(scratch).iterdir())
        shutil.move(str(top), str(suite))
    return suite


def _inside(name: str) -> str:
    """A member's path inside the archive's top folder (``celery-5.7.0/``)."""
    return name.split("/", 1)[1] if "/" in name else ""


def environment() -> dict[str, str]:
    broker = (os.environ.get("TEST_BROKER") or os.environ.get("WARMPOOL_TEST_RABBITMQ_BROKER")
              or DEFAULT_BROKER)
    backend = (os.environ.get("TEST_BACKEND") or os.environ.get("WARMPOOL_TEST_REDIS_BACKEND")
               or DEFAULT_BACKEND)
    store = urlparse(backend)
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "TEST_BROKER": broker, "TEST_BACKEND": backend,
            "REDIS_HOST": store.hostname or "127.0.0.1", "REDIS_PORT": str(store.port or 6379),
            "PYTHONPATH": path,
            # test_run_worker runs the `celery` command of this environment.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                     os.environ.get("PATH", "")])}


def run_suite(suite: Path, label: str, plugins: list[str], extra: list[str]) -> Run:
    report = suite.parent / f"{label.replace(' ', '-')}.xml"
    report.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
               "-p", "celery.contrib.pytest",
               # The package's own pytest plugin is left out of both runs alike.
               "-p", "no:celery_warmpool",
               *[argument for plugin in plugins for argument in ("-p", plugin)],
               "-q", "-rfE", f"--timeout={TEST_TIMEOUT}", f"--junitxml={report}",
               *MODULES, *extra]
    print(f"\n=== {label}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=suite, env=environment(), check=False)
    seconds = time.monotonic() - started
    if not report.exists():
        print(f"{label}: pytest wrote no report ({report})", file=sys.stderr)
        sys.exit(2)
    return Run(label, outcomes(report), seconds)


def outcomes(report: Path) -> dict[str, str]:
    """Each test's outcome in a JUnit report: passed, failed, error or skipped (a test
    that failed and then errored in teardown counts as failed)."""
    found: dict[str, str] = {}
    rank = {"passed": 0, "skipped": 1, "error": 2, "failed": 3}
    for case in ElementTree.parse(report).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            tag = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if tag is not None and rank[tag] > rank[outcome]:
                outcome = tag
        if rank[outcome] >= rank[found.get(test, "passed")]:
            found[test] = outcome
    return found


def differences(plain: Run, warm: Run) -> list[tuple[str, str, str]]:
    tests = sorted(set(plain.outcomes) | set(warm.outcomes))
    return [(test, plain.outcomes.get(test, "absent"), warm.outcomes.get(test, "absent"))
            for test in tests if plain.outcomes.get(test) != warm.outcomes.get(test)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pytest_args", nargs="*", help="passed to both pytest runs")
    arguments = parser.parse_args()
    version = celery_version()
    suite = fetch_suite(version)
    plain = run_suite(suite, "as they are", [], arguments.pytest_args)
    warm = run_suite(suite, "with a WarmPool", [PLUGIN], arguments.pytest_args)
    print(f"\nCelery {version}: {' and '.join(MODULES)} (suite in {suite})")
    for run in (plain, warm):
        failing = sorted(test for test, outcome in run.outcomes.items()
                         if outcome in ("failed", "error"))
        print(f"  {run.label + ':':<17} {run.counts()} in {run.seconds:.0f}s")
        for test in failing:
            print(f"      {run.outcomes[test]}: {test}")
    differing = differences(plain, warm)
    print(f"tests whose outcome differs: {len(differing) or 'none'}")
    for test, as_they_are, with_warm_pool in differing:
        print(f"  {test}: {as_they_are} as they are, {with_warm_pool} with a WarmPool")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
