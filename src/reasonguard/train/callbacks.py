"""What a run reports while it trains, as one `transformers.TrainerCallback`.

`RunMonitor` turns the Trainer's events into the run directory's live files (rank 0 only):

- `metrics.jsonl`: one JSON object per log (`train_loss`, `learning_rate`, `grad_norm`,
  `tokens_per_second`, `tokens_seen`, ...) and per evaluation (`eval_loss`, ...); on resume the
  events after the resumed step are dropped, so the file reads as one uninterrupted run;
- TensorBoard scalars under `logs/` (`report_to: tensorboard`), purged past the resumed step;
- `status.json` for `reasonguard runs status` (step, losses, tokens/s, ETA, checkpoints);
- a plateau warning when the eval loss has not improved for `early_warning_patience` evaluations;
- `save_strategy: both`: a checkpoint at every epoch end besides the `save_steps` ones;
- `save_total_limit`: the newest checkpoints by step are kept.

Its state (the recipe's counters) is saved in every checkpoint's `trainer_state.json` (it is an
`ExportableState`), which is how a resumed run continues its counts.

Example:
    >>> from reasonguard.train.callbacks import RunMonitor
    >>> RunMonitor.__mro__[1].__name__
    'TrainerCallback'
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from reasonguard.train import checkpoint as ckpt
from reasonguard.train import monitor

RECENT_LOSSES = 10  # logged train losses averaged in status.json's train_loss


class RunMonitor(TrainerCallback, ExportableState):
    """Writes metrics.jsonl, TensorBoard, status.json for one recipe (module docstring)."""

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe
        self.meter: monitor.Throughput | None = None
        self._step_started = 0.0
        self._window_steps = 0
        self._recent: list[float] = []  # the last logged train losses, for status.json

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": dict(self.recipe.state)}

    # ---------------------------------------------------------------------------- events

    def on_train_begin(self, args, state, control, **kwargs):
        r = self.recipe
        self.meter = monitor.Throughput(state.global_step, r.total_steps)
        r.status.update(state="running", step=state.global_step, total_steps=r.total_steps)
        r.write_status()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        r = self.recipe
        tokens = r.last_step_tokens
        r.state["step"] = state.global_step
        self.meter.update(state.global_step, tokens, time.perf_counter() - self._step_started)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.recipe.config.save_strategy == "both":
            control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        r = self.recipe
        logs = logs or {}
        step = state.global_step
        epoch = round(step / r.steps_per_epoch, 4)
        if "loss" in logs:
            r.state["last_train_loss"] = logs["loss"]
            event = {
                "step": step,
                "epoch": epoch,
                "train_loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_second": self.meter.tokens_per_second() if self.meter else None,
                "tokens_seen": r.state["tokens_seen"],
                "elapsed_seconds": round(self.meter.elapsed(), 2) if self.meter else None,
                **r.log_fields(),
            }
            if self.meter:
                self.meter.reset_window()
            self._write(event, "train", step)
            # One logged loss can come from a step of a single row (an epoch's last); status
            # shows the mean of the last few, and the last one beside it.
            self._recent = [*self._recent, logs["loss"]][-RECENT_LOSSES:]
            r.status.update(
                step=step,
                train_loss=sum(self._recent) / len(self._recent),
                train_loss_logs_averaged=len(self._recent),
                last_logged_train_loss=logs["loss"],
                learning_rate=logs.get("learning_rate"),
                tokens_per_second=event["tokens_per_second"],
                eta_seconds=self.meter.eta_seconds() if self.meter else None,
            )
            r.write_status()
        if "eval_loss" in logs:
            self._evaluated(step, epoch, logs)

    def _evaluated(self, step: int, epoch: float, logs: dict[str, Any]) -> None:
        r = self.recipe
        eval_loss = logs["eval_loss"]
        s = r.state
        s["last_eval_loss"], s["last_eval_step"] = eval_loss, step
        warning = r.plateau.update(eval_loss)
        s["best_eval_loss"], s["evals_since_best"] = r.plateau.best, r.plateau.since_best
        extra = {k: v for k, v in logs.items() if k.startswith("eval_") and k != "eval_loss"}
        self._write({"step": step, "epoch": epoch, "eval_loss": eval_loss, **extra}, "eval", step)
        r.print(
            f"step {step}/{r.total_steps} | eval loss {eval_loss:.4f} (best {r.plateau.best:.4f})"
        )
        if warning:
            r.warn(warning)
        r.status.update(eval_loss=eval_loss, best_eval_loss=r.plateau.best, **extra)
        r.write_status()

    def on_save(self, args, state, control, **kwargs):
        r = self.recipe
        keep = r.config.save_total_limit
        if keep and r.is_main:  # the newest `save_total_limit` checkpoints, by step
            for old in ckpt.list_checkpoints(r.run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        r.status["checkpoints"] = r.checkpoint_names()
        r.write_status()

    # ---------------------------------------------------------------------------- files

    def _write(self, event: dict[str, Any], group: str, step: int) -> None:
        r = self.recipe
        r.metrics.append(event)
        names = {"train_loss": "loss", "eval_loss": "loss"}
        r.tensorboard.scalars(
            {
                f"{group}/{names.get(k, k.removeprefix('eval_'))}": v
                for k, v in event.items()
                if k not in ("step", "tokens_seen", "elapsed_seconds")
                and isinstance(v, int | float)
            },
            step,
        )
