"""Checkpoints of a run directory: find the complete ones, drop the partial ones, read our state.

`transformers.Trainer` writes `RUN_DIR/checkpoint-<step>/`: the model (an adapter for LoRA, full
weights otherwise, in the `save_pretrained` layout, loadable like any model), `optimizer.pt`,
`scheduler.pt`, `rng_state.pth` (one per process when there are several), `training_args.bin`
and, last, `trainer_state.json`. Its presence is what marks a checkpoint complete: a run killed
while saving leaves a folder without it, which `remove_partial_checkpoints` deletes before a
resume. reasonguard's own counters (tokens seen, eval history, micro-batch after an
out-of-memory retry) travel inside `trainer_state.json` as the state of its run-monitor callback
(`saved_run_state`).

Example:
    >>> from reasonguard.train.checkpoint import latest_checkpoint
    >>> latest_checkpoint("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/checkpoint-20')
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MONITOR_STATE = "RunMonitor"  # the callback class whose state holds reasonguard's counters
_CHECKPOINT_RE = re.compile(rf"\A{PREFIX}(\d+)\Z")


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The step of a `checkpoint-<step>` folder name, or None for any other name."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def _checkpoint_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    root = Path(run_dir)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a complete one has its trainer_state.json)."""
    found = [p for p in _checkpoint_dirs(run_dir) if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(run_dir: str | os.PathLike[str]) -> None:
    """Delete checkpoint folders a run killed while saving left without their trainer state."""
    for path in _checkpoint_dirs(run_dir):
        if not (path / STATE_FILE).is_file():
            shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def saved_run_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """reasonguard's counters saved in a checkpoint ({} for a checkpoint without them)."""
    saved = read_trainer_state(checkpoint).get("stateful_callbacks", {}).get(MONITOR_STATE, {})
    if isinstance(saved, list):
        saved = saved[-1] if saved else {}
    return dict(saved.get("attributes", {}))
