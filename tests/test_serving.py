"""Serving a model from real workers: preload once per node, batches, Result, reply_state."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from celery_warmpool import ActionFailed, CheckoutTimeout
from tests.conftest import at_once, wait_until
from tests.test_faults import busy_child
from tests.test_worker import node_status, wait_for_status

pytestmark = pytest.mark.integration

MATRIX_MB = 64


def matrix_pool(size: int = 2, agent: str = "MatrixAgent", **options: Any) -> list[dict[str, Any]]:
    return [{"name": "counter", "agent": f"tests.serving_agents:{agent}", "size": size,
             **options}]


def embed(text: str) -> dict[str, Any]:
    return {"type": "matrix.embed", "data": {"text": text}}


def serving_env(tmp_path: Any, **more: str) -> dict[str, str]:
    return {"WARMPOOL_TEST_PRELOAD_DIR": str(tmp_path), "WARMPOOL_TEST_MATRIX_MB": str(MATRIX_MB),
            **more}


def calls_at_once(warm: Any, texts: list[str], **options: Any) -> list[Any]:
    """One ``warm.call`` per text, all from their own threads at once; outcomes in order."""
    return at_once(lambda text: warm.call("counter", embed(text), **options), texts)


def private_kilobytes(pid: int) -> int:
    """Memory private to ``pid`` (not shared with its parent), in kB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[name] = int(value.split()[0])
    return fields["Private_Clean"] + fields["Private_Dirty"]


@pytest.mark.parametrize("execution,concurrency", [("prefork", 2), ("threads", 4)])
def test_concurrent_calls_join_batches_and_each_caller_gets_its_own_answer(
        start_worker, client, tmp_path, execution, concurrency):
    specs = matrix_pool(2 if execution == "prefork" else 1)
    start_worker(specs, pool=execution, concurrency=concurrency, env=serving_env(tmp_path))
    _, warm = client(specs)
    texts = [f"text {number}" for number in range(16)]

    replies = calls_at_once(warm, texts, timeout=10)

    alone = {text: warm.call("counter", embed(text)).result["vector"] for text in texts[:3]}
    assert [reply.signal_type for reply in replies] == ["matrix.embed"] * 16
    for text, reply in zip(texts[:3], replies, strict=False):
        assert reply.result["vector"] == alone[text]  # its own answer, not a neighbour's
    sizes = [reply.result["batch"] for reply in replies]
    assert max(sizes) > 1 and max(sizes) <= 8  # batched, never past max_batch_size
    status = node_status(warm, replies[0].node)
    assert status.counters.batched >= 16
    assert status.counters.batches < status.counters.batched


def test_an_item_that_fails_fails_alone_in_a_worker(start_worker, client, tmp_path):
    start_worker(matrix_pool(2), pool="prefork", concurrency=2, env=serving_env(tmp_path))
    _, warm = client(matrix_pool(2))
    outcomes = calls_at_once(warm, ["good", "bad", "fine"], timeout=10)
    assert isinstance(outcomes[1], ActionFailed)
    assert "cannot embed 'bad'" in str(outcomes[1])
    assert [outcome.result["vector"] for outcome in (outcomes[0], outcomes[2])]


def test_a_batched_call_past_its_timeout_gets_checkout_timeout_and_never_runs(
        start_worker, client, tmp_path):
    worker = start_worker(matrix_pool(1), pool="prefork", concurrency=1,
                          env=serving_env(tmp_path, WARMPOOL_TEST_BATCH_SECONDS="2"))
    _, warm = client(matrix_pool(1))
    busy = warm.cast("counter", embed("first"))
    busy_child(warm, worker.hostname)

    started = time.monotonic()
    with pytest.raises(CheckoutTimeout):
        warm.call("counter", embed("late"), timeout=0.5)
    assert time.monotonic() - started < 3.0
    busy.get(timeout=10)
    status = wait_for_status(warm, lambda status: status.checked_out == 0,
                             node=worker.hostname)
    assert status.counters.batched == 1  # only the first one ran


def test_a_child_killed_mid_batch_loses_no_message(start_worker, client, tmp_path):
    worker = start_worker(matrix_pool(2), pool="prefork", concurrency=2,
                          env=serving_env(tmp_path, WARMPOOL_TEST_BATCH_SECONDS="1.5"))
    _, warm = client(matrix_pool(2))
    casts = [warm.cast("counter", embed(f"text {number}")) for number in range(6)]
    os.kill(busy_child(warm, worker.hostname), signal.SIGKILL)

    replies = [cast.get(timeout=30)[0] for cast in casts]
    assert len(replies) == 6
    assert all(reply["result"]["vector"] for reply in replies)


def test_preload_runs_once_per_node_and_children_share_it(start_worker, client, tmp_path):
    worker = start_worker(matrix_pool(2), pool="prefork", concurrency=2,
                          env=serving_env(tmp_path))
    _, warm = client(matrix_pool(2))
    where = [reply.result for reply in calls_at_once_where(warm, 2)]

    assert len(list(tmp_path.iterdir())) == 1  # one preload for the node
    assert {item["preloaded_by"] for item in where} == {worker.pid}  # in the main process
    assert {item["pid"] for item in where} == set(worker.children())
    assert len({item["shared_id"] for item in where}) == 1  # the same object, inherited
    assert {item["process_index"] for item in where} == {0, 1}
    for child in worker.children():
        # A 64 MB matrix, read by each child: its pages stay shared. A copy would make
        # the child's private memory at least the matrix; its own (the interpreter, its
        # connections, its agents) is about 16 MB.
        assert private_kilobytes(child) < MATRIX_MB * 1024 / 2, child

    before = set(worker.children())
    os.kill(min(before), signal.SIGKILL)
    wait_until(lambda: len(set(worker.children()) - before) == 1, 20,
               "the killed child was replaced")
    again = [reply.result for reply in calls_at_once_where(warm, 2)]
    assert {item["preloaded_by"] for item in again} == {worker.pid}
    assert len(list(tmp_path.iterdir())) == 1  # the replacement did not load again


def calls_at_once_where(warm: Any, count: int) -> list[Any]:
    """``count`` slow-ish calls at once, so that every prefork child answers one."""
    replies: list[Any] = [None] * count

    def call(index: int) -> None:
        replies[index] = warm.call("counter", {"type": "matrix.where"}, timeout=10)

    for _ in range(20):
        threads = [threading.Thread(target=call, args=(index,)) for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        if len({reply.pid for reply in replies}) == count:
            break
    return replies


def test_preload_runs_once_under_threads(start_worker, client, tmp_path):
    worker = start_worker(matrix_pool(3), pool="threads", concurrency=4,
                          env=serving_env(tmp_path))
    _, warm = client(matrix_pool(3))
    reply = warm.call("counter", {"type": "matrix.where"})
    assert reply.result["preloaded_by"] == worker.pid
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("agent,message", [
    ("FailingPreloadAgent", "pool 'counter': FailingPreloadAgent.preload() failed"),
    ("CudaPreloadAgent", "initialized CUDA in the worker's main process"),
])
def test_a_preload_that_fails_or_leaves_cuda_initialized_stops_the_worker(
        start_worker, tmp_path, agent, message):
    worker = start_worker(matrix_pool(2, agent), pool="prefork", concurrency=2,
                          env=serving_env(tmp_path), wait=False)
    worker.launch()
    assert worker.process.wait(60) != 0
    assert message in worker.log()


def test_cuda_in_preload_is_allowed_without_a_fork(start_worker, client, tmp_path):
    start_worker(matrix_pool(1, "CudaPreloadAgent"), pool="solo", concurrency=1,
                 env=serving_env(tmp_path))
    _, warm = client(matrix_pool(1, "CudaPreloadAgent"))
    assert warm.call("counter", embed("solo")).result["batch"] == 1


def test_result_value_and_reply_state_through_a_worker(start_worker, client, tmp_path):
    specs = matrix_pool(1, reply_state=False)
    start_worker(specs, pool="threads", concurrency=2, env=serving_env(tmp_path))
    _, warm = client(specs)
    first = warm.call("counter", {"type": "matrix.note"})
    second = warm.call("counter", {"type": "matrix.note"})
    assert (first.result, second.result) == ({"told": "note 1"}, {"told": "note 2"})
    assert first.state is None and second.state is None
