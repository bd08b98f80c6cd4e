"""The restart torture: warm pools while their broker restarts again and again, counted.

    python bench/restarts.py --restarts 30                     # Redis, restarted by SIGTERM
    python bench/restarts.py --restarts 30 --signal kill       # Redis, killed (SIGKILL)
    python bench/restarts.py --restarts 30 --broker rabbitmq   # RabbitMQ, connections dropped

Two worker nodes (prefork -c 2 and threads -c 4) host the pool of ``bench/soak_app.py``.
Eight callers keep calling it (four threads with ``warm.call``, four coroutines with
``warm.acall``; 5% of the calls fail on purpose, 1% are invalid) and a caster sends a cast
every 40 ms. Meanwhile the broker goes away N times: a redis-server of the torture's own,
with appendonly, stopped as a restart stops it and started again on the same port 1 to
3 s later; or, with ``--broker rabbitmq``, the local RabbitMQ (its result store a
redis-server of the torture's own) with every client connection dropped
(``rabbitmqctl close_all_connections``). Between two outages the broker stays up 1.5 to
3 s.

Then it prints what happened and exits 0 if every target is met: every call answered (a
reply, or an error of the contract other than "no reply"), every cast done or
dead-lettered (a cast done twice is counted and shown: casts are delivered at least
once), no worker exit, nothing checked out at rest, and nothing on the callers' side
telling the user to restart an application that recovered by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.soak import CONTRACT, RedisServer, at_rest, signal_for  # noqa: E402
from celery_warmpool import (  # noqa: E402
    ActionFailed,
    BrokerUnavailable,
    CheckoutTimeout,
    InvalidSignal,
)
from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402

RABBITMQ_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
BLOCKING_CALLERS = 4
ASYNC_CALLERS = 4
CAST_EVERY = 0.04
#: Seconds the broker stays up between two outages, and down during one: least, most.
UP = (1.5, 3.0)
DOWN = (1.0, 3.0)
#: What a caller must never be told about a result store that came back by itself.
RESTART_ADVICE = "must be restarted"


@dataclass
class Torture:
    """What happened, counted by the threads and coroutines of the torture."""

    outcomes: Counter[str] = field(default_factory=Counter)
    unanswered: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    casts: list[str] = field(default_factory=list)
    outages: list[float] = field(default_factory=list)
    #: Casts the callers' process sent again, found not taken after an outage.
    sent_again: int = 0
    #: The first message of each kind of error, to show with the counts.
    examples: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: dict[str, Any], outcome: BaseException | None) -> None:
        """Count one call's outcome: a reply, an error of the contract, or neither."""
        with self.lock:
            if outcome is None:
                self.outcomes["reply"] += 1
            elif isinstance(outcome, CheckoutTimeout) and "no reply" in str(outcome):
                self.outcomes["no reply (unanswered)"] += 1
                self.unanswered.append(str(outcome))
            elif isinstance(outcome, CONTRACT):
                wrong = ((isinstance(outcome, ActionFailed) and kind["type"] != "soak.fail")
                         or (isinstance(outcome, InvalidSignal) and "data" not in kind))
                name = type(outcome).__name__ + (" (wrong answer)" if wrong else "")
                self.outcomes[name] += 1
                self.examples.setdefault(name, str(outcome)[:150])
            else:
                self.outcomes["lost (outside the contract)"] += 1
                self.lost.append(f"{type(outcome).__name__}: {outcome}")


class CallerNoise(logging.Handler):
    """Counts what the callers' process tells its user: log lines and ignored errors."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: Counter[str] = Counter()
        self.restart_advice = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.note(f"{record.levelname} {record.name}: {record.getMessage()}")

    def note(self, text: str) -> None:
        self.lines[text.strip().splitlines()[0][:100] if text.strip() else "(empty)"] += 1
        self.restart_advice += RESTART_ADVICE in text

    def unraisable(self, unraisable: Any) -> None:
        """``sys.unraisablehook``: an error raised where nothing could catch it."""
        self.note(f"ignored in {unraisable.object!r}: {unraisable.exc_value!r}")


class SentAgain(logging.Handler):
    """Counts the casts the callers' process sent again after an outage (no mark yet)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.casts = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.args and isinstance(record.args, tuple):
            self.casts += int(record.args[0])


def blocking_caller(warm: Any, torture: Torture, stop: threading.Event) -> None:
    number = 0
    while not stop.is_set():
        kind = signal_for(number := number + 1)
        try:
            warm.call("soak", kind, timeout=15, call_timeout=10)
            torture.record(kind, None)
        except Exception as exc:
            torture.record(kind, exc)


async def async_callers(warm: Any, torture: Torture, stop: threading.Event) -> None:
    async def caller(first: int) -> None:
        number = first
        while not stop.is_set():
            kind = signal_for(number := number + 1)
            try:
                await warm.acall("soak", kind, timeout=15, call_timeout=10)
                torture.record(kind, None)
            except Exception as exc:
                torture.record(kind, exc)

    await asyncio.gather(*(caller(index * 1_000_000) for index in range(ASYNC_CALLERS)))


def caster(warm: Any, torture: Torture, stop: threading.Event, run_id: str) -> None:
    number = 0
    while not stop.is_set():
        cast = f"{run_id}-cast-{number}"
        number += 1
        while True:
            try:
                warm.cast("soak", {"type": "soak.record", "data": {"cast": cast}})
                break
            except BrokerUnavailable:
                time.sleep(0.5)  # away for longer than a cast waits: try again
        with torture.lock:
            torture.casts.append(cast)
        time.sleep(CAST_EVERY)


def terminate(server: RedisServer, how: signal.Signals) -> None:
    """Stop ``server`` the way a restart (SIGTERM) or a crash (SIGKILL) does."""
    assert server.process is not None and server.process.process is not None
    server.process.process.send_signal(how)
    server.process.process.wait(30)
    server.process = None


def close_rabbitmq_connections() -> None:
    """Drop every client connection of the local RabbitMQ (it keeps running)."""
    subprocess.run(["rabbitmqctl", "close_all_connections", "restart torture"], check=True,
                   capture_output=True, timeout=60)


def settle_casts(warm: Any, records: Path, sent: list[str],
                 within: float) -> tuple[int, int, dict[str, int]]:
    """Wait for every cast to be done or dead-lettered.

    Returns how many were done, how many dead-lettered only, and the casts done more
    than once with how many times.
    """
    spec = warm.spec("soak")
    deadline = time.monotonic() + within
    wanted = set(sent)
    while True:
        done = {path.name: len(path.read_text().split()) for path in records.iterdir()
                if path.name in wanted}
        dead = {letter.signal.get("data", {}).get("cast")
                for letter in warm.dead_letters.read(spec)} & wanted
        if wanted <= set(done) | dead or time.monotonic() > deadline:
            twice = {cast: times for cast, times in done.items() if times > 1}
            return len(done), len(dead - set(done)), twice
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=30, help="outages (default 30)")
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    parser.add_argument("--signal", choices=("term", "kill"), default="term",
                        help="how a Redis broker is stopped (default: term, a restart)")
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="warmpool-restarts-"))
    records = folder / "records"
    records.mkdir()
    store = RedisServer(folder)
    store.start()
    broker_url = RABBITMQ_BROKER if options.broker == "rabbitmq" else f"{store.url}/0"
    os.environ.update(WARMPOOL_BROKER_URL=broker_url, WARMPOOL_RESULT_BACKEND=f"{store.url}/1",
                      WARMPOOL_SOAK_RECORDS=str(records))
    env = {"PYTHONPATH": str(ROOT), "WARMPOOL_SOAK_RECORDS": str(records)}
    workers = [WorkerProcess("bench.soak_app", pool=pool, concurrency=concurrency,
                             broker=broker_url, backend=f"{store.url}/1", env=env, cwd=ROOT,
                             loglevel="WARNING", log_path=folder / f"worker-{pool}.log")
               for pool, concurrency in (("prefork", 2), ("threads", 4))]
    verdict = 1
    try:
        for worker in workers:
            worker.start(timeout=60)
        verdict = torture(workers, store, records, options)
        return verdict
    finally:
        for worker in workers:
            worker.stop()
        store.stop()
        if verdict == 0:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"(the workers' and the broker's logs are kept in {folder})")


def torture(workers: list[WorkerProcess], store: RedisServer, records: Path,
            options: argparse.Namespace) -> int:
    from bench.soak_app import warm

    noise, sent_again = CallerNoise(), SentAgain()
    logging.getLogger().addHandler(noise)
    resends = logging.getLogger("celery_warmpool.client.resends")
    resends.setLevel(logging.INFO)
    resends.addHandler(sent_again)
    sys.unraisablehook = noise.unraisable
    run, stop = Torture(), threading.Event()
    run_id = uuid.uuid4().hex[:8]
    threads = [threading.Thread(target=blocking_caller, args=(warm, run, stop))
               for _ in range(BLOCKING_CALLERS)]
    threads.append(threading.Thread(target=asyncio.run, args=(async_callers(warm, run, stop),)))
    threads.append(threading.Thread(target=caster, args=(warm, run, stop, run_id)))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    how = signal.SIGKILL if options.signal == "kill" else signal.SIGTERM
    for _ in range(options.restarts):
        time.sleep(random.uniform(*UP))
        if options.broker == "rabbitmq":
            close_rabbitmq_connections()
            run.outages.append(0.0)
            continue
        down = random.uniform(*DOWN)
        terminate(store, how)
        time.sleep(down)
        store.start()
        run.outages.append(down)
    time.sleep(UP[1])  # calls flow again after the last outage
    stop.set()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    with run.lock:
        sent = list(run.casts)
    done, dead, twice = settle_casts(warm, records, sent, within=120)
    out, alive = at_rest(warm, workers)
    exits = sum(worker.exited() or "Unrecoverable error" in worker.log() for worker in workers)
    run.sent_again = sent_again.casts
    return report(run, options, noise, len(sent), done, dead, twice, out, alive, exits, elapsed)


def report(run: Torture, options: argparse.Namespace, noise: CallerNoise, casts: int,
           done: int, dead: int, twice: dict[str, int], out: int, alive: int, exits: int,
           elapsed: float) -> int:
    calls = sum(run.outcomes.values())
    if options.broker == "rabbitmq":
        what = f"{len(run.outages)} times every RabbitMQ connection dropped"
    else:
        what = (f"{len(run.outages)} Redis broker restarts (SIG{options.signal.upper()}, "
                f"down {min(run.outages):.1f} to {max(run.outages):.1f} s)")
    print(f"restart torture: {what}; {calls:,} calls from {BLOCKING_CALLERS} threads and "
          f"{ASYNC_CALLERS} coroutines, {casts:,} casts; {elapsed:.1f} s")
    print()
    print("calls by outcome")
    for outcome, count in sorted(run.outcomes.items(), key=lambda item: -item[1]):
        print(f"  {outcome:<38} {count:>7,}")
    for outcome, example in run.examples.items():
        if outcome not in ("ActionFailed", "InvalidSignal"):  # the soak's own, on purpose
            print(f"    {outcome}, first: {example}")
    print()
    rows: list[tuple[str, int, int | None]] = [
        ("calls unanswered (no reply)", run.outcomes["no reply (unanswered)"], 0),
        ("calls lost (outside the contract)", run.outcomes["lost (outside the contract)"], 0),
        ("casts done", done, None),
        ("casts done twice (at least once)", len(twice), None),
        ("casts sent again after an outage", run.sent_again, None),
        ("casts dead-lettered", dead, None),
        ("casts missing", casts - done - dead, 0),
        ("worker exits (or unrecoverable errors)", exits, 0),
        ("agents checked out at rest", out, 0),
        ("agents alive at rest (of 4)", alive, None),
        ("caller lines saying restart the app", noise.restart_advice, 0),
    ]
    met = True
    print(f"  {'':<38} {'value':>8}  target")
    for label, value, target in rows:
        verdict = "" if target is None else ("PASS" if value == target else "MISS")
        met &= verdict != "MISS"
        print(f"  {label:<38} {value:>8}  {'' if target is None else f'= {target}  '}{verdict}")
    wrong = sum(count for outcome, count in run.outcomes.items() if "wrong" in outcome)
    if wrong:
        met = False
        print(f"  wrong answers: {wrong}  MISS")
    for cast, times in list(twice.items())[:5]:
        print(f"  done twice: {cast} ({times} times)")
    for problem in (run.unanswered + run.lost)[:5]:
        print(f"  not answered: {problem}")
    if noise.lines:
        print()
        print("the callers' process said (warnings and errors, by first line)")
        for line, count in noise.lines.most_common(8):
            print(f"  {count:>5} x {line}")
    print()
    print("all targets met" if met else "some targets missed")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
