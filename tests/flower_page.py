"""A real Flower process and a headless Chromium, for the Flower tests and the screenshot.

Used by ``tests/test_flower.py`` and ``scripts/flower_screenshot.py``.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery_warmpool.ops.processes import ManagedProcess

ROOT = Path(__file__).resolve().parent.parent

#: Flags that keep a headless Chromium quiet, local and free of first-run work.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")
_POOL_ROW = re.compile(
    r"<td>\s*warmpool\.(?P<pool>\w+)\s*</td>\s*<td[^>]*>(?P<value>.*?)</td>", re.DOTALL)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def chromium() -> str | None:
    """The path of Debian's ``chromium``, or ``None`` when it is not installed."""
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


class FlowerProcess(ManagedProcess):
    """``celery -A <app> flower`` as a subprocess on a free local port, API open."""

    def __init__(self, app: str, env: Mapping[str, str], *, cwd: Path = ROOT) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "celery", "-A", app, "flower",
                   f"--port={self.port}", "--address=127.0.0.1"]
        super().__init__(command, env={**os.environ, **env,
                                       "FLOWER_UNAUTHENTICATED_API": "true"}, cwd=cwd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> FlowerProcess:
        """Start Flower; return once it answers its health check."""
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.exited():
            with contextlib.suppress(OSError):
                if self.get("/healthcheck") == "OK":
                    return self
            time.sleep(0.1)
        output = self.log()
        self.stop()
        raise RuntimeError(f"flower did not answer on {self.url} in {timeout}s:\n{output}")

    def get(self, path: str, timeout: float = 30.0) -> str:
        """The body of ``GET path`` as text."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            body: bytes = response.read()
        return body.decode()

    def workers(self) -> dict[str, Any]:
        """``/api/workers?refresh=1``: every worker's stats, asked afresh."""
        found: dict[str, Any] = json.loads(self.get("/api/workers?refresh=1"))
        return found

    def warmpool_stats(self, node: str, until: Any = None, within: float = 15.0,
                       ) -> dict[str, Any]:
        """The ``warmpool`` stats of ``node`` from the API, once ``until(stats)`` holds."""
        deadline = time.monotonic() + within
        while True:
            stats = self.workers().get(node, {}).get("stats", {}).get("warmpool")
            if stats is not None and (until is None or until(stats)):
                return dict(stats)
            if time.monotonic() >= deadline:
                raise AssertionError(f"flower never showed the expected pools of {node}: "
                                     f"{stats!r}")
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0, *, group: bool = True) -> int | None:
        """Stop Flower and anything it started."""
        code = super().stop(timeout, group=group)
        self.remove_log()
        return code

    def __enter__(self) -> FlowerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def browse(url: str, *flags: str, timeout: float = 90.0) -> str:
    """Load ``url`` in headless Chromium (scripts run); return the DOM it ends with.

    ``flags`` are extra Chromium flags, such as ``--screenshot=PATH``; without them the
    serialized DOM is returned.
    """
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="warmpool-chromium-") as profile:
        action = flags or ("--dump-dom",)
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                   "--virtual-time-budget=3000", *action, url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def pool_rows_on_page(dom: str) -> dict[str, str]:
    """The ``warmpool.<pool>`` rows of a Flower worker page's "Other" tab: pool -> text."""
    return {found.group("pool"): " ".join(html.unescape(found.group("value")).split())
            for found in _POOL_ROW.finditer(dom)}
