"""One training run of any stage (`Recipe`) and the function that runs it (`run_recipe`):
`setup() -> train() -> save() -> cleanup()`.

`setup` checks the machine, decides fresh vs resume (`rundir`), loads the data, decides every
`auto` setting once (`plan.decisions`, printed and recorded), builds the Trainer's arguments
before the weights load (`arguments`), then the model and the stage's `GuardTrainer`. `train`
runs the optimizer steps; saving (`saving`) and the record (`record`) follow. What a stage does
differently it says through `parts.StageParts`.
"""

from __future__ import annotations

import os
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.train import checkpoint as ckpt
from reasonguard.train import monitor
from reasonguard.train.engine import process_count
from reasonguard.train.peak_memory import PeakMemory
from reasonguard.train.recipe.arguments import (
    cpu_only,
    process_backend,
    training_arguments,
    true_env,
)
from reasonguard.train.recipe.parts import StageParts
from reasonguard.train.recipe.record import RunRecord
from reasonguard.train.recipe.rundir import (
    FINAL_DIR,
    INFO_FILE,
    TrainResult,
    adopt_state,
    fresh_state,
    result_of_finished,
    resume_decision,
    write_config,
)
from reasonguard.train.recipe.saving import FinalModel


class Recipe(StageParts, FinalModel, RunRecord):
    """One run. Subclasses set `stage`, `trainer_class` and `prepare_data`, and may extend
    the other `StageParts`, `saved_model`, `checkpoint_identity`, `training_info`,
    `loss_description` and `title`."""

    stage = "sft"
    trainer_class: Any = None
    liger_loss = True  # the stage's loss can use liger-kernel's fused linear cross-entropy

    def __init__(self, config: Any) -> None:
        from accelerate import PartialState

        from reasonguard.launch.command import (
            die_with_launcher,
            precision_problem,
            several_gpus_problem,
            unsupported_launch,
            visible_gpus,
            world_size,
        )
        from reasonguard.train.modeling import use_bf16

        problem = (
            unsupported_launch()
            or several_gpus_problem(visible_gpus(), stage=self.stage)
            or precision_problem(use_bf16(config))
        )
        if problem:
            raise UserError(problem)
        if world_size() > 1:
            die_with_launcher()
        self.config = config
        self.run_dir = Path(config.output_dir)
        # Joins the launcher's process group.
        self.process = PartialState(cpu=cpu_only(), **process_backend())
        self.is_main = self.process.is_main_process
        self.world_size = process_count()
        self.finished_before = False
        self.model: Any = None
        self.trainer: Any = None
        self.data: Any = None
        self.monitor: Any = None
        self.status: dict[str, Any] = monitor.base_status(self.run_dir, self.stage)
        self.timings: dict[str, float] = {"setup_seconds": 0.0}
        self.started_at = monitor.now_iso()
        self.warnings: list[str] = []
        self.last_step_tokens = 0

    # ------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Check the machine, decide fresh vs resume, load data, decide, build args and model.

        Raises:
            UserError: the machine cannot run the config, the run dir conflicts with `resume`,
                or the data is invalid; all before any model weights load.
        """
        from transformers import set_seed

        from reasonguard.plan.decisions import format_decisions
        from reasonguard.train.callbacks import (
            RunMonitor,
            reporting_problems,
            resumable_tensorboard,
            show_progress,
        )
        from reasonguard.train.data import steps_per_epoch, total_steps
        from reasonguard.train.engine import quiet_libraries
        from reasonguard.train.modeling import parameter_counts, use_bf16

        c = self.config
        t0 = time.perf_counter()
        problems = self.environment_problems()
        problems += reporting_problems(c.report_to)
        if problems:
            raise UserError("this machine cannot run this config: " + "; ".join(problems))
        self.resume_from, self.finished_before = self._agreed(
            lambda: resume_decision(self.run_dir, self.config)
        )
        if self.finished_before:
            return
        # Read before this session rewrites status.json: the training time of the sessions
        # before, up to where each stopped (a checkpoint only holds it up to its own step).
        earlier_seconds = monitor.recorded_train_seconds(self.run_dir)
        quiet_libraries()
        self.tokenizer = self.load_tokenizer()
        self.data = self.prepare_data()
        self.max_length = self.data.max_length
        self.samples_per_step = c.rows_per_step(self.world_size)
        # A stage without packing (the classifier) has no pack_tokens key.
        self.pack_budget = getattr(c, "pack_tokens", None) or self.data.max_length
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), self.samples_per_step)
        self.total_steps = total_steps(
            len(self.data.train), self.samples_per_step, c.num_train_epochs, c.max_steps
        )
        if self.samples_per_step < self.world_size:
            self.warn(
                f"{self.world_size} processes share steps of {self.samples_per_step} rows: some "
                "have no row to train on (raise effective_batch_size, or use fewer processes)"
            )
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial_checkpoints(self.run_dir)
            write_config(self.run_dir, c, self.stage, self.resume_from, self.warn)
        self.process.wait_for_everyone()
        self.status.update(state="loading model", step=None, total_steps=self.total_steps)
        self.write_status()
        self.bf16 = use_bf16(c)
        self.decisions = self.decide()
        if self.decisions:
            self.print("decisions:\n" + "\n".join(format_decisions(self.decisions)))
        self.run_config = self.effective_config()
        self.state = fresh_state(c)
        if self.resume_from is not None:
            adopt_state(self.state, ckpt.saved_run_state(self.resume_from), c)
            self.state["train_seconds"] = max(self.state["train_seconds"], earlier_seconds)
            self.print(f"resuming from {self.resume_from}")
        self.state["resumed_from"] = self.state["resumed_from"] + (
            [str(self.resume_from)] if self.resume_from else []
        )
        self.micro_batch = self.state["micro_batch_size"]
        args = self.training_arguments()  # before the weights load (ZeRO-3 zero.Init)
        set_seed(c.seed)  # new LoRA weights start the same in every run of this config
        self.model = self.load_model()
        self.trainable_parameters = parameter_counts(self.model)["trainable"]
        self.metrics = monitor.MetricsLog(self.run_dir, self.state["step"], self.is_main)
        self.plateau = monitor.PlateauWatch(
            c.early_warning_patience, self.state["best_eval_loss"], self.state["evals_since_best"]
        )
        self.monitor = RunMonitor(self)
        self.trainer = self.trainer_class(
            model=self.model,
            args=args,
            train_dataset=self.data.train,
            eval_dataset=self.data.eval or None,
            callbacks=[self.monitor],
            recipe=self,
            train_rows=self.data.train,
            eval_rows=self.data.eval,
        )
        resumable_tensorboard(
            self.trainer, self.run_dir, self.state["step"] + 1 if self.resume_from else None
        )
        show_progress(self.trainer, self.is_main)
        if true_env("ACCELERATE_USE_FSDP") and not self.trainer.is_fsdp_enabled:
            self.warn(
                "the launch asked for FSDP, which accelerate enables on GPUs only: these CPU "
                "processes train as DDP (a full replica each, the same weights)"
            )
        self.after_setup()
        self.timings["setup_seconds"] = time.perf_counter() - t0

    def training_arguments(self) -> Any:
        """The Trainer's arguments (`arguments.training_arguments`) for this run."""
        return training_arguments(
            self.run_config,
            run_dir=self.run_dir,
            total_steps=self.total_steps,
            bf16=self.bf16,
            evaluates=bool(self.data.eval),
            is_main=self.is_main,
        )

    def _agreed(self, fn: Any) -> Any:
        """`fn()` on rank 0, its result on every rank."""
        if self.world_size == 1:
            return fn()
        from accelerate.utils import broadcast_object_list

        box = [fn() if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    # ------------------------------------------------------------------------------ train

    def train(self) -> None:
        """Run the optimizer steps from the current step to the end (Trainer.train).

        Raises:
            NonFiniteLossError: the loss or gradient norm became NaN/inf (nothing was updated).
            UserError: out of memory with no smaller micro-batch to try.
        """
        started, before = time.perf_counter(), self.state["train_seconds"]
        try:
            self.trainer.train(
                resume_from_checkpoint=str(self.resume_from) if self.resume_from else None
            )
        finally:  # the monitor keeps it current at each step; this adds the session's ends
            self.timings["train_seconds"] = time.perf_counter() - started  # this session's
            self.state["train_seconds"] = before + self.timings["train_seconds"]
        s = self.state
        if (
            self.data.eval
            and self.config.eval_strategy != "no"
            and s["last_eval_step"] != s["step"]
        ):
            self.trainer.evaluate()  # the final eval loss of training_info.json
        self.peak_memory = self.gathered_peak_memory()

    def count_step(self, rows: list[Any]) -> None:
        """Called by the trainer after each optimizer step's passes."""
        self.memory.sample()
        self.last_step_tokens = sum(len(r) for r in rows)
        self.state["tokens_seen"] += self.last_step_tokens
        self.state["label_tokens_seen"] += sum(r.num_labels for r in rows)

    def train_log_extras(self) -> dict[str, Any]:
        """The run's own fields of each train log (`GuardTrainer.log` adds them)."""
        return self.monitor.log_extras()

    def last_checkpoint(self) -> Path | None:
        return ckpt.latest_checkpoint(self.run_dir)

    def checkpoint_names(self) -> list[str]:
        return [p.name for p in ckpt.list_checkpoints(self.run_dir)]

    @cached_property
    def memory(self) -> PeakMemory:
        """This process's peak memory readings (`train.peak_memory`)."""
        return PeakMemory()

    # ------------------------------------------------------------------------------ messages

    def warn(self, message: str) -> None:
        """Record a warning and print it (rank 0)."""
        self.warnings.append(message)
        self.status.setdefault("warnings", []).append(message)
        if self.is_main:
            print(f"warning: {message}", file=sys.stderr)

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def write_status(self) -> None:
        if self.is_main and self.run_dir.is_dir():
            monitor.write_status(self.run_dir, self.status)


def run_recipe(recipe: Recipe) -> TrainResult:
    """Set up, train, save and record one run of any stage.

    Raises:
        UserError: bad data or config, a machine that cannot run it, NaN loss, out of memory.
    """
    try:
        recipe.setup()
        if recipe.finished_before:
            recipe.print(
                f"{recipe.run_dir} already holds this finished run; its model: {recipe.run_dir / FINAL_DIR}"
            )
            return result_of_finished(recipe.run_dir)
        recipe.train()
        recipe.save()
    except BaseException as exc:
        try:
            recipe.cleanup(exc)
        except Exception as cleanup_error:  # never hide the error that stopped training
            print(f"warning: could not record the stopped run: {cleanup_error}", file=sys.stderr)
        if isinstance(exc, KeyboardInterrupt) and recipe.data is not None:
            raise KeyboardInterrupt(monitor.resume_hint(recipe.status)) from None
        raise
    recipe.cleanup()
    s = recipe.state
    recipe.print(f"final model: {recipe.final_dir}")
    recipe.print(f"run info:    {recipe.run_dir / INFO_FILE}")
    return TrainResult(
        recipe.run_dir, recipe.final_dir, s["step"], s["last_train_loss"], s["last_eval_loss"]
    )


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers forks warn otherwise
