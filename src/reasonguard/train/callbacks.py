"""What a run reports while it trains, as `transformers.TrainerCallback`s.

`RunMonitor` turns the Trainer's events into the run directory's live files (rank 0 only):

- `metrics.jsonl`: one JSON object per log (`train_loss`, `learning_rate`, `grad_norm`,
  `tokens_per_second`, `tokens_seen`, ...) and per evaluation (`eval_loss`, ...); on resume the
  events after the resumed step are dropped, so the file reads as one uninterrupted run;
- `status.json` for `reasonguard runs status` (step, losses, tokens/s, elapsed training time
  of every session, ETA, checkpoints);
- a plateau warning when the eval loss has not improved for `early_warning_patience` evaluations;
- `save_strategy: both`: a checkpoint at every epoch end besides the `save_steps` ones;
- `save_total_limit`: the newest checkpoints by step number are kept. Trainer's own rotation
  (transformers 5.19, `Trainer._save_checkpoint`) orders them by modification time, and a resumed
  DeepSpeed run touches the checkpoint it loads, which would then count as the newest;
- every checkpoint gets the tokenizer and `reasonguard.json`, so it is served as trained.

Reporting (TensorBoard, wandb, mlflow, ...) is Trainer's own `report_to` integrations; the run's
extra fields reach them through `GuardTrainer.log`, and on resume the TensorBoard writer purges the
events a killed run wrote after the checkpoint it resumes from.

Its state (the recipe's counters) is saved in every checkpoint's `trainer_state.json` (it is an
`ExportableState`), which is how a resumed run continues its counts: the training seconds of
every session (kept current at each step, so a checkpoint carries the time up to its step) and
the last logged train losses that status.json's train loss averages.

`show_progress` sets what the terminal shows while it trains: Trainer's own tqdm bar (step k/N,
elapsed, ETA) on a terminal, one plain line per logged step elsewhere (`ProgressLines`).

Example:
    >>> from reasonguard.train.callbacks import RunMonitor
    >>> RunMonitor.__mro__[1].__name__
    'TrainerCallback'
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any

from tqdm import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState, PrinterCallback, ProgressCallback

from reasonguard.train import checkpoint as ckpt
from reasonguard.train import monitor

RECENT_LOSSES = 10  # logged train losses averaged in status.json's train_loss


class RunMonitor(TrainerCallback, ExportableState):
    """Writes metrics.jsonl and status.json for one recipe (module docstring)."""

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe
        self.meter: monitor.Throughput | None = None
        self._step_started = 0.0
        self._window_steps = 0
        self._recent: list[float] = []  # the last logged train losses, for status.json
        self._seconds_before = 0.0  # training seconds of the sessions before this one
        self.extra_names: list[str] = []

    def log_extras(self) -> dict[str, Any]:
        """The run's fields of a train log: throughput, tokens seen, elapsed, the stage's own."""
        r = self.recipe
        values = {
            "tokens_per_second": self.meter.tokens_per_second() if self.meter else None,
            "tokens_seen": r.state["tokens_seen"],
            "elapsed_seconds": round(self.meter.elapsed(), 2) if self.meter else None,
            **r.log_fields(),
        }
        self.extra_names = list(values)
        return {k: v for k, v in values.items() if v is not None}  # integrations log numbers

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": dict(self.recipe.state)}

    # ---------------------------------------------------------------------------- events

    def on_train_begin(self, args, state, control, **kwargs):
        r = self.recipe
        self.meter = monitor.Throughput(state.global_step, r.total_steps)
        # A resumed run goes on from the counts of the sessions before it.
        self._seconds_before = r.state["train_seconds"]
        self._recent = list(r.state.get("recent_train_losses") or [])[-RECENT_LOSSES:]
        r.status.update(
            state="running",
            step=state.global_step,
            total_steps=r.total_steps,
            elapsed_seconds=round(self._seconds_before, 2),
        )
        r.write_status()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        r = self.recipe
        tokens = r.last_step_tokens
        r.state["step"] = state.global_step
        self.meter.update(state.global_step, tokens, time.perf_counter() - self._step_started)
        r.state["train_seconds"] = self._seconds_before + self.meter.elapsed()

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
                **{k: logs.get(k) for k in self.extra_names},
            }
            if self.meter:
                self.meter.reset_window()
            r.metrics.append(event)
            # One logged loss can come from a step of a single row (an epoch's last); status
            # shows the mean of the last few, and the last one beside it.
            self._recent = [*self._recent, logs["loss"]][-RECENT_LOSSES:]
            r.state["recent_train_losses"] = list(self._recent)
            r.status.update(
                elapsed_seconds=round(r.state["train_seconds"], 2),
                step=step,
                train_loss=sum(self._recent) / len(self._recent),
                train_loss_logs_averaged=len(self._recent),
                last_logged_train_loss=logs["loss"],
                learning_rate=logs.get("learning_rate"),
                tokens_per_second=event.get("tokens_per_second"),
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
        r.metrics.append({"step": step, "epoch": epoch, "eval_loss": eval_loss, **extra})
        r.print(
            f"step {step}/{r.total_steps} | eval loss {eval_loss:.4f} (best {r.plateau.best:.4f})"
        )
        if warning:
            r.warn(warning)
        r.status.update(eval_loss=eval_loss, best_eval_loss=r.plateau.best, **extra)
        r.write_status()

    def on_save(self, args, state, control, **kwargs):
        r = self.recipe
        # The Trainer has just written checkpoint-<step>: the record makes it servable as trained.
        r.record_checkpoint(r.run_dir / f"{ckpt.PREFIX}{state.global_step}")
        keep = r.config.save_total_limit
        if keep and r.is_main:  # the newest `save_total_limit` checkpoints, by step
            for old in ckpt.list_checkpoints(r.run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        r.status["checkpoints"] = r.checkpoint_names()
        r.write_status()


def reporting_problems(report_to: list[str]) -> list[str]:
    """What is wrong with a config's `report_to` on this machine (empty when nothing): unknown
    integration names, and known ones whose package is not installed. Checked before the model
    loads, since Trainer would only fail once it is built."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = [n for n in report_to if n not in ("none", "all")]
    if "none" in report_to and len(report_to) > 1:
        return ["config key 'report_to': `none` cannot be combined with other integrations"]
    problems = []
    installed = set(get_available_reporting_integrations())
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
            problems.append(
                f"config key 'report_to': unknown integration {name!r} (known: {known})"
            )
        elif name not in installed:
            problems.append(
                f"config key 'report_to': {name} is not installed (pip install {name}), "
                "or leave it out of report_to"
            )
    return problems


def resumable_tensorboard(trainer: Any, run_dir: Any, resumed_step: int | None) -> None:
    """Point Trainer's TensorBoard integration at RUN_DIR/logs, and on resume hide the events a
    killed run wrote after the checkpoint it resumes from (`purge_step`)."""
    from transformers.integrations import TensorBoardCallback

    if not trainer.is_world_process_zero():
        return  # the integration writes nothing on the other ranks
    if trainer.pop_callback(TensorBoardCallback) is None:
        return  # TensorBoard is not in report_to
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / monitor.TENSORBOARD_DIR), purge_step=resumed_step)
    trainer.add_callback(TensorBoardCallback(tb_writer=writer))


# -------------------------------------------------------------------------------- progress


class ProgressBar(ProgressCallback):
    """Trainer's own progress bar (tqdm: step k/N, elapsed, ETA, s/it) with the last logged
    loss on the bar, instead of a printed dict per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)


class ProgressLines(TrainerCallback):
    """Where no terminal shows a bar (a log file, a pipe): one plain line per logged step,
    `step 7/19 (37%) | elapsed 00:21 | ETA 00:36 | loss 2.21`, on stderr."""

    def __init__(self) -> None:
        self._started = 0.0
        self._first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._started, self._first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or "loss" not in (logs or {}):
            return
        step, total = state.global_step, state.max_steps
        elapsed = time.perf_counter() - self._started
        done = step - self._first_step  # this session's steps (a resumed run starts later)
        eta = tqdm.format_interval(elapsed / done * (total - step)) if done > 0 else "?"
        print(
            f"step {step}/{total} ({100 * step // max(total, 1)}%) | elapsed "
            f"{tqdm.format_interval(elapsed)} | ETA {eta} | loss {logs['loss']:.4g}",
            file=sys.stderr,
            flush=True,
        )


def show_progress(trainer: Any, is_main: bool) -> None:
    """Replace the Trainer's printed log dicts (`PrinterCallback`, or the dicts its progress bar
    writes) with `ProgressBar` on a terminal and `ProgressLines` elsewhere; nothing off rank 0."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if is_main:
        trainer.add_callback(ProgressBar() if sys.stderr.isatty() else ProgressLines())
