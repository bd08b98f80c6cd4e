"""An agent that writes as it goes: words streamed one by one from a prefork node.

Streams need a Redis result store, so this example runs on the local Redis by default
(``redis://127.0.0.1:6379``, database 0, as broker and result store):

    python examples/stream_text.py
    python examples/stream_text.py --broker redis://127.0.0.1:6379/10 \\
        --backend redis://127.0.0.1:6379/11

The agent's ``preload()`` builds a small language model once per node, in the worker's
main process before its children fork: a word-level Markov chain over Genesis 1-2 in the
King James Version (public domain, shipped in ``examples/data/genesis_kjv.txt``). Its
``write`` action is a generator: each word it yields goes to the caller at once. The
client prints the words of one stream as they arrive, then closes a second stream of
10,000 words after its first ten and shows, from the pool's status counters, that the
generator stopped there and that the pool serves on.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file too

import itertools
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, Field

from celery_warmpool import (
    Action,
    ActionContext,
    Agent,
    AgentState,
    PoolCounters,
    PoolSpec,
    Signal,
    WarmPool,
)
from examples.launch import example_app, parse_options, running_worker

TEXT = Path(__file__).resolve().parent / "data" / "genesis_kjv.txt"
LOCAL_REDIS = "redis://127.0.0.1:6379"
#: Words the second stream asks for, and how many the client reads before closing it.
LONG, READ_BEFORE_CLOSING = 10_000, 10


class MarkovChain:
    """A word-level Markov chain of order two: which words followed each pair of words.

    Arguments:
        words: the training text, split on white space (punctuation stays on its word).
    """

    def __init__(self, words: list[str]) -> None:
        self.followers: dict[tuple[str, str], list[str]] = defaultdict(list)
        for first, second, third in zip(words, words[1:], words[2:], strict=False):
            self.followers[(first, second)].append(third)
        # A sentence starts with the text's first pair, and after a word that ends one.
        self.starts = [(words[0], words[1])] + [
            (second, third) for first, second, third in zip(words, words[1:], words[2:],
                                                            strict=False)
            if first.endswith((".", ":", ";", "?", "!"))]

    @classmethod
    def from_file(cls, path: Path) -> MarkovChain:
        """The chain of a text file, its ``#`` comment lines left out."""
        lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
        return cls(" ".join(lines).split())

    def words(self, prompt: str, rng: random.Random) -> Iterator[str]:
        """Words that follow ``prompt``, endlessly; a dead end starts a new sentence."""
        pair = tuple(prompt.split()[-2:])
        if pair not in self.followers:
            pair = rng.choice(self.starts)
            yield from pair
        while True:
            followers = self.followers.get(pair)  # type: ignore[call-overload]
            if not followers:
                pair = rng.choice(self.starts)
                yield from pair
                continue
            word = rng.choice(followers)
            yield word
            pair = (pair[1], word)


class WriterState(AgentState):
    texts_written: int = 0


class Write(Action):
    """Write ``words`` words after ``prompt``, one chunk per word, ``pause`` s apart."""

    name = "write"

    class Params(BaseModel):
        prompt: str = "In the beginning"
        words: int = Field(default=40, ge=1, le=100_000)
        seed: int = 0
        pause: float = Field(default=0.02, ge=0, le=1)

    def run(self, params: Any, context: ActionContext) -> Any:
        chain: MarkovChain = context.agent.shared
        words = chain.words(params.prompt, random.Random(params.seed))
        for index, word in enumerate(itertools.islice(words, params.words)):
            if index:
                time.sleep(params.pause)  # a real model's time per token
            yield word  # a closed stream stops the generator right here
        return {"texts_written": context.state.texts_written + 1}


class WriterAgent(Agent[WriterState]):
    """Writes from the node's one Markov chain (``self.shared``), built by ``preload()``."""

    signal_routes = {"text.write": Write}

    @classmethod
    def preload(cls, options: Mapping[str, Any]) -> MarkovChain:
        return MarkovChain.from_file(TEXT)


app = example_app("stream_text")
warm = WarmPool(app, pools=[PoolSpec("writer", WriterAgent, size=2)])


def write(prompt: str, words: int, seed: int) -> Signal:
    return Signal.new("text.write", {"prompt": prompt, "words": words, "seed": seed},
                      source="/examples/stream_text")


def counters_after(cancelled: int, within: float = 10.0) -> PoolCounters:
    """The pool's counters once ``cancelled`` streams are counted as cancelled."""
    deadline = time.monotonic() + within
    while True:
        counters = warm.status("writer").counters
        if counters.streams_cancelled >= cancelled or time.monotonic() > deadline:
            return counters
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    _, choice = parse_options(app, "Words streamed from a prefork node as they are written.",
                              argv, default_broker=LOCAL_REDIS)
    with running_worker(app, "examples.stream_text", choice, pool="prefork", concurrency=2):
        started = time.perf_counter()
        first_word = 0.0
        print("In the beginning", end="", flush=True)
        with warm.stream("writer", write("In the beginning", 40, seed=1)) as stream:
            for word in stream:
                first_word = first_word or time.perf_counter() - started
                print(f" {word}", end="", flush=True)
        print(f"\nfirst word after {first_word * 1000:.0f} ms; 40 words in "
              f"{time.perf_counter() - started:.2f} s from agent {stream.reply.agent_id} "
              f"(pid {stream.reply.pid}), its texts_written "
              f"{stream.reply.state['texts_written']}")

        print(f"a stream of {LONG} words, closed after {READ_BEFORE_CLOSING}:", end="",
              flush=True)
        with warm.stream("writer", write("And God said", LONG, seed=2)) as stream:
            for read, word in enumerate(stream, 1):
                print(f" {word}", end="", flush=True)
                if read == READ_BEFORE_CLOSING:
                    break
        counters = counters_after(cancelled=1)
        print(f"\nthe generator stopped: streams_cancelled={counters.streams_cancelled}, "
              f"it wrote {counters.chunks - 40} of {LONG} words")

        again = warm.call("writer", write("And the evening", 5, seed=3))
        counters = warm.status("writer").counters
        print(f"the pool serves on: a call of 5 words, texts_written "
              f"{again.state['texts_written']}; streams started={counters.streams_started} "
              f"finished={counters.streams_finished} cancelled={counters.streams_cancelled} "
              f"replacements={counters.replacements}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
