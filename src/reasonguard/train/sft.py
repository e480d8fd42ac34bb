"""Reasoning SFT (GuardReasoner stage 1): teach a model to reason, then answer the three tasks.

Run it:

    reasonguard train sft --config configs/demo-cpu.yaml [key=value ...] [--dry-run]
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m reasonguard train sft --config C.yaml

The engine is transformers' `Trainer` (`train.engine.GuardTrainer`), not TRL's `SFTTrainer`:
SFTTrainer's value is its dataset preparation (chat templating, tokenization, its packing),
and a guard's rows are prepared by `reasonguard.format` (the prompt formats the GuardReasoner
releases use, the loss on the output and its end-of-turn token only), so SFTTrainer would only
add a second tokenization path to keep in line. What this stage adds over `Trainer`:

- the loss: next-token cross-entropy at the labelled positions only, the LM head applied only
  there (`train.labelled_head`), liger-kernel's fused linear cross-entropy on CUDA when decided;
- micro-batches: the step's rows packed best-fit into `pack_tokens` (default `max_length`) with
  `position_ids` restarting per row (attention per sample: `train.packed_attention` on CPU,
  flash-attention's variable-length kernel or SDPA on CUDA), or right-padded
  `per_device_train_batch_size` rows each (`packing: false`).

Run directory (`output_dir`) after a finished LoRA / QLoRA run:

    RUN_DIR/
      config.yaml            the resolved config (every field), written before the model loads
      status.json            live progress, read by `reasonguard runs status RUN_DIR`
      metrics.jsonl          one JSON object per logging / eval event
      logs/                  TensorBoard event files (report_to: tensorboard)
      checkpoint-<step>/     the newest save_total_limit checkpoints (transformers' layout),
                             each loadable as a model, prompted as trained:
                             README.md adapter_config.json adapter_model.safetensors
                             chat_template.jinja optimizer.pt reasonguard.json rng_state.pth
                             scheduler.pt tokenizer.json tokenizer_config.json
                             trainer_state.json training_args.bin
      final/                 the trained model, loadable as is:
                             README.md adapter_config.json adapter_model.safetensors
                             chat_template.jinja reasonguard.json tokenizer.json
                             tokenizer_config.json
      training_info.json     config, data stats, git commit, versions, hardware, timings,
                             tokens seen, final train / eval loss, optimizer, and the run's
                             decisions (`model.decisions`; see `plan.decisions`)
      loss_curve.png         train and eval loss against the step

With `finetuning: full`, checkpoints and `final/` hold `config.json generation_config.json
model.safetensors` (final/ in bf16 when trained with bf16) instead of the adapter files.

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

from typing import Any

from reasonguard.train.config import SFTConfig
from reasonguard.train.data import Example, collate, collate_packed, micro_batches, pack, prepare
from reasonguard.train.engine import GuardTrainer
from reasonguard.train.labelled_head import (
    cross_entropy_sum,
    labelled_positions,
    liger_cross_entropy_sum,
    run_head,
)
from reasonguard.train.recipe import FINAL_DIR, INFO_FILE, Recipe, TrainResult

__all__ = [
    "FINAL_DIR",
    "INFO_FILE",
    "SFTRecipe",
    "SFTTrainer",
    "TrainResult",
    "run_sft",
]

SFTResult = TrainResult  # the name earlier releases used


def sft_batch(rows: list[Example], packed: bool, pad_token_id: int) -> dict[str, Any]:
    """Rows as one model input: packed into one row, or right-padded; plus where the head runs."""
    batch = collate_packed(rows) if packed else collate(rows, pad_token_id)
    batch["positions"], batch["mask"], batch["targets"] = labelled_positions(batch["labels"])
    return batch


class SFTTrainer(GuardTrainer):
    """R-SFT steps: packed (or padded) micro-batches, cross-entropy at the labelled positions."""

    def micro_batches(self, rows: list[Example], micro_batch: int) -> list[list[Example]]:
        c = self.recipe.config
        if not c.packing:
            return micro_batches(rows, micro_batch)
        # The budget shrinks with each out-of-memory retry, as the micro-batch would.
        budget = self.recipe.pack_budget * micro_batch // c.per_device_train_batch_size
        return pack(rows, max(1, budget))

    def step_count(self, rows: list[Example]) -> int:
        return sum(r.num_labels for r in rows)

    def batch_loss(self, model: Any, rows: list[Example], train: bool) -> Any:
        packed = train and self.recipe.config.packing
        batch = self.to_device(sft_batch(rows, packed, self.recipe.tokenizer.pad_token_id))
        liger = self.recipe.decisions["liger"].value
        head_fn = (liger_cross_entropy_sum if liger else cross_entropy_sum)(
            batch["mask"], batch["targets"]
        )
        return run_head(model, self.head, batch, head_fn)

    def after_step(self, rows: list[Example]) -> None:
        self.recipe.count_step(rows)


class SFTRecipe(Recipe):
    """One R-SFT run: `setup()`, `train()`, `save()`, `cleanup()` (see `run_sft`)."""

    stage = "sft"
    trainer_class = SFTTrainer

    def prepare_data(self) -> Any:
        """Load, validate, split and encode the run's rows (`data.train` / `data.eval`)."""
        return prepare(self.config, self.tokenizer)

    def decide(self) -> dict[str, Any]:
        """The machine's decisions, and what the run does with rows that label a response they
        do not have (`labels_without_response`; see `data.response_labels`)."""
        from reasonguard.plan.decisions import labels_without_response_decision

        decisions = super().decide()
        labels = self.data.stats["validation"]["labels_without_response"]
        decisions["labels_without_response"] = labels_without_response_decision(
            labels["setting"], labels["rows"]
        )
        return decisions

    def guard_record(self, finetuning: str, base_model: str) -> dict[str, Any]:
        record = super().guard_record(finetuning, base_model)
        return {**record, "labels_without_response": self.config.labels_without_response}


def run_sft(config: SFTConfig) -> TrainResult:
    """Train, save and record one R-SFT run (resuming it when `resume: auto` finds a checkpoint).

    Returns:
        Where the run and its final model are, and its final losses.

    Raises:
        UserError: bad data or config, a machine that cannot run it, NaN loss, out of memory.
    """
    from reasonguard.train.recipe import run_recipe

    return run_recipe(SFTRecipe(config))
