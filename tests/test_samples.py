"""Every Python sample of README.md and docs/ runs (the markers are in tests/doc_samples.py).

Each runnable sample is written to an empty temporary folder and run there in a fresh
interpreter, with the repository on ``PYTHONPATH``, the test Redis databases (2 and 3) as
``WARMPOOL_TEST_BROKER`` / ``WARMPOOL_TEST_BACKEND`` and a time limit; it passes when it
exits with status 0. Samples that need a broker use the embedded one or those databases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_samples import ROOT, Sample, blocks, every_sample, samples

SAMPLES = every_sample()
RUNNABLE = [sample for sample in SAMPLES if sample.marker != "fragment"]
#: Seconds one sample may take; the slowest start a worker, which takes about 5 s.
SAMPLE_TIMEOUT = 60


def run_sample(sample: Sample, folder: Path) -> subprocess.CompletedProcess[str]:
    """Run ``sample`` in ``folder`` as a script (or with pytest), in a fresh interpreter."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "WARMPOOL_TEST_BROKER": "redis://127.0.0.1:6379/2",
        "WARMPOOL_TEST_BACKEND": "redis://127.0.0.1:6379/3",
    }
    if sample.marker == "pytest":
        script = folder / "test_sample.py"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--rootdir={folder}", script.name]
    else:
        script = folder / "sample.py"
        command = [sys.executable, script.name]
    script.write_text(sample.code)
    return subprocess.run(command, cwd=folder, env=environment, capture_output=True,
                          text=True, timeout=SAMPLE_TIMEOUT, check=False)


@pytest.mark.integration
@pytest.mark.parametrize("sample", RUNNABLE, ids=[sample.name for sample in RUNNABLE])
def test_sample_runs(sample: Sample, tmp_path: Path) -> None:
    done = run_sample(sample, tmp_path)
    assert done.returncode == 0, (
        f"the sample at {sample.name} failed ({done.returncode}):\n"
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def test_the_readme_example_is_run_not_skipped() -> None:
    # If the samples were no longer found, every test above would vanish without a failure.
    readme = [sample for sample in RUNNABLE if sample.page == "README.md"]
    assert len(readme) == 1
    assert "WarmPool(app" in readme[0].code
    assert {"docs/calling.md", "docs/concepts.md", "docs/testing.md"} <= {
        sample.page for sample in RUNNABLE}


def test_a_longer_fence_holds_a_block_without_ending_early() -> None:
    text = "````text\n<!-- fragment -->\n```python\nx = 1\n```\n````\n```python\ny = 2\n```\n"
    assert [(line, info, body) for line, info, _, body in blocks(text)] == [
        (1, "text", "<!-- fragment -->\n```python\nx = 1\n```\n"), (7, "python", "y = 2\n")]


def test_a_continued_sample_runs_after_the_one_before(tmp_path: Path) -> None:
    page = ROOT / "docs" / "concepts.md"
    continued = [sample for sample in samples(page) if sample.marker == "continued"]
    assert continued, "docs/concepts.md has a continued sample"
    first = samples(page)[0]
    assert continued[0].code.startswith(first.code)


def test_an_unknown_marker_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.doc_samples.ROOT", tmp_path)
    page = tmp_path / "page.md"
    page.write_text("<!-- fragmnet -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="unknown sample marker 'fragmnet'"):
        samples(page)
