"""A real gateway process (``celery warmpool serve``) for the HTTP tests and the screenshot.

Used by ``tests/test_http.py``, ``tests/test_http_page.py`` and ``bench/gateway.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from celery_warmpool.ops.processes import ManagedProcess
from tests.flower_page import CHROMIUM_FLAGS, chromium, free_port
from tests.http_contract import Contract

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess(ManagedProcess):
    """``celery -A <app> warmpool serve`` as a subprocess on a free local port."""

    def __init__(self, app: str, env: Mapping[str, str], *, token: str | None = None,
                 args: tuple[str, ...] = (), host: str = "127.0.0.1",
                 cwd: Path = ROOT) -> None:
        self.port = free_port()
        self.token = token
        #: Once set, every response of :meth:`client` is checked against it.
        self.contract: Contract | None = None
        command = [sys.executable, "-m", "celery", "-A", app, "warmpool", "serve",
                   "--host", host, "--port", str(self.port), *args]
        environment = {**os.environ, **env, "PYTHONPATH": str(cwd)}
        environment.pop("WARMPOOL_HTTP_TOKEN", None)
        if token is not None:
            environment["WARMPOOL_HTTP_TOKEN"] = token
        super().__init__(command, env=environment, cwd=cwd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        """Start the gateway; return once it listens."""
        self.launch()
        if not self.wait_for_log("Uvicorn running on", timeout):
            output = self.log()
            self.stop()
            raise RuntimeError(f"the gateway did not start in {timeout}s:\n{output}")
        return self

    def client(self, *, token: bool = True, timeout: float = 30.0) -> httpx.Client:
        """An HTTP client of the gateway, sending its token unless told not to; with a
        :attr:`contract`, each response it gets is checked against the document."""
        headers = ({"Authorization": f"Bearer {self.token}"}
                   if token and self.token is not None else {})
        hooks = {"response": [self.contract.response_hook]} if self.contract else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                            event_hooks=hooks)

    def checked(self) -> GatewayProcess:
        """Check every later response of :meth:`client` against the gateway's document."""
        self.contract = Contract.fetch(self.url, self.token)
        return self

    def stop(self, timeout: float = 15.0, *, group: bool = True) -> int | None:
        code = super().stop(timeout, group=group)
        self.remove_log()
        return code

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """The server-sent events of a streamed response as they arrive: (event, data)."""
    name, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def browse(url: str, *flags: str, budget_ms: int = 5000, timeout: float = 90.0) -> str:
    """Load ``url`` in headless Chromium for ``budget_ms`` of virtual time; return its DOM
    (or run ``flags`` instead, such as ``--screenshot=PATH``)."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="warmpool-chromium-") as profile:
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                   f"--virtual-time-budget={budget_ms}", *(flags or ("--dump-dom",)), url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


@contextlib.contextmanager
def gateway_for(worker_env: Mapping[str, str], **options: Any) -> Iterator[GatewayProcess]:
    """A started gateway on the broker of a worker's environment, stopped afterwards."""
    gateway = GatewayProcess("tests.integration_app", worker_env, **options)
    with gateway:
        yield gateway

