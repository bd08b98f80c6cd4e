"""The Python samples of README.md and docs/: found, marked and made into runnable files.

A ```` ```python ```` block runs on its own as a script unless the line before its fence
is one of these markers (HTML comments, so neither GitHub nor the site shows them):

- ``<!-- fragment -->``: it only shows a fragment (your project's modules, a model, a
  worker you started yourself) and is not run;
- ``<!-- continued -->``: it goes on from the block before it on the same page, and runs
  after that block's code (and whatever that one continued from);
- ``<!-- pytest -->``: it is a test file, run with pytest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKERS = ("fragment", "continued", "pytest")
_FENCE = re.compile(r"^(?P<ticks>`{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^<!--\s*(?P<name>[a-z]+)\s*-->$")


@dataclass(frozen=True)
class Sample:
    """One Python block: where it is, how it is marked, and the code to run."""

    page: str
    line: int
    marker: str | None
    code: str

    @property
    def name(self) -> str:
        """``page:line``, the sample's test id."""
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every Markdown page of the site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(text: str) -> list[tuple[int, str, str | None, str]]:
    """Every fenced block of ``text``: (line of its fence, info string, marker, body).

    A fence closes only on a fence of at least as many backticks with no info string, so a
    block may show another block inside a longer fence.
    """
    found = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        ticks = len(opening["ticks"])
        marked = _MARKER.match(lines[index - 1].strip()) if index else None
        body = []
        end = index + 1
        while end < len(lines):
            closing = _FENCE.match(lines[end])
            if closing and len(closing["ticks"]) >= ticks and not closing["info"].strip():
                break
            body.append(lines[end])
            end += 1
        found.append((index + 1, opening["info"].strip(), marked["name"] if marked else None,
                      "\n".join(body) + "\n"))
        index = end + 1
    return found


def samples(path: Path) -> list[Sample]:
    """The Python samples of one page, each ``continued`` one joined to those before it."""
    page = path.relative_to(ROOT).as_posix()
    found: list[Sample] = []
    for line, info, marker, body in blocks(path.read_text()):
        if info != "python":
            continue
        if marker is not None and marker not in MARKERS:
            raise ValueError(f"{page}:{line}: unknown sample marker {marker!r}")
        code = body
        if marker == "continued":
            if not found or found[-1].marker in ("fragment", "pytest"):
                raise ValueError(f"{page}:{line}: a continued sample follows no runnable one")
            code = found[-1].code + "\n" + body
        found.append(Sample(page, line, marker, code))
    return found


def every_sample() -> list[Sample]:
    """The Python samples of README.md and docs/, in page order."""
    return [sample for path in pages() for sample in samples(path)]
