"""bench/fast_verdicts.py at its smallest size (`--quick`): every mode row and every stream row
of each backend measured, with numbers where numbers belong (no timing value is asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODE_NUMBERS = ("tokens_per_item", "items_per_s", "seconds_per_item", "speedup_vs_reasoning")
STREAM_NUMBERS = (
    "tokens_from_scratch_per_check",
    "seconds_per_check",
    "first_verdict_seconds",
    "reasoning_seconds",
    "first_verdict_speedup_vs_reasoning",
)


def run_bench(tmp_path: Path, shared_dir: Path, model: str, backends: list[str]) -> dict:
    out = tmp_path / "fast.json"
    command = [
        sys.executable, str(REPO / "bench/fast_verdicts.py"), "--model", model, "--quick",
        "--benchmark-dir", str(shared_dir / "data/benchmarks"), "--backend", *backends,
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| hf | fast |" in done.stdout and "| hf | kept |" in done.stdout
    return json.loads(out.read_text())


def check_rows(result: dict, backends: list[str]) -> None:
    assert list(result["backends"]) == backends
    assert result["items"] == 5  # 2 sample rows + 3 benchmark rows
    for backend, run in result["backends"].items():
        assert list(run["modes"]) == ["reasoning", "fast", "cascade"]
        for mode, m in run["modes"].items():
            assert m["items"] == 5, (backend, mode)
            for key in (*MODE_NUMBERS, "speedup_vs_hf_reasoning"):
                assert isinstance(m[key], float) and m[key] >= 0, (backend, mode, key)
            assert m["seconds"] > 0 and m["parse_failures"] >= 0
        assert run["modes"]["fast"]["generated_tokens"] == 0
        assert run["modes"]["reasoning"]["speedup_vs_reasoning"] == 1.0
        cascade = run["modes"]["cascade"]
        assert (
            0 <= cascade["escalated"] <= 5
            and cascade["escalated_share"] == cascade["escalated"] / 5
        )
        kinds = ["kept", "recomputed"] if backend == "hf" else ["kept"]
        assert list(run["streams"]) == kinds
        for kind, r in run["streams"].items():
            assert r["streams"] == 1 and r["checks"] >= 2, (backend, kind)  # prompt + chunks
            for key in STREAM_NUMBERS:
                assert isinstance(r[key], float) and r[key] > 0, (backend, kind, key)
    hf = result["backends"]["hf"]["streams"]
    # The kept KV cache computes fewer tokens than a check from scratch would.
    assert 0 < hf["kept"]["tokens_computed_per_check"] < hf["kept"]["tokens_from_scratch_per_check"]
    assert hf["recomputed"]["tokens_computed_per_check"] is None
    assert hf["kept"]["checks"] == hf["recomputed"]["checks"]
    assert isinstance(hf["kept"]["check_speedup_vs_recomputed"], float)


@pytest.mark.slow
@pytest.mark.vllm
def test_fast_verdicts_bench_hf_and_vllm_quick(tmp_path: Path, shared_dir: Path) -> None:
    # One run measures both backends (its HF rows are those an HF-only run writes); where vLLM
    # is not installed, the HF rows alone. `make setup` installs vLLM's CPU build: under CI a
    # missing vLLM fails here.
    if os.environ.get("CI"):
        import vllm  # noqa: F401
    backends = ["hf", "vllm"] if importlib.util.find_spec("vllm") else ["hf"]
    result = run_bench(tmp_path, shared_dir, "smollm2", backends)
    check_rows(result, backends)
    if "vllm" in backends:
        assert result["backends"]["vllm"]["streams"]["kept"]["tokens_computed_per_check"] is None
