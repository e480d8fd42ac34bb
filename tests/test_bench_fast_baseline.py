"""bench/fast_mode_baseline.py at its smallest: two rounds (one per checkout) of a tiny model's
fast verdicts, each checkout in its own child process; the same code on both sides agrees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "fast_mode_baseline.py"


@pytest.mark.slow
def test_the_same_checkout_as_baseline_gives_the_same_verdicts(tmp_path: Path) -> None:
    out = tmp_path / "baseline.json"
    command = [
        sys.executable, str(BENCH), "--baseline-src", str(REPO / "src"), "--model", "tiny-llama",
        "--sample-rows", "3", "--benchmark-rows", "0", "--rounds", "1", "--batch-size", "2",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["items"] == 3 and result["rounds"] == 1
    for name in ("baseline", "current"):
        (seconds,) = result["seconds_per_item"][name]
        assert seconds > 0 and result["median_seconds_per_item"][name] == seconds
    assert result["speedup"] > 0
    assert result["labels_equal"] is True
    assert result["largest_probability_difference"] < 1e-6
    assert "labels equal: True" in done.stdout


def test_a_baseline_without_the_package_is_refused(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCH), "--baseline-src", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"--baseline-src {tmp_path}: no reasonguard package there" in done.stderr
