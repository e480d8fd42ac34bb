"""Reasoning SFT (GuardReasoner stage 1): teach a model to reason, then answer the three tasks.

Run it:

    reasonguard train sft --config configs/demo-cpu.yaml [key=value ...] [--dry-run]

One file, shaped `setup() -> train() -> save() -> cleanup()` around an explicit PyTorch loop.
Why not HF Trainer / TRL SFTTrainer: the loss must be normalised per output token over the whole
accumulated step (not averaged per micro-batch), the LM head must run only where labels are, and
packed rows (issue 5) need per-sample `position_ids`; resume must restore the exact data order,
RNG and micro-batch size; an out-of-memory step must be retried with a smaller micro-batch inside
the same optimizer step. Each of these is a few lines in a plain loop and a fight with a trainer's
callbacks. The loop defines a step by its *rows* (`samples_per_step`), so the micro-batch size
can change (OOM) or the rows can be split over processes (issue 7) without changing the maths.

Loss: next-token cross-entropy on the output tokens only (the prompt is labelled -100 by
`data.tokenize.encode_records`), including the end-of-turn token, so the model learns to stop.

Run directory (`output_dir`) after a finished LoRA / QLoRA run:

    RUN_DIR/
      config.yaml            the resolved config (every field), written before step 0
      status.json            live progress, read by `reasonguard runs status RUN_DIR`
      metrics.jsonl          one JSON object per logging / eval event
      logs/                  TensorBoard event files (report_to: tensorboard)
      checkpoint-<step>/     the newest save_total_limit checkpoints, each holding
                             README.md adapter_config.json adapter_model.safetensors
                             optimizer.pt rng_state.pt scheduler.pt trainer_state.json
      final/                 the trained model, loadable as is:
                             README.md adapter_config.json adapter_model.safetensors
                             chat_template.jinja reasonguard.json tokenizer.json
                             tokenizer_config.json
      training_info.json     config, data stats, git commit, versions, hardware, timings,
                             tokens seen, final train / eval loss, and the run's decisions
                             (`model.decisions`: checkpointing, quantization, liger, compile,
                             attention, bf16, CPU allocator; see `train.decisions`)
      loss_curve.png         train and eval loss against the step

With `finetuning: full`, checkpoints and `final/` hold `config.json generation_config.json
model.safetensors` (bf16 when trained with bf16, else fp32; checkpoints always fp32, for exact
resume; possibly sharded) instead of the three adapter files. `final/
reasonguard.json` records the prompt format, so inference prompts the model as it was trained.

Several processes (one per GPU, or `--num-processes N --cpu`): see `reasonguard.train.distributed`.
Each rank trains on its share of every step's rows, the loss is normalised by the whole step's
label count and the gradients are summed across ranks before clipping, so the optimizer steps
are those of one process; only rank 0 logs and writes files.

Testing hook: `debug_nan_at_step=N` makes the loss of step N NaN, to exercise the NaN guard (it
stops before that update and leaves the last checkpoint untouched).

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.train.sft import run_sft
    >>> result = run_sft(load_config("configs/demo-cpu.yaml", ["output_dir=runs/try"]))  # doctest: +SKIP
    >>> result.final_dir  # doctest: +SKIP
    PosixPath('runs/try/final')
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.train import checkpoint as ckpt
from reasonguard.train import monitor
from reasonguard.train.config import SFTConfig, read_yaml, save_config
from reasonguard.train.data import (
    SFTData,
    collate,
    collate_packed,
    micro_batches,
    pack,
    prepare,
    step_plan,
    steps_per_epoch,
    total_steps,
)
from reasonguard.train.decisions import effective_config, format_decisions, resolve
from reasonguard.train.distributed import Processes, mixed_precision_note, step_seed
from reasonguard.train.modeling import (
    build_optimizer,
    build_scheduler,
    device,
    environment_problems,
    labelled_loss_sum,
    liger_labelled_loss_sum,
    load_model,
    load_training_tokenizer,
    parameter_counts,
    use_bf16,
    warmup_steps,
)
from reasonguard.train.sharding import make_sharding
from reasonguard.train.zero import SHARDS_DIR

STAGE = "sft"
CONFIG_FILE = "config.yaml"
INFO_FILE = "training_info.json"
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
class SFTResult:
    """What a finished (or already finished) run left behind."""

    run_dir: Path
    final_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None


class SFTRecipe:
    """One R-SFT run. Call `setup()`, `train()`, `save()`, then `cleanup()` (see `run_sft`).

    Stage 2 (`reasonguard.train.dpo.DPORecipe`) reuses the loop, checkpoints, logging and run
    record, overriding the hooks `_prepare_data`, `_after_model_loaded`, `_train_step`,
    `evaluate`, `_micro_batches` and `_loss_description`.
    """

    stage = STAGE
    liger_loss = True  # the stage's loss can use liger-kernel's fused linear cross-entropy

    def __init__(self, config: SFTConfig) -> None:
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.dist = Processes.from_env()  # one process unless started by a launcher
        self.loss_fn = labelled_loss_sum  # an attribute so tests can inject failures
        self.finished_before = False
        self.model: Any = None
        self.tokenizer: Any = None
        self.data: SFTData | None = None
        self.tensorboard: monitor.TensorBoard | None = None
        self.status: dict[str, Any] = monitor.base_status(self.run_dir, self.stage)
        self.timings: dict[str, float] = {
            "setup_seconds": 0.0,
            "eval_seconds": 0.0,
            "checkpoint_seconds": 0.0,
        }
        self.started_at = monitor.now_iso()
        self.warnings: list[str] = []

    # ------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Check the machine, decide fresh vs resume, load data, model and optimizer state.

        Raises:
            UserError: the machine cannot run the config, the run dir conflicts with `resume`,
                or the data is invalid; all before any model weights load.
        """
        c = self.config
        t0 = time.perf_counter()
        problems = environment_problems(c)
        if problems:
            raise UserError("this machine cannot run this config: " + "; ".join(problems))
        self.dist.start()  # joins the process group under a launcher; checks the launch
        # Rank 0 decides and every rank follows (they must resume from the same checkpoint).
        self.resume_from, self.finished_before = self.dist.decide(
            lambda: (self._resume_checkpoint(), self.finished_before)
        )
        if self.finished_before:
            return
        _quiet_libraries()
        _seed_everything(c.seed)
        self.tokenizer = load_training_tokenizer(c)
        self.data = self._prepare_data()
        self.samples_per_step = c.rows_per_step(self.dist.world_size)
        self.pack_budget = c.pack_tokens or self.data.max_length
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), self.samples_per_step)
        self.total_steps = total_steps(
            len(self.data.train), self.samples_per_step, c.num_train_epochs, c.max_steps
        )

        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial_checkpoints(self.run_dir)
            self._write_config()
        # A status before the (possibly minutes-long) model load, for `runs status`.
        self.status.update(state="loading model", step=None, total_steps=self.total_steps)
        self._write_status()
        self.bf16 = use_bf16(c)
        if self.dist.enabled:
            self._check_world_size()
            note = mixed_precision_note(self.bf16)
            if note:
                self._warn(note)
        self.device = device()
        # Every `auto` decided once, before the weights load (rank 0 decides for all ranks).
        self.decisions = self.dist.decide(self._decide)
        self._print("decisions:\n" + "\n".join(format_decisions(self.decisions)))
        self.run_config = effective_config(c, self.decisions)
        if self.decisions["liger"].value and self.loss_fn is labelled_loss_sum:
            self.loss_fn = liger_labelled_loss_sum
        self.sharding = make_sharding(self.dist)
        self.sharding.check(self.run_config, {"merges_adapter": self._merges_adapter_on_save()})
        self.model = load_model(self.run_config, self.bf16, checkpoint=self.resume_from)
        # Every rank starts from rank 0's weights (equal already: same seed, same files).
        self.dist.broadcast_parameters([p for p in self.model.parameters() if p.requires_grad])
        self.model = self.sharding.wrap(self.model, self.bf16)
        self.optimizer = build_optimizer(self.model, c)
        self.scheduler = build_scheduler(self.optimizer, c, self.total_steps)
        self.optimizer = self.sharding.attach_optimizer(self.optimizer, self.scheduler, c)
        self._after_model_loaded()
        self.state = self._fresh_state()
        if self.resume_from is not None:
            self._load_optimizer(self.resume_from)
            # Last: loading the model may draw random numbers; the saved RNG state wins.
            saved = ckpt.load_training_state(self.resume_from, self.scheduler)
            self._adopt_state(saved)
            self._print(
                f"resuming from {self.resume_from} (step {self.state['step']}/{self.total_steps})"
            )
        self.state["resumed_from"] = self.state.get("resumed_from", []) + (
            [str(self.resume_from)] if self.resume_from else []
        )
        self.micro_batch = self.state["micro_batch_size"]
        self.last_checkpoint = ckpt.latest_checkpoint(self.run_dir)
        self.metrics = monitor.MetricsLog(self.run_dir, self.state["step"], self.dist.is_main)
        self.tensorboard = monitor.TensorBoard(
            self.run_dir,
            c.report_to == "tensorboard" and self.dist.is_main,
            purge_step=self.state["step"] + 1 if self.resume_from else None,
        )
        self.plateau = monitor.PlateauWatch(
            c.early_warning_patience, self.state["best_eval_loss"], self.state["evals_since_best"]
        )
        self.timings["setup_seconds"] = time.perf_counter() - t0
        self.status.update(
            state="running",
            step=self.state["step"],
            total_steps=self.total_steps,
            num_train_epochs=self.total_steps / self.steps_per_epoch,
            checkpoints=self._checkpoint_names(),
        )
        self._write_status()

    def _merges_adapter_on_save(self) -> bool:
        """Whether save() folds an adapter into the base (needs the whole model in one place)."""
        return False

    def _load_optimizer(self, checkpoint: Path) -> None:
        fmt = ckpt.read_trainer_state(checkpoint).get("optimizer_format")
        self.sharding.load_optimizer(checkpoint, fmt)

    def _decide(self) -> dict[str, Any]:
        """The run's decisions (`train.decisions.resolve`) from its training rows' lengths."""
        rows = self.data.train
        return resolve(
            self.config,
            self.bf16,
            [len(r) for r in rows],
            [r.num_labels for r in rows],
            self._pack_budget_tokens(),
            stage_supports_liger=self.liger_loss,
        )

    def _pack_budget_tokens(self) -> int:
        """Tokens of one packed micro-batch (for the memory estimate)."""
        return self.pack_budget

    def _check_world_size(self) -> None:
        n, world = self.samples_per_step, self.dist.world_size
        if n < world:
            self._warn(
                f"{world} processes share steps of {n} rows: {world - n} of them have no row to "
                "train on (raise effective_batch_size, or use fewer processes)"
            )

    def _prepare_data(self) -> Any:
        """Load, validate, split and encode the run's rows (`data.train` / `data.eval` lists)."""
        return prepare(self.config, self.tokenizer)

    def _after_model_loaded(self) -> None:
        """Called once the model, optimizer and scheduler exist, before any resumed state loads."""

    def _loss_description(self) -> str:
        return "token-normalised cross-entropy over output tokens, per optimizer step"

    def _resume_checkpoint(self) -> Path | None:
        """The checkpoint to continue from, per `resume`; None for a fresh run."""
        c = self.config
        existing = ckpt.list_checkpoints(self.run_dir)
        final = self.run_dir / FINAL_DIR
        if c.resume == "never":
            if existing or final.exists():
                raise UserError(
                    f"{self.run_dir} already holds checkpoints or a final model and resume is "
                    "'never': delete that folder or choose another output_dir"
                )
            return None
        if c.resume == "auto":
            if _finished(self.run_dir):
                self._check_same_config()
                self.finished_before = True
                return None
            return existing[-1] if existing else None
        path = Path(c.resume)
        if not (path / ckpt.STATE_FILE).is_file():
            raise UserError(
                f"config key 'resume': {path} is not a checkpoint folder (no {ckpt.STATE_FILE}); "
                "allowed values: auto, never, or a checkpoint-<step> folder"
            )
        saved = ckpt.read_trainer_state(path).get("finetuning")
        if saved and saved != c.finetuning:
            raise UserError(
                f"config key 'resume': {path} was written by a {saved} run, this config is "
                f"finetuning: {c.finetuning}"
            )
        return path

    def _check_same_config(self) -> None:
        old = (
            read_yaml(self.run_dir / CONFIG_FILE) if (self.run_dir / CONFIG_FILE).is_file() else {}
        )
        changed = _changed_keys(old, self.config.to_dict())
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
                self._warn(
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
            "log_loss_sum": 0.0,
            "log_steps": 0,
            "last_train_loss": None,
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
        """Run the optimizer steps from the current step to the end.

        Raises:
            NonFiniteLossError: the loss or gradient norm became NaN/inf (nothing was updated).
            UserError: CUDA out of memory with no smaller micro-batch to try.
        """
        import torch
        from tqdm.auto import tqdm

        c = self.config
        data = self.data
        step = self.state["step"]
        meter = monitor.Throughput(step, self.total_steps)
        self._train_started = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        # disable=None: no bar when stderr is not a terminal (logs, CI); the log lines remain.
        bar = tqdm(
            total=self.total_steps,
            initial=step,
            desc=self.stage,
            unit="step",
            dynamic_ncols=True,
            disable=None if self.dist.is_main else True,
        )
        self.model.train()
        try:
            while step < self.total_steps:
                epoch, first = divmod(step, self.steps_per_epoch)
                plan = step_plan(len(data.train), self.samples_per_step, c.seed, epoch)
                for indices in plan[first:]:
                    if step >= self.total_steps:
                        break
                    rows = [data.train[i] for i in indices]
                    t0 = time.perf_counter()
                    if self.dist.enabled:  # each rank its own dropout masks, replayed on resume
                        torch.manual_seed(step_seed(c.seed, step + 1, self.dist.rank))
                    loss, n_labels, n_tokens = self._train_step(rows, step + 1)
                    monitor.check_finite(loss, step + 1, self.last_checkpoint)
                    # Several processes: summed into the whole step's gradient; then clipped.
                    norm = self.sharding.finish_gradients(params, c.max_grad_norm)
                    monitor.check_finite(norm, step + 1, self.last_checkpoint, "gradient norm")
                    lr = self.scheduler.get_last_lr()[0]
                    self.sharding.optimizer_step()
                    self.scheduler.step()
                    self.sharding.zero_grad()
                    step += 1
                    self._count(step, loss, n_labels, n_tokens)
                    meter.update(step, n_tokens, time.perf_counter() - t0)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{meter.tokens_per_second():,.0f}")
                    epoch_end = step % self.steps_per_epoch == 0
                    if step == 1 or step % c.logging_steps == 0 or step == self.total_steps:
                        self._log(step, lr, norm, meter, bar)
                    if self._eval_due(step, epoch_end):
                        self._evaluate(step, bar)
                    if self._save_due(step, epoch_end):
                        self._save_checkpoint(step)
        finally:
            bar.close()
            self.state["train_seconds"] += time.perf_counter() - self._train_started
        if data.eval and c.eval_strategy != "no" and self.state["last_eval_step"] != step:
            self._evaluate(step, None)  # the final eval loss of training_info.json
        self.peak_memory = self._peak_memory_per_rank()

    def _peak_memory_per_rank(self) -> dict[str, list[float] | None]:
        """Each rank's memory (GiB): its peak resident set and peak CUDA allocation so far, and
        the model state it holds (weights, optimizer master copies and moments: what sharding
        divides); collective (every rank sends its own)."""
        import resource

        import torch

        world, rank = self.dist.world_size, self.dist.rank
        gib = 1024**3
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib  # KiB on Linux
        cuda = torch.cuda.max_memory_allocated() / gib if torch.cuda.is_available() else 0.0
        state = model_state_bytes(self.model, self.optimizer)
        values = [rss, cuda, state["weights"] / gib, state["optimizer"] / gib]
        mine = [0.0] * (len(values) * world)
        for i, value in enumerate(values):
            mine[i * world + rank] = value
        every = self.dist.all_sum(mine)
        column = [[round(v, 3) for v in every[i * world : (i + 1) * world]] for i in range(4)]
        return {
            "peak_rss_gib": column[0],
            "peak_cuda_allocated_gib": column[1] if torch.cuda.is_available() else None,
            "weights_gib": column[2],
            "optimizer_state_gib": column[3],
        }

    def _train_step(self, rows: list[Any], step: int) -> tuple[float, int, int]:
        """Forward/backward over one optimizer step's rows; returns (loss, labels, tokens).

        The loss of every micro-batch is its summed token loss divided by the label count of
        the whole step, so the accumulated gradient is that of the per-token mean over the step
        however the rows are cut into micro-batches. With several processes each rank runs its
        share of `rows` (all ranks get the whole step's rows, so the count is the global one);
        the caller sums the gradients, the loss returned is the whole step's.
        """
        import torch

        n_labels = sum(r.num_labels for r in rows)
        n_tokens = sum(len(r) for r in rows)
        mine = self.dist.shard(rows)
        while True:
            try:
                total = torch.zeros((), device=self.device)
                for chunk in self._aligned(self._micro_batches(mine), backward=True):
                    if chunk is None:  # sharded parameters: a pass that adds nothing
                        self.sharding.backward(self._rows_loss([min(rows, key=len)]) * 0.0)
                        continue
                    loss_sum = self._rows_loss(chunk)
                    self.sharding.backward(loss_sum / n_labels)
                    total += loss_sum.detach()
                loss = self.dist.all_sum([total.item()])[0] / n_labels
                if self.config.debug_nan_at_step == step:
                    loss = float("nan")
                return loss, n_labels, n_tokens
            except torch.cuda.OutOfMemoryError:
                pass  # leave the except block first so the failed step's tensors can be freed
            self._shrink_micro_batch()

    def _rows_loss(self, rows: list[Any], packed: bool | None = None) -> Any:
        """Summed token loss of some rows (one forward pass, packed when the config packs)."""
        packed = self.config.packing if packed is None else packed
        tensors = collate_packed(rows) if packed else collate(rows, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in tensors.items()}
        with self._autocast():
            return self.sharding.forward(self.loss_fn, batch)

    def _aligned(self, chunks: Sequence[Any], backward: bool = False) -> list[Any]:
        """`chunks`, then None for every pass this rank must run idle: with sharded parameters
        (FSDP, ZeRO) every forward/backward gathers or reduces them collectively, so all ranks
        run as many passes as the busiest one."""
        total = self.sharding.agree_count(len(chunks))
        if backward:
            self.sharding.expect_backwards(total)
        return [*chunks, *([None] * (total - len(chunks)))]

    def _micro_batches(self, rows: list[Any]) -> list[list[Any]]:
        """One step's rows grouped into micro-batches: packed into the token budget (the budget
        halves with each out-of-memory retry), or `micro_batch` rows each."""
        if not self.config.packing:
            return micro_batches(rows, self.micro_batch)
        budget = self.pack_budget * self.micro_batch // self.config.per_device_train_batch_size
        return pack(rows, max(1, budget))

    def _shrink_micro_batch(self) -> None:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        c = self.config
        message = monitor.oom_message(
            self.micro_batch, self.data.max_length, self.run_config.gradient_checkpointing
        )
        if not c.auto_micro_batch or self.micro_batch == 1:
            raise UserError(message)
        self.micro_batch //= 2
        self.state["micro_batch_size"] = self.micro_batch
        self._warn(
            f"CUDA out of memory: retrying the step with micro-batch {self.micro_batch} "
            f"(the effective batch stays {self.samples_per_step} rows)",
            every_rank=True,
        )

    def _autocast(self) -> Any:
        import torch

        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _count(self, step: int, loss: float, n_labels: int, n_tokens: int) -> None:
        s = self.state
        s["step"] = step
        s["tokens_seen"] += n_tokens
        s["label_tokens_seen"] += n_labels
        s["log_loss_sum"] += loss
        s["log_steps"] += 1

    def _log(self, step: int, lr: float, grad_norm: float, meter: Any, bar: Any) -> None:
        s = self.state
        train_loss = s["log_loss_sum"] / max(1, s["log_steps"])
        s["last_train_loss"], s["log_loss_sum"], s["log_steps"] = train_loss, 0.0, 0
        tokens_per_second = meter.tokens_per_second()
        meter.reset_window()
        epoch = step / self.steps_per_epoch
        event = {
            "step": step,
            "epoch": round(epoch, 4),
            "train_loss": train_loss,
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second,
            "tokens_seen": s["tokens_seen"],
            "elapsed_seconds": round(meter.elapsed(), 2),
        }
        extra = self._extra_log_fields()
        if not self.dist.is_main:
            return
        event.update(extra)
        self.metrics.append(event)
        self.tensorboard.scalars(
            {
                "train/loss": train_loss,
                "train/learning_rate": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_per_second": tokens_per_second,
                "train/epoch": epoch,
                **{f"train/{k}": v for k, v in extra.items()},
            },
            step,
        )
        eta = meter.eta_seconds()
        bar.write(
            f"step {step}/{self.total_steps} | epoch {epoch:.2f} | loss {train_loss:.4f} | "
            f"lr {lr:.2e} | {tokens_per_second:,.0f} tok/s | eta {monitor.format_duration(eta)}"
        )
        self.status.update(
            step=step,
            epoch=epoch,
            train_loss=train_loss,
            learning_rate=lr,
            tokens_per_second=tokens_per_second,
            tokens_seen=s["tokens_seen"],
            elapsed_seconds=meter.elapsed(),
            eta_seconds=eta,
            micro_batch_size=self.micro_batch,
            gpu_memory=monitor.gpu_memory(),
        )
        self._write_status()

    def _extra_log_fields(self) -> dict[str, float]:
        """More numbers for each log event (stage-specific; none for SFT)."""
        return {}

    def _eval_due(self, step: int, epoch_end: bool) -> bool:
        c = self.config
        if not self.data.eval or c.eval_strategy == "no":
            return False
        return (c.eval_strategy == "steps" and step % c.eval_steps == 0) or (
            c.eval_strategy == "epoch" and epoch_end
        )

    def _save_due(self, step: int, epoch_end: bool) -> bool:
        strategy = self.config.save_strategy
        by_steps = strategy in ("steps", "both") and step % self.config.save_steps == 0
        return by_steps or (strategy in ("epoch", "both") and epoch_end)

    def evaluate(self) -> float:
        """Mean loss per output token over the held-out rows (dropout off; each rank its share)."""
        import torch

        rows = self.dist.shard(sorted(self.data.eval, key=len, reverse=True))
        size = self.config.per_device_eval_batch_size
        chunks = [rows[start : start + size] for start in range(0, len(rows), size)]
        total, count = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for chunk in self._aligned(chunks):
                if chunk is None:  # sharded parameters: a pass that adds nothing
                    self._rows_loss([min(self.data.eval, key=len)], packed=False)
                    continue
                total += float(self._rows_loss(chunk, packed=False))
                count += sum(r.num_labels for r in chunk)
        self.model.train()
        total, count = self.dist.all_sum([total, count])
        return total / count

    def _evaluate(self, step: int, bar: Any | None) -> None:
        t0 = time.perf_counter()
        eval_loss = self.evaluate()
        self.timings["eval_seconds"] += time.perf_counter() - t0
        s = self.state
        s["last_eval_loss"], s["last_eval_step"] = eval_loss, step
        warning = self.plateau.update(eval_loss)
        s["best_eval_loss"], s["evals_since_best"] = self.plateau.best, self.plateau.since_best
        if not self.dist.is_main:
            return
        self.metrics.append(
            {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "eval_loss": eval_loss}
        )
        self.tensorboard.scalars({"eval/loss": eval_loss}, step)
        line = f"step {step}/{self.total_steps} | eval loss {eval_loss:.4f} (best {self.plateau.best:.4f})"
        (bar.write if bar is not None else print)(line)
        if warning:
            self._warn(warning)
        self.status.update(eval_loss=eval_loss, best_eval_loss=self.plateau.best)
        self._write_status()

    def _save_checkpoint(self, step: int) -> None:
        """Rank 0 writes the checkpoint. Replicated: every rank holds the same weights and
        optimizer state (the step's gradient all_reduce synchronised them, no barrier needed);
        sharded: every rank first sends its shards to rank 0."""
        t0 = time.perf_counter()
        shards = None
        if self.sharding.writes_shards:  # every rank writes its part first (DeepSpeed)
            shards = self.run_dir / f".{ckpt.PREFIX}{step}.shards.tmp"
            if self.dist.is_main:
                shutil.rmtree(shards, ignore_errors=True)
            self.dist.barrier()
            self.sharding.write_shards(shards)
            self.dist.barrier()
        model_state = self.sharding.full_model_state()  # collective when sharded
        optimizer_state, optimizer_format = self.sharding.full_optimizer_state()
        if not self.dist.is_main:
            self.last_checkpoint = self.run_dir / f"{ckpt.PREFIX}{step}"
            return
        state = {
            **self.state,
            "epoch": step / self.steps_per_epoch,
            "saved_at": monitor.now_iso(),
            "optimizer_format": optimizer_format,
        }
        self.last_checkpoint = ckpt.save_checkpoint(
            self.run_dir,
            step,
            _model_writer(self.model, model_state),
            optimizer_state,
            self.scheduler,
            state,
            keep=self.config.save_total_limit,
            folders={SHARDS_DIR: shards} if shards is not None else None,
        )
        self.timings["checkpoint_seconds"] += time.perf_counter() - t0
        self.status["checkpoints"] = self._checkpoint_names()
        self._write_status()

    def _checkpoint_names(self) -> list[str]:
        return [p.name for p in ckpt.list_checkpoints(self.run_dir)]

    def _warn(self, message: str, every_rank: bool = False) -> None:
        """Record a warning; print it on rank 0 (and on any rank for a rank-local event)."""
        self.warnings.append(message)
        self.status.setdefault("warnings", []).append(message)
        if self.dist.is_main:
            print(f"warning: {message}", file=sys.stderr)
        elif every_rank:
            print(f"warning (rank {self.dist.rank}): {message}", file=sys.stderr)

    def _print(self, message: str) -> None:
        if self.dist.is_main:
            print(message)

    def _write_status(self) -> None:
        if self.dist.is_main:
            monitor.write_status(self.run_dir, self.status)

    # ------------------------------------------------------------------------------ save

    def save(self) -> Path:
        """Write the trained model (adapter or full weights), tokenizer and guard record to
        `RUN_DIR/final`, atomically."""
        import shutil

        from reasonguard.models import end_of_turn_ids, write_guard_config

        final = self.run_dir / FINAL_DIR
        self.final_dir = final
        model_state = self.sharding.full_model_state()  # collective when sharded
        if not self.dist.is_main:
            return final
        tmp = self.run_dir / f".{FINAL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        eos_ids = end_of_turn_ids(self.tokenizer)
        model, finetuning, base_model = self._saved_model()
        generation_config = getattr(model, "generation_config", None)
        if finetuning == "full" and generation_config is not None:
            # Generation must stop at the end-of-turn token the model was trained to emit.
            generation_config.eos_token_id = eos_ids
            generation_config.pad_token_id = self.tokenizer.pad_token_id
        if finetuning == "full" and self.bf16:
            import torch

            # Training is over: the fp32 master weights were for exact updates; the model is
            # used (and was trained) in bf16, and half the size on disk.
            if model_state is None:
                model = model.to(torch.bfloat16)
            else:
                model_state = {
                    k: v.to(torch.bfloat16) if v.is_floating_point() else v
                    for k, v in model_state.items()
                }
        _model_writer(model, model_state)(tmp)
        self.tokenizer.save_pretrained(tmp)
        write_guard_config(
            tmp,
            prompt_format=self.config.prompt_format,
            base_model=base_model,
            finetuning=finetuning,
            stage=self.stage,
            max_length=self.data.max_length,
            eos_token_ids=eos_ids,
            chat_template=self.config.chat_template,
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.final_dir = final
        return final

    def _saved_model(self) -> tuple[Any, str, str]:
        """(model to save, finetuning to record, base model to record). The finetuning is the
        one trained (`lora` when `qlora_fallback_to_lora` chose a bf16 base), not the configured."""
        c = getattr(self, "run_config", None) or self.config
        return self.model, c.finetuning, c.model_name_or_path

    # ------------------------------------------------------------------------------ cleanup

    def cleanup(self, error: BaseException | None = None) -> None:
        """Close the logs; write training_info.json, the loss curve and the final status.

        Runs after success and after failure (NaN, OOM, Ctrl-C), so a stopped run still says why.
        """
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.data is None or not self.dist.is_main:  # nothing to record, or not rank 0's job
            return
        if error is None:
            outcome, message = "finished", None
        elif isinstance(error, KeyboardInterrupt):
            outcome, message = "interrupted", "stopped by the user (Ctrl-C)"
        else:
            outcome, message = "failed", str(error)
        events = monitor.read_metrics(self.run_dir / monitor.METRICS_FILE)
        monitor.plot_loss_curve(events, self.run_dir / monitor.LOSS_CURVE_FILE, title=self._title())
        monitor.write_json_atomic(self.run_dir / INFO_FILE, self._training_info(outcome, message))
        self.status.update(state=outcome, message=message, checkpoints=self._checkpoint_names())
        if outcome == "finished":
            self.status.update(eta_seconds=0, final_dir=str(self.run_dir / FINAL_DIR))
        monitor.write_status(self.run_dir, self.status)

    def _title(self) -> str:
        c = self.config
        return f"R-SFT {c.model_name_or_path} ({c.finetuning}, {c.prompt_format})"

    def _training_info(self, outcome: str, message: str | None) -> dict[str, Any]:
        from reasonguard import __version__
        from reasonguard.models import resolve_model
        from reasonguard.train.allocenv import decision as allocator_decision
        from reasonguard.train.runinfo import environment_info

        c, s = self.config, self.state if hasattr(self, "state") else {}
        model = self.model
        run_config = getattr(self, "run_config", None)
        decisions = getattr(self, "decisions", None)
        final = self.run_dir / FINAL_DIR
        return {
            "stage": self.stage,
            "reasonguard_version": __version__,
            "outcome": outcome,
            "message": message,
            "run_dir": str(self.run_dir.resolve()),
            "final_dir": str(final.resolve()) if outcome == "finished" else None,
            "config": c.to_dict(),
            "plan": {
                "samples_per_step": self.samples_per_step,
                "micro_batch_size": c.per_device_train_batch_size,
                "micro_batch_size_used": getattr(self, "micro_batch", None),
                "gradient_accumulation_steps": c.accumulation_for(self.dist.world_size),
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "warmup_steps": warmup_steps(c, self.total_steps),
                "max_length": self.data.max_length,
                "packing": c.packing,
                "pack_tokens": getattr(self, "pack_budget", None) if c.packing else None,
                "processes": self.dist.world_size,
                "distributed_backend": self.dist.backend,
                "sharding": self.sharding.describe() if hasattr(self, "sharding") else None,
            },
            "data": self.data.stats,
            "model": {
                "base": c.model_name_or_path,
                "resolved": resolve_model(c.model_name_or_path),
                "finetuning": c.finetuning,
                "parameters": parameter_counts(model) if model is not None else None,
                "bf16": getattr(self, "bf16", None),
                "device": str(getattr(self, "device", "")) or None,
                "gradient_checkpointing": (
                    run_config.gradient_checkpointing if run_config else c.gradient_checkpointing
                ),
                "cpu_allocator": allocator_decision(),
                "decisions": (
                    {k: d.to_dict() for k, d in decisions.items()} if decisions else None
                ),
                "loss": self._loss_description(),
            },
            **environment_info(),
            "timings": {
                "started_at": self.started_at,
                "finished_at": monitor.now_iso(),
                **{k: round(v, 2) for k, v in self.timings.items()},
                "train_seconds_all_sessions": round(s.get("train_seconds", 0.0), 2),
            },
            "steps_completed": s.get("step", 0),
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


# --------------------------------------------------------------------------------------------
# Entry points


def run_sft(config: SFTConfig) -> SFTResult:
    """Train, save and record one R-SFT run (resuming it when `resume: auto` finds a checkpoint).

    Returns:
        Where the run and its final model are, and its final losses.

    Raises:
        UserError: bad data or config, a machine that cannot run it, NaN loss, out of memory.
    """
    return run_recipe(SFTRecipe(config))


def run_recipe(recipe: SFTRecipe) -> SFTResult:
    """Set up, train, save and record one run of any stage (see `run_sft`)."""
    try:
        recipe.setup()
        if recipe.finished_before:
            recipe._print(
                f"{recipe.run_dir} already holds this finished run; its model: {recipe.run_dir / FINAL_DIR}"
            )
            recipe.dist.stop()
            return _result_of_finished(recipe.run_dir)
        recipe.train()
        recipe.save()
    except BaseException as exc:
        try:
            recipe.cleanup(exc)
        except Exception as cleanup_error:  # never hide the error that stopped training
            print(f"warning: could not record the stopped run: {cleanup_error}", file=sys.stderr)
        recipe.dist.stop()
        raise
    recipe.cleanup()
    recipe.dist.barrier()  # no process reports success before rank 0 has written final/
    recipe.dist.stop()
    s = recipe.state
    recipe._print(f"final model: {recipe.final_dir}")
    recipe._print(f"run info:    {recipe.run_dir / INFO_FILE}")
    return SFTResult(
        recipe.run_dir, recipe.final_dir, s["step"], s["last_train_loss"], s["last_eval_loss"]
    )


def _result_of_finished(run_dir: Path) -> SFTResult:
    import json

    info = json.loads((run_dir / INFO_FILE).read_text())
    return SFTResult(
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

    own = {id(p) for p in model.parameters()}
    weights = sum(local(p) for p in model.parameters())
    masters = sum(local(p) for g in optimizer.param_groups for p in g["params"] if id(p) not in own)
    moments = sum(
        local(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)
    )
    return {"weights": weights, "optimizer": masters + moments}


def _model_writer(model: Any, state: dict[str, Any] | None) -> Callable[[Path], None]:
    """Writes `model` with `save_pretrained` into a folder: its own weights, or `state` (the
    full state dict a sharded run gathered on rank 0)."""
    if state is None:
        return model.save_pretrained
    return lambda folder: model.save_pretrained(folder, state_dict=state)


def _finished(run_dir: Path) -> bool:
    import json

    info = run_dir / INFO_FILE
    if not (run_dir / FINAL_DIR).is_dir() or not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("outcome") == "finished"
    except json.JSONDecodeError:
        return False


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in new if k not in _HARMLESS_ON_RESUME and k in old and old[k] != new[k]]


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _quiet_libraries() -> None:
    """Hide per-call progress bars and a peft deprecation notice that say nothing to a user."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
