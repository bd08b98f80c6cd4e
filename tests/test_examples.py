"""Each example runs from its one command, exits 0, prints what it shows, and is quick.

Run as real subprocesses (``python examples/<name>.py``) from another directory, on the
embedded broker each starts itself; one also runs on Redis through ``--broker``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_BACKEND as TEST_BACKEND
from tests.conftest import REDIS_BROKER as TEST_BROKER

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
REDIS_BROKER = "redis://127.0.0.1:6379/6"
REDIS_BACKEND = "redis://127.0.0.1:6379/7"

pytestmark = pytest.mark.integration


def run_example(name: str, *args: str, cwd: Path, limit: float) -> str:
    """Run ``examples/<name>.py``; return its output after checking exit status and time."""
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args], cwd=cwd,
        capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, f"{name} exited {finished.returncode}:\n{output}"
    assert elapsed < limit, f"{name} took {elapsed:.1f}s (limit {limit}s):\n{output}"
    assert "worker stopped (exit status 0)" in output or "starting a worker" not in output
    return finished.stdout


def number(pattern: str, output: str) -> int:
    found = re.search(pattern, output)
    assert found, f"no line matches {pattern!r} in:\n{output}"
    return int(found.group(1))


def test_every_example_names_its_command() -> None:
    for path in sorted(EXAMPLES.glob("*.py")):
        if path.name in ("__init__.py", "launch.py", "local_site.py", "service.py"):
            continue
        assert f"python examples/{path.name}" in path.read_text(), path.name


def test_counter_state_persists_and_resets(tmp_path: Path) -> None:
    output = run_example("counter", cwd=tmp_path, limit=30)
    assert "shared state: count 1 then 2" in output
    assert "reset_on_checkin: count 1 then 1" in output
    assert ("failed call raised ActionFailed: action 'fail' failed on signal "
            "'counter.fail': RuntimeError: asked to fail") in output
    assert "state after the failed call: count 2 (unchanged" in output
    assert "status of 'counter': state=ready size=1 available=1 checkouts=4 calls=3 " \
           "call_failures=1" in output


def test_counter_runs_on_redis_with_broker_option(tmp_path: Path) -> None:
    for url in (REDIS_BROKER, REDIS_BACKEND):
        redis.Redis.from_url(url).flushdb()
    output = run_example("counter", "--broker", REDIS_BROKER, "--backend", REDIS_BACKEND,
                         cwd=tmp_path, limit=30)
    assert f"on the broker {REDIS_BROKER}, results {REDIS_BACKEND}" in output
    assert "shared state: count 1 then 2" in output
    assert "reset_on_checkin: count 1 then 1" in output


def test_url_fetcher_reuses_connections(tmp_path: Path) -> None:
    output = run_example("url_fetcher", cwd=tmp_path, limit=30)
    assert "after warm-up: the site saw 3 connections and 0 requests" in output
    assert "reused connection: True, client in reply: False" in output
    assert "cast 30 fetches: served by" in output
    assert "30 of 30 on a reused connection" in output
    assert "pool-aware task: title 'Item 7'" in output
    assert "with the pool: 32 requests over 3 TCP connections" in output
    assert "without a pool: 10 requests over 10 TCP connections" in output
    assert "after shutdown: 13 of 13 connections closed" in output


def test_crawler_fans_out_with_bounded_concurrency(tmp_path: Path) -> None:
    output = run_example("crawler", cwd=tmp_path, limit=30)
    assert "level 2: 8 fetches cast at once, 8 pages fetched" in output
    assert ("crawled 12 pages: About, Blog, Docs, Home, Install, Pools, Post 1, Post 2, "
            "Post 3, Post 4, Signals, Status") in output
    assert re.search(r"broken link: /missing \(FetchError: GET http://127\.0\.0\.1:\d+"
                     r"/missing answered 404\)", output), output
    peak = number(r"peak concurrent fetches at the site: (\d+) \(pool size 3, "
                  r"6 worker threads\)", output)
    assert 1 <= peak <= 3
    assert "the site saw 13 requests over 3 TCP connections" in output
    assert "checkouts=13 calls=13 call_failures=1" in output


def test_ml_inference_is_warm_from_the_first_call(tmp_path: Path) -> None:
    output = run_example("ml_inference", cwd=tmp_path, limit=45)
    accuracy = float(re.search(r"test accuracy (0\.\d+)", output).group(1))  # type: ignore[union-attr]
    assert accuracy > 0.9
    assert number(r"20 warm calls: (\d+) of 20 correct", output) >= 18
    first = number(r"first call after ready: (\d+) ms", output)
    warm = number(r"20 warm calls: .*median (\d+) ms", output)
    cold = number(r"3 cold calls .*median (\d+) ms", output)
    assert warm < cold and first < cold, output
    assert "pool status: 2 agents over 2 processes, calls=21" in output
    assert "by the worker's main process" in output  # trained once, by preload()


def test_embeddings_serves_the_real_model_batched_from_one_copy(tmp_path: Path) -> None:
    output = run_example("embeddings", cwd=tmp_path, limit=90)
    assert "a vector of 384 floats" in output
    throughput = number(r"500 sentences from 32 threads in [\d.]+ s: (\d+) sentences/s",
                        output)
    assert throughput > 0
    batches = number(r"the worker ran (\d+) batches", output)
    assert batches < 500  # calls were batched together
    memory = number(r"holds (\d+) MB in all", output)
    # One copy of the model for the node: a copy per child would be well over 800 MB.
    assert memory < 800, output


def test_many_models_serves_a_head_per_customer_from_one_pool(tmp_path: Path) -> None:
    output = run_example("many_models", cwd=tmp_path, limit=60)
    assert "customer-0, loaded ahead and warmed up: first call" in output
    assert number(r"its head loaded in (\d+) ms", output) >= 5  # a real load cost
    assert "6 callers at once for cold customer-8: 6 replies, 1 load, on 1 agent(s)" in output
    hits = number(r"\(Zipf, 4 callers\): (\d+) hits", output)
    loads = number(r"hits, (\d+) loads", output)
    assert hits + loads == 200 and hits > loads
    assert ("customer-99 (first): ModelLoadFailed: pool 'heads': model 'customer-99' failed "
            "to load on") in output
    assert "FileNotFoundError: no head was trained for customer-99" in output
    assert "customer-99 (again): ModelLoadFailed:" in output
    assert "failed to load 1 time(s) in a row" in output  # backing off: no second load
    assert "a call naming no customer: InvalidArgument: model must be a model id" in output


def test_state_semantics_and_isolation_patterns(tmp_path: Path) -> None:
    output = run_example("state_semantics", cwd=tmp_path, limit=15)
    assert "count 1 then 2 (same agent: True)" in output
    assert "alice buys apple+pear: 3.50; bob buys pear: 5.00" in output
    assert "alice: 3.50; bob: 1.50; resource in the reply: False" in output
    assert output.count("alice: 3.50; bob: 1.50") == 3
    assert "cart between requests: []" in output
    assert "survives the resets: True, loaded 1 time for 3 checkouts" in output


def test_backpressure_sheds_what_it_cannot_serve(tmp_path: Path) -> None:
    output = run_example("backpressure", cwd=tmp_path, limit=30)
    assert "wait as long as it takes:  served 10 (" in output
    for refusal in ("CheckoutTimeout", "PoolExhausted"):
        found = re.search(rf"served (\d+) \(slowest in [\d.]+s\), shed (\d+) by {refusal}",
                          output)
        assert found, output
        served, shed = int(found.group(1)), int(found.group(2))
        assert served + shed == 10 and 2 <= served <= 4, output
    assert "pool status: state=full checked_out=2 available=0" in output
    assert "while saturated: served 0, shed 3 by CheckoutTimeout" in output, output
    assert "its agent has done 2 jobs" in output


def test_stream_text_streams_words_and_stops_a_closed_stream(tmp_path: Path) -> None:
    # Streams need a Redis result store: the test databases, not the example's default.
    for url in (TEST_BROKER, TEST_BACKEND):
        redis.Redis.from_url(url).flushdb()
    output = run_example("stream_text", "--broker", TEST_BROKER, "--backend", TEST_BACKEND,
                         cwd=tmp_path, limit=30)
    assert "(prefork, concurrency 2)" in output
    first = output.split("\n", 3)[3]  # after the worker's three lines
    assert first.startswith("In the beginning "), output
    assert len(first.split("\n", 1)[0].split()) == 3 + 40  # the prompt, then 40 words
    assert re.search(r"first word after \d+ ms; 40 words in [\d.]+ s from agent "
                     r"writeragent-\w+ \(pid \d+\), its texts_written \d", output), output
    closed = re.search(r"a stream of 10000 words, closed after 10:((?: \S+){10})\n", output)
    assert closed, output
    wrote = number(r"the generator stopped: streams_cancelled=1, it wrote (\d+) of 10000 "
                   r"words", output)
    assert 10 <= wrote <= 10 + 5, output  # stopped at its next yield after the close
    assert "streams started=2 finished=1 cancelled=1 replacements=0" in output
