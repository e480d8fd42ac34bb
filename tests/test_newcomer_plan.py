"""`reasonguard plan` and `train sft --dry-run` as a new user meets them: assumptions marked as
such, GPU names in any case, more GPU classes and any other GPU by its numbers, the decision
lines of every dry run, and no allocator line in a dry run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from reasonguard.plan.estimate import GPUS, TARGETS, plan_training
from reasonguard.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
EXP19 = REPO / "configs" / "exp19-qlora-3b-instruct.yaml"
DECISIONS = ("checkpointing", "quantization", "liger", "compile", "attention", "bf16")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _plan(**kwargs):
    return plan_training(load_config(EXP19, []), **kwargs)


def test_assumed_mfu_is_marked_in_text_and_json(cli, tmp_path: Path) -> None:
    out_file = tmp_path / "plan.json"
    code, out, err = cli("plan", "--config", EXP19, "--gpu", "4090", "--json", out_file)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("throughput"))
    assert "MFU 0.23 (ASSUMED" in line
    rate = json.loads(out_file.read_text())["throughput"]
    assert rate["mfu"] == 0.23 and rate["mfu_assumed"] is True
    assert rate["mfu_source"].startswith("ASSUMED")
    # A measured rate has no MFU to mark.
    code, out, _ = cli("plan", "--config", EXP19, "--gpu", "4090", "--tokens-per-second", 900)
    assert code == 0 and "ASSUMED" not in next(
        x for x in out.splitlines() if x.startswith("throughput")
    )


def test_gpu_names_are_case_insensitive(cli) -> None:
    code, out, err = cli("plan", "--config", EXP19, "--gpu", "H100")
    assert code == 0, err
    assert "NVIDIA H100" in out
    code, out, err = cli("plan", "--config", EXP19, "--gpu", "4070TI-Super")
    assert code == 0, err
    assert _plan(gpu="A100")["target"] == "a100"


@pytest.mark.parametrize(
    ("gpu", "memory_gib", "tflops"),
    [("3090", 24, 71.0), ("a10", 24, 125.0), ("l4", 24, 121.0), ("a6000", 48, 154.8)],
)
def test_more_gpu_classes(cli, gpu: str, memory_gib: int, tflops: float) -> None:
    assert gpu in TARGETS
    assert GPUS[gpu].memory_gib == memory_gib and GPUS[gpu].bf16_tflops == pytest.approx(tflops)
    code, out, err = cli("plan", "--config", EXP19, "--gpu", gpu.upper())
    assert code == 0, err
    assert f"{memory_gib}GB" in out.splitlines()[0]
    assert f"{tflops:,.1f} TFLOPS bf16 peak" in out


def test_any_other_gpu_by_its_memory_and_tflops(cli, tmp_path: Path) -> None:
    out_file = tmp_path / "plan.json"
    args = ["--gpu-memory-gib", 24, "--gpu-tflops", 165.2, "--json", out_file]
    code, out, err = cli("plan", "--config", EXP19, *args)
    assert code == 0, err
    assert "a GPU with 24 GiB and 165.2 bf16 TFLOPS (as given)" in out.splitlines()[0]
    given = json.loads(out_file.read_text())
    assert given["target"] == "custom" and given["memory"]["capacity_bytes"] == 24 * 1024**3
    assert given["throughput"]["mfu_assumed"] is True
    # The same numbers as a table class give the same plan.
    table = _plan(gpu="4090")
    assert given["time"]["total_seconds"] == pytest.approx(table["time"]["total_seconds"])
    assert given["memory"]["fits"] == table["memory"]["fits"]
    # One number overrides a table class: an A100 with 40 GiB.
    small = _plan(gpu="a100", gpu_memory_gib=40)
    assert small["memory"]["capacity_bytes"] == 40 * 1024**3
    assert small["time"]["total_seconds"] == pytest.approx(
        _plan(gpu="a100")["time"]["total_seconds"]
    )
    assert "40 GiB (as given)" in small["device"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu-memory-gib", "24"], "give both --gpu-memory-gib and --gpu-tflops"),
        (["--gpu-tflops", "100"], "give both --gpu-memory-gib and --gpu-tflops"),
        (["--gpu-memory-gib", "0", "--gpu-tflops", "100"], "--gpu-memory-gib must be a positive"),
        (["--gpu-memory-gib", "24", "--gpu-tflops", "nan"], "--gpu-tflops must be a positive"),
        (["--gpu", "cpu", "--gpu-memory-gib", "24"], "describe a GPU"),
        (["--gpu", "v100"], "--gpu-memory-gib and --gpu-tflops"),
    ],
)
def test_bad_gpu_descriptions_exit_2(cli, args: list[str], message: str) -> None:
    code, out, err = cli("plan", "--config", EXP19, *args)
    assert code == 2 and out == ""
    assert message in err


def test_dry_run_prints_the_decisions_even_when_this_machine_cannot_run_it(
    cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plain install has no bitsandbytes (it is the `qlora` extra): exp19 cannot run here, and
    # its decisions are still made from the config and this machine, before any weights load.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    code, out, err = cli("train", "sft", "--config", EXP19, "--dry-run")
    assert code == 0, err
    assert "cannot run it: finetuning: qlora needs bitsandbytes" in out
    for name in DECISIONS:
        assert f"\ndecision       {name}: " in out, name
    assert "decision       quantization: nf4" in out


def test_dry_run_prints_no_allocator_line(cli) -> None:
    code, out, err = cli("train", "sft", "--config", EXP19, "--dry-run")
    assert code == 0, err
    assert "allocator" not in out + err
