"""Screenshot the gateway's live page while a stream arrives, so a person can look.

    python scripts/gateway_screenshot.py                     # writes docs/gateway-page.png
    python scripts/gateway_screenshot.py --output /tmp/x.png --broker redis://127.0.0.1:6379/4

Starts a threads worker with two pools against Redis and ``celery warmpool serve`` with a
token, opens the page in headless Chromium with a link that streams twelve chunks from
the ``speller`` pool, takes a PNG, and stops everything. Needs Redis and Debian's chromium.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402
from tests.http_gateway import GatewayProcess, browse  # noqa: E402

SPECS = [
    {"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 2},
    {"name": "speller", "agent": "tests.integration_app:SpellingAgent", "size": 1},
]
TOKEN = "screenshot"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "gateway-page.png")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/4")
    parser.add_argument("--backend", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--size", default="1200,900", help="window width,height")
    options = parser.parse_args()

    env = {"WARMPOOL_TEST_SPECS": json.dumps(SPECS), "PYTHONPATH": str(ROOT)}
    worker = WorkerProcess("tests.integration_app", pool="threads", concurrency=4,
                           broker=options.broker, backend=options.backend, env=env,
                           cwd=ROOT, nodename="warmpool-demo@%h")
    print("starting a worker with pools counter and speller, and the gateway ...")
    with worker, GatewayProcess("tests.integration_app", worker.env, token=TOKEN) as gateway:
        link = urlencode({"token": TOKEN, "pool": "speller", "type": "words.spell",
                          "data": json.dumps({"count": 12}), "send": "stream"})
        options.output.parent.mkdir(parents=True, exist_ok=True)
        browse(f"{gateway.url}/?{link}", f"--screenshot={options.output.resolve()}",
               f"--window-size={options.size}", "--hide-scrollbars")
    print(f"wrote {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
