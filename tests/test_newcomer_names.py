"""Model and data names a new user mistypes or cannot reach: plain messages, no retries.

The "hub unreachable" cases are real where the tests run without network; on a machine that
reaches the Hugging Face Hub they are skipped (they would download instead).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_support import CPU_ENV, REPO, cli_env


def _offline_machine() -> bool:
    from reasonguard.plan.hardware import hub_reachable

    return not hub_reachable()


needs_no_hub = pytest.mark.skipif(
    not _offline_machine(), reason="the Hugging Face Hub is reachable from here"
)


@pytest.fixture
def online_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode off, also in a hub client another test imported while it was on."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def run(cli, *args: object) -> tuple[int, str]:
    code, _, err = cli(*args)
    return code, err


# ------------------------------------------------------------------------ missing local paths


def test_missing_model_folder_says_no_such_folder(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(cli, "classify", "--model", "./no/such/folder", "--prompt", "hi")
    assert code == 2
    assert "no such folder: ./no/such/folder" in err
    assert "Repo id" not in err


def test_missing_data_file_says_no_such_file(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(cli, "data", "validate", "./missing.jsonl")
    assert code == 2
    assert "no such file or folder: ./missing.jsonl" in err


def test_data_alias_typo_suggests_the_alias(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(cli, "data", "validate", "sample")
    assert code == 2
    assert "no such file or folder: sample" in err
    assert "did you mean 'samples'?" in err
    assert "not reachable" not in err and "cannot load" not in err


def test_model_alias_typo_suggests_the_alias(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(cli, "classify", "--model", "smollm", "--prompt", "hi")
    assert code == 2
    assert "no such folder: smollm" in err
    assert "did you mean 'smollm2'?" in err


# ------------------------------------------------------------------------ hub ids, no hub


def _assert_offline_advice(err: str) -> None:
    assert "not reachable" in err or "not in the local Hugging Face cache" in err
    assert "HF_HUB_OFFLINE=1" in err
    assert "Traceback" not in err and "internet connection" not in err


@needs_no_hub
def test_hub_dataset_without_hub_fails_fast_with_offline_advice(cli, online_mode) -> None:
    code, err = run(cli, "data", "validate", "yueliu1999/GuardReasonerTrain")
    assert code == 2
    assert "cannot load 'yueliu1999/GuardReasonerTrain'" in err
    assert "Hugging Face Hub is not reachable" in err
    assert "samples" in err and "folder" in err
    _assert_offline_advice(err)


@needs_no_hub
def test_hub_model_without_hub_fails_fast_with_offline_advice(cli, online_mode) -> None:
    code, err = run(cli, "classify", "--model", "yueliu1999/GuardReasoner-1B", "--prompt", "hi")
    assert code == 2
    assert "cannot load model 'yueliu1999/GuardReasoner-1B'" in err
    assert "Hugging Face Hub is not reachable" in err
    assert "smollm2" in err and "tiny-llama" in err and "local model folder" in err
    _assert_offline_advice(err)


def test_offline_mode_without_cached_model_fails_fast(cli, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, err = run(cli, "classify", "--model", "yueliu1999/GuardReasoner-1B", "--prompt", "hi")
    assert code == 2
    assert "not in the local Hugging Face cache" in err
    assert "smollm2" in err
    _assert_offline_advice(err)


def test_offline_mode_without_cached_dataset_fails_fast(cli, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-datasets"))
    code, err = run(cli, "data", "validate", "someone/NotCached")
    assert code == 2
    assert "cannot load 'someone/NotCached'" in err
    _assert_offline_advice(err)


@pytest.mark.slow  # the CLI in a child process
def test_offline_mode_loads_a_model_from_the_hub_cache(tmp_path) -> None:
    """With HF_HUB_OFFLINE=1 a hub id already in the cache loads, without the network."""
    from reasonguard.models import resolve_model

    repo = tmp_path / "hub" / "models--someone--tiny-guard"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(resolve_model("tiny-llama"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {**cli_env(), **CPU_ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run(
        [sys.executable, "-m", "reasonguard", "classify", "--model", "someone/tiny-guard"]
        + ["--prompt", "hi", "--max-new-tokens", "4", "--no-scores"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert '"request"' in done.stdout or "{" in done.stdout


def test_probe_runs_once_per_process(online_mode, monkeypatch) -> None:
    from reasonguard import hub

    first = hub.hub_available()
    assert list(hub._HUB_PROBES.values()) == [first]
    assert hub.hub_available() is first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_available() is False  # offline mode: no probe, no network


def test_aliases_and_existing_folders_are_not_checked_against_the_hub(tmp_path: Path) -> None:
    from reasonguard.models import resolve_model

    (tmp_path / "config.json").write_text("{}")  # a model folder (an empty one is refused)
    assert resolve_model(tmp_path) == str(tmp_path)
    assert Path(resolve_model("llama3-tokenizer")).is_dir()
