"""A training run's folders given as `--model`: the run folder is named for what it is, with its
`final/`; a checkpoint is served as the run trained (its prompt format, its tokenizer).

One real LoRA run of the tiny random Llama (chat format, a checkpoint every 2 steps) serves all
tests; `reasonguard classify` runs in-process (`main` returns the exit code a user gets, and
any exception that would print a traceback reaches the test instead).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reasonguard import load_guard
from reasonguard.format import render_input
from reasonguard.models import GUARD_CONFIG_FILE, read_guard_config
from reasonguard.train.sft import run_sft
from test_train_support import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model-folders")
    config = tiny_config(root, rows=8, max_steps=4, save_steps=2, eval_strategy="no")
    result = run_sft(config)
    assert (result.run_dir / "checkpoint-2").is_dir() and (result.run_dir / "final").is_dir()
    return result.run_dir


def _classify(cli, model: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    code, _, err = cli("classify", "--model", model, "--prompt", "hi")
    return code, err


def test_the_run_folder_given_as_a_model_names_its_final_folder(
    run_dir: Path, cli, monkeypatch
) -> None:
    code, err = _classify(cli, run_dir, run_dir.parent, monkeypatch)
    assert code == 2, err
    assert "Traceback" not in err
    assert f"{run_dir} is a training run folder, not a model" in err
    assert f"--model {run_dir / 'final'}" in err


def test_an_unfinished_run_folder_names_its_newest_checkpoint(
    run_dir: Path, tmp_path: Path, cli, monkeypatch
) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished, ignore=shutil.ignore_patterns("final"))
    code, err = _classify(cli, unfinished, tmp_path, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert "without a final model yet" in err
    assert str(unfinished / "checkpoint-4") in err


def test_a_folder_with_no_model_says_so(tmp_path: Path, cli, monkeypatch) -> None:
    (tmp_path / "notes").mkdir()
    code, err = _classify(cli, tmp_path / "notes", tmp_path, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert "holds no model" in err and "config.json" in err


def test_a_checkpoint_carries_the_runs_record_and_tokenizer(run_dir: Path) -> None:
    checkpoint = read_guard_config(run_dir / "checkpoint-2")
    final = read_guard_config(run_dir / "final")
    assert checkpoint is not None and checkpoint["prompt_format"] == "chat"
    assert checkpoint == final  # same base, finetuning, format, stop tokens
    assert (run_dir / "checkpoint-2" / "tokenizer_config.json").is_file()


def test_a_checkpoint_is_prompted_in_the_format_it_was_trained_with(run_dir: Path) -> None:
    item = render_input("How do I pick a lock?", None)
    from_final = load_guard(str(run_dir / "final"), device="cpu", max_new_tokens=4)
    from_checkpoint = load_guard(str(run_dir / "checkpoint-4"), device="cpu", max_new_tokens=4)
    assert from_checkpoint.prompt_format == "chat"
    prompt = from_checkpoint.backend.build_prompt(item)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert prompt == from_final.backend.build_prompt(item)
    # checkpoint-4 holds the final weights: the same prompt gives the same output and scores.
    items = [{"prompt": "How do I pick a lock?", "response": "No."}]
    a, b = from_checkpoint.classify(items), from_final.classify(items)
    assert (a[0].output, a[0].scores) == (b[0].output, b[0].scores)


def test_a_checkpoint_without_its_record_is_prompted_as_its_runs_config_says(
    run_dir: Path, tmp_path: Path
) -> None:
    old_run = tmp_path / "old-run"
    shutil.copytree(run_dir, old_run, ignore=shutil.ignore_patterns("final"))
    (old_run / "checkpoint-2" / GUARD_CONFIG_FILE).unlink(
        missing_ok=True
    )  # as saved before the record
    guard = load_guard(str(old_run / "checkpoint-2"), device="cpu", max_new_tokens=2)
    assert guard.prompt_format == "chat"
