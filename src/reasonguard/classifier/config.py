"""The classifier config: one dataclass, YAML keys 1:1 with its fields, `key=value` overrides.

Field names follow Hugging Face `TrainingArguments` where one exists; loading, overrides and the
type checks are the training configs' own (`train.config.load_config`), so a typo or a wrong type
fails with the same message before anything loads.

The labels come from exactly one of three sources:

- `dataset`: guard training records (the `data validate` rules apply), gold labels read from
  each record's answer block;
- `teacher_predictions`: a folder of a guard's predictions as `generate` writes them
  (`<Benchmark>/generated_predictions.jsonl`; the released GuardReasoner predictions have this
  layout): the teacher's labels, and its label probabilities as soft targets where the rows
  carry `scores` (distillation);
- `benchmarks` (with `benchmark_dir`): benchmark files' gold labels, as `evaluate` reads them.

Example:
    >>> from reasonguard.classifier.config import load_classifier_config
    >>> config = load_classifier_config("configs/classifier-minilm.yaml", ["learning_rate=1e-4"])
    >>> config.model_name_or_path  # doctest: +SKIP
    'minilm'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from reasonguard.errors import UserError
from reasonguard.train.config import check_types, load_config

SOURCES = ("dataset", "teacher_predictions", "benchmarks")


@dataclass
class ClassifierConfig:
    """Encoder-classifier settings. Each YAML key sets the field of the same name."""

    # ---------------------------------------------------------------- model
    model_name_or_path: str = "minilm"
    """The encoder: any `AutoModel` checkpoint (a hub id such as `microsoft/deberta-v3-small`
    or `answerdotai/ModernBERT-base`, a local folder, a classifier trained before, whose heads
    it starts from) or the offline alias `minilm` (all-MiniLM-L6-v2). A causal LM is refused."""
    trust_remote_code: bool = False
    """Allow model code from the hub (never needed for BERT, DeBERTa or ModernBERT)."""
    pooling: Literal["mean", "cls"] = "mean"
    """How the encoder's token states become one vector: `mean` over the tokens (what
    sentence-transformers models such as all-MiniLM were trained with) or the first token's
    state (`cls`, the usual choice for DeBERTa and ModernBERT classifiers)."""
    classifier_dropout: float = 0.1
    """Dropout on the pooled vector before the heads (training only)."""
    max_length: int = 256
    """Tokens per item (request, or request and response as a pair); longer items are cut,
    the longer of the two texts first. At most the encoder's position limit."""

    # ---------------------------------------------------------------- labels (exactly one source)
    dataset: str | None = None
    """Guard training records: a hub id, a folder of split files, one json/jsonl/parquet file,
    or `samples`; gold labels from each record's answer block."""
    splits: list[str] | None = None
    """With `dataset`: the splits to train on; all of them when null."""
    teacher_predictions: str | None = None
    """Distillation: a predictions folder as `generate` writes it (`<Benchmark>/
    generated_predictions.jsonl`); the teacher's labels, and its probabilities where present."""
    benchmarks: list[str] | None = None
    """Benchmark names whose gold labels to train on (their files in `benchmark_dir`)."""
    benchmark_dir: str | None = None
    """The folder of benchmark files: needed with `benchmarks`; with `teacher_predictions`,
    each predictions file is checked to hold one row per benchmark row."""
    max_samples: int | None = None
    """Use at most this many items per split or benchmark (the first ones); all when null."""
    skip_invalid: bool = False
    """Drop invalid records or prediction rows (counted in training_info.json) instead of
    stopping at the first one."""
    eval_split_ratio: float = 0.1
    """Fraction of items held out for the eval loss (at least 1 when > 0); 0 disables eval."""
    eval_split_seed: int = 42
    """Seed of the held-out choice (independent of `seed`, so the split never moves)."""

    # ---------------------------------------------------------------- optimisation
    num_train_epochs: int = 3
    """Passes over the training items (ignored when `max_steps` > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 runs `num_train_epochs` epochs."""
    per_device_train_batch_size: int = 16
    """Items per forward/backward pass (the micro-batch)."""
    per_device_eval_batch_size: int = 32
    """Items per forward pass during evaluation."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 5e-5
    """Peak learning rate (the heads and the encoder alike)."""
    class_balance: bool = False
    """Weigh each task's positive labels (harmful, refusal) by the ratio of negative to positive
    labels of that task in the training items (the `pos_weight` of binary cross-entropy), so a
    rare class counts as much as the common one: guard data is often skewed (about 7% of
    ToxicChat's prompts are toxic), and a head trained on it unweighted learns the prior. The
    weights are recorded in training_info.json. Off: every label counts once."""
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warmup."""
    warmup_steps: int | float = 0.1
    """Linear warmup: an int is a step count, a float in [0, 1) a fraction of all steps."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    optim: Literal["adamw_torch", "adamw_torch_fused"] = "adamw_torch"
    """Optimizer."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    bf16: bool | Literal["auto"] = "auto"
    """bf16 autocast; `auto`: on when the CUDA GPU supports it, off on CPU."""
    auto_micro_batch: bool = False
    """On CUDA out-of-memory, halve the micro-batch (the effective batch stays) and retry."""
    seed: int = 42
    """Seed for the head init, dropout and the per-epoch data order."""

    # ---------------------------------------------------------------- evaluation, logging, checkpoints
    output_dir: str = "runs/classifier"
    """The run directory (checkpoints, logs, status, final model)."""
    logging_steps: int = 10
    """Log train loss and learning rate and update status.json every N steps."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where Trainer reports metrics: any of its integrations (`tensorboard`, `wandb`, `mlflow`,
    ..., a list or comma-separated), `all` for every installed one, or `none`. TensorBoard event
    files go under RUN_DIR/logs."""
    eval_strategy: Literal["steps", "epoch", "no"] = "epoch"
    """When to compute the held-out eval loss (also once at the end of training)."""
    eval_steps: int = 500
    """Eval every N optimizer steps (with `eval_strategy: steps`)."""
    early_warning_patience: int = 3
    """Warn when the eval loss has not improved for this many evaluations; 0 disables."""
    save_strategy: Literal["steps", "epoch", "both", "no"] = "epoch"
    """When to write a checkpoint: every `save_steps`, at each epoch end, both, or never."""
    save_steps: int = 500
    """Checkpoint every N optimizer steps (with `save_strategy: steps|both`)."""
    save_total_limit: int | None = 2
    """Keep only the newest K checkpoints; null keeps all."""
    resume: str = "auto"
    """`auto`: continue from the newest checkpoint in output_dir if there is one; `never`:
    start fresh (refuses a run dir that already holds checkpoints); or a checkpoint folder."""

    # ---------------------------------------------------------------- testing hooks
    debug_nan_at_step: int | None = None
    """Testing hook: make the loss of this optimizer step NaN, to exercise the NaN guard."""

    def __post_init__(self) -> None:
        check_types(self)
        _check_values(self)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON/YAML-ready copy of every field."""
        return dataclasses.asdict(self)

    @property
    def finetuning(self) -> str:
        """Every weight trains (the encoder and the heads); recorded like the other stages'."""
        return "full"

    @property
    def source(self) -> str:
        """Which of `SOURCES` the labels come from."""
        return next(name for name in SOURCES if getattr(self, name) is not None)

    def rows_per_step(self, world_size: int = 1) -> int:
        """Items per optimizer step over all `world_size` processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size


def _check_values(c: ClassifierConfig) -> None:
    def fail(key: str, message: str) -> None:
        raise UserError(f"config key {key!r}: {message}")

    for key in (
        "num_train_epochs",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
    ):
        if getattr(c, key) < 1:
            fail(key, f"must be at least 1, got {getattr(c, key)}")
    given = [name for name in SOURCES if getattr(c, name) is not None]
    if len(given) != 1:
        fail(
            given[1] if len(given) > 1 else "dataset",
            "the labels come from exactly one source: dataset (guard training records, gold "
            "labels), teacher_predictions (a guard's predictions folder, for distillation) or "
            f"benchmarks (benchmark files' gold labels, with benchmark_dir); got "
            f"{', '.join(given) if given else 'none'}",
        )
    if c.benchmarks is not None and not c.benchmarks:
        fail("benchmarks", "name at least one benchmark (or set another source)")
    if c.benchmarks is not None and c.benchmark_dir is None:
        fail("benchmark_dir", "benchmarks needs benchmark_dir, the folder of benchmark files")
    if c.splits is not None and c.dataset is None:
        fail("splits", "goes with dataset (the splits of guard training records)")
    if c.max_steps == 0 or c.max_steps < -1:
        fail(
            "max_steps", f"must be -1 (use num_train_epochs) or a positive count, got {c.max_steps}"
        )
    if c.max_length < 8:
        fail("max_length", f"must be at least 8 tokens, got {c.max_length}")
    if c.learning_rate <= 0:
        fail("learning_rate", f"must be positive, got {c.learning_rate}")
    if c.weight_decay < 0:
        fail("weight_decay", f"must not be negative, got {c.weight_decay}")
    if c.max_grad_norm < 0:
        fail("max_grad_norm", f"must not be negative (0 disables clipping), got {c.max_grad_norm}")
    if not 0 <= c.classifier_dropout < 1:
        fail("classifier_dropout", f"must be in [0, 1), got {c.classifier_dropout}")
    if isinstance(c.warmup_steps, float) and not 0 <= c.warmup_steps < 1:
        fail("warmup_steps", f"a float is a fraction of all steps in [0, 1), got {c.warmup_steps}")
    if isinstance(c.warmup_steps, int) and c.warmup_steps < 0:
        fail("warmup_steps", f"must not be negative, got {c.warmup_steps}")
    if c.max_samples is not None and c.max_samples < 1:
        fail("max_samples", f"must be at least 1 (or null for all), got {c.max_samples}")
    if not 0 <= c.eval_split_ratio < 0.5:
        fail("eval_split_ratio", f"must be in [0, 0.5), got {c.eval_split_ratio}")
    if c.eval_split_ratio == 0 and c.eval_strategy != "no":
        fail(
            "eval_strategy", "needs held-out items: set eval_split_ratio > 0, or eval_strategy: no"
        )
    if c.early_warning_patience < 0:
        fail(
            "early_warning_patience", f"must be 0 (off) or positive, got {c.early_warning_patience}"
        )
    if c.save_total_limit is not None and c.save_total_limit < 1:
        fail(
            "save_total_limit",
            f"must be at least 1 (or null to keep all), got {c.save_total_limit}",
        )
    if not c.resume.strip():
        fail("resume", "allowed values: auto, never, or a checkpoint folder")
    if not c.output_dir.strip():
        fail("output_dir", "must not be empty")
    if c.debug_nan_at_step is not None and c.debug_nan_at_step < 1:
        fail("debug_nan_at_step", f"must be a step number >= 1, got {c.debug_nan_at_step}")


def load_classifier_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()
) -> ClassifierConfig:
    """Read a classifier YAML config and apply `key=value` overrides (see `load_config`).

    Raises:
        UserError: unreadable file, unknown key, wrong type or value, named after its cause.
    """
    return load_config(path, overrides, cls=ClassifierConfig)
