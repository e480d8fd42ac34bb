"""Reporting goes through Trainer's own `report_to` integrations: TensorBoard by default, written
under RUN_DIR/logs with the run's own fields (tokens/s, tokens seen), purged past the resumed step;
an integration that is unknown or not installed is refused before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from reasonguard.errors import UserError
from reasonguard.train.sft import run_sft
from test_train_support import tiny_config


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def test_tensorboard_is_trainers_integration_with_the_runs_fields(tmp_path: Path) -> None:
    result = run_sft(tiny_config(tmp_path, rows=10, report_to="tensorboard", save_steps=100))
    scalars = _scalars(result.run_dir / "logs")
    assert "train/loss" in scalars and "eval/loss" in scalars
    # Fields only the run computes reach the integration too (GuardTrainer.log adds them).
    assert "train/tokens_per_second" in scalars and "train/tokens_seen" in scalars
    steps = [step for step, _ in scalars["train/tokens_seen"]]
    seen = [value for _, value in scalars["train/tokens_seen"]]
    assert steps == sorted(steps) and seen == sorted(seen) and seen[0] > 0


def test_no_reporting_writes_no_event_files(tmp_path: Path) -> None:
    result = run_sft(
        tiny_config(tmp_path, rows=6, report_to="none", eval_split_ratio=0.0, eval_strategy="no")
    )
    assert not list(result.run_dir.glob("logs/events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("report_to", "expected"),
    [
        ("tensorbord", "unknown integration 'tensorbord'"),
        ("none,tensorboard", "`none` cannot be combined"),
    ],
)
def test_a_bad_integration_is_refused_before_loading(
    tmp_path: Path, report_to: str, expected: str
) -> None:
    with pytest.raises(UserError, match=expected):
        run_sft(tiny_config(tmp_path, report_to=report_to))
    assert not (tmp_path / "run" / "final").exists()


def test_an_integration_that_is_not_installed_is_named(tmp_path: Path) -> None:
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    missing = sorted(set(INTEGRATION_TO_CALLBACK) - set(get_available_reporting_integrations()))
    assert missing, "every reporting integration is installed here"
    with pytest.raises(UserError, match=f"{missing[0]} is not installed"):
        run_sft(tiny_config(tmp_path, report_to=missing[0]))
