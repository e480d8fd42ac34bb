"""`train classifier`: all-MiniLM-L6-v2 with three heads on the sample rows (CPU, seconds), the
run directory the other stages write, resume after SIGKILL, and distillation from a teacher."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reasonguard.classifier.model import HEADS_FILE, build_classifier, load_classifier
from reasonguard.classifier.train import run_classifier
from reasonguard.data.sources import load_source
from reasonguard.format import TASKS, parse_labels, split_input
from reasonguard.models import resolve_model
from reasonguard.train.monitor import read_metrics
from test_classifier_support import prediction_row, small_config, write_predictions, write_yaml
from test_train_support import cli_env

RUN_DIR_LISTING = {
    "config.yaml",
    "status.json",
    "metrics.jsonl",
    "training_info.json",
    "loss_curve.png",
    "final",
}
CHECKPOINT_FILES = {
    "model.safetensors",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
}
FINAL_FILES = {
    "config.json",
    "model.safetensors",
    HEADS_FILE,
    "reasonguard.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _probabilities(folder: Path, pairs: list[tuple[str, str | None]]) -> torch.Tensor:
    """P(positive) per item and task of a trained classifier (rows x TASKS)."""
    from reasonguard.classifier.inputs import collate, encode_texts

    model, tokenizer, record = load_classifier(folder)
    batch = collate(encode_texts(tokenizer, pairs, record["max_length"]), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    return torch.sigmoid(logits)


def test_trains_on_the_sample_rows_and_writes_the_run_directory_of_every_stage(
    tmp_path: Path,
) -> None:
    config = small_config(tmp_path)
    result = run_classifier(config)
    run = Path(config.output_dir)
    checkpoints = sorted(p.name for p in run.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-9"]  # one per epoch, save_total_limit 1
    assert {p.name for p in run.iterdir()} == RUN_DIR_LISTING | {"checkpoint-9"}
    assert {p.name for p in (run / "checkpoint-9").iterdir()} == CHECKPOINT_FILES
    assert {p.name for p in result.final_dir.iterdir()} == FINAL_FILES

    info = json.loads((run / "training_info.json").read_text())
    assert info["stage"] == "classifier" and info["outcome"] == "finished"
    assert info["plan"]["total_steps"] == result.steps == 9
    assert info["data"]["train_items"] == 35 and info["data"]["eval_items"] == 4
    assert info["data"]["labels"]["prompt"]["labelled"] == 35
    assert all("trained on" in info["model"]["heads"][task] for task in TASKS)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 9
    assert (
        (run / "config.yaml")
        .read_text()
        .startswith(
            "# Resolved config of this run; rerun with:\n#   reasonguard train classifier --config "
        )
    )

    events = read_metrics(run / "metrics.jsonl")
    losses = [e["train_loss"] for e in events if "train_loss" in e]
    assert len(losses) == 9 and all(0 < x < 10 for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3])  # the loss falls
    evals = [e for e in events if "eval_loss" in e]
    assert len(evals) == 3 and "eval_accuracy_prompt" in evals[-1]

    record = json.loads((result.final_dir / "reasonguard.json").read_text())
    assert record["kind"] == "encoder-classifier" and record["pooling"] == "mean"
    assert record["base_model"] == "minilm" and record["max_length"] == 64
    # Every weight trained: the encoder against the packaged one, the heads against the
    # initialisation this config's seed gives.
    base = load_file(Path(resolve_model("minilm")) / "model.safetensors")
    trained = load_file(result.final_dir / "model.safetensors")
    # (the packaged file also holds a `position_ids` buffer that transformers 5 no longer saves,
    # and BERT's pooler, which the classifier's own pooling replaces)
    assert set(trained) == {k for k in base if not k.startswith("pooler.")} - {
        "embeddings.position_ids"
    }
    assert "embeddings.position_embeddings.weight" in trained
    same = [k for k in trained if torch.equal(base[k], trained[k])]
    assert same == []
    from transformers import set_seed

    set_seed(config.seed)
    start = build_classifier("minilm").heads.state_dict()
    heads = load_file(result.final_dir / HEADS_FILE)
    assert heads.keys() == start.keys()
    assert all(not torch.equal(start[k], heads[k]) for k in heads)


def test_a_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    config = small_config(
        tmp_path,
        max_samples=3,
        num_train_epochs=1,
        eval_strategy="no",
        eval_split_ratio=0.0,
        save_strategy="no",
    )
    first = run_classifier(config)
    weights = (first.final_dir / "model.safetensors").stat().st_mtime_ns
    again = run_classifier(config)
    assert again.steps == first.steps == 1
    assert (first.final_dir / "model.safetensors").stat().st_mtime_ns == weights


def _command(config_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reasonguard",
        "train",
        "classifier",
        "--config",
        str(config_path),
        *overrides,
    ]


def _run(config_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        _command(config_path, *overrides),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_final_weights(tmp_path: Path) -> None:
    # 9 steps with a checkpoint every 2 and dropout on (so the RNG state must come back too).
    config = small_config(tmp_path, save_strategy="steps", save_steps=2, eval_strategy="epoch")
    path = write_yaml(tmp_path / "classifier.yaml", config)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(path, f"output_dir={straight}")

    proc = subprocess.Popen(
        _command(path, f"output_dir={killed}"),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(killed.glob("checkpoint-*/trainer_state.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # this process only, by its pid
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "final").exists()

    resumed = _run(path, f"output_dir={killed}")
    assert "resuming from" in resumed.stdout
    info = json.loads((killed / "training_info.json").read_text())
    assert info["outcome"] == "finished" and info["resumed_from"]
    for name in ("model.safetensors", HEADS_FILE):
        expected = load_file(straight / "final" / name)
        got = load_file(killed / "final" / name)
        assert expected.keys() == got.keys()
        assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    steps = [e["step"] for e in read_metrics(killed / "metrics.jsonl") if "train_loss" in e]
    assert steps == list(range(1, 10))


def test_distillation_learns_the_teachers_labels_not_the_gold_ones(tmp_path: Path) -> None:
    # A teacher that answers every request the opposite way from the gold label, with its
    # probabilities as `generate --scores` writes them: the student must follow the teacher.
    records = [r for rows in load_source("samples").values() for r in rows]
    pairs, rows, gold = [], [], []
    for record in records:
        prompt, response = split_input(record["input"])
        truth = parse_labels(record["output"])["prompt"]
        teacher = "unharmful" if truth == "harmful" else "harmful"
        p = 0.9 if teacher == "harmful" else 0.1
        scores = {"prompt_harmfulness": {"harmful": p, "unharmful": 1 - p}}
        rows.append(prediction_row(prompt, None, teacher, scores=scores))
        pairs.append((prompt, None))
        gold.append(truth == "harmful")
    teacher_dir = tmp_path / "teacher"
    write_predictions(teacher_dir, "AegisSafetyTest", rows)
    config = small_config(
        tmp_path,
        dataset=None,
        teacher_predictions=str(teacher_dir),
        max_samples=None,
        eval_split_ratio=0.0,
        eval_strategy="no",
        save_strategy="no",
        num_train_epochs=4,
        per_device_train_batch_size=16,
        learning_rate=3e-4,
        max_length=32,
    )
    result = run_classifier(config)
    info = json.loads((result.run_dir / "training_info.json").read_text())
    assert info["data"]["source"] == "teacher_predictions"
    assert (
        info["data"]["soft_target_items"]
        == len(records)
        == info["data"]["labels"]["prompt"]["soft"]
    )
    assert info["data"]["labels"]["response"]["labelled"] == 0
    assert "untrained" in info["model"]["heads"]["response"]

    harmful = (_probabilities(result.final_dir, pairs)[:, 0] > 0.5).tolist()
    with_teacher = sum(h != g for h, g in zip(harmful, gold, strict=True)) / len(gold)
    with_gold = sum(h == g for h, g in zip(harmful, gold, strict=True)) / len(gold)
    assert with_teacher >= 0.8 > with_gold
