"""Agents for the serving tests: a cheap model (a numpy matrix) shared through preload.

Environment, read by the worker processes:

- ``WARMPOOL_TEST_MATRIX_MB``: size of the matrix ``preload`` builds (default 64);
- ``WARMPOOL_TEST_PRELOAD_DIR``: each ``preload`` run leaves a file there (counted);
- ``WARMPOOL_TEST_BATCH_SECONDS``: how long each batch takes (default 0).
"""

from __future__ import annotations

import os
import sys
import time
import types
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Agent, AgentState, BatchAction, Result


def _preloaded() -> dict[str, Any]:
    folder = os.environ.get("WARMPOOL_TEST_PRELOAD_DIR")
    if folder:
        Path(folder, f"{os.getpid()}-{uuid.uuid4().hex[:6]}").write_text("preloaded")
    megabytes = int(os.environ.get("WARMPOOL_TEST_MATRIX_MB", "64"))
    rows = megabytes * 1024 * 1024 // (8 * 256)
    matrix = np.random.default_rng(7).random((rows, 256))
    return {"matrix": matrix, "by": os.getpid()}


class Embed(BatchAction):
    """A row of the shared matrix per text; the text ``bad`` fails alone."""

    name = "embed"
    max_batch_size = 8
    batch_wait_timeout = 0.05

    class Params(BaseModel):
        text: str

    def run_batch(self, items: list[Any], context: ActionContext) -> list[Any]:
        time.sleep(float(os.environ.get("WARMPOOL_TEST_BATCH_SECONDS", "0")))
        matrix = context.agent.shared["matrix"]
        outcomes: list[Any] = []
        for item in items:
            if item.text == "bad":
                outcomes.append(ValueError("cannot embed 'bad'"))
                continue
            row = matrix[sum(map(ord, item.text)) % len(matrix)]
            outcomes.append({"vector": [round(float(value), 6) for value in row[:4]],
                             "batch": len(items), "pid": os.getpid()})
        return outcomes


class Where(Action):
    """Where the agent runs and what it shares: the caller gets it; state is not touched."""

    name = "where"

    def run(self, params: Any, context: ActionContext) -> Result:
        agent = context.agent
        return Result({"pid": os.getpid(), "shared_id": id(agent.shared),
                       "preloaded_by": agent.shared["by"],
                       "process_index": agent.process_index})


class Note(Action):
    """Counts in state and tells the caller something else."""

    name = "note"

    def run(self, params: Any, context: ActionContext) -> Result:
        notes = context.state.notes + 1
        return Result({"told": f"note {notes}"}, updates={"notes": notes})


class MatrixState(AgentState):
    notes: int = 0
    history: list[int] = []


class MatrixAgent(Agent[MatrixState]):
    signal_routes = {"matrix.embed": Embed, "matrix.where": Where, "matrix.note": Note}

    @classmethod
    def preload(cls, options: Any) -> Any:
        return _preloaded()


class FailingPreloadAgent(MatrixAgent):
    @classmethod
    def preload(cls, options: Any) -> Any:
        raise OSError("the model file is missing")


class CudaPreloadAgent(MatrixAgent):
    """Its preload leaves a stand-in of torch with CUDA initialized in the process."""

    @classmethod
    def preload(cls, options: Any) -> Any:
        torch = types.ModuleType("torch")
        torch.cuda = types.SimpleNamespace(is_initialized=lambda: True)  # type: ignore[attr-defined]
        sys.modules["torch"] = torch
        return _preloaded()
