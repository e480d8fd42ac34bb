"""A training run's directory: the files in it, and what a run decides from what it finds there.

A run directory holds the resolved `config.yaml` (written before the model loads), checkpoints,
`final/` and `training_info.json`. Before a run starts, `resume_decision` reads it: `resume:
never` refuses a directory that already holds a run, `auto` continues from the newest checkpoint
or recognises a finished run of the same config (and does not train it again), and a checkpoint
folder is checked to be one. The run state a checkpoint carries (`checkpoint.saved_run_state`)
is adopted here too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.train import checkpoint as ckpt
from reasonguard.train import monitor
from reasonguard.train.config import read_yaml, save_config

CONFIG_FILE = "config.yaml"
INFO_FILE = monitor.INFO_FILE
FINAL_DIR = "final"

# Config keys that do not change the weights a run produces: resuming with another value is fine.
HARMLESS_ON_RESUME = {
    "output_dir",
    "resume",
    "logging_steps",
    "report_to",
    "eval_strategy",
    "eval_steps",
    "per_device_eval_batch_size",
    "early_warning_patience",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "auto_micro_batch",
    "debug_nan_at_step",
}


@dataclass
class TrainResult:
    """What a finished (or already finished) run left behind."""

    run_dir: Path
    final_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None


def result_of_finished(run_dir: Path) -> TrainResult:
    """The `TrainResult` of a run that finished before, from its training_info.json."""
    info = json.loads((run_dir / INFO_FILE).read_text())
    return TrainResult(
        run_dir,
        run_dir / FINAL_DIR,
        info["steps_completed"],
        info["final_train_loss"],
        info["final_eval_loss"],
    )


def run_finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run: its final model and a training_info.json that
    says `finished`."""
    info = run_dir / INFO_FILE
    if not (run_dir / FINAL_DIR).is_dir() or not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("outcome") == "finished"
    except json.JSONDecodeError:
        return False


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys, set in both configs, whose values differ and change the trained weights."""
    return [k for k in new if k not in HARMLESS_ON_RESUME and k in old and old[k] != new[k]]


def resume_decision(run_dir: Path, config: Any) -> tuple[Path | None, bool]:
    """(the checkpoint to continue from or None, whether the run already finished).

    Raises:
        UserError: `resume: never` on a directory that holds a run, a finished run of another
            config, or a `resume` folder that is no checkpoint or one of another finetuning.
    """
    c = config
    ckpt.remove_partial_checkpoints(run_dir)
    existing = ckpt.list_checkpoints(run_dir)
    if c.resume == "never":
        if existing or (run_dir / FINAL_DIR).exists():
            raise UserError(
                f"{run_dir} already holds checkpoints or a final model and resume is "
                "'never': delete that folder or choose another output_dir"
            )
        return None, False
    if c.resume == "auto":
        if run_finished(run_dir):
            check_same_config(run_dir, config)
            return None, True
        return (existing[-1] if existing else None), False
    path = Path(c.resume)
    if not (path / ckpt.STATE_FILE).is_file():
        raise UserError(
            f"config key 'resume': {path} is not a checkpoint folder (no {ckpt.STATE_FILE}); "
            "allowed values: auto, never, or a checkpoint-<step> folder"
        )
    saved = ckpt.saved_run_state(path).get("finetuning")
    if saved and saved != c.finetuning:
        raise UserError(
            f"config key 'resume': {path} was written by a {saved} run, this config is "
            f"finetuning: {c.finetuning}"
        )
    return path, False


def check_same_config(run_dir: Path, config: Any) -> None:
    """Refuse a finished run whose config.yaml differs from `config` in a key that matters."""
    path = run_dir / CONFIG_FILE
    changed = changed_keys(read_yaml(path) if path.is_file() else {}, config.to_dict())
    if changed:
        raise UserError(
            f"{run_dir} holds a finished run with a different config ({', '.join(changed)}); "
            "choose another output_dir, or delete that folder to train again"
        )


def write_config(
    run_dir: Path,
    config: Any,
    stage: str,
    resume_from: Path | None,
    warn: Callable[[str], Any],
) -> None:
    """Write the resolved config.yaml (with the command that reruns it); when resuming, `warn`
    about keys that changed since the run started."""
    path = run_dir / CONFIG_FILE
    if resume_from is not None and path.is_file():
        changed = changed_keys(read_yaml(path), config.to_dict())
        if changed:
            warn(
                f"resuming with a different {', '.join(changed)} than the run started with; "
                "the result will differ from an uninterrupted run"
            )
    save_config(
        config,
        path,
        header=f"# Resolved config of this run; rerun with:\n"
        f"#   reasonguard train {stage} --config {path}",
    )


def fresh_state(config: Any) -> dict[str, Any]:
    """The run state of a run that starts at step 0 (what each checkpoint saves of it)."""
    return {
        "step": 0,
        "finetuning": config.finetuning,
        "micro_batch_size": config.per_device_train_batch_size,
        "configured_micro_batch_size": config.per_device_train_batch_size,
        "tokens_seen": 0,
        "label_tokens_seen": 0,
        "micro_batches": 0,
        "last_train_loss": None,
        "recent_train_losses": [],
        "last_eval_loss": None,
        "last_eval_step": None,
        "best_eval_loss": None,
        "evals_since_best": 0,
        "train_seconds": 0.0,
        "resumed_from": [],
    }


def adopt_state(state: dict[str, Any], saved: dict[str, Any], config: Any) -> None:
    """Take over a checkpoint's saved run state into `state`."""
    state.update(saved)
    if saved.get("configured_micro_batch_size") != config.per_device_train_batch_size:
        # The config changed the micro-batch: it wins over a size an OOM retry chose.
        state["micro_batch_size"] = config.per_device_train_batch_size
        state["configured_micro_batch_size"] = config.per_device_train_batch_size
