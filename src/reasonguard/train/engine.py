"""The training engine: transformers' `Trainer`, fed one optimizer step of guard rows at a time.

`Trainer` (with accelerate under it) owns what users expect from it: the optimizer and schedule
from Hugging Face argument names (`optim: paged_adamw_32bit`, `lr_scheduler_type`), gradient
clipping, mixed precision, checkpoints and their rotation, resume, `report_to`, callbacks, and
every distribution strategy of `accelerate launch --config_file ...` (DDP, FSDP, DeepSpeed ZeRO,
with weights loaded sharded: ZeRO-3's `zero.Init`, FSDP's `cpu_ram_efficient_loading`).
`GuardTrainer` changes only what a guard's data needs:

- **A step is a set of rows.** The dataloader yields, per optimizer step, the rows
  `train.data.step_plan` gives it (a seeded shuffle: resuming at step s replays step s exactly,
  through the Trainer's own batch skipping). Inside the step the rows are cut into micro-batches
  (packed best-fit into a token budget with per-sample `position_ids`, or padded), so the number
  of forward passes varies with the row lengths while the step's rows do not. Trainer's
  `gradient_accumulation_steps` is therefore 1 and the accumulation happens here.
- **Token-normalised loss over the whole step.** Each micro-batch's summed loss is divided by the
  label count of the whole step (SFT) or its pair count (DPO), over all processes, so the step's
  gradient is the per-token mean however the rows are cut or spread. Engines average gradients
  over processes, so the loss is multiplied by the world size.
- **Equal passes on every rank.** Ranks with fewer micro-batches run zero-weighted passes, so the
  collectives of FSDP / ZeRO-3 forwards and of gradient reduction stay in step.
- **The NaN guard** runs before the update: the step's loss is summed over the ranks before its
  last backward (DeepSpeed steps inside that backward), and a non-finite loss or gradient norm
  stops the run with `NonFiniteLossError`, leaving the last checkpoint untouched.
- **Out of memory** in one process retries the step with half the micro-batch
  (`auto_micro_batch`); with several processes it stops with the settings that fit (a rank-local
  retry would desynchronise the ranks' collectives).
- **Dropout** is reseeded per (step, rank), so a resumed run draws the masks it would have drawn.

A subclass (`train.sft`, `train.dpo.stage`) says how rows become micro-batches and what a micro-batch's
loss is (`micro_batches`, `step_count`, `batch_loss`, `eval_loss`).

Example:
    >>> from reasonguard.train.engine import shard_rows
    >>> shard_rows(["aaaa", "b", "cc", "ddd"], rank=0, world_size=2)
    ['aaaa', 'cc']
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Sequence
from typing import Any

from transformers import Trainer

from reasonguard.errors import UserError
from reasonguard.train.data import step_plan
from reasonguard.train.monitor import check_finite, oom_message


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of optimizer step `step` on `rank` (distinct below 65,536 ranks)."""
    return seed + 65_536 * step + rank


def shard_rows(rows: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share of a step's rows: sorted by length, then every world_size-th, so the
    ranks get similar token counts."""
    ordered = sorted(rows, key=len, reverse=True)
    return list(ordered[rank::world_size])


class StepSampler:
    """Yields `[global step index]` batches for one epoch (`set_epoch` picks it)."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        start = self.epoch * self.steps_per_epoch
        return iter([[start + k] for k in range(self.steps_per_epoch)])

    def __len__(self) -> int:
        return self.steps_per_epoch


class StepRows:
    """Global step index -> that step's rows (the same on every rank)."""

    def __init__(self, rows: Sequence[Any], samples_per_step: int, seed: int) -> None:
        self.rows = rows
        self.samples_per_step = samples_per_step
        self.seed = seed
        self.steps_per_epoch = math.ceil(len(rows) / samples_per_step)
        self._plans: dict[int, list[list[int]]] = {}

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, k = divmod(index, self.steps_per_epoch)
        if epoch not in self._plans:
            self._plans = {
                epoch: step_plan(len(self.rows), self.samples_per_step, self.seed, epoch)
            }
        return {"rows": [self.rows[i] for i in self._plans[epoch][k]]}

    def __len__(self) -> int:
        return len(self.rows)


class GuardTrainer(Trainer):
    """`Trainer` whose batches are whole optimizer steps of guard rows (module docstring)."""

    def __init__(
        self,
        *args: Any,
        recipe: Any,
        train_rows: Sequence[Any],
        eval_rows: Sequence[Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe  # the run's config, decisions, warnings and counters
        self.train_rows = StepRows(train_rows, recipe.samples_per_step, recipe.config.seed)
        self.eval_rows = list(eval_rows)
        # The LM head, run only at labelled positions (None for a model without one).
        output_embeddings = getattr(self.model, "get_output_embeddings", None)
        self.head = output_embeddings() if output_embeddings is not None else None
        self.micro_batch = recipe.micro_batch
        self.last_step_loss: float | None = None
        self.last_passes = 0  # forward/backward passes of the last step on this rank

    # ---------------------------------------------------------------------------- subclass API

    def micro_batches(self, rows: list[Any], micro_batch: int) -> list[list[Any]]:
        raise NotImplementedError

    def step_count(self, rows: list[Any]) -> int:
        """What a step's loss is normalised by (labelled tokens, or pairs)."""
        raise NotImplementedError

    def batch_loss(self, model: Any, rows: list[Any], train: bool) -> Any:
        """The summed loss of some rows under `model` (a scalar tensor)."""
        raise NotImplementedError

    def after_step(self, rows: list[Any]) -> None:
        """Called after every optimizer step's passes (counters for the logs)."""

    # ---------------------------------------------------------------------------- data

    def get_train_dataloader(self) -> Any:
        from torch.utils.data import DataLoader

        # Not prepared by accelerate: every rank gets the whole step and takes its share itself.
        sampler = StepSampler(self.train_rows.steps_per_epoch)
        loader = DataLoader(self.train_rows, batch_sampler=sampler, collate_fn=lambda b: b[0])
        loader.set_epoch = sampler.set_epoch  # what Trainer calls at each epoch
        return loader

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        tokens = sum(len(r) for r in inputs["rows"])
        return 6 * tokens * self.recipe.trainable_parameters

    # ---------------------------------------------------------------------------- one step

    @property
    def _world(self) -> int:
        return process_count()

    @property
    def _rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else 0

    def _sum(self, values: list[float]) -> list[float]:
        """Sum numbers over the processes (identity for one process)."""
        if self._world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def _aligned(self, chunks: list[Any]) -> list[Any]:
        """`chunks` padded with None up to the busiest rank's count (at least one pass each)."""
        count = len(chunks)
        if self._world > 1:
            count = max(1, int(self._max([count])[0]))
        return [*chunks, *([None] * (count - len(chunks)))]

    def _max(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the run's own fields (tokens/s, tokens seen, DPO rewards) added
        to each train log, so every `report_to` integration receives them."""
        if "loss" in logs:
            logs = {**logs, **self.recipe.train_log_extras()}
        super().log(logs, start_time)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None):
        import torch

        rows = inputs["rows"]
        step = self.state.global_step + 1
        rank = self._rank
        torch.manual_seed(step_seed(self.recipe.config.seed, step, rank))
        model.train()
        while True:
            try:
                loss = self._passes(model, rows, step)
                break
            except torch.OutOfMemoryError:
                self._shrink_after_oom(model)
        state = self.recipe.state
        state["micro_batches"] = state.get("micro_batches", 0) + self.last_passes
        self.after_step(rows)
        self.last_step_loss = loss
        return torch.tensor(loss, device=self.args.device)

    def _passes(self, model: Any, rows: list[Any], step: int) -> float:
        """Forward/backward of every micro-batch of this rank's share of `rows`; the loss of
        the whole step (checked finite before the last backward). Sets `last_passes`."""

        world = self._world
        denominator = self.step_count(rows)
        mine = shard_rows(rows, self._rank, world)
        chunks = self._aligned(self.micro_batches(mine, self.micro_batch))
        smallest = [min(rows, key=len)]
        total = 0.0
        state = self.accelerator.gradient_state
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            with self.compute_loss_context_manager():
                if chunk is None:  # a pass that adds nothing, for the collectives
                    loss_sum = self.batch_loss(model, smallest, train=True) * 0.0
                else:
                    loss_sum = self.batch_loss(model, chunk, train=True)
            total += float(loss_sum.detach())
            if last:  # the NaN guard: before the backward that may update (DeepSpeed)
                step_loss = self._sum([total])[0] / denominator
                if self.recipe.config.debug_nan_at_step == step:
                    step_loss = float("nan")
                check_finite(step_loss, step, self.recipe.last_checkpoint())
            state._set_sync_gradients(last)
            try:
                if last or world == 1:
                    self.accelerator.backward(loss_sum * (world / denominator))
                else:
                    with self.accelerator.no_sync(model):
                        self.accelerator.backward(loss_sum * (world / denominator))
            finally:
                state._set_sync_gradients(True)
        self.last_passes = len(chunks)
        return step_loss

    def _shrink_after_oom(self, model: Any) -> None:
        import torch

        model.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        c = self.recipe.config
        message = oom_message(
            self.micro_batch, self.recipe.max_length, self.recipe.run_config.gradient_checkpointing
        )
        if self._world > 1:
            raise UserError(
                message + " (with several processes the step cannot be retried on one of them)"
            )
        if not c.auto_micro_batch or self.micro_batch == 1:
            raise UserError(message)
        self.micro_batch //= 2
        self.recipe.state["micro_batch_size"] = self.micro_batch
        self.recipe.warn(
            f"out of memory: retrying the step with micro-batch {self.micro_batch} "
            f"(effective batch unchanged: {self.recipe.samples_per_step} rows per step)"
        )

    def _clip_grad_norm(self, model: Any) -> Any:
        norm = super()._clip_grad_norm(model)
        value = float(norm) if norm is not None else 0.0
        check_finite(
            value, self.state.global_step + 1, self.recipe.last_checkpoint(), "gradient norm"
        )
        return norm

    # ---------------------------------------------------------------------------- evaluation

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix="eval"):
        """The token-normalised loss (or the stage's objective) over the held-out rows; each
        rank evaluates its share.

        Not Trainer's `evaluation_loop`: in transformers 5.19 it averages each batch's loss
        weighted by the batch's row count, so its `eval_loss` is not the per-token mean over the
        held-out set that the train loss is, and it cannot give DPO's reward metrics.
        """
        import torch

        if not self.eval_rows:
            return {}
        mine = shard_rows(self.eval_rows, self._rank, self._world)
        size = self.args.per_device_eval_batch_size
        chunks = self._aligned([mine[i : i + size] for i in range(0, len(mine), size)])
        model = self.model_wrapped
        model.eval()
        total = 0.0
        with torch.no_grad():
            for chunk in chunks:
                with self.compute_loss_context_manager():
                    if chunk is None:
                        self.batch_loss(model, [min(self.eval_rows, key=len)], train=False)
                        continue
                    total += float(self.batch_loss(model, chunk, train=False))
        model.train()
        metrics = self.eval_metrics(self._sum([total])[0])
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    def eval_metrics(self, total: float) -> dict[str, float]:
        return {"eval_loss": total / self.step_count(self.eval_rows)}

    # ---------------------------------------------------------------------------- helpers

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.accelerator.device
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def process_count() -> int:
    """Processes in the training's process group (accelerate's count is 1 for DeepSpeed on CPU
    processes, whose group DeepSpeed itself initialises)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def quiet_libraries() -> None:
    """Hide per-call progress bars and deprecation notices that say nothing to a user."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for pattern in (".*is_gradient_checkpointing.*", ".*past_key_values.*"):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*use_reentrant.*")
