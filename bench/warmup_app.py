"""The Celery app ``bench/warmup.py`` runs: all-MiniLM-L6-v2 served with and without warm-up.

``WARMPOOL_BENCH_SCENARIO`` picks the pool (always named ``embedder``):

- ``preloaded``: the model loaded once per node by ``preload`` (in the main process,
  before the prefork children fork), shared by every agent;
- ``per_agent``: each agent loads its own copy in ``setup()`` (a threads node);
- ``models``: a multiplexed pool (``max_models=1``) whose agents load the model as
  ``minilm`` by ``load_model``, ahead (``models=["minilm"]``).

``WARMPOOL_BENCH_WARMUP=1`` adds ``warmup=[one embed]`` to the pool. No agent warms up by
hand in ``setup()``: what the first call pays is what nobody ran before it.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Agent, AgentState, PoolSpec, Result, WarmPool
from examples.embeddings import load_model

#: What the warm-up sends: one sentence, as a real call would.
WARMUP_SIGNAL = {"type": "text.embed", "data": {"text": "a sentence to warm the model up"}}


class Text(BaseModel):
    text: str


class Embed(Action):
    """One forward pass for one sentence."""

    name = "embed"
    Params = Text

    def run(self, params: Any, context: ActionContext) -> Result:
        model = context.model if context.model is not None else context.agent.model  # type: ignore[attr-defined]
        return Result(model.encode([params.text], show_progress_bar=False)[0].tolist())


class PreloadedAgent(Agent[AgentState]):
    """The node's one copy, loaded before the fork."""

    signal_routes = {"text.embed": Embed}

    @classmethod
    def preload(cls, options: Any) -> Any:
        return load_model()

    @property
    def model(self) -> Any:
        return self.shared

    def setup(self) -> None:
        import torch

        torch.set_num_threads(1)


class CopyAgent(PreloadedAgent):
    """A copy per agent, loaded in ``setup()``."""

    @classmethod
    def preload(cls, options: Any) -> Any:
        return None

    def setup(self) -> None:
        self._model = load_model()

    @property
    def model(self) -> Any:
        return self._model


class ModelsAgent(CopyAgent):
    """A multiplexed agent: the model loaded by id."""

    def setup(self) -> None:
        import torch

        torch.set_num_threads(1)

    def load_model(self, model_id: str) -> Any:
        return load_model()


AGENTS = {"preloaded": PreloadedAgent, "per_agent": CopyAgent, "models": ModelsAgent}
OPTIONS: dict[str, dict[str, Any]] = {"models": {"max_models": 1, "models": ["minilm"]}}



def make_app(scenario: str, warm_up: bool) -> tuple[Celery, WarmPool]:
    """The app and its pool for ``scenario``, with warm-up or not (the bench makes the
    caller's side with it too)."""
    app = Celery("bench_warmup", broker=os.environ.get("WARMPOOL_BROKER_URL"),
                 backend=os.environ.get("WARMPOOL_RESULT_BACKEND"), set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True
    app.conf.result_expires = 600
    warm = WarmPool(app, pools=[PoolSpec(
        "embedder", AGENTS[scenario], size=2, reply_state=False,
        warmup=[WARMUP_SIGNAL] if warm_up else [], **OPTIONS.get(scenario, {}))])
    return app, warm


app, warm = make_app(os.environ.get("WARMPOOL_BENCH_SCENARIO", "preloaded"),
                     os.environ.get("WARMPOOL_BENCH_WARMUP") == "1")
