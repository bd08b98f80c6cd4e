"""A Griffe extension: the docstrings' Sphinx roles shown as code on the docs site.

The package's docstrings name other objects the Sphinx way (``:class:`AgentPool```,
``:meth:`~celery_warmpool.core.pool.AgentPool.checkout```), which Markdown would show
as written. Each role becomes inline code of the name, with a leading ``~`` meaning the
last part only, as Sphinx reads it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|exc|data|obj):`(?P<target>[^`]+)`")


def plain(text: str) -> str:
    """``text`` with every Sphinx role replaced by inline code of the name it shows."""
    def name(match: re.Match[str]) -> str:
        target = match["target"]
        if target.startswith("~"):
            target = target[1:].rsplit(".", 1)[-1]
        return f"`{target}`"

    return _ROLE.sub(name, text)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring once the object tree is loaded."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader,
                  **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
