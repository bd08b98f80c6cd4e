"""Agents that hold many models, for the multiplexing tests (in process and in workers).

A :class:`ModelAgent`'s "model" is a small dict naming the model, the agent and process
that loaded it and the how-manieth load of that agent it was. What it does is written
down so that tests see loads, unloads, warm-ups and batches in order:

- in process, to the :class:`Recorder` the test gives the agent (which may also hold a
  load back until the test lets it go, fail the next loads of a model, or make loads
  meet at a barrier);
- in a worker, to the file ``WARMPOOL_TEST_MODEL_LOG`` (one line per event:
  ``<pid> <agent> <what> <model>``). There ``WARMPOOL_TEST_LOAD_SECONDS`` makes every
  load take that long, and a load of model ``m`` fails while the file
  ``$WARMPOOL_TEST_FAIL_DIR/m`` exists.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Agent, AgentState, BatchAction, Result
from celery_warmpool.core import models as _models

if os.environ.get("WARMPOOL_TEST_RETRY_FIRST"):  # a worker's back-off, set by its test
    _models.RETRY_FIRST = float(os.environ["WARMPOOL_TEST_RETRY_FIRST"])


class Recorder:
    """What the agents of one test did, and the knobs the test holds their loads with."""

    def __init__(self, load_seconds: float = 0.0) -> None:
        self.lock = threading.Lock()
        #: ``(what, agent id, model id)`` in the order they happened.
        self.events: list[tuple[str, str, str]] = []
        self.load_seconds = load_seconds
        #: A load of a model listed here waits until its event is set.
        self.gates: dict[str, threading.Event] = {}
        #: Set when a load of that model starts.
        self.started: dict[str, threading.Event] = {}
        #: The next loads of a model that fail: how many are left.
        self.failing: dict[str, int] = {}
        #: Loads wait here, when set: proof that two run at once.
        self.barrier: threading.Barrier | None = None
        #: A ``hold`` action waits until this is set.
        self.release = threading.Event()
        self.holding = threading.Event()

    def record(self, what: str, agent: str, model: str) -> None:
        with self.lock:
            self.events.append((what, agent, model))

    def of(self, what: str) -> list[str]:
        """The models of every event ``what``, in order."""
        with self.lock:
            return [model for kind, _, model in self.events if kind == what]

    def gate(self, model: str) -> threading.Event:
        """Hold the loads of ``model`` until the event returned is set."""
        self.started[model] = threading.Event()
        self.gates[model] = threading.Event()
        return self.gates[model]


class Text(BaseModel):
    text: str = ""


class Predict(Action):
    """Tell the caller which model served it, and where."""

    name = "predict"
    Params = Text

    def run(self, params: Any, context: ActionContext) -> Result:
        model = context.model
        agent = context.agent
        return Result({"model": context.model_id, "loaded_by": model["agent"],
                       "load": model["number"], "agent": agent.id, "pid": os.getpid(),
                       "held": agent.models.held() if agent.models is not None else None,
                       "device": agent.device, "process_index": agent.process_index,
                       "text": params.text})


class Hold(Action):
    """Wait until the test lets go (the agent is busy meanwhile)."""

    name = "hold"

    def run(self, params: Any, context: ActionContext) -> Result:
        recorder = context.agent.recorder  # type: ignore[attr-defined]
        recorder.holding.set()
        assert recorder.release.wait(20)
        return Result({"model": context.model_id, "agent": context.agent.id})


class Warm(Action):
    """A warm-up signal: notes that it ran, for which model (state is left alone)."""

    name = "warm"

    def run(self, params: Any, context: ActionContext) -> Result:
        context.agent.note("warmup", context.model_id or "-")  # type: ignore[attr-defined]
        if context.model_id == "cursed":
            raise ValueError("the warm-up of 'cursed' breaks")
        return Result(None)


class Score(BatchAction):
    """A batch: each item learns its batch's model and size."""

    name = "score"
    max_batch_size = 8
    batch_wait_timeout = 0.05

    Params = Text

    def run_batch(self, items: list[Any], context: ActionContext) -> list[Any]:
        time.sleep(float(os.environ.get("WARMPOOL_TEST_BATCH_SECONDS", "0")))
        context.agent.note("batch", f"{context.model_id}:{len(items)}")  # type: ignore[attr-defined]
        return [{"model": context.model_id, "batch": len(items), "text": item.text,
                 "agent": context.agent.id, "pid": os.getpid()} for item in items]


class Spell(Action):
    """Stream the model's id, a character at a time."""

    name = "spell"

    def run(self, params: Any, context: ActionContext) -> Any:
        yield from str(context.model_id)
        return Result(context.model_id)


class ModelState(AgentState):
    served: int = 0


class Count(Action):
    """Count in state (a transaction's step)."""

    name = "count"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"served": context.state.served + 1}


class ModelAgent(Agent[ModelState]):
    """Holds models that cost ``load_seconds`` to load (see the module)."""

    signal_routes = {"model.predict": Predict, "model.hold": Hold, "model.warm": Warm,
                     "model.score": Score, "model.spell": Spell, "model.count": Count}

    def __init__(self, *args: Any, recorder: Recorder | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorder = recorder
        self.loads = 0

    def note(self, what: str, model: str) -> None:
        if self.recorder is not None:
            self.recorder.record(what, self.id, model)
        log = os.environ.get("WARMPOOL_TEST_MODEL_LOG")
        if log:
            with open(log, "a") as file:
                file.write(f"{os.getpid()} {self.id} {what} {model}\n")

    def load_model(self, model_id: str) -> Any:
        self.note("load", model_id)
        recorder = self.recorder
        if recorder is not None:
            self._held_back(recorder, model_id)
        time.sleep(float(os.environ.get("WARMPOOL_TEST_LOAD_SECONDS", "0")))
        failing = os.environ.get("WARMPOOL_TEST_FAIL_DIR")
        if failing and Path(failing, model_id).exists():
            raise OSError(f"no weights for {model_id}")
        self.loads += 1
        return {"id": model_id, "agent": self.id, "number": self.loads}

    def _held_back(self, recorder: Recorder, model_id: str) -> None:
        if model_id in recorder.started:
            recorder.started[model_id].set()
        if model_id in recorder.gates:
            assert recorder.gates[model_id].wait(20)
        if recorder.barrier is not None:
            recorder.barrier.wait(10)  # a BrokenBarrierError if loads run one at a time
        time.sleep(recorder.load_seconds)
        with recorder.lock:
            left = recorder.failing.get(model_id, 0)
            if left:
                recorder.failing[model_id] = left - 1
        if left:
            raise OSError(f"no weights for {model_id}")

    def unload_model(self, model_id: str, model: Any) -> None:
        self.note("unload", model_id)

    def teardown(self) -> None:
        self.note("teardown", "-")
