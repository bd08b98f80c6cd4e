"""A crawler: fetches fanned out through a pool of 3 agents, with bounded concurrency.

Run it (starts a local website and its own worker on an embedded broker):

    python examples/crawler.py

On Redis: ``python examples/crawler.py --broker redis://127.0.0.1:6379/0``.

Each level of the site is cast to the pool at once; the worker runs 6 threads, but only
the pool's 3 agents fetch, so the site never serves more than 3 requests at a time. A
broken link comes back as the error it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file too

import os
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

from celery_warmpool import ActionFailed, AgentReply, PoolSpec, Signal, WarmPool
from examples.launch import BrokerChoice, example_app, parse_options, running_worker
from examples.local_site import LocalSite
from examples.url_fetcher import ORIGIN_VARIABLE, Fetch, FetcherAgent, Response

POOL_SIZE = 3
WORKER_THREADS = 6


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.found.append(href)


def links_in(url: str, body: bytes) -> list[str]:
    """The same-site links of a page, absolute, in page order, without fragments."""
    parser = _Links()
    parser.feed(body.decode(errors="replace"))
    origin = urlsplit(url).netloc
    links = []
    for href in parser.found:
        target = urljoin(url, href).split("#", 1)[0]
        if urlsplit(target).netloc == origin and target not in links:
            links.append(target)
    return links


class FetchPage(Fetch):
    """Fetch a page and report its links too."""

    name = "crawl.page"

    def summary(self, url: str, response: Response) -> dict[str, Any]:
        return {**super().summary(url, response), "links": links_in(url, response.body)}


class CrawlerAgent(FetcherAgent):
    signal_routes = {"fetch": Fetch, "crawl.page": FetchPage}


app = example_app("crawler")
warm = WarmPool(app, pools=[
    PoolSpec("crawler", CrawlerAgent, size=POOL_SIZE,
             worker_opts={"origin": os.environ.get(ORIGIN_VARIABLE)}),
])


def _page(title: str, *links: str) -> str:
    anchors = "".join(f'<a href="{link}">{link}</a> ' for link in links)
    return f"<html><title>{title}</title><body>{anchors}</body></html>"


SITE = {
    "/": _page("Home", "/docs/", "/blog/", "/about"),
    "/about": _page("About", "/"),
    "/docs/": _page("Docs", "install", "pools", "signals", "status", "/"),
    "/docs/install": _page("Install", "pools"),
    "/docs/pools": _page("Pools", "signals", "/missing"),
    "/docs/signals": _page("Signals", "status"),
    "/docs/status": _page("Status", "/docs/"),
    "/blog/": _page("Blog", "1", "2", "3", "4"),
    **{f"/blog/{n}": _page(f"Post {n}", "/blog/", f"/docs/{topic}")
       for n, topic in zip(range(1, 5), ("install", "pools", "signals", "status"),
                           strict=True)},
}


def crawl(site: LocalSite) -> tuple[dict[str, str], dict[str, str]]:
    """Crawl ``site`` level by level; return titles by URL and errors by URL."""
    titles: dict[str, str] = {}
    broken: dict[str, str] = {}
    seen = {site.url("/")}
    level, frontier = 0, [site.url("/")]
    while frontier:
        casts = [(url, warm.cast("crawler", Signal.new("crawl.page", {"url": url},
                                                       source="/examples/crawler")))
                 for url in frontier]
        found: list[str] = []
        for url, result in casts:
            try:
                reply = AgentReply.model_validate(result.get(timeout=30, interval=0.01)[0])
            except ActionFailed as exc:
                broken[url] = exc.cause or str(exc)
                continue
            page = reply.state["last_fetch"]
            titles[url] = page["title"]
            found.extend(link for link in page["links"] if link not in seen)
            seen.update(page["links"])
        fetched = len(frontier) - sum(url in broken for url, _ in casts)
        print(f"level {level}: {_count(len(frontier), 'fetch', 'fetches')} cast at once, "
              f"{_count(fetched, 'page', 'pages')} fetched")
        level, frontier = level + 1, list(dict.fromkeys(found))
    return titles, broken


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def main(argv: list[str] | None = None) -> int:
    _, choice = parse_options(app, "A crawler fanned out through a pool of agents.", argv)
    with LocalSite(SITE, latency=0.15) as site:
        return _crawl_with_worker(site, choice)


def _crawl_with_worker(site: LocalSite, choice: BrokerChoice) -> int:
    with running_worker(app, "examples.crawler", choice, pool="threads",
                        concurrency=WORKER_THREADS, env={ORIGIN_VARIABLE: site.origin}):
        site.reset_peak()
        titles, broken = crawl(site)
        counters = site.counters()
        print(f"crawled {len(titles)} pages: {', '.join(sorted(titles.values()))}")
        for url, error in broken.items():
            print(f"broken link: {urlsplit(url).path} ({error})")
        print(f"peak concurrent fetches at the site: {counters.peak_in_flight} "
              f"(pool size {POOL_SIZE}, {WORKER_THREADS} worker threads)")
        print(f"the site saw {counters.requests} requests over {counters.connections} "
              "TCP connections")
        status = warm.status("crawler")
        print(f"pool status: checkouts={status.counters.checkouts} "
              f"calls={status.counters.calls} call_failures={status.counters.call_failures} "
              f"exhausted={status.counters.exhausted} (calls that waited for an agent)")
    return 0 if counters.peak_in_flight <= POOL_SIZE else 1


if __name__ == "__main__":
    sys.exit(main())
