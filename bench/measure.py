"""What the benchmarks read off running processes, and how they print their targets."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

REDIS_PORT = 6379
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: One target: what is measured, its value, the target as shown, whether it is met.
Check = tuple[str, float | int, str, bool]


def cpu_seconds(*pids: int) -> float:
    """User and system CPU time so far of processes ``pids`` (their threads included)."""
    ticks = 0
    for pid in pids:
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def redis_connections(pid: int | None = None) -> int:
    """TCP connections of process ``pid`` (this one by default) to the Redis port."""
    return sum(1 for connection in psutil.Process(pid).net_connections(kind="tcp")
               if connection.raddr and connection.raddr.port == REDIS_PORT)


def print_targets(checks: list[Check], *, indent: str = "  ", width: int = 40,
                  digits: int = 2) -> None:
    """One line per target: its value (floats to ``digits`` places), the target, PASS or
    MISS."""
    for name, value, target, met in checks:
        shown = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        print(f"{indent}{name:{width}}{shown:>8}  {target:8}  {'PASS' if met else 'MISS'}")
