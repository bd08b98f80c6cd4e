"""The example pools as one deployable Celery app: what ``compose.yaml`` runs.

    celery -A examples.service worker -P threads -c 8 --loglevel=INFO
    celery -A examples.service flower

Broker and result backend come from ``WARMPOOL_BROKER_URL`` and
``WARMPOOL_RESULT_BACKEND``; pool sizes can be changed without code
(``WARMPOOL_FETCHER_SIZE=8``). The worker consumes the pools' queues and ``examples``
for plain tasks, so it shares a broker with other apps without taking their work.

Calling it from Python::

    from celery_warmpool import Signal
    from examples.service import warm

    warm.call("visits", Signal.new("counter.increment", {"by": 1}))
    warm.call("fetcher", Signal.new("fetch", {"url": "http://example.com/"}))
"""

from __future__ import annotations

from celery_warmpool import PoolSpec, WarmPool
from examples.counter import CounterAgent
from examples.launch import example_app
from examples.ml_inference import DigitsAgent
from examples.url_fetcher import FetcherAgent

app = example_app("service")
app.conf.task_default_queue = "examples"
warm = WarmPool(app, pools=[
    PoolSpec("fetcher", FetcherAgent, size=4, max_overflow=2),
    PoolSpec("digits", DigitsAgent, size=2),
    PoolSpec("visits", CounterAgent, size=1),
])
