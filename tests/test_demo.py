"""``python -m celery_warmpool.demo``: the README's main command, run as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

DEMO_BROKER = "redis://127.0.0.1:6379/4"
DEMO_BACKEND = "redis://127.0.0.1:6379/5"


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the demo with its temp files under ``tmp_path``; return it and its duration."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("WARMPOOL_")}
    env.update(TMPDIR=str(scratch), PYTHONPATH=str(ROOT))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "celery_warmpool.demo", *args],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    return result, time.monotonic() - started


def processes_named(text: str) -> list[int]:
    """Live processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in command:
                found.append(int(entry.name))
    return found


def assert_full_run(result: subprocess.CompletedProcess[str], seconds: float,
                    tmp_path: Path) -> None:
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert seconds < 60, seconds
    # Progress while warming up: each of the four agents (two pools, two processes).
    for count in range(1, 5):
        assert f"agent warm ({count} of 4)" in output
    assert "worker ready: 4 agents warm, taking signals" in output
    # The call-style burst: 20 replies per pool.
    assert re.search(r"catalog  20 replies  median [\d.]+ ms", output)
    assert re.search(r"signer   20 replies  median [\d.]+ ms", output)
    # The cast-style burst: every result collected.
    assert "Cast-style burst: 40 warm.cast sent at once" in output
    assert re.search(r"all 40 results in [\d.]+ ms", output)
    # Warm versus cold, as a table with a ratio per pool.
    assert re.search(r"catalog  warm pool \(warm\.call\) +20 ", output)
    assert re.search(r"catalog  agent per request +3 ", output)
    ratios = dict(re.findall(r"(catalog|signer) (\d+)x", output))
    assert set(ratios) == {"catalog", "signer"}
    # A warm call skips the warm-up every cold request pays for.
    assert all(int(ratio) >= 5 for ratio in ratios.values()), ratios
    # The status table exactly as the CLI renders it: 20 calls + 20 casts per pool.
    node = re.search(r"celery worker (demo-\d+@\S+) started", output)
    assert node
    for pool in ("catalog", "signer"):
        assert f"pool {pool}: ready, 2 of 2 agents available, 1 node" in output
    node_rows = [line.split() for line in output.splitlines()
                 if line.startswith(f"  {node[1]} ")]
    assert node_rows == [[node[1], "ready", "2", "2", "0", "0", "0", "0/4", "40", "0", "0",
                          "0"]] * 2
    assert len(re.findall(r"    process [01] \(pid \d+\)  ready", output)) == 4
    # A clean end: warm shutdown, nothing left running, nothing left on disk.
    assert "worker stopped, exit status 0" in output
    removed = re.search(r"Removed (\S+)", output)
    assert removed
    assert not Path(removed[1]).exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert processes_named(f"{node[1].split('@')[0]}@") == []
    assert re.search(r"Done in [\d.]+ s\.", output)


def test_demo_runs_on_an_embedded_broker_and_cleans_up(tmp_path):
    result, seconds = run_demo(tmp_path)
    assert "Broker and result store: embedded" in result.stdout
    assert_full_run(result, seconds, tmp_path)


def test_demo_runs_on_redis(tmp_path):
    for url in (DEMO_BROKER, DEMO_BACKEND):
        redis.Redis.from_url(url).flushdb()
    result, seconds = run_demo(tmp_path, "--broker", DEMO_BROKER, "--backend", DEMO_BACKEND)
    assert "Broker: redis://127.0.0.1:6379/4  result backend: redis://127.0.0.1:6379/5" in (
        result.stdout)
    assert_full_run(result, seconds, tmp_path)


def test_demo_stops_at_once_when_the_broker_is_unreachable(tmp_path):
    result, seconds = run_demo(tmp_path, "--broker", "redis://127.0.0.1:1/0")
    assert result.returncode == 2
    assert "cannot reach the broker redis://127.0.0.1:1/0" in result.stderr
    assert "celery worker" not in result.stdout
    assert seconds < 15
    assert list((tmp_path / "tmp").iterdir()) == []
