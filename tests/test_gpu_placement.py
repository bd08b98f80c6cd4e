"""GPU placement without a GPU: the parent never initialises CUDA (preload included),
each prefork child takes its device by its index, and a replacement child the same one;
the agents of a threads process take theirs by seat."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.integration

DEVICES = ["cuda:0", "cuda:1"]


def gpu_pool(size: int) -> list[dict[str, Any]]:
    return [{"name": "counter", "agent": "tests.gpu_agents:GpuAgent", "size": size,
             "devices": DEVICES}]


def gpu_env(tmp_path: Path) -> dict[str, str]:
    return {"WARMPOOL_TEST_CUDA_LOG": str(tmp_path / "cuda.log"),
            "WARMPOOL_TEST_DEVICE_LOG": str(tmp_path / "devices.log")}


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def placed(tmp_path: Path) -> dict[str, tuple[int, str]]:
    """By pid: the process index and device each agent's setup() was given."""
    return {pid: (int(index), device) for pid, index, _, device in lines(
        tmp_path / "devices.log")}


def test_prefork_children_take_devices_by_index_and_the_parent_never_touches_cuda(
        start_worker, tmp_path):
    worker = start_worker(gpu_pool(2), pool="prefork", concurrency=2, env=gpu_env(tmp_path))
    children = set(worker.children())

    assert {int(pid) for pid in placed(tmp_path)} == children
    assert sorted(placed(tmp_path).values()) == [(0, "cuda:0"), (1, "cuda:1")]
    tried = {int(pid) for [pid] in lines(tmp_path / "cuda.log")}
    assert tried == children  # each child tried its device; the parent never did

    [(second, _)] = [(int(pid), index) for pid, (index, _) in placed(tmp_path).items()
                     if index == 1]
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: len(placed(tmp_path)) == 3, 30, "the killed child was replaced")

    [(replacement, placement)] = [(int(pid), placement) for pid, placement
                                  in placed(tmp_path).items() if int(pid) not in children]
    assert placement == (1, "cuda:1")  # the same index, so the same device
    tried = {int(pid) for [pid] in lines(tmp_path / "cuda.log")}
    assert worker.pid not in tried
    assert tried == children | {replacement}


def test_the_agents_of_a_threads_process_take_devices_by_seat(start_worker, tmp_path):
    worker = start_worker(gpu_pool(3), pool="threads", concurrency=3, env=gpu_env(tmp_path))

    seats = sorted((int(seat), device) for pid, index, seat, device
                   in lines(tmp_path / "devices.log"))
    assert seats == [(0, "cuda:0"), (1, "cuda:1"), (2, "cuda:0")]
    assert {int(pid) for pid, _, _, _ in lines(tmp_path / "devices.log")} == {worker.pid}
