"""The project's own soak, in its quick form: calls, casts, kills and a broker restart."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_quick_soak_meets_every_target():
    done = subprocess.run([sys.executable, "bench/soak.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all targets met" in done.stdout
    assert "calls lost (outside the contract)             0  = 0  PASS" in done.stdout
    assert "casts missing                                 0  = 0  PASS" in done.stdout
