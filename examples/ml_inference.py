"""ML inference: a scikit-learn model trained once per node, then served by every agent.

Run it (starts its own prefork worker on an embedded broker; nothing is downloaded, the
handwritten digits dataset ships with scikit-learn):

    python examples/ml_inference.py

On Redis: ``python examples/ml_inference.py --broker redis://127.0.0.1:6379/0``.

The agent's ``preload()`` trains a random forest once, in the worker's main process,
before the children fork: both children share that one model (and its memory), and a
replacement child gets it with no training. Even the first prediction is warm. The
comparison is spawn-per-request: a plain task that builds, trains and tears down a fresh
agent for every prediction.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file too

import os
import statistics
import time
from typing import Any

from pydantic import BaseModel, Field

# Imported here, once, in the worker's main process: prefork children inherit it
# instead of each paying seconds for it while they warm up.
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split

from celery_warmpool import (
    Action,
    ActionContext,
    Agent,
    AgentState,
    PoolSpec,
    Signal,
    WarmPool,
    resource,
)
from examples.launch import example_app, parse_options, running_worker

TREES = 100


def digits_split() -> tuple[Any, Any, Any, Any]:
    """The bundled 8x8 digits, split the same way everywhere: train X, y; test X, y."""
    images, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels)
    return train_x, train_y, test_x, test_y


class DigitsState(AgentState):
    model: Any = resource()  # the node's trained forest: never sent in a reply
    test_accuracy: float = 0.0
    trained_in: float = 0.0
    trained_by: int = 0  # the process that trained it: the worker's main process
    predictions: int = 0
    last_prediction: dict[str, Any] | None = None


class Predict(Action):
    """Classify one 8x8 image (64 grey levels, 0 to 16)."""

    name = "predict"

    class Params(BaseModel):
        pixels: list[float] = Field(min_length=64, max_length=64)

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        model = context.state.model
        probabilities = model.predict_proba([params.pixels])[0]
        best = int(probabilities.argmax())
        return {"predictions": context.state.predictions + 1,
                "last_prediction": {"digit": int(model.classes_[best]),
                                    "confidence": round(float(probabilities[best]), 3)}}


def train() -> dict[str, Any]:
    """A random forest trained on the digits, and how it did."""
    started = time.perf_counter()
    train_x, train_y, test_x, test_y = digits_split()
    model = RandomForestClassifier(n_estimators=TREES, random_state=0)
    model.fit(train_x, train_y)
    return {"model": model, "trained_in": round(time.perf_counter() - started, 3),
            "test_accuracy": round(float(model.score(test_x, test_y)), 4),
            "trained_by": os.getpid()}


class DigitsAgent(Agent[DigitsState]):
    """Serves ``digits.predict`` from the node's one model, trained by ``preload()``."""

    signal_routes = {"digits.predict": Predict}

    @classmethod
    def preload(cls, options: Any) -> dict[str, Any]:
        return train()

    def setup(self) -> None:
        trained = self.shared
        self.state.model = trained["model"]
        self.state.trained_in = trained["trained_in"]
        self.state.test_accuracy = trained["test_accuracy"]
        self.state.trained_by = trained["trained_by"]

    def teardown(self) -> None:
        self.state.model = None


app = example_app("ml_inference")
warm = WarmPool(app, pools=[PoolSpec("digits", DigitsAgent, size=2)])


@app.task(name="ml_inference.predict_cold")
def predict_cold(pixels: list[float]) -> dict[str, Any]:
    """Spawn-per-request, for comparison: build, train, use and tear down an agent."""
    agent = DigitsAgent()
    agent.shared = train()
    agent.setup()
    try:
        return agent.handle(predict(pixels)).model_dump(mode="json")
    finally:
        agent.teardown()


def predict(pixels: Any) -> Signal:
    return Signal.new("digits.predict", {"pixels": [float(p) for p in pixels]},
                      source="/examples/ml_inference")


def _timed(function: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> int:
    _, choice = parse_options(app, "A warm scikit-learn inference pool.", argv)
    _, _, test_x, test_y = digits_split()
    with running_worker(app, "examples.ml_inference", choice, pool="prefork", concurrency=2):
        first_seconds, first = _timed(warm.call, "digits", predict(test_x[0]))
        print(f"model warm before the first call: trained once in {first.state['trained_in']}s "
              f"by the worker's main process (pid {first.state['trained_by']}), before its "
              f"children forked; test accuracy {first.state['test_accuracy']:.3f}")
        print(f"first call after ready: {first_seconds * 1000:.0f} ms (digit "
              f"{first.state['last_prediction']['digit']}, true {int(test_y[0])})")

        warm_times, correct = [], 0
        for pixels, label in zip(test_x[1:21], test_y[1:21], strict=True):
            seconds, reply = _timed(warm.call, "digits", predict(pixels))
            warm_times.append(seconds)
            correct += reply.state["last_prediction"]["digit"] == int(label)
        print(f"20 warm calls: {correct} of 20 correct, "
              f"median {statistics.median(warm_times) * 1000:.0f} ms")

        cold_times = []
        for pixels in test_x[21:24]:
            seconds, _ = _timed(lambda p: predict_cold.delay(list(map(float, p))).get(
                timeout=60, interval=0.01), pixels)
            cold_times.append(seconds)
        cold, hot = statistics.median(cold_times), statistics.median(warm_times)
        print(f"3 cold calls (agent built and trained per request): "
              f"median {cold * 1000:.0f} ms")
        print(f"warm vs cold: {hot * 1000:.0f} ms vs {cold * 1000:.0f} ms, "
              f"{cold / hot:.0f}x faster warm")
        status = warm.status("digits")
        print(f"pool status: {status.size} agents over {len(status.processes)} processes, "
              f"calls={status.counters.calls}, all sharing one model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
