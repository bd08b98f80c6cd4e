"""The gateway's live page in headless Chromium: the pools, their status, a streamed reply."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from tests.flower_page import chromium
from tests.http_gateway import GatewayProcess, browse
from tests.integration_app import CounterAgent
from tests.test_overload import frozen, gate, hold

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium")]

assert gate  # a fixture of this module's too

TOKEN = "page-t0ken"
SPECS = [
    {"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 2},
    {"name": "speller", "agent": "tests.integration_app:SpellingAgent", "size": 1},
]


def section(dom: str, pool: str) -> str:
    """The part of the page's DOM about ``pool``."""
    found = re.search(rf'<section class="pool" id="pool-{pool}".*?</section>', dom, re.DOTALL)
    assert found, f"no section for pool {pool!r} in the page:\n{dom[:3000]}"
    return found.group(0)


def texts(fragment: str, tag: str, css_class: str) -> list[str]:
    pattern = rf'<{tag}[^>]*class="{css_class}[^"]*"[^>]*>(.*?)</{tag}>'
    return [html.unescape(re.sub(r"<[^>]+>", " ", text)).strip()
            for text in re.findall(pattern, fragment, re.DOTALL)]


@pytest.fixture
def page(start_worker) -> Iterator[tuple[str, GatewayProcess]]:
    worker = start_worker(SPECS, pool="threads", concurrency=4)
    with GatewayProcess("tests.integration_app", worker.env, token=TOKEN) as gateway:
        yield worker.hostname, gateway


def test_the_page_shows_each_pool_and_streams_a_reply_into_it(page):
    node, gateway = page
    link = urlencode({"token": TOKEN, "pool": "speller", "type": "words.spell",
                      "data": json.dumps({"count": 4}), "send": "stream"})

    dom = browse(f"{gateway.url}/?{link}")

    counter, speller = section(dom, "counter"), section(dom, "speller")
    heading = re.search(r"<h2>(.*?)</h2>", counter, re.DOTALL)
    assert heading and " ".join(re.sub(r"<[^>]+>", " ", heading.group(1)).split()) == \
        "counter ready"
    row = re.search(rf'<tr data-node="{re.escape(node)}">(.*?)</tr>', counter, re.DOTALL)
    assert row, counter
    cells = [html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
             for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.DOTALL)]
    assert cells[:6] == [node, "ready", "2 of 2", "0", "0", "0"]
    assert re.findall(r'<option value="([^"]+)"', speller) == sorted(
        [*CounterAgent.signal_routes, "words.spell"])

    assert texts(speller, "li", "chunk") == ["chunk-0", "chunk-1", "chunk-2", "chunk-3"]
    reply = json.loads(texts(speller, "pre", "reply")[0])
    assert (reply["action"], reply["node"], reply["state"]["count"]) == ("spell", node, 4)
    assert 'data-outcome="reply"' in speller



def test_the_page_charts_each_pools_backlog_capacity_and_calls(page, client, gate):
    _, gateway = page
    _, warm = client(SPECS)
    casts = [warm.cast("counter", hold(gate)) for _ in range(10)]
    frozen(warm, running=2, waiting=8)

    dom = browse(f"{gateway.url}/?{urlencode({'token': TOKEN})}", budget_ms=3000)

    counter = section(dom, "counter")
    assert re.findall(r'<p class="backlog">(.*?)</p>', counter) == [
        "backlog 10: 6 queued · 2 reserved · 2 running — capacity 2 — 0.0 calls/s"]
    lines = {name: points for name, points in re.findall(
        r'<polyline class="(\w+)" points="([^"]*)"', counter)}
    assert set(lines) == {"backlog", "capacity", "rate"}
    # Every point of the history so far: the backlog at the top of the chart (10 is its
    # highest value), the capacity at a fifth of it, no calls handled.
    heights = {name: {point.split(",")[1] for point in points.split()}
               for name, points in lines.items()}
    assert heights == {"backlog": {"4.0"}, "capacity": {"85.6"}, "rate": {"106.0"}}
    gate.touch()
    for result in casts:
        result.get(timeout=30)
