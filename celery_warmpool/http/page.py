"""``GET /``: the live page, one HTML file with its script and style inlined.

The page, its script and its style are package data (``static/``), put together once per
process: no build step, and nothing loaded from elsewhere, so the page works where the
gateway has no way out and a token given as ``?token=`` is needed on one address only.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["page_html"]


@functools.cache
def page_html() -> str:
    """The live page, script and style inlined."""
    static = resources.files("celery_warmpool.http").joinpath("static")
    page = static.joinpath("page.html").read_text(encoding="utf-8")
    script = static.joinpath("page.js").read_text(encoding="utf-8")
    style = static.joinpath("page.css").read_text(encoding="utf-8")
    return page.replace("/*STYLE*/", style).replace("/*SCRIPT*/", script)
