"""Watching a run: metrics log, live status file, ETA, NaN guard, eval-plateau warning, loss curve.

Everything a second terminal (`reasonguard runs status RUN_DIR`) or a later reader
needs is written here, and nothing here knows which stage (SFT or DPO) is running.

- `metrics.jsonl`: one JSON object per logging or eval event (`{"step", "train_loss", ...}`);
- `status.json`: the live state, rewritten atomically at each logging step;
- `loss_curve.png`: train and eval loss against the step, drawn at the end.

Example:
    >>> from reasonguard.train.monitor import check_finite, format_duration
    >>> format_duration(3725)
    '1h02m'
    >>> check_finite(float("nan"), step=7, last_checkpoint=None)
    Traceback (most recent call last):
    ...
    reasonguard.train.monitor.NonFiniteLossError: the training loss became nan at step 7 ...
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError

STATUS_FILE = "status.json"
INFO_FILE = "training_info.json"  # the run record the recipe writes at its end
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "logs"


class NonFiniteLossError(UserError):
    """The loss (or gradient norm) became NaN or infinite; training stopped before the update."""


def check_finite(
    value: float,
    step: int,
    last_checkpoint: str | os.PathLike[str] | None,
    what: str = "training loss",
) -> None:
    """Raise `NonFiniteLossError` when `value` is NaN or infinite, saying what to do next.

    Called before the optimizer applies the step, so the weights in memory and every checkpoint
    on disk are still the last good ones.
    """
    if math.isfinite(value):
        return
    kept = (
        f"the last good checkpoint is {last_checkpoint} (untouched)"
        if last_checkpoint
        else "no checkpoint was written before it"
    )
    raise NonFiniteLossError(
        f"the {what} became {value} at step {step}; training stopped before applying that "
        f"update, {kept}. Usual causes: a learning rate too high (lower learning_rate or add "
        "warmup_steps), fp16 overflow, or a corrupted row. Resume with the same command "
        "(resume: auto) after changing the config"
    )


def format_duration(seconds: float | None) -> str:
    """`42s`, `7m05s`, `1h02m`, `3d04h`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


class Throughput:
    """Tokens/s of the training steps and the run's ETA, measured in this process.

    Tokens/s counts only the time spent in training steps (eval and checkpoint pauses would make
    it jump); the ETA uses the average wall time per step, which includes them.
    """

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.start_step = start_step
        self.total_steps = total_steps
        self.started = time.perf_counter()
        self.step = start_step
        self._window_tokens = 0
        self._window_seconds = 0.0

    def update(self, step: int, tokens: int, seconds: float) -> None:
        """Record a finished step: its non-pad token count and its compute time."""
        self.step = step
        self._window_tokens += tokens
        self._window_seconds += seconds

    def tokens_per_second(self) -> float:
        """Over the steps since the last `reset_window`."""
        return self._window_tokens / self._window_seconds if self._window_seconds > 0 else 0.0

    def reset_window(self) -> None:
        self._window_tokens = 0
        self._window_seconds = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta_seconds(self) -> float | None:
        done = self.step - self.start_step
        if done <= 0:
            return None
        return self.elapsed() / done * (self.total_steps - self.step)


class PlateauWatch:
    """Warn when the eval loss has not improved for `patience` evaluations (0 disables)."""

    def __init__(self, patience: int, best: float | None = None, since_best: int = 0) -> None:
        self.patience = patience
        self.best = best
        self.since_best = since_best

    def update(self, eval_loss: float) -> str | None:
        """Record an eval loss; return a warning message when the plateau threshold is hit."""
        if self.best is None or eval_loss < self.best:
            self.best, self.since_best = eval_loss, 0
            return None
        self.since_best += 1
        if self.patience and self.since_best == self.patience:
            return (
                f"eval loss has not improved for {self.patience} evaluations "
                f"(best {self.best:.4f}, now {eval_loss:.4f}): check learning_rate, or stop "
                "early and use the best checkpoint"
            )
        return None

    def state(self) -> dict[str, Any]:
        return {"best_eval_loss": self.best, "evals_since_best": self.since_best}


# --------------------------------------------------------------------------------------------
# Files


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, out)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def base_status(run_dir: str | os.PathLike[str], stage: str) -> dict[str, Any]:
    """The fields of status.json that identify the process (updated_at is set on write)."""
    return {
        "stage": stage,
        "state": "starting",
        "run_dir": str(Path(run_dir).resolve()),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": now_iso(),
    }


def write_status(run_dir: str | os.PathLike[str], status: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / STATUS_FILE, {**status, "updated_at": now_iso()})


def read_status(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The status of a run directory.

    Raises:
        UserError: no status.json (not a run directory, or training has not started yet); when
            a sub-folder holds one (`runs/demo` -> `runs/demo/model`), the message names it.
    """
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        runs = runs_below(run_dir)
        if runs:
            others = f" (other runs here: {', '.join(map(str, runs[1:]))})" if runs[1:] else ""
            raise UserError(
                f"{run_dir}: no {STATUS_FILE}; did you mean {runs[0]}?{others} A run's "
                f"{STATUS_FILE} lies in its output_dir"
            )
        raise UserError(
            f"{run_dir}: no {STATUS_FILE}; not a reasonguard run directory, or its training has "
            "not reached step 0 yet"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: unreadable status file: {exc}") from exc


def recorded_train_seconds(run_dir: str | os.PathLike[str]) -> float:
    """The training seconds of every session so far, as the run directory last recorded them
    (status.json's `elapsed_seconds`, training_info.json's `train_seconds_all_sessions`); 0 for
    a new run. A session that stopped after its last checkpoint recorded the time it trained
    past it, which that checkpoint does not hold."""
    found = [0.0]
    for name, keys in (
        (STATUS_FILE, ("elapsed_seconds",)),
        (INFO_FILE, ("timings", "train_seconds_all_sessions")),
    ):
        try:
            value: Any = json.loads((Path(run_dir) / name).read_text())
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
        except (OSError, ValueError):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            found.append(float(value))
    return max(found)


def resume_hint(status: dict[str, Any]) -> str:
    """What to do about a stopped run (status.json's fields): the command that resumes it and
    where it continues from."""
    stage, run_dir = status.get("stage", "sft"), status.get("run_dir", ".")
    checkpoints = status.get("checkpoints") or []
    command = f"reasonguard train {stage} --config {Path(run_dir) / 'config.yaml'}"
    step, total = status.get("step"), status.get("total_steps")
    where = f"stopped at step {step}/{total}; " if step is not None and total else ""
    if not checkpoints:
        return (
            f"{where}no checkpoint was written yet, so the same command (or `{command}`) starts "
            "the run over"
        )
    return f"{where}run the same command again (or `{command}`) to resume from {checkpoints[-1]}"


def runs_below(folder: str | os.PathLike[str], depth: int = 2) -> list[Path]:
    """Run directories (with a status.json) inside `folder`, the shallowest first, up to
    `depth` levels down; hidden folders and checkpoints are not looked into."""
    found: list[Path] = []
    level = [Path(folder)]
    for _ in range(depth):
        below = []
        for parent in level:
            try:
                children = sorted(p for p in parent.iterdir() if p.is_dir())
            except OSError:
                continue
            for child in children:
                if child.name.startswith((".", "checkpoint-")):
                    continue
                (found if (child / STATUS_FILE).is_file() else below).append(child)
        if found:
            return found
        level = below
    return found


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gpu_memory() -> dict[str, float] | None:
    """CUDA memory of this process in GiB (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    gib = 1024**3
    return {
        "allocated_gib": round(torch.cuda.memory_allocated() / gib, 2),
        "reserved_gib": round(torch.cuda.memory_reserved() / gib, 2),
        "max_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
        "max_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2),
        "total_gib": round(
            torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / gib, 2
        ),
    }


class MetricsLog:
    """Append-only `metrics.jsonl`; on resume, events after the resumed step are dropped.

    `enabled=False` (every process but the first of a multi-process run) writes nothing.
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], resume_step: int = 0, enabled: bool = True
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled:
            kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))

    def append(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(event) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Events of a metrics.jsonl (missing file: none; a torn last line is skipped)."""
    file = Path(path)
    if not file.is_file():
        return []
    events = []
    for line in file.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def plot_loss_curve(
    events: Iterable[dict[str, Any]], path: str | os.PathLike[str], title: str = ""
) -> Path | None:
    """Draw train and eval loss against the step into a PNG; None when there is nothing to draw."""
    events = list(events)
    train = [(e["step"], e["train_loss"]) for e in events if e.get("train_loss") is not None]
    evals = [(e["step"], e["eval_loss"]) for e in events if e.get("eval_loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in a headless job
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per output token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def oom_message(micro_batch: int, max_length: int, gradient_checkpointing: bool) -> str:
    """What to change after a CUDA out-of-memory error, with the current values."""
    tips = []
    if micro_batch > 1:
        tips.append(
            f"per_device_train_batch_size={max(1, micro_batch // 2)} (now {micro_batch}; raise "
            "gradient_accumulation_steps to keep the effective batch), or auto_micro_batch=true"
        )
    if not gradient_checkpointing:
        tips.append("gradient_checkpointing=true")
    shorter = max(256, max_length // 2 // 128 * 128)
    tips.append(f"max_length={shorter} (now {max_length}; longer rows are cut)")
    return "CUDA out of memory. Settings that would fit in less memory: " + "; ".join(tips)
