"""The soak: warm pools under crashes, a broker restart and contention, counted.

    python bench/soak.py            # 10,000 calls and 1,000 casts (about two minutes)
    python bench/soak.py --quick    # 500 calls, 100 casts, 3 kills (the test suite runs it)

Two worker nodes (prefork -c 2 and threads -c 4) host the same pool on a redis-server the
soak starts itself on a free port, with appendonly, so that a restart keeps its messages as
a production broker does. Six threads (``warm.call``) and eight coroutines on one event
loop (``warm.acall``, a tenth of them cancelled) make calls (5% to an action that fails,
1% with an invalid signal); a reader reads streams of 20 numbers the whole time (a chunk
lost, repeated or out of order is a miss; a killed child ends its stream in
``AgentLost``); casts leave a file each, so the soak can count them; a prefork child is
SIGKILLed every 2 s; midway the broker goes down for 3 s. Then it prints what happened and
exits 0 if every target is met: no call lost (an exception outside the contract, or no
answer), no cast missing, no worker exit, nothing checked out at rest, and a killed child's
agents restored within 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from celery_warmpool import (  # noqa: E402
    ActionFailed,
    AgentLost,
    BrokerUnavailable,
    CallTimeout,
    CheckoutTimeout,
    InvalidSignal,
    WarmPoolError,
)
from celery_warmpool.ops.processes import ManagedProcess, WorkerProcess  # noqa: E402

#: The errors a caller may get by contract; anything else counts as lost.
CONTRACT = (ActionFailed, InvalidSignal, AgentLost, CheckoutTimeout, CallTimeout,
            BrokerUnavailable, WarmPoolError)
KILL_EVERY = 2.0
OUTAGE = 3.0
RESTORE_TARGET = 2.0
#: Threads calling with warm.call, and coroutines (on one event loop) with warm.acall.
CALLERS = 6
ASYNC_CALLERS = 8


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """A redis-server of the soak's own, kept on disk, restartable on its port."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = ManagedProcess(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder)],
            log_path=self.folder / "redis.log").launch()
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=self.port).shutdown(nosave=True)
        assert self.process.process is not None
        self.process.process.wait(10)
        self.process = None


@dataclass
class Run:
    """What happened, counted by the threads of the soak."""

    outcomes: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    restores: list[float] = field(default_factory=list)
    #: Restores timed while the broker was down: status cannot be read then, so these
    #: measure the outage more than the restore.
    restores_in_outage: list[float] = field(default_factory=list)
    kills: int = 0
    outage_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1


def signal_for(number: int) -> dict[str, Any]:
    """The ``number``-th call's signal: 5% fail, 1% are invalid, the rest work."""
    if number % 20 == 0:
        return {"type": "soak.fail"}
    if number % 100 == 1:
        return {"type": "soak.work", "data": {"unexpected": 1}}
    return {"type": "soak.work"}


def caller(warm: Any, numbers: Any, run: Run, pause: float) -> None:
    for number in numbers:
        kind = signal_for(number)
        try:
            warm.call("soak", kind, timeout=15, call_timeout=10)
            run.count("reply")
        except Exception as exc:
            classify(run, kind, exc)
        if pause:
            time.sleep(pause)


def async_caller(warm: Any, numbers: Any, run: Run, pause: float) -> None:
    """Calls from coroutines on one event loop, every tenth of them cancelled."""

    async def call(number: int) -> None:
        kind = signal_for(number)
        if number % 10 == 5:
            task = asyncio.ensure_future(warm.acall("soak", kind, timeout=15))
            await asyncio.sleep(0.002 * (number % 7))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, *CONTRACT):
                await task
            run.count("cancelled (asyncio)")
            return
        try:
            await warm.acall("soak", kind, timeout=15, call_timeout=10)
            run.count("reply (asyncio)")
        except Exception as exc:
            classify(run, kind, exc)

    async def loop() -> None:
        for number in numbers:
            await call(number)
            if pause:
                await asyncio.sleep(pause)

    async def main() -> None:
        await asyncio.gather(*(loop() for _ in range(ASYNC_CALLERS)))

    asyncio.run(main())


def classify(run: Run, kind: dict[str, Any], exc: BaseException) -> None:
    """Count a call's error: by contract, a wrong answer, or lost."""
    if isinstance(exc, CONTRACT):
        # A failing action or an invalid signal on a call that asked for neither would
        # be a wrong answer, not a lost one: say so.
        wrong = ((isinstance(exc, ActionFailed) and kind["type"] != "soak.fail")
                 or (isinstance(exc, InvalidSignal) and "data" not in kind))
        run.count(type(exc).__name__ + (" (wrong answer)" if wrong else ""))
        return
    run.count("lost")  # outside the contract
    with run.lock:
        run.lost.append(f"{type(exc).__name__}: {exc}")


def streamer(warm: Any, streams: int, run: Run, done: threading.Event) -> None:
    """Streams of numbers, read to their end or their error: any chunk lost, repeated
    or out of order before either is counted (and is a miss)."""
    for _ in range(streams):
        if done.is_set():
            return
        chunks: list[int] = []
        try:
            stream = warm.stream("soak", {"type": "soak.count", "data": {"n": 20}},
                                 timeout=15, call_timeout=10)
            chunks.extend(stream)
            outcome = "stream: complete" if chunks == list(range(20)) else None
        except CONTRACT as exc:
            outcome = f"stream: {type(exc).__name__}"
        except Exception as exc:  # outside the contract: lost
            outcome = "lost"
            with run.lock:
                run.lost.append(f"stream: {type(exc).__name__}: {exc}")
        if chunks != list(range(len(chunks))):
            outcome = "stream: a chunk lost or repeated"
        run.count(outcome or "stream: a chunk lost or repeated")


def caster(warm: Any, casts: int, records: Path, spread: float, sent: list[str]) -> None:
    for number in range(casts):
        cast = f"cast-{number}"
        while True:
            try:
                warm.cast("soak", {"type": "soak.record", "data": {"cast": cast}})
                break
            except BrokerUnavailable:
                time.sleep(0.5)  # the broker is away for longer than the cast waits: again
        sent.append(cast)
        time.sleep(spread / casts)


def node_processes(warm: Any, node: str) -> list[Any]:
    parts = warm.status_reader.collect("soak", timeout=1.0, destination=[node]).get("soak", [])
    return [process for part in parts for process in (part.processes or [part])]


def killer(warm: Any, worker: WorkerProcess, run: Run, done: threading.Event,
           kills: int | None, outage: threading.Event) -> None:
    """SIGKILL a prefork child every 2 s; time how long its agents take to come back."""
    while not done.wait(KILL_EVERY):
        if kills is not None and run.kills >= kills:
            return
        if outage.is_set():
            continue
        children = worker.children()
        if not children:
            continue
        victim = random.choice(children)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        run.kills += 1
        deadline = killed_at + 30
        overlapped = False
        while time.monotonic() < deadline:
            overlapped |= outage.is_set()
            try:
                processes = node_processes(warm, worker.hostname)
            except BrokerUnavailable:
                processes = []
            warm_pids = {process.pid for process in processes if process.alive >= 1}
            if len(warm_pids) == 2 and victim not in warm_pids:
                taken = time.monotonic() - killed_at
                (run.restores_in_outage if overlapped else run.restores).append(taken)
                break
            time.sleep(0.02)


def settle_casts(warm: Any, records: Path, sent: list[str], within: float) -> tuple[int, int]:
    """Wait for every cast to be done or dead-lettered; return (done, dead-lettered)."""
    spec = warm.spec("soak")
    deadline = time.monotonic() + within
    while True:
        done = {path.name for path in records.iterdir()}
        dead = {letter.signal.get("data", {}).get("cast")
                for letter in warm.dead_letters.read(spec)}
        if all(cast in done or cast in dead for cast in sent) or time.monotonic() > deadline:
            return (sum(cast in done for cast in sent),
                    sum(cast in dead and cast not in done for cast in sent))
        time.sleep(0.5)


def at_rest(warm: Any, workers: list[WorkerProcess]) -> tuple[int, int]:
    """Agents checked out, and agents alive, over both nodes once the load is over."""
    for _ in range(50):
        processes = [process for worker in workers
                     for process in node_processes(warm, worker.hostname)]
        out = sum(process.checked_out for process in processes)
        alive = sum(process.alive for process in processes)
        if out == 0 and alive == 4:
            break
        time.sleep(0.1)
    return out, alive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 calls, 100 casts, 3 kills")
    options = parser.parse_args()
    calls, casts, kills = (500, 100, 3) if options.quick else (10_000, 1_000, None)
    folder = Path(tempfile.mkdtemp(prefix="warmpool-soak-"))
    records = folder / "records"
    records.mkdir()
    broker = RedisServer(folder)
    broker.start()
    os.environ.update(WARMPOOL_BROKER_URL=f"{broker.url}/0",
                      WARMPOOL_RESULT_BACKEND=f"{broker.url}/1",
                      WARMPOOL_SOAK_RECORDS=str(records))
    env = {"PYTHONPATH": str(ROOT), "WARMPOOL_SOAK_RECORDS": str(records)}
    workers = [WorkerProcess("bench.soak_app", pool=pool, concurrency=concurrency,
                             broker=f"{broker.url}/0", backend=f"{broker.url}/1", env=env,
                             cwd=ROOT, loglevel="WARNING",
                             log_path=folder / f"worker-{pool}.log")
               for pool, concurrency in (("prefork", 2), ("threads", 4))]
    try:
        for worker in workers:
            worker.start(timeout=60)
        return soak(workers, broker, records, calls, casts, kills, options.quick)
    finally:
        for worker in workers:
            worker.stop()
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def soak(workers: list[WorkerProcess], broker: RedisServer, records: Path, calls: int,
         casts: int, kills: int | None, quick: bool) -> int:
    from bench.soak_app import warm

    run = Run()
    started = time.monotonic()
    numbers = iter(range(calls))
    lock = threading.Lock()

    def next_numbers() -> Any:
        while True:
            with lock:
                number = next(numbers, None)
            if number is None:
                return
            yield number

    # The quick run is paced so that its three kills and the restart fall inside it.
    pause = 0.1 if quick else 0.0
    done, outage = threading.Event(), threading.Event()
    sent: list[str] = []
    threads = [threading.Thread(target=caller, args=(warm, next_numbers(), run, pause))
               for _ in range(CALLERS)]
    threads.append(threading.Thread(target=async_caller,
                                    args=(warm, next_numbers(), run, pause)))
    readers_done = threading.Event()
    reader = threading.Thread(target=streamer, args=(warm, 10_000, run, readers_done))
    threads.append(threading.Thread(target=caster, args=(
        warm, casts, records, 6.0 if quick else 40.0, sent)))
    kill_thread = threading.Thread(target=killer, args=(warm, workers[0], run, done, kills,
                                                        outage))
    for thread in [*threads, kill_thread, reader]:
        thread.start()
    while sum(run.outcomes.values()) < calls // 2:
        time.sleep(0.05)
    outage.set()
    run.outage_at = time.monotonic() - started
    broker.stop()
    time.sleep(OUTAGE)
    broker.start()
    outage.clear()
    for thread in threads:
        thread.join()
    readers_done.set()
    reader.join()
    done.set()
    kill_thread.join()
    elapsed = time.monotonic() - started
    done_casts, dead_casts = settle_casts(warm, records, sent, within=90)
    out, alive = at_rest(warm, workers)
    exits = sum(worker.exited() for worker in workers)
    return report(run, calls, len(sent), done_casts, dead_casts, out, alive, exits, elapsed)


def report(run: Run, calls: int, casts: int, done_casts: int, dead_casts: int, out: int,
           alive: int, exits: int, elapsed: float) -> int:
    missing = casts - done_casts - dead_casts
    restore_p50 = statistics.median(run.restores) if run.restores else float("nan")
    restore_max = max(run.restores) if run.restores else float("nan")
    print(f"soak: {calls} calls from {CALLERS} threads and {ASYNC_CALLERS} coroutines (a tenth "
          f"of theirs cancelled), streams beside them, {casts} casts, {run.kills} prefork "
          f"children killed, a {OUTAGE:g} s broker restart at {run.outage_at:.1f} s; "
          f"{elapsed:.1f} s")
    print()
    print("calls by outcome")
    for outcome, count in sorted(run.outcomes.items(), key=lambda item: -item[1]):
        print(f"  {outcome:<32} {count:>7,}")
    print()
    rows = [
        ("calls lost (outside the contract)", run.outcomes["lost"], 0),
        ("streams with a chunk lost or repeated",
         run.outcomes["stream: a chunk lost or repeated"], 0),
        ("casts done", done_casts, None),
        ("casts dead-lettered", dead_casts, None),
        ("casts missing", missing, 0),
        ("worker exits", exits, 0),
        ("agents checked out at rest", out, 0),
        ("agents alive at rest (of 4)", alive, None),
    ]
    met = True
    print(f"  {'':<38} {'value':>8}  target")
    for label, value, target in rows:
        verdict = "" if target is None else ("PASS" if value == target else "MISS")
        met &= verdict != "MISS"
        print(f"  {label:<38} {value:>8}  {'' if target is None else f'= {target}  '}{verdict}")
    restore_ok = bool(run.restores) and restore_max <= RESTORE_TARGET
    met &= restore_ok
    print(f"  {'killed child restored, p50 / max (s)':<38} {restore_p50:>4.2f} / {restore_max:.2f}"
          f"  <= {RESTORE_TARGET:g}  {'PASS' if restore_ok else 'MISS'}")
    if run.restores_in_outage:
        seen = ", ".join(f"{taken:.2f}" for taken in run.restores_in_outage)
        print(f"  (and {len(run.restores_in_outage)} restore timed across the broker outage, "
              f"when no status can be read: {seen} s)")
    wrong = sum(count for outcome, count in run.outcomes.items() if "wrong" in outcome)
    if wrong:
        met = False
        print(f"  wrong answers: {wrong}  MISS")
    for problem in run.lost[:10]:
        print(f"  lost: {problem}")
    print()
    print("all targets met" if met else "some targets missed")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
