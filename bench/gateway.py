"""The HTTP gateway under load, against the hand-written one, in one run.

    python bench/gateway.py            # about a minute
    python bench/gateway.py --quick    # 4 s of wrk per server

Starts one threads node (``-c 16``, an echo pool of 8 agents) on the local Redis
(databases 12 and 13; ``WARMPOOL_BENCH_REDIS`` names another server), then two HTTP
servers on it, both under uvicorn with one process and no access log:

- ``celery warmpool serve``: every request awaits ``warm.acall`` on one event loop;
- the hand-written gateway of ``bench/gateway_app.py``: a plain ``def`` FastAPI endpoint
  calling the blocking ``warm.call`` in FastAPI's thread pool, as users write it today.

Each takes ``wrk`` (Debian's package) with 256 connections for 10 s on
``POST /pools/echo/call``, in two runs of 5 s taken in turn (which goes first
alternating, so that a drift in the machine's load hits both alike): requests per
second, non-2xx answers and socket errors, the server's own CPU per request (from
``/proc/<pid>/stat``) and the most Redis connections it held (psutil, sampled every
0.2 s). The gateway has every route used first (calls, casts, streams, status reads,
and the page with what its script reads, the health check and the OpenAPI document: one
at a time, then 64 at once), and its connections are sampled from then until the end.
Then, through the gateway, one client at a time: the time to the first chunk of an SSE
stream against a unary call's p50.

The Redis connections of one process reading 200 streams at once are
``bench/streaming.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import (  # noqa: E402
    Check,
    cpu_seconds,
    most_connections,
    print_targets,
    redis_connections,
    redis_url,
)
from celery_warmpool.ops.processes import ManagedProcess, WorkerProcess  # noqa: E402
from tests.flower_page import free_port  # noqa: E402

BROKER, BACKEND = redis_url(12), redis_url(13)
CONNECTIONS = 256
SIGNAL = '{"type": "bench.echo", "data": {"text": "hello"}}'
WORDS = {"type": "bench.words", "data": {"count": 8}}
#: The gateway's routes, each used once and then ``AT_ONCE`` times at once.
ROUTES = ("call", "cast", "stream", "status", "page")
AT_ONCE = 64
WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.body = '{SIGNAL}'
wrk.headers["Content-Type"] = "application/json"
"""
#: Targets: the HTTP issue's, and a gateway costing less than the hand-written one.
CPU_RATIO_TARGET = 0.5
REQUESTS_RATIO_TARGET = 1.3
REDIS_CONNECTIONS_TARGET = 8
FIRST_CHUNK_TARGET = 1.2


@dataclass
class Load:
    """What one server did under wrk."""

    name: str
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    cpu_seconds: float
    #: The most Redis connections the server held (the gateway: from its first route used).
    redis_connections: int = 0

    def __add__(self, other: Load) -> Load:
        """Two runs of one server's as one."""
        return Load(self.name, self.requests + other.requests, self.seconds + other.seconds,
                    self.non_2xx + other.non_2xx, self.socket_errors + other.socket_errors,
                    self.cpu_seconds + other.cpu_seconds)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_per_request_us(self) -> float:
        return self.cpu_seconds / max(self.requests, 1) * 1e6


def wrk_binary() -> str:
    """Debian's wrk; installed here with apt-get when missing and this runs as root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0:
        print("wrk is missing: installing Debian's wrk (apt-get install wrk)")
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("wrk")
    if not found:
        sys.exit("wrk is missing: install Debian's wrk package (apt-get install wrk)")
    return found


def start_server(command: list[str], env: dict[str, str]) -> tuple[ManagedProcess, str]:
    port = free_port()
    process = ManagedProcess([*command, "--port", str(port)], env=env, cwd=ROOT).launch()
    if not process.wait_for_log("Uvicorn running on", 60):
        sys.exit(f"{command[0]} did not start:\n{process.log()}")
    return process, f"http://127.0.0.1:{port}"


def load(name: str, server: ManagedProcess, url: str, seconds: float, wrk: str,
         script: str) -> Load:
    """wrk on ``url``'s call route for ``seconds``; the server's CPU."""
    before = cpu_seconds(server.pid)
    done = subprocess.run(
        [wrk, "-t2", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--timeout", "10s", "-s", script,
         f"{url}/pools/echo/call"], capture_output=True, text=True, check=True)
    used = cpu_seconds(server.pid) - before
    output = done.stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", output)
    if total is None:
        sys.exit(f"cannot read wrk's output:\n{output}")
    requests, elapsed, unit = total.groups()
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                       r"timeout (\d+)", output)
    return Load(name, int(requests), float(elapsed) / (1000 if unit == "ms" else 1),
                int(non_2xx.group(1)) if non_2xx else 0,
                sum(int(count) for count in errors.groups()) if errors else 0, used)


def use_route(url: str, route: str, at_once: int) -> None:
    """``at_once`` requests to ``route`` at once: ``call``, ``cast``, ``stream``,
    ``status``, or ``page`` (the page, then what its script reads: the pool list; and the
    health check and the OpenAPI document)."""
    async def one(http: httpx.AsyncClient) -> list[int]:
        if route in ("call", "cast"):
            return [(await http.post(f"/pools/echo/{route}", content=SIGNAL)).status_code]
        if route == "status":
            return [(await http.get("/pools/echo/status")).status_code]
        if route == "stream":
            async with http.stream("POST", "/pools/echo/stream", json=WORDS) as response:
                async for _ in response.aiter_lines():
                    pass
                return [response.status_code]
        return [(await http.get(path)).status_code
                for path in ("/", "/pools", "/healthz", "/openapi.json")]

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=at_once)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            answers = await asyncio.gather(*(one(http) for _ in range(at_once)))
        return [status for statuses in answers for status in statuses]

    statuses = asyncio.run(main())
    if any(status >= 300 for status in statuses):
        sys.exit(f"the gateway's {route} route failed: statuses {sorted(set(statuses))}")


def first_chunks(url: str, rounds: int) -> tuple[list[float], list[float]]:
    """Unary call latencies and times to the first SSE chunk, one client, interleaved."""
    unary: list[float] = []
    first: list[float] = []
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(rounds):
            started = time.perf_counter()
            assert http.post("/pools/echo/call", content=SIGNAL).status_code == 200
            unary.append(time.perf_counter() - started)
            started = time.perf_counter()
            with http.stream("POST", "/pools/echo/stream",
                             json=WORDS) as response:
                lines = response.iter_lines()
                for line in lines:
                    if line.startswith("event: chunk"):
                        first.append(time.perf_counter() - started)
                        break
                for _ in lines:  # the rest, to its reply
                    pass
    return unary, first


class Held:
    """The Redis connections a server held: every sample, and the most so far after each
    step."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self.after: dict[str, int] = {}

    def mark(self, step: str) -> None:
        self.samples.append(redis_connections(self.pid))
        self.after[step] = max(self.samples)


def alternated_loads(servers: list[tuple[str, ManagedProcess, str]], seconds: float,
                     wrk: str, script: str, rounds: int = 2) -> list[Load]:
    """wrk on each server in turn, ``rounds`` times for ``seconds / rounds``, which goes
    first alternating: a drift in the machine's load hits them alike."""
    loads: dict[str, Load] = {}
    order = list(servers)
    for _ in range(rounds):
        for name, server, url in order:
            part = load(name, server, url, seconds / rounds, wrk, script)
            loads[name] = loads[name] + part if name in loads else part
        order.reverse()
    return [loads[name] for name, _, _ in servers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 s of wrk per server")
    options = parser.parse_args()
    seconds = 4.0 if options.quick else 10.0
    wrk = wrk_binary()
    for url in (BROKER, BACKEND):
        redis.Redis.from_url(url).flushdb()
    env = {**os.environ, "WARMPOOL_BROKER_URL": BROKER, "WARMPOOL_RESULT_BACKEND": BACKEND,
           "PYTHONPATH": str(ROOT)}
    worker = WorkerProcess("bench.gateway_app", pool="threads", concurrency=16,
                           broker=BROKER, backend=BACKEND, env=env, cwd=ROOT,
                           loglevel="WARNING")
    servers: list[ManagedProcess] = []
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    try:
        worker.start()
        python = [sys.executable, "-m"]
        gateway, gateway_url = start_server(
            [*python, "celery", "-A", "bench.gateway_app", "warmpool", "serve"], env)
        servers.append(gateway)
        handwritten, handwritten_url = start_server(
            [*python, "uvicorn", "bench.gateway_app:handwritten", "--no-access-log",
             "--log-level", "info"], env)
        servers.append(handwritten)
        held = [Held(gateway.pid), Held(handwritten.pid)]
        with most_connections(held[0].samples, gateway.pid, every=0.2), \
                most_connections(held[1].samples, handwritten.pid, every=0.2):
            for at_once in (1, AT_ONCE):
                for route in ROUTES:
                    use_route(gateway_url, route, at_once)
                    held[0].mark(f"{route} x{at_once}")
            for url in (gateway_url, handwritten_url):
                warm_up(wrk, url, script.name)
            rows = alternated_loads(
                [("celery warmpool serve", gateway, gateway_url),
                 ("hand-written (warm.call in threads)", handwritten, handwritten_url)],
                seconds, wrk, script.name)
            held[0].mark(f"wrk -c{CONNECTIONS}")
            unary, first = first_chunks(gateway_url, 20 if options.quick else 100)
            held[0].mark("the SSE rounds")
        held[0].after["at rest after them"] = redis_connections(gateway.pid)
        for row, found in zip(rows, held, strict=True):
            row.redis_connections = max(found.samples)
    finally:
        for server in servers:
            server.stop(15)
            server.remove_log()
        worker.stop()
        worker.remove_log()
        os.unlink(script.name)
    report(rows, unary, first, seconds, held[0].after)


def warm_up(wrk: str, url: str, script: str) -> None:
    """A second of wrk with 16 connections: imports, connections, the reply listener."""
    subprocess.run([wrk, "-t1", "-c16", "-d1s", "-s", script, f"{url}/pools/echo/call"],
                   capture_output=True, check=True)


def report(rows: list[Load], unary: list[float], first: list[float], seconds: float,
           held: dict[str, int]) -> None:
    gateway, handwritten = rows
    print(f"\nwrk -c{CONNECTIONS} for {seconds:g} s (two runs each, in turn) on POST "
          "/pools/echo/call, a threads node (-c 16, 8 agents) on Redis\n")
    print(f"  {'server':38}{'req/s':>8}{'non-2xx':>9}{'sock err':>10}{'CPU us/req':>12}"
          f"{'redis conns':>13}")
    for row in rows:
        print(f"  {row.name:38}{row.per_second:8.0f}{row.non_2xx:9d}{row.socket_errors:10d}"
              f"{row.cpu_per_request_us:12.0f}{row.redis_connections:13d}")
    print("\n  the gateway's Redis connections, the most held so far after each step (page: "
          "/, /pools, /healthz, /openapi.json)")
    for at_once, label in ((1, "one request at a time"), (AT_ONCE, f"{AT_ONCE} at once")):
        print(f"    {label + ':':23}" + ", ".join(f"{route} {held[f'{route} x{at_once}']}"
                                                  for route in ROUTES))
    print("    then " + ", ".join(f"{step} {count}" for step, count in held.items()
                                  if " x" not in step))
    unary_p50 = statistics.median(unary) * 1000
    first_p50 = statistics.median(first) * 1000
    print(f"\n  one client through the gateway: unary call p50 {unary_p50:.2f} ms, "
          f"first SSE chunk p50 {first_p50:.2f} ms ({len(unary)} of each, interleaved)\n")
    checks: list[Check] = [
        ("no socket error, no non-2xx (gateway)",
         gateway.socket_errors + gateway.non_2xx, "= 0",
         gateway.socket_errors + gateway.non_2xx == 0),
        ("req/s gateway / hand-written", gateway.per_second / handwritten.per_second,
         f">= {REQUESTS_RATIO_TARGET}",
         gateway.per_second >= REQUESTS_RATIO_TARGET * handwritten.per_second),
        ("CPU per request gateway / hand-written",
         gateway.cpu_per_request_us / handwritten.cpu_per_request_us,
         f"<= {CPU_RATIO_TARGET}",
         gateway.cpu_per_request_us <= CPU_RATIO_TARGET * handwritten.cpu_per_request_us),
        ("Redis connections of the gateway, at most", gateway.redis_connections,
         f"<= {REDIS_CONNECTIONS_TARGET}",
         gateway.redis_connections <= REDIS_CONNECTIONS_TARGET),
        ("first SSE chunk / unary call p50", first_p50 / unary_p50,
         f"<= {FIRST_CHUNK_TARGET}", first_p50 <= FIRST_CHUNK_TARGET * unary_p50),
    ]
    print("targets")
    print_targets(checks)


if __name__ == "__main__":
    main()
