"""The CLI re-executes CPU training once with the glibc allocator settings, and the run records
what it did in training_info.json (dry runs say nothing about it: nothing trains)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reasonguard.launch.allocenv import GUARD, MALLOC_ENV, OPT_OUT, decision
from test_train_support import REPO, tiny_config, write_yaml_config


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k not in (GUARD, OPT_OUT)}
    return {**env, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def _one_step(tmp_path: Path, env: dict[str, str]) -> dict:
    """Train one step of the tiny model through the real command line; its allocator record."""
    import json

    config = tiny_config(tmp_path, max_steps=1, eval_strategy="no", save_strategy="no")
    path = write_yaml_config(tmp_path / "c.yaml", config)
    done = subprocess.run(
        [sys.executable, "-m", "reasonguard", "train", "sft", "--config", str(path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    info = json.loads((Path(config.output_dir) / "training_info.json").read_text())
    return info["model"]["cpu_allocator"]


@pytest.mark.slow  # a training run in a child process
def test_cli_sets_the_allocator_variables_when_they_are_unset(tmp_path: Path) -> None:
    record = _one_step(tmp_path, _env())
    assert "re-executed" in record["action"]
    for key, value in MALLOC_ENV.items():
        assert record["env"][key] == value


@pytest.mark.slow  # a training run in a child process
def test_opt_out_keeps_the_process(tmp_path: Path) -> None:
    record = _one_step(tmp_path, _env(**{OPT_OUT: "1"}))
    assert record["action"] == f"disabled by {OPT_OUT}=1"


def test_decision_rules() -> None:
    assert decision({}, cuda=False)["re_exec"]
    assert not decision({}, cuda=True)["re_exec"]
    assert not decision({"MALLOC_TOP_PAD_": "1"}, cuda=False)["re_exec"]
    assert not decision({GUARD: "1"}, cuda=False)["re_exec"]  # never loops
