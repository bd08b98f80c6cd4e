"""Serve many models from one pool: a scikit-learn head per customer, loaded on first use.

Run it (starts its own worker on an embedded broker; nothing is downloaded, the
handwritten digits dataset ships with scikit-learn):

    python examples/many_models.py

On Redis: ``python examples/many_models.py --broker redis://127.0.0.1:6379/0``.

Each of 10 customers has a classifier of its own (150 trees, about 9 MB on disk, some
50 ms to load): far too many to keep every one warm in every agent, too slow to load per
call. One pool serves them all. A call names its customer's model,
``warm.call("heads", signal, model="customer-3")``, and the pool gives it an agent that
holds that head: ``PoolSpec(max_models=3)`` lets each agent keep three, the least recently
used unloaded when a fourth is needed. ``models=["customer-0"]`` loads the busiest
customer's head on every agent before the pool serves, and ``warmup=[...]`` runs a
prediction with it, so its first call is as fast as its hundredth. A cold head is loaded
once for callers that ask for it at the same time, and a customer with no head gets
:class:`ModelLoadFailed`, then a quick refusal while its load backs off.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file too

import copy
import random
import statistics
import tempfile
import threading
import time
from typing import Any

import joblib
from pydantic import BaseModel, Field
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier

from celery_warmpool import (
    Action,
    ActionContext,
    Agent,
    AgentState,
    InvalidArgument,
    ModelLoadFailed,
    PoolSpec,
    Result,
    WarmPool,
)
from examples.launch import example_app, parse_options, running_worker

CUSTOMERS = 10
TREES, HEAD_TREES = 300, 150
#: Where the heads are saved (made once, by the example's own process).
HEADS = Path(tempfile.gettempdir()) / "celery-warmpool-example-heads"


class Digit(BaseModel):
    pixels: list[float] = Field(min_length=64, max_length=64)


class Predict(Action):
    """Classify one 8x8 image with the calling customer's head."""

    name = "predict"
    Params = Digit

    def run(self, params: Any, context: ActionContext) -> Result:
        head = context.model
        assert context.agent.models is not None and context.model_id is not None
        held = context.agent.models.entry(context.model_id)
        return Result({"customer": context.model_id, "agent": context.agent.id,
                       "digit": int(head.predict([params.pixels])[0]),
                       "loaded_in_ms": round(held.load_seconds * 1000, 1) if held else None})


class HeadAgent(Agent[AgentState]):
    """Holds up to ``max_models`` customers' heads, each loaded from its file."""

    signal_routes = {"digits.predict": Predict}

    def load_model(self, model_id: str) -> Any:
        path = Path(self.options["heads"]) / f"{model_id}.joblib"
        if not path.exists():
            raise FileNotFoundError(f"no head was trained for {model_id}")
        return joblib.load(path)


def image(index: int) -> list[float]:
    return [float(value) for value in load_digits().data[index]]


app = example_app("many_models")
warm = WarmPool(app, pools=[PoolSpec(
    "heads", HeadAgent, size=2, max_models=3, models=["customer-0"],
    warmup=[{"type": "digits.predict", "data": {"pixels": [0.0] * 64}}],
    worker_opts={"heads": str(HEADS)}, reply_state=False)])


def save_heads() -> None:
    """One forest, then a head per customer: 150 of its trees, picked by the customer."""
    HEADS.mkdir(exist_ok=True)
    if all((HEADS / f"customer-{number}.joblib").exists() for number in range(CUSTOMERS)):
        return
    images, labels = load_digits(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=TREES, random_state=0, n_jobs=-1)
    forest.fit(images, labels)
    for number in range(CUSTOMERS):
        head = copy.copy(forest)
        head.estimators_ = random.Random(number).sample(forest.estimators_, HEAD_TREES)
        head.n_estimators = HEAD_TREES
        head.n_jobs = 1
        joblib.dump(head, HEADS / f"customer-{number}.joblib")


def call(customer: str, index: int = 0) -> tuple[float, Any]:
    """One prediction for ``customer``: the seconds it took the caller, and the reply."""
    started = time.perf_counter()
    reply = warm.call("heads", {"type": "digits.predict", "data": {"pixels": image(index)}},
                      timeout=30, model=customer)
    return time.perf_counter() - started, reply


def at_once(customer: str, count: int) -> list[Any]:
    replies: list[Any] = [None] * count

    def one(index: int) -> None:
        replies[index] = call(customer, index)[1]

    threads = [threading.Thread(target=one, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies


def zipf_traffic(calls: int) -> list[tuple[float, Any]]:
    """``calls`` predictions from 4 threads, customers drawn as real traffic is: a few
    busy ones, a long tail (Zipf, s = 1.1)."""
    weights = [1 / (rank + 1) ** 1.1 for rank in range(CUSTOMERS)]
    draws = random.Random(7).choices(range(CUSTOMERS), weights, k=calls)
    lock, outcomes = threading.Lock(), []

    def caller() -> None:
        while True:
            with lock:
                if not draws:
                    return
                number = draws.pop()
            outcome = call(f"customer-{number}", number)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def main(argv: list[str] | None = None) -> int:
    _, choice = parse_options(app, "A pool serving a model per customer.", argv)
    started = time.perf_counter()
    save_heads()
    print(f"{CUSTOMERS} customer heads saved in {HEADS} "
          f"({(HEADS / 'customer-1.joblib').stat().st_size // 2 ** 20} MB each), "
          f"in {time.perf_counter() - started:.1f}s")
    with running_worker(app, "examples.many_models", choice, pool="threads", concurrency=4):
        seconds, reply = call("customer-0")
        print(f"customer-0, loaded ahead and warmed up: first call {seconds * 1000:.0f} ms "
              f"(digit {reply.result['digit']})")
        cold, reply = call("customer-5", 5)
        loaded_in = reply.result["loaded_in_ms"]
        hot, _ = call("customer-5", 5)
        print(f"customer-5, cold: {cold * 1000:.0f} ms (its head loaded in {loaded_in:.0f} ms),"
              f" then warm: {hot * 1000:.0f} ms")
        before = warm.status("heads").counters
        replies = at_once("customer-8", 6)
        after = warm.status("heads").counters
        agents = {reply.result["agent"] for reply in replies}
        print(f"6 callers at once for cold customer-8: {len(replies)} replies, "
              f"{after.model_loads - before.model_loads} load, on {len(agents)} agent(s)")

        outcomes = zipf_traffic(200)
        counters = warm.status("heads").counters
        hits = counters.model_hits - after.model_hits
        loads = counters.model_loads - after.model_loads
        print(f"200 calls over {CUSTOMERS} customers (Zipf, 4 callers): {hits} hits, {loads} "
              f"loads (hit rate {hits / (hits + loads):.2f}), "
              f"{counters.model_evictions - after.model_evictions} heads unloaded for room, "
              f"median {statistics.median(seconds for seconds, _ in outcomes) * 1000:.0f} ms")

        for attempt in ("first", "again"):
            try:
                call("customer-99")
            except ModelLoadFailed as exc:
                print(f"customer-99 ({attempt}): ModelLoadFailed: {exc}")
        try:
            warm.call("heads", {"type": "digits.predict", "data": {"pixels": image(0)}})
        except InvalidArgument as exc:
            print(f"a call naming no customer: InvalidArgument: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
