"""Checkpoints: write atomically, find the newest, keep the last K, restore exact training state.

A checkpoint folder `RUN_DIR/checkpoint-<step>/` holds the model (an adapter for LoRA, full
weights otherwise, in the usual `save_pretrained` layout so it can be loaded like any model) and
the state needed to continue bit-exactly: `optimizer.pt`, `scheduler.pt`, `rng_state.pt` (Python,
NumPy, torch CPU and CUDA generators) and `trainer_state.json` (step, epoch, tokens seen, logging
accumulators, eval history). It is written to a hidden temporary folder and renamed into place,
so a run killed mid-save leaves the previous checkpoint as the newest complete one.

Example:
    >>> from reasonguard.train.checkpoint import latest_checkpoint
    >>> latest_checkpoint("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/checkpoint-20')
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"\A{PREFIX}(\d+)\Z")


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The step of a `checkpoint-<step>` folder name, or None for any other name."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a complete one has its trainer_state.json)."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and checkpoint_step(p) is not None and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(run_dir: str | os.PathLike[str]) -> None:
    """Delete temporary folders left by a run killed while saving."""
    root = Path(run_dir)
    if root.is_dir():
        for path in root.glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    save_model: Callable[[Path], None],
    optimizer_state: dict[str, Any] | None,
    scheduler: Any,
    state: dict[str, Any],
    keep: int | None = None,
    folders: dict[str, Path] | None = None,
) -> Path:
    """Write `RUN_DIR/checkpoint-<step>` atomically, then prune to the newest `keep`.

    Args:
        run_dir: the run directory.
        step: the optimizer step just completed.
        save_model: writes the model (or adapter) into the folder it is given.
        optimizer_state: the optimizer's state dict (by position from a plain optimizer, by
            parameter name from a sharded one: `state["optimizer_format"]` says which); None
            when the optimizer state is in `folders` (DeepSpeed's own files).
        scheduler: its `state_dict()` is saved.
        state: JSON-serialisable trainer state (step, epoch, counters, histories).
        keep: how many checkpoints to keep (None: all).
        folders: finished folders (written by every rank) to move into the checkpoint, by name.

    Returns:
        The checkpoint folder.
    """
    import torch

    root = Path(run_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".{PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    for name, folder in (folders or {}).items():
        shutil.move(str(folder), str(tmp / name))
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(capture_rng_state(), tmp / "rng_state.pt")
    # The state file goes last: its presence is what marks a checkpoint complete.
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_optimizer_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The optimizer state dict saved in a checkpoint."""
    import torch

    # weights_only=False: optimizer state holds plain Python containers written by us.
    return torch.load(Path(checkpoint) / "optimizer.pt", weights_only=False)


def load_training_state(checkpoint: str | os.PathLike[str], scheduler: Any) -> dict:
    """Restore scheduler and RNG state from a checkpoint; return its trainer state (the
    optimizer state is the caller's: `read_optimizer_state`, loaded by its sharding)."""
    import torch

    path = Path(checkpoint)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    restore_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


def read_trainer_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def capture_rng_state() -> dict[str, Any]:
    """Every random generator a training step can draw from (dropout, sampling, shuffles)."""
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
