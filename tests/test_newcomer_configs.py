"""Config mistakes a new user makes: each error names its real cause and the command to use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from reasonguard.errors import UserError
from reasonguard.train.config import load_config
from test_train_support import REPO

DEMO = REPO / "configs" / "demo-cpu.yaml"
DPO_3B = REPO / "configs" / "guardreasoner-hsdpo-3b.yaml"
PIPELINE_3B = REPO / "configs" / "hsdpo" / "guardreasoner-3b.yaml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------ overrides


def test_bad_override_is_blamed_on_the_command_line_not_the_file(cli) -> None:
    code, _, err = cli("train", "sft", "--config", DEMO, "learning_rate=fast", "--dry-run")
    assert code == 2
    assert "command-line override learning_rate=fast: " in err
    assert "expected a number, got 'fast'" in err
    assert str(DEMO) not in err


def test_unknown_override_key_is_blamed_on_the_command_line(cli) -> None:
    code, _, err = cli("train", "sft", "--config", DEMO, "learnin_rate=1e-4", "--dry-run")
    assert code == 2
    assert "command-line override learnin_rate=1e-4: unknown config key 'learnin_rate'" in err
    assert "did you mean 'learning_rate'?" in err


def test_cross_field_override_error_names_the_override(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"per_device_train_batch_size": 4, "effective_batch_size": 8}))
    with pytest.raises(UserError) as err:
        load_config(path, ["per_device_train_batch_size=3"])
    assert str(err.value).startswith("command-line override per_device_train_batch_size=3: ")
    assert "'effective_batch_size'" in str(err.value)


def test_the_override_an_error_names_is_blamed_not_an_earlier_one(tmp_path: Path) -> None:
    """eval_split_ratio=0 alone contradicts the file's eval_strategy, which a later override
    sets to `no`: the bad finetuning value is the one to name."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"eval_split_ratio": 0.1, "eval_strategy": "steps"}))
    overrides = ["eval_split_ratio=0", "eval_strategy=no", "finetuning=bogus"]
    with pytest.raises(UserError) as err:
        load_config(path, overrides)
    assert str(err.value).startswith("command-line override finetuning=bogus: ")
    assert load_config(path, overrides[:2]).eval_strategy == "no"


def test_errors_of_the_file_still_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": "fast"}))
    with pytest.raises(UserError, match=rf"^{path}: config key 'learning_rate'"):
        load_config(path, ["lora_r=8"])
    # an override that fixes the file's value wins
    assert load_config(path, ["learning_rate=1e-4"]).learning_rate == 1e-4
    # a bad override of the file's bad key is the override's fault
    with pytest.raises(UserError, match=r"^command-line override learning_rate=slow: "):
        load_config(path, ["learning_rate=slow"])


# ------------------------------------------------------------------------ the other stage


def test_dpo_config_to_train_sft_names_train_dpo(cli) -> None:
    code, _, err = cli("train", "sft", "--config", DPO_3B, "--dry-run")
    assert code == 2
    assert "is a DPO config" in err
    assert f"reasonguard train dpo --config {DPO_3B}" in err
    assert "unknown config key" not in err


def test_sft_config_to_train_dpo_names_train_sft(cli) -> None:
    code, _, err = cli("train", "dpo", "--config", DEMO, "--dry-run")
    assert code == 2
    assert "is an SFT config, not a DPO config" in err
    assert "beta" in err and "preference pairs" in err
    assert f"reasonguard train sft --config {DEMO}" in err
    assert "invalid pair" not in err


def test_dpo_config_without_dpo_keys_on_pairs_is_not_refused(tmp_path: Path) -> None:
    from reasonguard.commands.train import check_stage

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"input": "x", "chosen": "a", "rejected": "b"}) + "\n")
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"input": "x", "output": "y"}) + "\n")
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"dataset": str(pairs)}))
    check_stage("dpo", str(path), [])
    with pytest.raises(UserError, match="is an SFT config"):
        check_stage("dpo", str(path), [f"dataset={records}"])
    check_stage("dpo", str(path), [f"dataset={records}", "beta=0.1"])  # says it is DPO


# ------------------------------------------------------------------------ hsdpo pipelines


def test_pipeline_config_paths_resolve_from_another_folder(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("hsdpo", "--config", PIPELINE_3B, "--dry-run")
    assert code == 0, err
    assert "HS-DPO [to run]" in out


def test_pipeline_paths_relative_to_the_pipeline_file(tmp_path, monkeypatch) -> None:
    from reasonguard.hsdpo.pipeline import load_pipeline_config

    folder = tmp_path / "project" / "pipelines"
    folder.mkdir(parents=True)
    (folder / "sft.yaml").write_text("dataset: samples\n")
    (folder / "dpo.yaml").write_text("beta: 0.1\n")
    (folder / "p.yaml").write_text("sft_config: sft.yaml\ndpo_config: dpo.yaml\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_pipeline_config(folder / "p.yaml")
    assert Path(config.sft_config) == folder / "sft.yaml"
    assert Path(config.dpo_config) == folder / "dpo.yaml"
    # the current directory's file still counts when the pipeline's folder has none
    (elsewhere / "own-dpo.yaml").write_text("beta: 0.2\n")
    (folder / "q.yaml").write_text("sft_config: sft.yaml\ndpo_config: own-dpo.yaml\n")
    assert load_pipeline_config(folder / "q.yaml").dpo_config == "own-dpo.yaml"


def test_pipeline_dry_run_flags_missing_main_model_and_backend(cli, tmp_path, monkeypatch) -> None:
    import importlib.util

    monkeypatch.chdir(tmp_path)
    code, out, err = cli(
        "hsdpo", "--config", PIPELINE_3B, "--dry-run", "main_model=runs/nothing/final"
    )
    assert code == 0, err
    assert "main_model runs/nothing/final does not exist" in out
    assert "reasonguard train sft" in out
    if importlib.util.find_spec("vllm") is None:
        assert "backend vllm" in out and "vllm is not installed" in out
    code, out, err = cli("hsdpo", "--config", PIPELINE_3B, "--dry-run", "backend=hf")
    assert code == 0, err
    assert "backend hf" not in out


def test_pipeline_run_refuses_to_start_with_problems(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("hsdpo", "--config", PIPELINE_3B, "main_model=runs/nothing/final")
    assert code == 2
    assert "main_model runs/nothing/final does not exist" in err
    assert not (tmp_path / "runs").exists()


def test_no_main_model_flag_when_the_pipeline_trains_it(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("hsdpo", "--config", PIPELINE_3B, "--dry-run", "main_model=null")
    assert code == 0, err
    assert "main_model" not in out


# ------------------------------------------------------------------------ DPO's missing inputs

DPO_1B = REPO / "configs" / "guardreasoner-hsdpo-1b.yaml"


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_dpo_without_its_rsft_model_names_train_sft(cli, tmp_path, monkeypatch, dry_run) -> None:
    """The shipped DPO config starts from runs/guardreasoner-rsft-1b/final, absent on a fresh
    clone: a plain error naming the key and `train sft`, not a hub library's validation error."""
    monkeypatch.chdir(tmp_path)
    pairs = tmp_path / "PAIRS.jsonl"
    pairs.write_text(json.dumps({"input": "x", "chosen": "a", "rejected": "b"}) + "\n")
    args = ["train", "dpo", "--config", DPO_1B, f"dataset={pairs}"]
    code, _, err = cli(*args, *(["--dry-run"] if dry_run else []))
    assert code == 2
    assert (
        "config key 'model_name_or_path': no such folder: runs/guardreasoner-rsft-1b/final" in err
    )
    assert "`reasonguard train sft`" in err
    assert "HFValidationError" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_dpo_without_its_pairs_names_mine_not_the_hub(cli, tmp_path, monkeypatch, dry_run) -> None:
    """A missing local pairs.jsonl is a file to make (`mine` or `hsdpo`), not an unreachable hub."""
    monkeypatch.chdir(tmp_path)
    args = ["train", "dpo", "--config", DPO_1B, "model_name_or_path=tiny-llama"]
    code, _, err = cli(*args, *(["--dry-run"] if dry_run else []))
    assert code == 2
    assert "config key 'dataset': no such file: runs/guardreasoner-hsdpo-1b/pairs.jsonl" in err
    assert "`reasonguard mine`" in err and "`reasonguard hsdpo`" in err
    assert "hub" not in err
    assert not (tmp_path / "runs").exists()
