"""The Celery app ``bench/inference.py`` runs: all-MiniLM-L6-v2 served three ways.

- pool ``embedder``: ``text.embed`` is a :class:`BatchAction` (up to 32 sentences per
  forward pass), ``text.embed_one`` a plain action (one forward pass per sentence), both
  on the one copy of the model ``preload`` loads per node;
- pool ``copies`` (only when ``WARMPOOL_BENCH_COPIES=1``): the same agent without
  ``preload``, each agent loading its own copy in ``setup()`` (the usual way);
- ``bench.batches_embed``: celery-batches (``flush_every=32``, ``flush_interval=0.01``) on a
  model this module loads at import, in the worker's main process before the fork.

The broker and result store come from ``WARMPOOL_BROKER_URL`` / ``WARMPOOL_RESULT_BACKEND``.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from celery import Celery
from pydantic import BaseModel

from celery_warmpool import (
    Action,
    ActionContext,
    Agent,
    AgentState,
    BatchAction,
    PoolSpec,
    Result,
    WarmPool,
)
from examples.embeddings import load_model

MAX_BATCH = 32
WAIT = 0.01


class Text(BaseModel):
    text: str


class Embed(BatchAction):
    name = "embed"
    max_batch_size = MAX_BATCH
    batch_wait_timeout = WAIT
    Params = Text

    def run_batch(self, items: list[Any], context: ActionContext) -> list[Any]:
        vectors = context.agent.model.encode([item.text for item in items],
                                             batch_size=len(items), show_progress_bar=False)
        return [vector.tolist() for vector in vectors]


class EmbedOne(Action):
    name = "embed_one"
    Params = Text

    def run(self, params: Any, context: ActionContext) -> Result:
        vector = context.agent.model.encode([params.text], show_progress_bar=False)[0]
        return Result(vector.tolist())


class EmbedderAgent(Agent[AgentState]):
    """The model shared by the node (``preload``)."""

    signal_routes = {"text.embed": Embed, "text.embed_one": EmbedOne}

    @classmethod
    def preload(cls, options: Any) -> Any:
        model = load_model()
        model.encode(["warm up"], show_progress_bar=False)
        return model

    @property
    def model(self) -> Any:
        return self.shared

    def setup(self) -> None:
        import torch

        torch.set_num_threads(1)
        self.model.encode(["warm up"], show_progress_bar=False)


class CopyAgent(EmbedderAgent):
    """The usual way: every agent loads its own copy of the model in ``setup()``."""

    @classmethod
    def preload(cls, options: Any) -> Any:
        return None

    @property
    def model(self) -> Any:
        return self._model

    def setup(self) -> None:
        self._model = load_model()
        self._model.encode(["warm up"], show_progress_bar=False)


app = Celery("bench_inference", broker=os.environ.get("WARMPOOL_BROKER_URL"),
             backend=os.environ.get("WARMPOOL_RESULT_BACKEND"), set_as_current=False)
app.conf.broker_connection_retry_on_startup = True
app.conf.result_expires = 600
pools = [PoolSpec("embedder", EmbedderAgent, size=2, reply_state=False)]
if os.environ.get("WARMPOOL_BENCH_COPIES") == "1":
    pools = [PoolSpec("copies", CopyAgent, size=2, reply_state=False)]
warm = WarmPool(app, pools=pools)

if os.environ.get("WARMPOOL_BENCH_BATCHES") == "1":
    from celery_batches import Batches

    # celery-batches has no per-node preload: load at import, in the main process, and
    # freeze before the fork, as a careful user would.
    MODEL = load_model()
    MODEL.encode(["warm up"], show_progress_bar=False)
    gc.collect()
    gc.freeze()

    @app.task(name="bench.batches_embed", base=Batches, flush_every=MAX_BATCH,
              flush_interval=WAIT, acks_late=True, shared=False)
    def batches_embed(requests: list[Any]) -> None:
        """celery-batches: one forward pass per flushed batch, results stored per request."""
        vectors = MODEL.encode([request.args[0] for request in requests],
                               batch_size=len(requests), show_progress_bar=False)
        for request, vector in zip(requests, vectors, strict=True):
            app.backend.mark_as_done(request.id, vector.tolist(), request=request)
