"""The demo's Celery app: two warm pools whose agents take a second to warm up.

- ``catalog``: each agent builds an inverted index over a 200,000-item product catalog
  in ``setup()`` and answers searches from it.
- ``signer``: each agent derives a signing key with PBKDF2 in ``setup()`` and signs
  documents with it.

``cold_call`` is the comparison: a plain task that builds, warms up and tears down a
fresh agent for every request, as code without a pool does.

Broker and result store come from ``WARMPOOL_BROKER_URL`` / ``WARMPOOL_RESULT_BACKEND``;
without them the embedded store under ``WARMPOOL_EMBEDDED_DIR`` (default: a
``celery-warmpool-demo`` folder in the temp directory) serves, so
``celery -A celery_warmpool.demo.app worker`` runs on a machine with no server.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import tempfile
import time
from collections import defaultdict
from typing import Any

from celery import Celery
from pydantic import BaseModel, Field

from ..core import telemetry
from ..core.action import Action, ActionContext
from ..core.agent import Agent, AgentState, resource
from ..core.pool import AgentPool
from ..core.spec import PoolSpec
from ..extension import WarmPool
from ..ops.embedded import embedded_config, is_embedded

__all__ = ["AGENTS", "CatalogAgent", "SignerAgent", "make_app"]

logger = logging.getLogger(__name__)

#: Products in the catalog each ``catalog`` agent indexes at warm-up.
CATALOG_SIZE = 200_000
#: The queue of the demo's plain tasks (``cold_call``).
QUEUE = "celery_warmpool.demo"
#: PBKDF2 rounds each ``signer`` agent runs to derive its key at warm-up.
KEY_ROUNDS = 1_000_000

COLOURS = ("red", "green", "blue", "black", "white", "silver", "golden", "amber")
MATERIALS = ("steel", "oak", "glass", "cotton", "wool", "leather", "copper", "bamboo",
             "linen", "stone")
KINDS = ("chair", "table", "lamp", "kettle", "jacket", "bag", "desk", "shelf", "mug",
         "clock", "bottle", "bench", "rug", "vase")


class CatalogState(AgentState):
    items: int = 0
    searches: int = 0
    matches: int = 0
    first: list[int] = Field(default_factory=list)
    index: Any = resource()


class Search(Action):
    """Find the products whose names hold every word of ``query``."""

    name = "search"

    class Params(BaseModel):
        query: str = Field(min_length=1)
        limit: int = Field(default=3, ge=0)

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        index: dict[str, frozenset[int]] = context.state.index
        words = params.query.lower().split()
        found = frozenset.intersection(*(index.get(word, frozenset()) for word in words))
        return {"searches": context.state.searches + 1, "matches": len(found),
                "first": sorted(found)[:params.limit]}


class CatalogAgent(Agent[CatalogState]):
    """Searches a product catalog through an index built at warm-up."""

    signal_routes = {"catalog.search": Search}

    def setup(self) -> None:
        random_names = random.Random(CATALOG_SIZE)
        postings: dict[str, list[int]] = defaultdict(list)
        for item in range(CATALOG_SIZE):
            for word in (random_names.choice(COLOURS), random_names.choice(MATERIALS),
                         random_names.choice(KINDS)):
                postings[word].append(item)
        self.state.index = {word: frozenset(items) for word, items in postings.items()}
        self.state.items = CATALOG_SIZE

    def teardown(self) -> None:
        self.state.index = None


class SignerState(AgentState):
    signed: int = 0
    signature: str = ""
    key: Any = resource()


class Sign(Action):
    """Sign ``document`` with the agent's key (HMAC-SHA256)."""

    name = "sign"

    class Params(BaseModel):
        document: str

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        digest = hmac.new(context.state.key, params.document.encode(), hashlib.sha256)
        return {"signed": context.state.signed + 1, "signature": digest.hexdigest()}


class SignerAgent(Agent[SignerState]):
    """Signs documents with a key derived (slowly, on purpose) at warm-up."""

    signal_routes = {"doc.sign": Sign}

    def setup(self) -> None:
        self.state.key = hashlib.pbkdf2_hmac("sha256", b"demo passphrase", b"demo salt",
                                             KEY_ROUNDS)

    def teardown(self) -> None:
        self.state.key = None


AGENTS: dict[str, type[Agent[Any]]] = {"catalog": CatalogAgent, "signer": SignerAgent}


def _log_warm_agent(sender: AgentPool[Any], agent: Agent[Any], duration: float,
                    **kwargs: Any) -> None:
    # The demo reads these lines from the worker's log to show warm-up progress.
    logger.info("agent warm: pool=%s agent=%s pid=%d setup=%.2fs", sender.name, agent.id,
                os.getpid(), duration)


def default_directory() -> str:
    """The embedded store's folder when ``WARMPOOL_EMBEDDED_DIR`` is not set."""
    return os.path.join(tempfile.gettempdir(), "celery-warmpool-demo")


def make_app(broker: str | None = None, backend: str | None = None,
             directory: str | None = None, *, size: int = 2) -> tuple[Celery, WarmPool]:
    """The demo app and its pools; with no ``broker`` the embedded store in ``directory``."""
    app = Celery("celery_warmpool.demo.app", set_as_current=False)
    if is_embedded(broker):
        app.conf.update(embedded_config(directory or default_directory()))
    else:
        app.conf.update(broker_url=broker, result_backend=backend,
                        broker_connection_retry_on_startup=True)
    app.conf.result_expires = 600
    # Its own default queue, so a demo worker on a shared broker takes no one else's tasks.
    app.conf.task_default_queue = QUEUE
    warm = WarmPool(app, pools=[PoolSpec(name, agent, size=size)
                                for name, agent in AGENTS.items()])

    @app.task(name="celery_warmpool.demo.cold_call")
    def cold_call(pool: str, signal: dict[str, Any]) -> dict[str, Any]:
        """Build, warm up and tear down a fresh agent for one signal (no pool)."""
        started = time.perf_counter()
        agent = AGENTS[pool]()
        agent.setup()
        try:
            reply = agent.handle(signal)
        finally:
            agent.teardown()
        return {**reply.model_dump(mode="json"), "duration": time.perf_counter() - started}

    return app, warm


telemetry.agent_started.connect(_log_warm_agent, weak=False)

_configured: tuple[Celery, WarmPool] | None = None


def __getattr__(name: str) -> Any:
    # ``app`` and ``warm`` (what ``celery -A celery_warmpool.demo.app`` loads) are built
    # on first use from the environment, so importing this module creates no store.
    global _configured
    if name not in ("app", "warm"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _configured is None:
        _configured = make_app(os.environ.get("WARMPOOL_BROKER_URL"),
                               os.environ.get("WARMPOOL_RESULT_BACKEND"),
                               os.environ.get("WARMPOOL_EMBEDDED_DIR"))
    return _configured[0] if name == "app" else _configured[1]
