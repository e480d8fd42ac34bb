"""bench/serve_load.py end to end with the HF backend on the tiny random Llama: a real server,
two concurrency levels, every request answered, latencies and throughput reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_load_bench_reports_each_level(shared_dir: Path) -> None:
    command = [
        sys.executable, str(REPO / "bench/serve_load.py"), "--model", "tiny-llama",
        "--backends", "hf", "--concurrency", "1", "4", "--requests-per-level", "6",
        "--max-new-tokens", "4", "--benchmark-dir", str(shared_dir / "data" / "benchmarks"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    levels = summary["results"]["hf"]
    assert [level["clients"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] == 6 and level["requests_per_s"] > 0
        assert 0 < level["p50_s"] <= level["p95_s"]
