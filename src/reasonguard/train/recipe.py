"""One training run of any stage, around `transformers.Trainer`: `setup() -> train() -> save() -> cleanup()`.

The stages (`train.sft`, `train.dpo.stage`) say how their data is prepared and which `GuardTrainer`
subclass trains it; this module owns what every run does the same way:

- **the run directory**: resume decisions (`resume: auto | never | checkpoint-N`), the resolved
  `config.yaml` written before the model loads, a finished run recognised (and not retrained),
  partial checkpoints dropped;
- **decisions**: every `auto` setting decided once from the data and the machine, printed and
  recorded (`plan.decisions`);
- **the Trainer's arguments** from the config (Hugging Face names carried over 1:1), built before
  the weights load, so DeepSpeed ZeRO-3 loads them partitioned (`zero.Init`) and FSDP's
  `cpu_ram_efficient_loading` applies;
- **the record**: `final/` (the model or adapter, its tokenizer and `reasonguard.json`),
  `training_info.json`, `loss_curve.png` and the last `status.json`, after success or failure.

Only rank 0 writes files; every rank reads the checkpoint the run resumes from.

Example:
    >>> from reasonguard.train.recipe import INFO_FILE
    >>> INFO_FILE
    'training_info.json'
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.train import checkpoint as ckpt
from reasonguard.train import monitor
from reasonguard.train.config import read_yaml, save_config
from reasonguard.train.engine import process_count
from reasonguard.train.peak_memory import PeakMemory, memory_fields

CONFIG_FILE = "config.yaml"
INFO_FILE = monitor.INFO_FILE
FINAL_DIR = "final"

# Config keys that do not change the weights a run produces: resuming with another value is fine.
_HARMLESS_ON_RESUME = {
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


class Recipe:
    """One run. Subclasses set `stage`, `trainer_class` and `prepare_data`, and may extend
    `after_setup`, `saved_model`, `training_info`, `loss_description` and `title`."""

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
        self.process = PartialState(cpu=_cpu_only(), **_backend())
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
        self.resume_from, self.finished_before = self._agreed(self._resume_decision)
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
            self._write_config()
        self.process.wait_for_everyone()
        self.status.update(state="loading model", step=None, total_steps=self.total_steps)
        self.write_status()
        self.bf16 = use_bf16(c)
        self.decisions = self.decide()
        if self.decisions:
            self.print("decisions:\n" + "\n".join(format_decisions(self.decisions)))
        self.run_config = self.effective_config()
        self.state = self._fresh_state()
        if self.resume_from is not None:
            self._adopt_state(ckpt.saved_run_state(self.resume_from))
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
        if _true_env("ACCELERATE_USE_FSDP") and not self.trainer.is_fsdp_enabled:
            self.warn(
                "the launch asked for FSDP, which accelerate enables on GPUs only: these CPU "
                "processes train as DDP (a full replica each, the same weights)"
            )
        self.after_setup()
        self.timings["setup_seconds"] = time.perf_counter() - t0

    def environment_problems(self) -> list[str]:
        """What stops this config on this machine (`modeling.environment_problems`, plus what
        the launch's sharding cannot do); loads nothing."""
        from reasonguard.train.modeling import environment_problems

        return environment_problems(self.config) + self.sharding_problems()

    def load_tokenizer(self) -> Any:
        """The run's tokenizer (with the configured chat template)."""
        from reasonguard.train.modeling import load_training_tokenizer

        return load_training_tokenizer(self.config)

    def effective_config(self) -> Any:
        """The config with the run's decisions in place of `auto` (what the model loader reads)."""
        from reasonguard.plan.decisions import effective_config

        return effective_config(self.config, self.decisions)

    def load_model(self) -> Any:
        """The model to train (base plus adapters, or full weights), on its device."""
        from reasonguard.train.modeling import load_model

        return load_model(self.run_config, self.bf16)

    def sharding_problems(self) -> list[str]:
        """What this config cannot do when the launch shards the model (FSDP, DeepSpeed)."""
        from reasonguard.launch.command import uses_deepspeed

        sharded = _true_env("ACCELERATE_USE_FSDP") or uses_deepspeed()
        if sharded and self.config.finetuning == "qlora":
            return [
                "finetuning: qlora trains one model copy per GPU (4-bit weights are not sharded "
                "here): launch it with DDP (--sharding ddp, configs/accelerate/ddp.yaml), or use "
                "finetuning: lora / full with FSDP or DeepSpeed"
            ]
        return []

    def training_arguments(self) -> Any:
        """The Trainer's arguments: the config's Hugging Face settings, one step per batch."""
        from transformers import TrainingArguments

        from reasonguard.train.modeling import cuda_available, warmup_steps

        c = self.run_config
        save = {"both": "steps"}.get(c.save_strategy, c.save_strategy)
        return TrainingArguments(
            output_dir=str(self.run_dir),
            max_steps=self.total_steps,
            per_device_train_batch_size=1,  # one batch = one optimizer step's rows (engine.py)
            gradient_accumulation_steps=1,
            per_device_eval_batch_size=c.per_device_eval_batch_size,
            learning_rate=c.learning_rate,
            weight_decay=c.weight_decay,
            adam_beta1=c.adam_beta1,
            adam_beta2=c.adam_beta2,
            adam_epsilon=c.adam_epsilon,
            max_grad_norm=c.max_grad_norm,
            lr_scheduler_type=c.lr_scheduler_type,
            warmup_steps=warmup_steps(c, self.total_steps),
            optim=c.optim,
            seed=c.seed,
            bf16=self.bf16,
            use_cpu=_cpu_only() and not cuda_available(),
            logging_steps=c.logging_steps,
            logging_first_step=True,
            report_to=c.report_to,
            eval_strategy=c.eval_strategy if self.data.eval else "no",
            eval_steps=c.eval_steps,
            save_strategy=save,
            save_steps=c.save_steps,
            # Kept by step number in the run monitor (transformers orders by mtime, which a
            # resumed DeepSpeed run touches on the checkpoint it loads).
            save_total_limit=None,
            save_only_model=False,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            ddp_find_unused_parameters=False,
            disable_tqdm=not self.is_main or None,
            deepspeed=self._deepspeed_config(),
            ddp_backend=_backend().get("backend"),
        )

    def _deepspeed_config(self) -> dict[str, Any] | None:
        """Under a DeepSpeed launch: the launcher's DeepSpeed config (its YAML's settings or its
        JSON file), with the batch keys one optimizer step per batch needs; None otherwise.
        The other `auto` values (optimizer, clipping, precision) are filled by transformers from
        the training arguments."""
        from reasonguard.launch.command import uses_deepspeed

        if not uses_deepspeed():
            return None
        import copy

        from accelerate.utils import DeepSpeedPlugin

        config = copy.deepcopy(DeepSpeedPlugin().deepspeed_config)
        config.update(
            train_micro_batch_size_per_gpu=1,
            gradient_accumulation_steps=1,  # the accumulation is the engine's, within a step
        )
        # Left for DeepSpeed to derive (micro x accumulation x processes): transformers would
        # fill it before the process group is known.
        config.pop("train_batch_size", None)
        # The launcher's settings are in `config` now; accelerate would refuse them twice.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        return config

    def decide(self) -> dict[str, Any]:
        """The run's decisions (`plan.decisions.resolve`) from its training rows' lengths."""
        from reasonguard.plan.decisions import resolve

        rows = self.data.train
        return resolve(
            self.config,
            self.bf16,
            [len(r) for r in rows],
            [r.num_labels for r in rows],
            self.pack_budget_tokens(),
            stage_supports_liger=self.liger_loss,
        )

    def pack_budget_tokens(self) -> int:
        """Tokens of one packed micro-batch (for the memory estimate)."""
        return self.pack_budget

    def prepare_data(self) -> Any:
        raise NotImplementedError

    def after_setup(self) -> None:
        """Called once the trainer exists."""

    def _agreed(self, fn: Any) -> Any:
        """`fn()` on rank 0, its result on every rank."""
        if self.world_size == 1:
            return fn()
        from accelerate.utils import broadcast_object_list

        box = [fn() if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _resume_decision(self) -> tuple[Path | None, bool]:
        """(the checkpoint to continue from or None, whether the run already finished)."""
        c = self.config
        ckpt.remove_partial_checkpoints(self.run_dir)
        existing = ckpt.list_checkpoints(self.run_dir)
        if c.resume == "never":
            if existing or (self.run_dir / FINAL_DIR).exists():
                raise UserError(
                    f"{self.run_dir} already holds checkpoints or a final model and resume is "
                    "'never': delete that folder or choose another output_dir"
                )
            return None, False
        if c.resume == "auto":
            if _finished(self.run_dir):
                self._check_same_config()
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

    def _check_same_config(self) -> None:
        path = self.run_dir / CONFIG_FILE
        changed = _changed_keys(read_yaml(path) if path.is_file() else {}, self.config.to_dict())
        if changed:
            raise UserError(
                f"{self.run_dir} holds a finished run with a different config ({', '.join(changed)}); "
                "choose another output_dir, or delete that folder to train again"
            )

    def _write_config(self) -> None:
        path = self.run_dir / CONFIG_FILE
        if self.resume_from is not None and path.is_file():
            changed = _changed_keys(read_yaml(path), self.config.to_dict())
            if changed:
                self.warn(
                    f"resuming with a different {', '.join(changed)} than the run started with; "
                    "the result will differ from an uninterrupted run"
                )
        save_config(
            self.config,
            path,
            header=f"# Resolved config of this run; rerun with:\n"
            f"#   reasonguard train {self.stage} --config {path}",
        )

    def _fresh_state(self) -> dict[str, Any]:
        return {
            "step": 0,
            "finetuning": self.config.finetuning,
            "micro_batch_size": self.config.per_device_train_batch_size,
            "configured_micro_batch_size": self.config.per_device_train_batch_size,
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

    def _adopt_state(self, saved: dict[str, Any]) -> None:
        self.state.update(saved)
        if saved.get("configured_micro_batch_size") != self.config.per_device_train_batch_size:
            # The config changed the micro-batch: it wins over a size an OOM retry chose.
            self.state["micro_batch_size"] = self.config.per_device_train_batch_size
            self.state["configured_micro_batch_size"] = self.config.per_device_train_batch_size

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
        self.peak_memory = self._peak_memory()

    def count_step(self, rows: list[Any]) -> None:
        """Called by the trainer after each optimizer step's passes."""
        self.memory.sample()
        self.last_step_tokens = sum(len(r) for r in rows)
        self.state["tokens_seen"] += self.last_step_tokens
        self.state["label_tokens_seen"] += sum(r.num_labels for r in rows)

    def train_log_extras(self) -> dict[str, Any]:
        """The run's own fields of each train log (`GuardTrainer.log` adds them)."""
        return self.monitor.log_extras()

    def log_fields(self) -> dict[str, float]:
        """Extra fields of each train log event (DPO: reward accuracy and margin)."""
        return {}

    def last_checkpoint(self) -> Path | None:
        return ckpt.latest_checkpoint(self.run_dir)

    def checkpoint_names(self) -> list[str]:
        return [p.name for p in ckpt.list_checkpoints(self.run_dir)]

    @cached_property
    def memory(self) -> PeakMemory:
        """This process's peak memory readings (`train.peak_memory`)."""
        return PeakMemory()

    def _peak_memory(self) -> dict[str, Any]:
        """Each rank's memory (GiB): its peaks (`train.peak_memory`: resident set; on a GPU
        torch's allocated and reserved, and NVML's reading) and the model state it holds
        (weights; optimizer master copies and moments): what sharding divides. Collective:
        every rank sends its own."""
        gib = 1024**3
        peaks = self.memory.reading()
        state = model_state_bytes(self.trainer.model_wrapped, self.trainer.optimizer)
        readings = {
            **{k: v or 0.0 for k, v in peaks.items()},
            "weights": state["weights"] / gib,
            "optimizer": state["optimizer"] / gib,
        }
        world, rank = self.world_size, self.trainer._rank
        mine = [0.0] * (len(readings) * world)
        for i, value in enumerate(readings.values()):
            mine[i * world + rank] = value
        every = self.trainer._sum(mine)
        columns = {k: every[i * world : (i + 1) * world] for i, k in enumerate(readings)}
        available = {k: v is not None for k, v in peaks.items()}
        return memory_fields(columns, available, self.memory.measured())

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

    # ------------------------------------------------------------------------------ save

    def save(self) -> Path:
        """Write the trained model (adapter or full weights), tokenizer and guard record to
        `RUN_DIR/final`, atomically. Collective: sharded weights are gathered on rank 0."""
        import torch

        from reasonguard.models import end_of_turn_ids, write_guard_config

        final = self.run_dir / FINAL_DIR
        self.final_dir = final
        state_dict = self.trainer.accelerator.get_state_dict(self.trainer.model_wrapped)
        if not self.is_main:
            self.process.wait_for_everyone()
            return final
        tmp = self.run_dir / f".{FINAL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        eos_ids = end_of_turn_ids(self.tokenizer)
        model, finetuning, base_model = self.saved_model()
        if finetuning == "full":
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None:
                # Generation must stop at the end-of-turn token the model was trained to emit.
                generation_config.eos_token_id = eos_ids
                generation_config.pad_token_id = self.tokenizer.pad_token_id
            if state_dict is not None and getattr(model.config, "tie_word_embeddings", False):
                # The head is the embedding: stored once, as save_pretrained does for a model
                # (an engine's gathered state dict can hold it as a separate tensor).
                state_dict.pop("lm_head.weight", None)
            if self.bf16 and state_dict is not None:
                # The fp32 master weights were for exact updates; the model is used (and was
                # trained) in bf16, and half the size on disk.
                state_dict = {
                    k: v.to(torch.bfloat16) if v.is_floating_point() else v
                    for k, v in state_dict.items()
                }
        if model is not self.model:  # a merged copy: its own weights
            state_dict = None
        model.save_pretrained(tmp, state_dict=state_dict)
        self.tokenizer.save_pretrained(tmp)
        write_guard_config(tmp, **self.guard_record(finetuning, base_model))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.process.wait_for_everyone()
        return final

    def guard_record(self, finetuning: str, base_model: str) -> dict[str, Any]:
        """The `reasonguard.json` fields of a model this run saves (`models.write_guard_config`):
        how to prompt it, what it was trained from, where generation stops."""
        from reasonguard.models import end_of_turn_ids
        from reasonguard.train.modeling import nf4_base_record

        return {
            "prompt_format": self.config.prompt_format,
            "base_model": base_model,
            "finetuning": finetuning,
            "stage": self.stage,
            "max_length": self.data.max_length,
            "eos_token_ids": end_of_turn_ids(self.tokenizer),
            "chat_template": self.config.chat_template,
            **self.fast_mode_record(),
            # A QLoRA adapter is served on the 4-bit base it was trained on.
            **({"quantization": nf4_base_record(self.bf16)} if finetuning == "qlora" else {}),
        }

    def checkpoint_identity(self) -> tuple[str, str] | None:
        """(finetuning, base model) to record in a checkpoint, or None when a checkpoint cannot
        be served on its own (see the DPO stage). A checkpoint holds what `save` would save
        unmerged: the trained adapter on the run's base, or the full weights."""
        _, finetuning, base_model = self.saved_model()
        return finetuning, base_model

    def record_checkpoint(self, checkpoint: Path) -> None:
        """Make a checkpoint servable as trained: its tokenizer and `reasonguard.json` beside the
        weights the Trainer wrote (rank 0), so `load_guard(checkpoint)` prompts it in the run's
        format, with the run's chat template."""
        from reasonguard.models import write_guard_config

        identity = self.checkpoint_identity()
        if not self.is_main or identity is None or not checkpoint.is_dir():
            return
        self.tokenizer.save_pretrained(checkpoint)
        write_guard_config(checkpoint, **self.guard_record(*identity))

    def fast_mode_record(self) -> dict[str, Any]:
        """The dual-mode facts of reasonguard.json: the fast-mode marker the model learned (from
        this run's `reasoning_dropout`, or inherited from the model it started from)."""
        from reasonguard.format import FAST_MODE_MARKER
        from reasonguard.models import read_guard_config, resolve_model

        fraction = getattr(self.config, "reasoning_dropout", 0.0)
        if fraction:
            return {"fast_mode_marker": FAST_MODE_MARKER, "reasoning_dropout": fraction}
        start = Path(resolve_model(self.config.model_name_or_path))
        record = (read_guard_config(start) if start.is_dir() else None) or {}
        if record.get("fast_mode_marker"):
            return {
                "fast_mode_marker": record["fast_mode_marker"],
                "reasoning_dropout": record.get("reasoning_dropout"),
            }
        return {}

    def saved_model(self) -> tuple[Any, str, str]:
        """(model to save, finetuning to record, base model to record). The finetuning is the
        one trained (`lora` when `qlora_fallback_to_lora` chose a bf16 base), not the configured."""
        c = getattr(self, "run_config", None) or self.config
        return self.model, c.finetuning, c.model_name_or_path

    # ------------------------------------------------------------------------------ cleanup

    def cleanup(self, error: BaseException | None = None) -> None:
        """Close the logs; write training_info.json, the loss curve and the final status.

        Runs after success and after failure (NaN, OOM, Ctrl-C), so a stopped run still says why.
        """
        if self.data is None or not self.is_main:
            return
        if error is None:
            outcome, message = "finished", None
        elif isinstance(error, KeyboardInterrupt):
            outcome, message = "interrupted", "stopped by the user (Ctrl-C)"
        else:
            outcome, message = "failed", str(error)
        events = monitor.read_metrics(self.run_dir / monitor.METRICS_FILE)
        monitor.plot_loss_curve(events, self.run_dir / monitor.LOSS_CURVE_FILE, title=self.title())
        monitor.write_json_atomic(self.run_dir / INFO_FILE, self.training_info(outcome, message))
        self.status.update(state=outcome, message=message, checkpoints=self.checkpoint_names())
        s = getattr(self, "state", {})
        self.status.update(
            step=s.get("step", self.status.get("step")),
            elapsed_seconds=round(s.get("train_seconds", 0.0), 2),
        )
        if outcome != "finished":
            self.status.update(eta_seconds=None)  # a stopped run has no time left to estimate
        if outcome == "finished":
            self.status.update(eta_seconds=0, final_dir=str(self.run_dir / FINAL_DIR))
        monitor.write_status(self.run_dir, self.status)

    def title(self) -> str:
        c = self.config
        return f"R-SFT {c.model_name_or_path} ({c.finetuning}, {c.prompt_format})"

    def loss_description(self) -> str:
        return "token-normalised cross-entropy over output tokens, per optimizer step"

    def training_info(self, outcome: str, message: str | None) -> dict[str, Any]:
        from reasonguard import __version__
        from reasonguard.launch.runinfo import environment_info

        c, s = self.config, getattr(self, "state", {})
        return {
            "stage": self.stage,
            "reasonguard_version": __version__,
            "outcome": outcome,
            "message": message,
            "run_dir": str(self.run_dir.resolve()),
            "final_dir": str((self.run_dir / FINAL_DIR).resolve())
            if outcome == "finished"
            else None,
            "config": c.to_dict(),
            "plan": self.plan_info(),
            "data": self.data.stats,
            "model": self.model_info(),
            **environment_info(),
            "timings": {
                "started_at": self.started_at,
                "finished_at": monitor.now_iso(),
                **{k: round(v, 2) for k, v in self.timings.items()},
                "train_seconds_all_sessions": round(s.get("train_seconds", 0.0), 2),
            },
            "steps_completed": s.get("step", 0),
            # Forward/backward passes of each rank (the same on every rank): above the steps,
            # gradients were accumulated over several micro-batches per step.
            "micro_batches_per_rank": s.get("micro_batches", 0),
            "tokens_seen": {
                "total": s.get("tokens_seen", 0),
                "labelled": s.get("label_tokens_seen", 0),
            },
            "memory_per_rank": getattr(self, "peak_memory", None),
            "final_train_loss": s.get("last_train_loss"),
            "final_eval_loss": s.get("last_eval_loss"),
            "best_eval_loss": s.get("best_eval_loss"),
            "resumed_from": s.get("resumed_from", []),
            "warnings": self.warnings,
        }

    def plan_info(self) -> dict[str, Any]:
        """The `plan` of training_info.json: steps, batch, length, packing, processes."""
        from reasonguard.train.modeling import warmup_steps

        c, trainer = self.config, self.trainer
        return {
            "samples_per_step": self.samples_per_step,
            "micro_batch_size": c.per_device_train_batch_size,
            "micro_batch_size_used": getattr(trainer, "micro_batch", None),
            "gradient_accumulation_steps": c.accumulation_for(self.world_size),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": warmup_steps(c, self.total_steps),
            "max_length": self.data.max_length,
            "packing": c.packing,
            "pack_tokens": self.pack_budget if c.packing else None,
            "processes": self.world_size,
            "distributed": _distributed(trainer, self.process),
        }

    def model_info(self) -> dict[str, Any]:
        """The `model` of training_info.json: what was trained, how, with which decisions."""
        from reasonguard.launch.allocenv import decision as allocator_decision
        from reasonguard.models import resolve_model
        from reasonguard.train.modeling import parameter_counts

        c = self.config
        run_config = getattr(self, "run_config", None)
        decisions = getattr(self, "decisions", None)
        optimizer = getattr(self.trainer, "optimizer", None) if self.trainer is not None else None
        return {
            "base": c.model_name_or_path,
            "resolved": resolve_model(c.model_name_or_path),
            "finetuning": c.finetuning,
            "parameters": parameter_counts(self.model) if self.model is not None else None,
            "bf16": getattr(self, "bf16", None),
            "device": str(self.process.device),
            "gradient_checkpointing": (
                run_config.gradient_checkpointing if run_config else c.gradient_checkpointing
            ),
            "optimizer": _optimizer_name(optimizer),
            "cpu_allocator": allocator_decision(),
            "decisions": {k: d.to_dict() for k, d in decisions.items()} if decisions else None,
            "loss": self.loss_description(),
        }


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
            return _result_of_finished(recipe.run_dir)
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


def _result_of_finished(run_dir: Path) -> TrainResult:
    info = json.loads((run_dir / INFO_FILE).read_text())
    return TrainResult(
        run_dir,
        run_dir / FINAL_DIR,
        info["steps_completed"],
        info["final_train_loss"],
        info["final_eval_loss"],
    )


def model_state_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes of model state this process holds: `weights` (its parameters, or its shards of
    them) and `optimizer` (master copies the optimizer keeps apart from the model's parameters,
    as DeepSpeed's fp32 partitions, plus every state tensor: AdamW's moments)."""
    import torch

    def local(t: Any) -> int:
        if hasattr(t, "to_local"):  # an FSDP2 DTensor: this rank's shard
            t = t.to_local()
        t = getattr(t, "ds_tensor", None) if hasattr(t, "ds_tensor") else t  # ZeRO-3 partition
        return 0 if t is None else t.numel() * t.element_size()

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's / DeepSpeed's wrapper
    own = {id(p) for p in model.parameters()}
    weights = sum(local(p) for p in model.parameters())
    groups = getattr(inner, "param_groups", [])
    masters = sum(local(p) for g in groups for p in g["params"] if id(p) not in own)
    moments = sum(
        local(v)
        for st in getattr(inner, "state", {}).values()
        for v in (st.values() if isinstance(st, dict) else [])
        if torch.is_tensor(v)
    )
    return {"weights": weights, "optimizer": masters + moments}


def _optimizer_name(optimizer: Any) -> str | None:
    from reasonguard.launch.runinfo import optimizer_name

    return None if optimizer is None else optimizer_name(optimizer)


def _cpu_only() -> bool:
    """Whether accelerate should run this process on the CPU. Not under DeepSpeed: accelerate
    drops DeepSpeed from CPU-only states, while DeepSpeed runs on CPU processes itself (its CPU
    accelerator, with gloo)."""
    import torch

    from reasonguard.launch.command import forced_cpu, uses_deepspeed

    if uses_deepspeed():
        return False
    return forced_cpu() or not torch.cuda.is_available()


def _distributed(trainer: Any, process: Any) -> str:
    """How the processes share the work: NO, MULTI_CPU / MULTI_GPU (DDP), FSDP or DEEPSPEED."""
    if trainer is not None and getattr(trainer, "is_deepspeed_enabled", False):
        return "DEEPSPEED"
    if trainer is not None and getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    return str(process.distributed_type).split(".")[-1]


def _true_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _backend() -> dict[str, str]:
    """DeepSpeed on CPU processes needs gloo named: accelerate finds no backend without a GPU."""
    import torch

    from reasonguard.launch.command import uses_deepspeed

    return {"backend": "gloo"} if uses_deepspeed() and not torch.cuda.is_available() else {}


def _finished(run_dir: Path) -> bool:
    info = run_dir / INFO_FILE
    if not (run_dir / FINAL_DIR).is_dir() or not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("outcome") == "finished"
    except json.JSONDecodeError:
        return False


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in new if k not in _HARMLESS_ON_RESUME and k in old and old[k] != new[k]]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers forks warn otherwise
