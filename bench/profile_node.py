"""Where a node's time goes: py-spy on a threads node serving bare tasks, warm.call and
warm.acall, in one run.

    python bench/profile_node.py            # about a minute and a quarter
    python bench/profile_node.py --quick    # 3 s per run
    python bench/profile_node.py --out profiles/before

One threads node (``-c 16``, the echo pool of 8 agents of ``bench/callers_app.py``) on the
local Redis (databases 10 and 11; ``WARMPOOL_BENCH_REDIS`` names another server, see
``bench/measure.py``), called from one process by the steps of ``bench/callers.py``:

- bare ``apply_async().get()`` from 32 threads;
- ``warm.call`` from 32 threads;
- ``warm.acall`` with 256 calls in flight on one event loop.

Each runs twice: once as it is, for the node's calls per second, its CPU per call (its
main thread's and its other threads', user and system time, from ``/proc``) and the Redis
commands run per call (``INFO commandstats``); once under ``py-spy record --gil
--nonblocking`` at 200 samples a second. ``--gil`` keeps the samples of the thread
holding the GIL: the Python the node runs, which is its user time (checked against
``/proc``: without it, py-spy counts threads waiting on a Redis reply as busy, and puts
two thirds of the node's time in socket reads); ``--nonblocking`` reads the node without
pausing it (pausing it 200 times a second cut its calls a second by a quarter and moved
the shares between its threads away from what ``/proc`` says). Samples caught on their
way into a wait (a stack ending in a lock's or a condition's wait, an epoll or select, a
thread pool's idle loop) are left out and counted apart. Printed per run: the top entries
(functions) by inclusive share of the samples, each also in microseconds per call (the
share of the node's user CPU per call under py-spy); then the entries whose microseconds
per call differ most between the bare run and each warm one. The raw profiles (py-spy's
collapsed stacks, one file a run) are kept in the folder printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.callers import BACKEND, BROKER, Row, in_a_fresh_process, start_node  # noqa: E402
from bench.measure import redis_server_pid, thread_cpu  # noqa: E402

#: The runs: a short name, the bench/callers.py step that calls the node.
RUNS = {
    "bare": "bare apply_async().get(), 32 threads",
    "call": "warm.call, 32 threads",
    "acall": "warm.acall, 256 in flight",
}
RATE = 200
TOP = 25
DIFFERENCES = 20
#: Frames a stack ends in when its thread is waiting, not working (py-spy shows no C
#: frames: a thread blocked in a lock's acquire, epoll_wait or a queue's get ends in the
#: Python function that called it).
IDLE_LEAVES = {
    ("Condition.wait", "threading.py"),
    ("Event.wait", "threading.py"),
    ("Thread.join", "threading.py"),
    ("Thread._wait_for_tstate_lock", "threading.py"),
    ("Semaphore.acquire", "threading.py"),
    ("_worker", "concurrent/futures/thread.py"),
    ("_epoll.poll", "kombu/utils/eventio.py"),
    ("_poll.poll", "kombu/utils/eventio.py"),
    ("_select.poll", "kombu/utils/eventio.py"),
    ("EpollSelector.select", "selectors.py"),
    ("PollSelector.select", "selectors.py"),
    ("SelectSelector.select", "selectors.py"),
}


@dataclass
class Profile:
    """One run's samples: each distinct stack (root first) and how often it came."""

    stacks: Counter[tuple[str, ...]] = field(default_factory=Counter)
    idle: Counter[str] = field(default_factory=Counter)  # left-out samples, by the caller

    @classmethod
    def read(cls, path: Path) -> Profile:
        """py-spy's raw output: a line per stack, ``frame;frame;... count``."""
        profile = cls()
        for line in path.read_text().splitlines():
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = tuple(frame.strip() for frame in stack.split(";"))
            if frames[0].startswith("process "):  # --subprocesses names the process first
                frames = frames[1:]
            if not frames:  # a sample py-spy could not read a frame of
                continue
            if parse(frames[-1]) in IDLE_LEAVES:
                profile.idle[frames[-2] if len(frames) > 1 else frames[-1]] += int(count)
            else:
                profile.stacks[frames] += int(count)
        return profile

    @property
    def busy(self) -> int:
        return sum(self.stacks.values())

    def own(self) -> dict[str, float]:
        """Each function's share of the samples it was running itself."""
        found: Counter[str] = Counter()
        for frames, count in self.stacks.items():
            found[frames[-1]] += count
        return {frame: count / self.busy for frame, count in found.items()}


@dataclass
class Split:
    """A node's CPU per call over a run, in microseconds: its main thread's (Celery's
    consumer: the event loop, the messages in and their acks) and its other threads'
    (the execution pool's, the watchdog's, ...), each user and system time."""

    main_user: float
    main_system: float
    other_user: float
    other_system: float

    @classmethod
    def between(cls, before: dict[int, tuple[float, float]],
                after: dict[int, tuple[float, float]], pid: int, row: Row) -> Split:
        """From two readings of :func:`thread_cpu` of process ``pid`` around the whole
        caller's process, scaled to the node's CPU over the caller's own window (what
        ``row`` measured: the caller's start and warm-up call left out)."""
        spent = {thread: [now - then for now, then in zip(
                     times, before.get(thread, (0.0, 0.0)), strict=True)]
                 for thread, times in after.items()}
        others = [times for thread, times in spent.items() if thread != pid]
        parts = [spent[pid][0], spent[pid][1], sum(user for user, _ in others),
                 sum(system for _, system in others)]
        scale = row.watched_per_call_us("node") / (sum(parts) or 1)
        return cls(*(part * scale for part in parts))

    @property
    def user(self) -> float:
        return self.main_user + self.other_user

    @property
    def total(self) -> float:
        return self.user + self.main_system + self.other_system


@dataclass
class Run:
    name: str
    plain: Row
    plain_split: Split
    profiled: Row
    profiled_split: Split
    profile: Profile
    errors: str

    @property
    def node_us(self) -> float:
        """The node's user CPU per call under py-spy: what the shares divide (a thread
        holds the GIL while it runs Python; system time, spent in the kernel with the GIL
        let go, is not sampled)."""
        return self.profiled_split.user


def inclusive(*profiles: Profile) -> dict[str, list[float]]:
    """Each entry's share of each profile's samples that have it anywhere on the stack.

    An entry is a function, with the callers that pass (almost) all their time to it
    folded in (a thread's start, Celery's command line): named ``function (file) [+N
    callers]``, with the function's own share."""
    found: list[Counter[str]] = []
    for profile in profiles:
        holding: Counter[str] = Counter()
        for frames, count in profile.stacks.items():
            for frame in set(frames):  # once, however deep the recursion
                holding[frame] += count
        found.append(holding)
    into = passes_to(profiles)
    entries: dict[str, str] = {}  # each function: the entry it is shown as
    for frame in set().union(*found):
        entry, seen = frame, {frame}
        while entry in into and into[entry] not in seen:  # a recursion's loop ends it
            entry = into[entry]
            seen.add(entry)
        entries[frame] = entry
    callers = Counter(entry for frame, entry in entries.items() if frame != entry)
    return {entry + (f" [+{callers[entry]} callers]" if callers[entry] else ""):
            [holding[entry] / (profile.busy or 1)
             for holding, profile in zip(found, profiles, strict=True)]
            for entry in set(entries.values())}


def passes_to(profiles: tuple[Profile, ...], share: float = 0.95) -> dict[str, str]:
    """The functions that pass at least ``share`` of their samples to one callee, the
    same one in every profile: each with that callee."""
    calls: list[dict[str, Counter[str | None]]] = []
    for profile in profiles:
        callees: dict[str, Counter[str | None]] = {}
        for frames, count in profile.stacks.items():
            # A function's innermost call only: in a recursion (Celery's bootsteps start
            # one another), the one that leads to the work.
            innermost = {frame: level for level, frame in enumerate(frames)}
            for frame, level in innermost.items():
                callee = frames[level + 1] if level + 1 < len(frames) else None
                callees.setdefault(frame, Counter())[callee] += count
        calls.append(callees)
    into = {}
    for frame in set().union(*calls):
        tops = {callees[frame].most_common(1)[0] + (callees[frame].total(),)
                for callees in calls if frame in callees}
        if len({callee for callee, _, _ in tops}) == 1:
            callee = next(iter(tops))[0]
            if callee is not None and callee != frame and all(
                    count >= share * total for _, count, total in tops):
                into[frame] = callee
    return into


def parse(frame: str) -> tuple[str, str]:
    """A py-spy frame ``function (path/file.py)`` as (function, path)."""
    function, _, where = frame.rpartition(" (")
    return function, where.rstrip(")")


def py_spy() -> str:
    """The py-spy next to this Python (the dev extra installs it), or on the PATH."""
    here = Path(sys.executable).parent / "py-spy"
    found = str(here) if here.exists() else shutil.which("py-spy")
    if found is None:
        sys.exit("py-spy is missing: pip install py-spy (it is in the dev extra)")
    return found


def called(step: str, seconds: float, node_pid: int,
           watched: dict[str, int]) -> tuple[Row, Split]:
    """Run ``step`` in a process of its own; its row and the node's CPU over it."""
    before = thread_cpu(node_pid)
    [row] = in_a_fresh_process(step, seconds, BROKER, watched)
    return row, Split.between(before, thread_cpu(node_pid), node_pid, row)


def profiled(step: str, seconds: float, node_pid: int, watched: dict[str, int],
             output: Path) -> tuple[Row, Split, str]:
    """Run ``step`` with py-spy recording the node (and its children) the while; py-spy
    stops when the caller is done (its warm-up call and start are idle time, left out)."""
    spy = subprocess.Popen(
        [py_spy(), "record", "-p", str(node_pid), "--subprocesses", "-f", "raw", "-r",
         str(RATE), "--gil", "--nonblocking", "--nolineno", "-o", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)  # py-spy attaches
        row, split = called(step, seconds, node_pid, watched)
    finally:
        spy.send_signal(signal.SIGINT)
        said = spy.communicate(timeout=60)[0]
    if not output.exists():
        sys.exit(f"py-spy wrote no profile:\n{said}")
    counts = re.search(r"Samples: (\d+) Errors: (\d+)", said)
    return row, split, (f"{counts[1]} samples, {counts[2]} unreadable" if counts
                        else "no count")


def profile_runs(seconds: float, folder: Path) -> list[Run]:
    for url in (BROKER, BACKEND):
        redis.Redis.from_url(url).flushdb()
    node = start_node(BROKER, BACKEND)
    watched = {"node": node.pid, "Redis": redis_server_pid(BACKEND)}
    runs = []
    try:
        for name, step in RUNS.items():
            print(f"  {name}: {step}", file=sys.stderr, flush=True)
            plain, plain_split = called(step, seconds, node.pid, watched)
            output = folder / f"{name}.txt"
            row, split, errors = profiled(step, seconds, node.pid, watched, output)
            runs.append(Run(name, plain, plain_split, row, split, Profile.read(output),
                            errors))
    finally:
        node.stop()
        node.remove_log()
    return runs


def print_run(run: Run) -> None:
    profile = run.profile
    idle = sum(profile.idle.values())
    split = run.plain_split
    print(f"\n{run.name}: {RUNS[run.name]}")
    print(f"  as it is: {run.plain.rate:,.0f} calls/s; the node's CPU per call "
          f"{split.total:,.0f} us: main thread {split.main_user:,.0f} user + "
          f"{split.main_system:,.0f} system, other threads {split.other_user:,.0f} + "
          f"{split.other_system:,.0f}")
    print(f"  under py-spy: {run.profiled.rate:,.0f} calls/s, "
          f"{run.profiled_split.total:,.0f} us per call, {run.node_us:,.0f} of it user time "
          "(what the samples share out)")
    ranked = sorted(run.plain.commands, key=lambda command: -run.plain.commands[command])
    print(f"  Redis commands per call {run.plain.commands_per_call():.1f}: " + ", ".join(
        f"{command} {run.plain.commands_per_call(command):.2f}" for command in ranked[:8]))
    print(f"  {profile.busy:,} samples holding the GIL (py-spy: {run.errors}); "
          f"{idle:,} caught entering a wait left out, most under "
          + ", ".join(f"{short(frame)} {count}" for frame, count in profile.idle.most_common(3)))
    shares, own = inclusive(profile), profile.own()
    print(f"\n  {'function (file) [callers folded in]':<86}{'incl.':>7}{'own':>7}{'us/call':>9}")
    for entry, (share,) in sorted(shares.items(), key=lambda item: -item[1][0])[:TOP]:
        print(f"  {short(entry):<86}{share:>7.1%}{own.get(entry.split(' [+')[0], 0.0):>7.1%}"
              f"{share * run.node_us:>9,.0f}")


def print_differences(bare: Run, warm: Run) -> None:
    """The functions whose inclusive microseconds per call differ most from bare's."""
    costs = {entry: (shares[0] * bare.node_us, shares[1] * warm.node_us)
             for entry, shares in inclusive(bare.profile, warm.profile).items()}
    moved = sorted(costs, key=lambda entry: -abs(costs[entry][1] - costs[entry][0]))
    print(f"\n{warm.name} against bare: the node's user CPU per call {warm.node_us:,.0f} "
          f"against {bare.node_us:,.0f} us; the functions that differ most, inclusive us per "
          "call")
    print(f"  {'function (file)':<86}{'bare':>7}{warm.name:>7}{'diff':>7}")
    for entry in moved[:DIFFERENCES]:
        before, after = costs[entry]
        print(f"  {short(entry):<86}{before:>7,.0f}{after:>7,.0f}{after - before:>+7,.0f}")


def short(frame: str, width: int = 85) -> str:
    return frame if len(frame) <= width else frame[:width - 3] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="3 s per run")
    parser.add_argument("--out", type=Path, help="the folder for the raw profiles "
                        "(default: a new one under the system's temporary folder)")
    options = parser.parse_args()
    seconds = 3.0 if options.quick else options.seconds
    folder = options.out or Path(tempfile.mkdtemp(prefix="warmpool-profile-"))
    folder.mkdir(parents=True, exist_ok=True)
    py_spy()
    runs = profile_runs(seconds, folder)
    print(f"\none threads node (-c 16, a pool of 8 agents), called from one process, "
          f"{seconds:g} s per run; py-spy at {RATE} samples/s, --gil --nonblocking; load average "
          + " ".join(f"{load:.2f}" for load in os.getloadavg()))
    for run in runs:
        print_run(run)
    bare = runs[0]
    for warm in runs[1:]:
        print_differences(bare, warm)
    (folder / "runs.json").write_text(json.dumps({run.name: {
        "step": RUNS[run.name], "calls_per_second": run.plain.rate,
        "node_cpu_per_call_us": vars(run.plain_split),
        "redis_commands_per_call": {command: run.plain.commands_per_call(command)
                                    for command in run.plain.commands},
        "profiled_calls_per_second": run.profiled.rate,
        "profiled_node_cpu_per_call_us": vars(run.profiled_split),
        "samples": run.profile.busy,
        "idle_samples_left_out": sum(run.profile.idle.values())} for run in runs}, indent=2))
    print(f"\nraw profiles (py-spy's collapsed stacks) and the figures: {folder}")


if __name__ == "__main__":
    main()
