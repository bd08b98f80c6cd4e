"""Screenshot Flower's worker page with warm pools on it, so a person can look.

    python scripts/flower_screenshot.py                      # writes docs/flower-worker.png
    python scripts/flower_screenshot.py --output /tmp/x.png --broker redis://127.0.0.1:6379/4

Starts a threads worker with two warm pools against Redis, sends it a few signals, starts
Flower, takes a PNG of the worker page's "Other" tab (where Flower lists the ``warmpool``
stats) with headless Chromium, and stops everything. Needs Redis and Debian's chromium.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402
from tests.flower_page import FlowerProcess, browse  # noqa: E402
from tests.integration_app import make_app  # noqa: E402

SPECS = [
    {"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 2},
    {"name": "tally", "agent": "tests.integration_app:CounterAgent", "size": 2,
     "max_overflow": 1},
]
INCREMENT = {"type": "counter.increment", "data": {"by": 1}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "flower-worker.png")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/4")
    parser.add_argument("--backend", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--size", default="1280,1600", help="window width,height")
    options = parser.parse_args()

    env = {"WARMPOOL_TEST_SPECS": json.dumps(SPECS), "PYTHONPATH": str(ROOT)}
    worker = WorkerProcess("tests.integration_app", pool="threads", concurrency=4,
                           broker=options.broker, backend=options.backend, env=env,
                           cwd=ROOT, nodename="warmpool-demo@%h")
    print("starting a worker with pools counter and tally ...")
    with worker:
        app, warm = make_app(options.broker, options.backend, SPECS)
        for _ in range(5):
            warm.call("counter", INCREMENT)
        warm.call("tally", INCREMENT)
        app.close()
        print("starting flower ...")
        with FlowerProcess("tests.integration_app", worker.env) as flower:
            flower.warmpool_stats(
                worker.hostname,
                until=lambda stats: stats["counter"]["counters"]["calls"] == 5)
            options.output.parent.mkdir(parents=True, exist_ok=True)
            page = f"{flower.url}/worker/{worker.hostname}#tab-other"
            browse(page, f"--screenshot={options.output.resolve()}",
                   f"--window-size={options.size}", "--hide-scrollbars")
    print(f"wrote {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
