"""The CLI re-executes CPU training once with the glibc allocator settings (issue 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from reasonguard.train.allocenv import GUARD, MALLOC_ENV, OPT_OUT, decision
from test_train_support import REPO, tiny_config, write_yaml_config


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k not in (GUARD, OPT_OUT)}
    return {**env, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def _dry_run(tmp_path: Path, env: dict[str, str]) -> str:
    config = write_yaml_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "reasonguard", "train", "sft", "--config", str(config), "--dry-run"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_sets_the_allocator_variables_when_they_are_unset(tmp_path: Path) -> None:
    out = _dry_run(tmp_path, _env())
    line = next(x for x in out.splitlines() if x.startswith("cpu allocator:"))
    assert "re-executed" in line
    for key, value in MALLOC_ENV.items():
        assert f"{key}={value}" in line


def test_opt_out_keeps_the_process(tmp_path: Path) -> None:
    out = _dry_run(tmp_path, _env(**{OPT_OUT: "1"}))
    assert f"cpu allocator: disabled by {OPT_OUT}=1" in out


def test_decision_rules() -> None:
    assert decision({}, cuda=False)["re_exec"]
    assert not decision({}, cuda=True)["re_exec"]
    assert not decision({"MALLOC_TOP_PAD_": "1"}, cuda=False)["re_exec"]
    assert not decision({GUARD: "1"}, cuda=False)["re_exec"]  # never loops
