"""What a local folder given as a model holds: a model, an adapter, a tokenizer, or a training run.

A training run's folder (`output_dir`) holds `config.yaml`, `status.json`, the `checkpoint-<step>`
folders and, once finished, `final/`; the model is inside it, not the folder itself. Handing the
run folder to transformers ends in a tokenizer traceback that says nothing of this, so a folder
that holds no model is named for what it is, with the folder to use instead.

Example:
    >>> from reasonguard.folders import check_model_folder
    >>> check_model_folder("runs/demo/model")  # doctest: +SKIP
    UserError: runs/demo/model is a training run folder, not a model: its trained model is
    runs/demo/model/final
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError

# Any of these makes a folder loadable by transformers or peft (a tokenizer alone is a
# tokenizer source, as `llama3-tokenizer` is).
MODEL_FILES = ("config.json", "adapter_config.json", "tokenizer_config.json", "tokenizer.json")
RUN_FILES = ("config.yaml", "status.json", "training_info.json", "metrics.jsonl")
FINAL_DIR = "final"
# `transformers.Trainer`'s checkpoint folders; complete once their trainer_state.json exists.
_CHECKPOINT_RE = re.compile(r"\Acheckpoint-(\d+)\Z")


def checkpoints_of(run_dir: Path) -> list[Path]:
    """The complete `checkpoint-<step>` folders of a run folder, oldest first."""
    found = [
        (int(m.group(1)), p)
        for p in run_dir.iterdir()
        if p.is_dir()
        and (m := _CHECKPOINT_RE.match(p.name))
        and (p / "trainer_state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def checkpoint_run_config(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The training config (`config.yaml`, written before step 0) of the run a
    `checkpoint-<step>` folder belongs to, or None for any other folder.

    Checkpoints of runs trained before checkpoints carried `reasonguard.json` have only this to
    say how they were prompted.
    """
    import yaml

    path = Path(folder)
    config = path.parent / "config.yaml"
    if not _CHECKPOINT_RE.match(path.name) or not config.is_file():
        return None
    try:
        loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` looks like a training run's `output_dir` (not a model inside it)."""
    return (
        (folder / FINAL_DIR).is_dir()
        or bool(checkpoints_of(folder))
        or any((folder / name).is_file() for name in RUN_FILES)
    )


def check_model_folder(path: str | os.PathLike[str]) -> None:
    """Refuse a local folder that holds no model, naming the model folder to use instead.

    Raises:
        UserError: a training run folder (its `final/` named, or its newest checkpoint while the
            run has not finished), or a folder with none of `MODEL_FILES`.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir() or any((folder / name).is_file() for name in MODEL_FILES):
        return
    if is_run_folder(folder):
        final = folder / FINAL_DIR
        if (final / "config.json").is_file() or (final / "adapter_config.json").is_file():
            raise UserError(
                f"{path} is a training run folder, not a model: its trained model is {final} "
                f"(use --model {final})"
            )
        checkpoints = checkpoints_of(folder)
        if checkpoints:
            raise UserError(
                f"{path} is a training run folder without a final model yet (the run has not "
                f"finished): its newest checkpoint is {checkpoints[-1]}; use that, or finish "
                "the run with the same `reasonguard train` command"
            )
        raise UserError(
            f"{path} is a training run folder with no model saved yet (no {FINAL_DIR}/ and no "
            "checkpoint-<step>/ folder)"
        )
    raise UserError(
        f"{path} holds no model: a model folder has config.json (full weights) or "
        "adapter_config.json (a LoRA adapter), as a training run's final/ folder does"
    )
