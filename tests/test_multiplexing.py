"""Many models per pool, through real workers (prefork and threads): loads, hits and
evictions, one load for concurrent first calls, a failing load and its retry, models
loaded ahead and warm-up, batches of one model, every way of calling with a model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from celery_warmpool import InvalidArgument, ModelLoadFailed, PoolStatus
from celery_warmpool.wire.message import CallMessage
from tests.conftest import at_once, wait_until

pytestmark = pytest.mark.integration

EXECUTIONS = [("prefork", 1), ("threads", 2)]


def heads(size: int = 1, **options: Any) -> list[dict[str, Any]]:
    return [{"name": "counter", "agent": "tests.model_agents:ModelAgent", "size": size,
             "max_models": 2, "reply_state": False, **options}]


def predict(text: str = "") -> dict[str, Any]:
    return {"type": "model.predict", "data": {"text": text}}


def wait_for_status(warm: Any, condition: Any, within: float = 10.0, *,
                    node: str) -> PoolStatus:
    """The pool's status on ``node`` once ``condition`` holds (prefork children publish
    theirs a few times a second; a node busy starting may miss one question)."""
    found: list[PoolStatus] = []

    def holds() -> bool:
        parts = warm.status_reader.collect("counter", timeout=2.0, destination=[node])
        found[:] = [PoolStatus.combine("counter", parts["counter"])] if parts.get(
            "counter") else []
        return bool(found) and bool(condition(found[0]))

    wait_until(holds, within, "the pool's status never matched")
    return found[0]


def model_env(tmp_path: Path, **more: str) -> dict[str, str]:
    return {"WARMPOOL_TEST_MODEL_LOG": str(tmp_path / "models.log"), **more}


def model_log(tmp_path: Path) -> list[tuple[str, str, str, str]]:
    """``(pid, agent, what, model)`` per line of the workers' model log."""
    path = tmp_path / "models.log"
    if not path.exists():
        return []
    return [tuple(line.split()) for line in path.read_text().splitlines()]  # type: ignore[misc]


def events(tmp_path: Path, what: str) -> list[str]:
    return [model for _, _, kind, model in model_log(tmp_path) if kind == what]


@pytest.mark.parametrize("execution,concurrency", EXECUTIONS)
def test_models_load_on_first_use_hit_after_and_the_least_recent_goes(
        start_worker, client, tmp_path, execution, concurrency):
    worker = start_worker(heads(), pool=execution, concurrency=concurrency,
                          env=model_env(tmp_path))
    _, warm = client(heads())

    replies = [warm.call("counter", predict(), model=model) for model in "aabac"]

    assert events(tmp_path, "load") == ["a", "b", "c"]
    assert events(tmp_path, "unload") == ["b"]  # a was used after b: b went
    assert [reply.result["model"] for reply in replies] == list("aabac")
    assert [reply.result["load"] for reply in replies] == [1, 1, 2, 1, 3]
    assert replies[-1].result["held"] == ["a", "c"]
    counters = wait_for_status(warm, lambda status: status.counters.calls == 5,
                               node=worker.hostname).counters
    assert (counters.model_loads, counters.model_hits, counters.model_evictions) == (3, 2, 1)


def test_concurrent_first_calls_on_a_threads_node_load_a_cold_model_once(
        start_worker, client, tmp_path):
    start_worker(heads(4), pool="threads", concurrency=4,
                 env=model_env(tmp_path, WARMPOOL_TEST_LOAD_SECONDS="0.5"))
    _, warm = client(heads(4))

    replies = at_once(lambda _: warm.call("counter", predict(), model="cold", timeout=20),
                      range(6))

    assert events(tmp_path, "load") == ["cold"]
    assert len({reply.agent_id for reply in replies}) == 1


def test_no_prefork_child_loads_a_model_twice_for_concurrent_first_calls(
        start_worker, client, tmp_path):
    start_worker(heads(2), pool="prefork", concurrency=2,
                 env=model_env(tmp_path, WARMPOOL_TEST_LOAD_SECONDS="0.3"))
    _, warm = client(heads(2))

    replies = at_once(lambda _: warm.call("counter", predict(), model="cold", timeout=20),
                      range(6))

    loads = [(pid, model) for pid, _, what, model in model_log(tmp_path) if what == "load"]
    assert len(loads) == len(set(loads))  # each child loaded it once at most
    assert {pid for pid, _ in loads} == {str(reply.pid) for reply in replies}


@pytest.mark.parametrize("execution,concurrency", EXECUTIONS)
def test_a_failing_load_fails_its_calls_and_is_tried_again_after_its_back_off(
        start_worker, client, tmp_path, execution, concurrency):
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "broken").touch()
    worker = start_worker(heads(), pool=execution, concurrency=concurrency, env=model_env(
        tmp_path, WARMPOOL_TEST_FAIL_DIR=str(failing), WARMPOOL_TEST_RETRY_FIRST="3"))
    _, warm = client(heads())

    with pytest.raises(ModelLoadFailed) as first:
        warm.call("counter", predict(), model="broken")
    with pytest.raises(ModelLoadFailed) as second:
        warm.call("counter", predict(), model="broken")
    (failing / "broken").unlink()
    assert events(tmp_path, "load") == ["broken"]  # the second never tried
    started = time.monotonic()
    wait_until(lambda: _answers(warm, "broken"), 10, "the model loaded after its back-off")

    assert time.monotonic() - started > 1.0
    assert (first.value.model, first.value.pool, first.value.retry_in) == (
        "broken", "counter", 3.0)
    assert first.value.cause == "OSError: no weights for broken"
    assert "tried again in" in str(second.value)
    assert events(tmp_path, "load") == ["broken", "broken"]
    counters = wait_for_status(warm, lambda status: status.counters.model_loads == 1,
                               node=worker.hostname).counters
    assert (counters.model_load_failures, counters.model_loads) == (1, 1)


def _answers(warm: Any, model: str) -> bool:
    try:
        return warm.call("counter", predict(), model=model).result["model"] == model
    except ModelLoadFailed:
        return False


@pytest.mark.parametrize("execution,concurrency", [("prefork", 2), ("threads", 2)])
def test_models_of_the_spec_and_warm_up_run_before_the_node_serves_uncounted(
        start_worker, client, tmp_path, execution, concurrency):
    specs = heads(2, models=["a", "b"], warmup=[{"type": "model.warm"}])
    worker = start_worker(specs, pool=execution, concurrency=concurrency,
                          env=model_env(tmp_path, WARMPOOL_TEST_LOAD_SECONDS="0.2"))
    _, warm = client(specs)

    before = wait_for_status(warm, lambda status: status.counters.model_loads == 4,
                             within=10, node=worker.hostname)
    assert sorted(events(tmp_path, "load")) == ["a", "a", "b", "b"]
    for agent in {agent for _, agent, _, _ in model_log(tmp_path)}:
        assert [(what, model) for _, who, what, model in model_log(tmp_path)
                if who == agent] == [("load", "a"), ("warmup", "a"), ("load", "b"),
                                     ("warmup", "b")]
    assert (before.counters.calls, before.counters.checkouts) == (0, 0)
    assert before.counters.model_loads == 4
    assert all(process.warmup_seconds >= 0.4 for process in before.processes)
    assert before.warmup_seconds == max(p.warmup_seconds for p in before.processes)

    reply = warm.call("counter", predict(), model="b")
    assert reply.result["load"] == 2  # loaded ahead, second on that agent
    wait_for_status(warm, lambda status: status.counters.model_hits == 1,
                    node=worker.hostname)


@pytest.mark.parametrize("execution,concurrency,size", [("prefork", 2, 2), ("threads", 4, 2)])
def test_batches_in_a_worker_hold_the_signals_of_one_model(
        start_worker, client, tmp_path, execution, concurrency, size):
    start_worker(heads(size), pool=execution, concurrency=concurrency,
                 env=model_env(tmp_path, WARMPOOL_TEST_BATCH_SECONDS="0.2"))
    _, warm = client(heads(size))
    models = ["x", "y"] * 8

    replies = at_once(lambda model: warm.call(
        "counter", {"type": "model.score", "data": {"text": model}}, model=model,
        timeout=20), models)

    assert [reply.result["model"] for reply in replies] == models
    assert [reply.result["text"] for reply in replies] == models
    batches = [line.split(":") for line in events(tmp_path, "batch")]
    assert sum(int(count) for _, count in batches) == 16
    assert max(int(count) for _, count in batches) > 1


def test_every_way_of_calling_names_a_model(start_worker, client, tmp_path):
    start_worker(heads(2), pool="threads", concurrency=2, env=model_env(tmp_path))
    _, warm = client(heads(2))

    cast = warm.cast("counter", predict("cast"), model="m-cast")
    mapped = list(warm.map("counter", [predict("1"), predict("2")], model="m-map"))
    with warm.stream("counter", {"type": "model.spell"}, model="m-stream") as stream:
        chunks = "".join(stream)
    transaction = warm.transaction("counter", [{"type": "model.count"}] * 2, model="m-tx")

    async def awaited() -> list[Any]:
        called = await warm.acall("counter", predict("acall"), model="m-acall")
        acast = await warm.acast("counter", predict("acast"), model="m-acast")
        amapped = [reply async for reply in warm.amap("counter", [predict()], model="m-amap")]
        achunks = [chunk async for chunk in warm.astream(
            "counter", {"type": "model.spell"}, model="m-as")]
        return [called, acast, amapped, achunks]

    called, acast, amapped, achunks = asyncio.run(awaited())

    assert cast.get(timeout=10)[0]["result"]["model"] == "m-cast"
    assert [reply.result["model"] for reply in mapped] == ["m-map", "m-map"]
    assert chunks == "m-stream"
    assert [reply.action for reply in transaction] == ["count", "count"]
    assert called.result["model"] == "m-acall"
    assert acast.get(timeout=10)[0]["result"]["model"] == "m-acast"
    assert amapped[0].result["model"] == "m-amap"
    assert "".join(achunks) == "m-as"
    assert set(events(tmp_path, "load")) == {
        "m-cast", "m-map", "m-stream", "m-tx", "m-acall", "m-acast", "m-amap", "m-as"}


def test_a_call_without_a_model_is_refused_before_and_after_it_is_sent(
        start_worker, client, tmp_path):
    start_worker(heads(), pool="threads", concurrency=1, env=model_env(tmp_path))
    _, warm = client(heads())

    with pytest.raises(InvalidArgument, match="holds many models"):
        warm.call("counter", predict())
    with pytest.raises(InvalidArgument, match="1 to 128 characters"):
        warm.cast("counter", predict(), model="not a model id")
    with pytest.raises(InvalidArgument, match="holds many models"):
        warm.stream("counter", {"type": "model.spell"})
    # A message that skipped the caller's check (an older caller, say): the worker refuses it.
    bare = CallMessage("counter", [predict()], time.time() + 10, None)
    result = warm.handle_task.apply_async(bare.to_args(), queue=warm.spec("counter").queue)
    with pytest.raises(InvalidArgument, match="holds many models"):
        result.get(timeout=10)
    assert events(tmp_path, "load") == []
