"""The Celery app each solo node of ``bench/status.py`` runs: one pool of one agent."""

from __future__ import annotations

import os

from celery import Celery

from bench.e2e_app import TrivialAgent
from celery_warmpool import PoolSpec, WarmPool

app = Celery(
    "bench_status",
    broker=os.environ.get("WARMPOOL_BROKER_URL", "redis://127.0.0.1:6379/12"),
    backend=os.environ.get("WARMPOOL_RESULT_BACKEND", "redis://127.0.0.1:6379/13"),
    set_as_current=False,
)
app.conf.broker_connection_retry_on_startup = True
warm = WarmPool(app, pools=[PoolSpec("bench", TrivialAgent, size=1)])
