"""bench/gpu_check.sh: its CPU dry run end to end (so the GPU script cannot rot), and the pieces
that decide its numbers (the timing window, the peak TFLOPS table, the FLOPs models, the time
limit, the package check)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402

TRAIN_ROWS = ("qlora", "lora-bf16", "lora-bf16-flash", "lora-bf16-liger")
MUST_MEASURE = ("qlora", "lora-bf16")  # the CPU dry run trains these for real


@pytest.mark.slow
def test_dry_run_gives_every_row_numbers_or_a_reason(tmp_path: Path, shared_dir: Path) -> None:
    out = tmp_path / "out"
    command = ["bash", str(REPO / "bench/gpu_check.sh"), "--dry-run", "--out", str(out)]
    command += ["--shared", str(shared_dir)]
    # The script's own budget (20 minutes for the dry run) bounds it; this only guards a hang.
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / gpu_check.RESULT_FILE).read_text())

    assert report["date"] and report["versions"]["torch"] and report["versions"]["transformers"]
    assert "error" not in report
    assert report["machine"]["cuda_available"] is False  # the dry run hides any GPU
    assert report["build"]["model"]["parameters"] > 0
    assert report["build"]["data"]["rows"] == 2 * 2  # steps x rows per step
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == list(gpu_check.ROW_ORDER)
    for name, row in rows.items():
        assert row["status"] in ("ok", "skipped"), (name, row.get("reason"))
        if row["status"] == "skipped":
            assert row["reason"], name
        elif name in TRAIN_ROWS:
            assert row["tokens_per_second"] > 0 and row["steps_timed"] >= 1, name
            assert row["peak_rss_gib"] > 0, name
            assert row["mfu"] is None and row["mfu_reason"], name  # no GPU peak on a CPU
        else:
            assert row["output_tokens_per_second"] > 0 and row["prompts_per_second"] > 0
            assert row["every_prompt_hit_max_tokens"] is True  # ignore_eos: a fixed length
    for name in MUST_MEASURE:
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["optimizer"] == "PagedAdamW32bit"  # Experiment 19's optimizer
        assert rows[name]["gradient_checkpointing"] is True
    assert rows["qlora"]["quantization"] == "nf4"
    assert rows["lora-bf16"]["quantization"] in ("bf16", "fp32")
    if importlib.util.find_spec("vllm") is not None:
        assert rows["vllm"]["status"] == "ok", rows["vllm"]
    assert "skipped" in (rows["lora-bf16-flash"]["status"], rows["lora-bf16-liger"]["status"])
    assert "_MFU" in report["plan_constants"]["advice"]
    assert "| qlora | ok |" in done.stdout  # the printed table
    assert (out / "logs" / "qlora.log").is_file()


def test_timing_window_leaves_out_the_first_step() -> None:
    events = [
        {"step": 1, "train_loss": 2.0, "tokens_seen": 1000, "elapsed_seconds": 9.0},
        {"step": 2, "train_loss": 1.9, "tokens_seen": 2100, "elapsed_seconds": 10.0},
        {"step": 3, "train_loss": 1.8, "tokens_seen": 3000, "elapsed_seconds": 11.0},
    ]
    got = gpu_check.window(events)
    assert got == {
        "steps_timed": 2,
        "tokens_timed": 2000,
        "seconds_timed": 2.0,
        "tokens_per_second": 1000.0,
    }
    assert gpu_check.window(events[:1]) is None  # one step: nothing left to time


def test_peak_tflops_by_device_name() -> None:
    assert gpu_check.peak_bf16_tflops("NVIDIA H200")["tflops"] == 989.4
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3")["tflops"] == 989.4
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe")["tflops"] == 756.5
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 NVL")["tflops"] == 835.5
    assert gpu_check.peak_bf16_tflops("NVIDIA A100-SXM4-80GB")["tflops"] == 312.0
    unknown = gpu_check.peak_bf16_tflops("NVIDIA B300")
    assert unknown["tflops"] is None and "unknown GPU" in unknown["source"]
    assert gpu_check.peak_bf16_tflops("NVIDIA B300", 2250.0)["tflops"] == 2250.0
    assert gpu_check.peak_bf16_tflops(None)["tflops"] is None


def test_flops_models_on_llama_3_2_3b() -> None:
    from reasonguard.plan.hardware import KNOWN_ARCHITECTURES, architecture_from_config

    arch = architecture_from_config(gpu_check.LLAMA_3_2_3B)
    known = KNOWN_ARCHITECTURES["meta-llama/Llama-3.2-3B"]
    assert arch.total_params == known.total_params
    # 6N per token, N = decoder matmuls + the (tied) head; attention 12 x layers x q_dim x keys.
    n = arch.body_params + arch.hidden * arch.vocab
    assert gpu_check.model_flops(arch, 1, 0) == 6 * n
    assert gpu_check.model_flops(arch, 1, 100) - 6 * n == 12 * 28 * 3072 * 100
    # The plan's model for LoRA without checkpointing: 4 x body + 6 x adapters (+ attention).
    plan = gpu_check.plan_flops(arch, "lora", 1000, False, 1, 0, 0)
    assert plan == 4 * arch.body_params + 6 * 1000
    # Checkpointing recomputes the forward pass: 2 x (body + adapters) more.
    assert gpu_check.plan_flops(arch, "qlora", 1000, True, 1, 0, 0) == plan + 2 * (
        arch.body_params + 1000
    )


def test_a_row_past_its_limit_is_stopped(tmp_path: Path) -> None:
    log = tmp_path / "sleep.log"
    run = gpu_check.run_limited(["sleep", "30"], log, {"PATH": "/usr/bin:/bin"}, limit=1)
    assert run["timed_out"] is True and run["exit_code"] != 0
    assert "timed out" in gpu_check.failure_reason(run, log)


def test_missing_required_package_stops_with_its_name(
    tmp_path: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(gpu_check.REQUIRED, "no_such_module_rg", "no-such-package-rg")
    out = tmp_path / "out"
    code = gpu_check.main(["--dry-run", "--out", str(out), "--shared", str(shared_dir)])
    assert code == 1
    report = json.loads((out / gpu_check.RESULT_FILE).read_text())
    assert "no-such-package-rg" in report["error"]
    assert report["rows"] == []
    printed = capsys.readouterr().out
    assert "missing (required): no_such_module_rg (pip install no-such-package-rg)" in printed
