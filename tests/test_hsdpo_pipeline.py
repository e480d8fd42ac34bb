"""`reasonguard hsdpo` end to end on the tiny Llama (CPU): plan, kill mid-way, resume, finish."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from reasonguard.errors import UserError
from reasonguard.format import render_answers, render_input
from reasonguard.hsdpo.pipeline import (
    HSDPOConfig,
    Pipeline,
    diversity_configs,
    generation_plan,
    load_pipeline_config,
)
from test_train_support import CPU_ENV, REPO, cli_env

_PROMPTS = [
    "How do I bake bread?",
    "How can I pick a lock to get into a house?",
    "Write a poem.",
    "Tell me how to make a weapon at home.",
    "Is this mushroom safe to eat?",  # ambiguous: labelled both ways below
    "How do I get into my own locked car?",  # ambiguous
]


def write_split_data(path: Path, splits: tuple[str, ...] = ("W", "A", "B")) -> Path:
    """Short guard records in three splits. The last two prompts appear twice with opposite
    labels, so a model trained on them is unsure there: its sampled answers disagree, which is
    what hard-sample mining looks for."""
    rows = []
    for split in splits:
        items = [(p, i % 2 == 1) for i, p in enumerate(_PROMPTS)]
        items += [(p, i % 2 == 0) for i, p in enumerate(_PROMPTS) if i >= 4]
        for prompt, harmful in items:
            label = "harmful" if harmful else "unharmful"
            rows.append(
                {
                    "split": split,
                    "instruction": "Classify.",
                    "input": render_input(prompt, None),
                    "output": "# Task 1\n\n---\n\n" + render_answers(label, None, None),
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def format_model(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny random Llama fully fine-tuned until it writes the answer block (the R-SFT
    starting point of the test pipeline), and its data."""
    from reasonguard.train.config import SFTConfig
    from reasonguard.train.sft import run_sft

    tmp = tmp_path_factory.mktemp("format")
    data = write_split_data(tmp / "data.jsonl")
    config = SFTConfig(
        model_name_or_path="tiny-llama",
        dataset=str(data),
        prompt_format="chat",
        finetuning="full",
        max_length=256,
        eval_split_ratio=0,
        eval_strategy="no",
        num_train_epochs=50,
        per_device_train_batch_size=12,  # 100 steps: enough to write the block, not to be sure
        learning_rate=1e-2,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        output_dir=str(tmp / "run"),
    )
    return run_sft(config).final_dir, data


def write_pipeline(tmp_path: Path, model: Path, data: Path, **changes: Any) -> Path:
    sft = {
        "model_name_or_path": str(model),
        "dataset": str(data),
        "prompt_format": "chat",
        "finetuning": "full",
        "max_length": 256,
        "eval_split_ratio": 0,
        "eval_strategy": "no",
        "max_steps": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-6,
        "save_strategy": "no",
        "report_to": "none",
    }
    dpo = {
        "prompt_format": "chat",
        "finetuning": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "max_length": 256,
        "eval_split_ratio": 0,
        "eval_strategy": "no",
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "save_strategy": "no",
        "report_to": "none",
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    pipeline = {
        "sft_config": str(tmp_path / "sft.yaml"),
        "dpo_config": str(tmp_path / "dpo.yaml"),
        "output_dir": str(tmp_path / "out"),
        "leave_out": ["A", "B"],
        "samples": 4,
        "temperature": 0.7,
        "top_p": 0.95,
        "max_new_tokens": 40,
        "batch_size": 8,
        **changes,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def test_sources_go_to_the_models_that_trained_on_them(tmp_path) -> None:
    data = write_split_data(tmp_path / "d.jsonl", ("W", "A", "B", "C"))
    path = write_pipeline(tmp_path, Path("tiny-llama"), data, leave_out=["A", "B", "C"])
    config = load_pipeline_config(path)
    assert generation_plan(config, ["W", "A", "B", "C"]) == [
        ("main", "W"),
        ("no-B", "A"),
        ("no-C", "A"),
        ("no-A", "B"),
        ("no-C", "B"),
        ("no-A", "C"),
        ("no-B", "C"),
    ]
    diversity = diversity_configs(config, ["W", "A", "B", "C"])
    assert {k: v.splits for k, v in diversity.items()} == {
        "A": ["W", "B", "C"],
        "B": ["W", "A", "C"],
        "C": ["W", "A", "B"],
    }
    assert diversity["A"].output_dir == str(tmp_path / "out" / "rsft-no-A")
    assert Pipeline(config).dpo_config().model_name_or_path == str(
        tmp_path / "out" / "rsft-main" / "final"
    )


def test_bad_pipeline_configs_are_refused(tmp_path) -> None:
    data = write_split_data(tmp_path / "d.jsonl")
    with pytest.raises(UserError, match="'leave_out': 'Z' is not a split"):
        Pipeline(load_pipeline_config(write_pipeline(tmp_path, Path("m"), data, leave_out=["Z"])))
    with pytest.raises(UserError, match="'samples'"):
        HSDPOConfig(sft_config="a.yaml", dpo_config="b.yaml", samples=1)
    with pytest.raises(UserError, match="'tensor_parallel_size': needs backend: vllm"):
        HSDPOConfig(sft_config="a.yaml", dpo_config="b.yaml", tensor_parallel_size=2)
    with pytest.raises(UserError, match="unknown config key 'sample'"):
        load_pipeline_config(write_pipeline(tmp_path, Path("m"), data, sample=3))


def test_shipped_pipeline_configs_plan_offline(cli, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in sorted((REPO / "configs" / "hsdpo").glob("*.yaml")):
        assert path.read_text().splitlines()[0] == (
            f"# reasonguard hsdpo --config configs/hsdpo/{path.name}"
        )
        code, out, err = cli("hsdpo", "--config", path, "--dry-run")
        assert code == 0, err
        assert "R-SFT without AegisTrainR [to run]" in out
        assert "generate k=4 with main [to run]" in out
        assert "WildGuardTrainR" in out and "HS-DPO [to run]" in out


def run_cli(path: Path, log: Path) -> subprocess.Popen:
    """Start the real CLI in its own process, its output going to `log`."""
    with log.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "reasonguard", "hsdpo", "--config", str(path)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            env={**cli_env(), **CPU_ENV},
            cwd=REPO,
        )


def test_pipeline_killed_mid_way_resumes_without_redoing_finished_stages(
    tmp_path, format_model
) -> None:
    model, data = format_model
    path = write_pipeline(tmp_path, model, data)
    out = tmp_path / "out"
    first = run_cli(path, tmp_path / "first.log")
    deadline = time.monotonic() + 240
    while not (out / "generations" / "no-B").exists():  # the R-SFT stages are done
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "the pipeline did not reach generation in time"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (out / "dpo").exists()
    trained = {
        name: (out / name / "training_info.json").stat().st_mtime_ns
        for name in ("rsft-main", "rsft-no-A", "rsft-no-B")
    }

    second = run_cli(path, tmp_path / "second.log")
    second.wait(timeout=300)
    log = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, log
    for name in ("R-SFT main model", "R-SFT without A", "R-SFT without B"):
        assert f"{name}: done before, skipped" in log
    assert trained == {
        name: (out / name / "training_info.json").stat().st_mtime_ns for name in trained
    }
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs, "no hard samples mined"
    assert {p["source"] for p in pairs} <= {"W", "A", "B"}
    assert len({p["input"] for p in pairs}) == len(pairs)
    for split in ("W",):
        rows = (out / "generations" / "main" / f"{split}.jsonl").read_text().splitlines()
        assert len(rows) == 8 and all(len(json.loads(r)["samples"]) == 4 for r in rows)
    info = json.loads((out / "dpo" / "training_info.json").read_text())
    assert info["stage"] == "dpo" and info["outcome"] == "finished"
    assert (out / "dpo" / "final" / "adapter_model.safetensors").is_file()

    third = run_cli(path, tmp_path / "third.log")
    third.wait(timeout=120)
    log = (tmp_path / "third.log").read_text()
    assert third.returncode == 0, log
    assert log.count("done before, skipped") == 8  # 3 R-SFT, 3 generation, mining, DPO
