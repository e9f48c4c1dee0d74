"""`benchmarks/run.py` runs end to end on a few generated images and writes its table as JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_the_benchmark_harness_runs_on_generated_images(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks/run.py"), "--data", str(tmp_path / "absent.tgz"),
               "--images", "40", "--compare-images", "8", "--rounds", "1", "--results", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]  # 1: a target failed
    assert "generated JPEGs" in result.stdout and "| figure | value | target |" in result.stdout
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["pipeline"]["incremental"]["stats"]["computed"] == 10
    assert {row["pass"] for row in saved["table"]} <= {True, False, None} and len(saved["table"]) == 19
