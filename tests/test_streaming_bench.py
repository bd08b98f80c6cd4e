"""bench/streaming.py in its quick form: every stream whole, closed streams stopped."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_quick_streaming_bench_delivers_every_chunk_and_stops_closed_streams():
    done = subprocess.run([sys.executable, "bench/streaming.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    output = done.stdout
    assert done.returncode == 0, output + done.stderr
    for node in ("threads -c 8", "prefork -c 2"):
        assert f"\n{node}\n" in output
    # The figures that do not depend on the machine's load, on both nodes.
    assert output.count("chunks lost, read by the caller                    0/20000") == 2
    assert output.count("200 streams complete, in order, once           200  = 200     "
                        "PASS") == 2
    assert output.count("one stream of 5000 chunks in") == 2
    stops = re.findall(r"stopped after its next chunk \(max, s\)\s+([\d.]+)", output)
    assert len(stops) == 2 and all(float(stop) <= 0.1 for stop in stops), output
