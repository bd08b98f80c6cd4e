"""The docs site builds strictly, keeps all the README held, and names every public name."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click

import celery_warmpool
from celery_warmpool.ops.cli import warmpool

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: The README's headings before the site existed (git show 5948c29:README.md): each is now
#: a page title or a section heading in docs/.
OLD_README_HEADINGS = [
    "Quick start",
    "Concepts",
    "An agent",
    "The local pool",
    "Configuration",
    "What `size` means under each execution pool",
    "No cold starts",
    "Queues and bounded concurrency",
    "Calling pools",
    "Timeouts and errors",
    "When things fail",
    "Serving a model",
    "Many nodes",
    "Monitoring",
    "Examples",
    "Deployment",
    "Testing your agents",
    "Benchmarks",
    "The local pool: `python bench/local_pool.py`",
    "In a worker: `python bench/e2e.py`",
    "Serving a model: `python bench/inference.py`",
    "Many nodes: `python bench/status.py`",
    "Under crashes and a broker restart: `python bench/soak.py`",
    "What we build on",
    "Layout",
]
README_MAX_LINES = 200
_HEADING = re.compile(r"^#{1,6} (?P<text>.+?)\s*$")


def headings(path: Path) -> list[str]:
    """The headings of a Markdown page, outside fenced blocks."""
    found = []
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := _HEADING.match(line)):
            found.append(match["text"])
    return found


def test_the_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)})
    assert done.returncode == 0, done.stderr[-5000:]
    api = (tmp_path / "reference" / "api" / "index.html").read_text()
    missing = [name for name in celery_warmpool.__all__
               if f'id="celery_warmpool.{name}"' not in api]
    assert not missing, f"public names the built API page does not show: {missing}"


def test_every_old_readme_heading_is_a_page_or_a_section() -> None:
    found = {heading for page in DOCS.rglob("*.md") for heading in headings(page)}
    missing = [heading for heading in OLD_README_HEADINGS if heading not in found]
    assert not missing, f"README headings found nowhere in docs/: {missing}"


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_the_api_reference_documents_exactly_the_public_names() -> None:
    page = (DOCS / "reference" / "api.md").read_text()
    documented = re.findall(r"^::: celery_warmpool\.(\w+)$", page, flags=re.MULTILINE)
    assert sorted(documented) == sorted(celery_warmpool.__all__)


def test_the_command_line_page_names_every_command_and_option() -> None:
    page = (DOCS / "reference" / "cli.md").read_text()
    missing = []
    for name, command in warmpool.commands.items():
        if f"## `celery warmpool {name}" not in page:
            missing.append(name)
        for parameter in command.params:
            if isinstance(parameter, click.Option):
                missing += [f"{name} {flag}" for flag in
                            (*parameter.opts, *parameter.secondary_opts)
                            if f"`{flag}" not in page]
    assert not missing, f"commands and options docs/reference/cli.md does not name: {missing}"


def test_the_version_is_one_and_in_the_changelog() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == celery_warmpool.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{celery_warmpool.__version__}]" in changelog
