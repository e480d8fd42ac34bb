"""The R-SFT and DPO configs: every key, its default, its type and its allowed values.

`SFTConfig` holds the R-SFT keys and the rules that tie one key to another (checked when a config
is built); `DPOConfig` adds the HS-DPO keys and stage-2 defaults. Reading them from YAML with
`key=value` overrides is `reasonguard.train.config.files`; the type checks every field goes
through are `reasonguard.train.config.checks`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from reasonguard.errors import UserError
from reasonguard.train.config.checks import check_types

DEFAULT_DATASET = "yueliu1999/GuardReasonerTrain"  # same value as data.sources.DEFAULT_DATASET
LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT_TEMPLATES = ("llama3",)


@dataclass
class SFTConfig:
    """Reasoning-SFT settings. Each YAML key sets the field of the same name.

    Cross-field rules are checked in `__post_init__`; checks that need the machine (CUDA,
    bitsandbytes) live in `reasonguard.train.modeling.environment_problems`.
    """

    # ---------------------------------------------------------------- model and prompt format
    model_name_or_path: str = "smollm2"
    """Base model: a hub id, a local folder, or an offline alias (`smollm2`, `tiny-llama`)."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer to use; the model's own when null."""
    chat_template: str | None = None
    """Replace the tokenizer's chat template: `llama3` (the one-turn Llama 3 template of the
    official LLaMA-Factory training), or null to keep the tokenizer's own."""
    prompt_format: Literal["raw", "chat", "chat-user"] = "chat"
    """How a record becomes a prompt (see `reasonguard.format`); recorded in the saved model."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel. `auto`: on CUDA, flash-attention's variable-length kernel for packed rows
    when flash-attn is installed, else SDPA; on CPU, SDPA run per sample inside packed rows
    (decided and logged at setup: `plan.decisions.attention_decision`)."""
    trust_remote_code: bool = False
    """Allow model code from the hub (never needed for Llama / SmolLM2)."""

    # ---------------------------------------------------------------- fine-tuning method
    finetuning: Literal["full", "lora", "qlora"] = "lora"
    """`full`: every weight; `lora`: adapters on a frozen base; `qlora`: adapters on a 4-bit NF4
    base (double quantisation; compute in bf16 under `bf16`, else fp32). QLoRA needs bitsandbytes
    (`pip install 'reasonguard[qlora]'`) and runs on a CUDA GPU or on CPU."""
    qlora_fallback_to_lora: Literal["auto", "never"] = "never"
    """With `finetuning: qlora`: `never` (the default) always trains on the NF4 base, as asked;
    `auto` trains bf16 LoRA instead (no dequantisation of every weight in every matmul: faster)
    when the memory estimate of the bf16 LoRA run is at most 80% of the CUDA GPU's memory (never
    on CPU, nor without bf16). The choice is logged in training_info.json
    (`model.decisions.quantization`)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGET_MODULES))
    """Module names that get adapters (all attention and MLP projections by default)."""

    # ---------------------------------------------------------------- data
    dataset: str = DEFAULT_DATASET
    """Records source: hub id, folder of split files, one json/jsonl/parquet file, or `samples`."""
    splits: list[str] | None = None
    """Splits to train on, in order; all of them when null."""
    max_samples: int | None = None
    """Use at most this many rows per split (the first ones, after validation); all when null."""
    skip_invalid: bool = False
    """Drop invalid rows (counted in training_info.json) instead of stopping at the first one."""
    labels_without_response: Literal["keep", "none"] = "keep"
    """Rows whose input has no response (`AI assistant:\nNone`) yet whose answer block labels one
    (`Completion: refusal`, `Response: unharmful`; the released GuardReasonerTrain has such rows):
    `keep` (the default) trains them as published, as the GuardReasoner paper did; `none` sets
    their `Completion:` and `Response:` answers to None (the reasoning text is kept). Counted in
    training_info.json (`data.validation.labels_without_response`) and the run's decisions;
    `reasonguard data validate` lists the rows."""
    max_length: int | Literal["auto"] = "auto"
    """Cut sequences to this many tokens; `auto`: p95 of the token lengths clamped to
    [1024, 2048] (the rule of Experiment 19's script)."""
    eval_split_ratio: float = 0.01
    """Fraction of rows held out for eval loss (at least 1 row when > 0); 0 disables eval."""
    eval_split_seed: int = 42
    """Seed of the held-out row choice (independent of `seed`, so the split never moves)."""
    reasoning_dropout: float = 0.0
    """Dual-mode training: this fraction of the training rows (chosen with `seed`) is trained
    answer-only: the answer block alone as the target, with the fast-mode marker as the last line
    of the instruction. One model then answers with reasoning (prompted as usual) and without it
    (`--mode fast`, prompted with the marker), and a model prompted without the marker never
    learned to skip its reasoning. 0 (the default) trains every row with its reasoning, as the
    GuardReasoner paper does; held-out rows always keep theirs."""

    # ---------------------------------------------------------------- optimisation
    num_train_epochs: int = 3
    """Passes over the training rows (ignored when `max_steps` > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 runs `num_train_epochs` epochs."""
    per_device_train_batch_size: int = 2
    """Rows per forward/backward pass (the micro-batch)."""
    per_device_eval_batch_size: int = 4
    """Rows per forward pass during evaluation."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each process (derived when `effective_batch_size` is
    set; without it a step holds per_device_train_batch_size x this x processes rows)."""
    effective_batch_size: int | None = None
    """Rows per optimizer step over all processes; when set, `gradient_accumulation_steps` is
    derived from it, so a recipe keeps its batch on any number of GPUs."""
    learning_rate: float = 5e-5
    """Peak learning rate."""
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int | float = 0
    """Linear warmup: an int is a step count, a float in [0, 1) a fraction of all steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    optim: Literal[
        "adamw_torch",
        "adamw_torch_fused",
        "paged_adamw_32bit",
        "paged_adamw_8bit",
        "adamw_bnb_8bit",
    ] = "adamw_torch"
    """Optimizer; the paged and 8-bit ones are bitsandbytes' (CUDA or CPU; on CPU bitsandbytes
    runs the paged ones without paging)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    bf16: bool | Literal["auto"] = "auto"
    """bf16 autocast (frozen LoRA base weights stored in bf16, full fine-tuning keeps fp32
    master weights); `auto`: on when the CUDA GPU supports it, off on CPU."""
    gradient_checkpointing: bool | Literal["auto"] = False
    """Recompute activations in the backward pass: less memory, ~30% more compute. `auto`: on
    only when the memory estimate of `reasonguard plan` without it exceeds the CUDA device's
    memory; off on CPU (memory is plentiful there)."""
    use_liger_kernel: bool | Literal["auto"] = "auto"
    """Liger-Kernel's fused linear cross-entropy for the SFT loss (the LM head and the loss in
    chunks, never the full logits). `auto`: on with CUDA when `liger_kernel` is installed;
    `true` fails before the model loads without them. DPO's log-probs keep the plain head."""
    torch_compile: bool = False
    """Compile the decoder with `torch.compile` (opt-in: the first steps pay the compile time,
    and packed rows of varying length recompile)."""
    auto_micro_batch: bool = False
    """On CUDA out-of-memory, halve the micro-batch (the effective batch stays) and retry."""
    packing: bool = True
    """Pack each optimizer step's rows into token-budget micro-batches (best-fit decreasing,
    one row per micro-batch, `position_ids` restarting per sample, no attention across samples):
    no padding. The rows per step stay `samples_per_step`; `per_device_train_batch_size` then
    only sizes the step, not the micro-batches. false: pad rows to the longest of each
    micro-batch of `per_device_train_batch_size` rows (the GuardReasoner paper's setup)."""
    pack_tokens: int | None = None
    """Token budget of one packed micro-batch; null uses the resolved `max_length`."""
    seed: int = 42
    """Seed for adapter init, dropout and the per-epoch data order."""

    # ---------------------------------------------------------------- evaluation, logging, checkpoints
    output_dir: str = "runs/sft"
    """The run directory (checkpoints, logs, status, final model)."""
    logging_steps: int = 10
    """Log train loss, learning rate, tokens/s and update status.json every N steps."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where Trainer reports metrics: any of its integrations (`tensorboard`, `wandb`, `mlflow`,
    `comet_ml`, `trackio`, ..., a list or comma-separated), `all` for every installed one, or
    `none`. TensorBoard event files go under RUN_DIR/logs."""
    eval_strategy: Literal["steps", "epoch", "no"] = "steps"
    """When to compute the held-out eval loss (also once at the end of training)."""
    eval_steps: int = 500
    """Eval every N optimizer steps (with `eval_strategy: steps`)."""
    early_warning_patience: int = 3
    """Warn when the eval loss has not improved for this many evaluations; 0 disables."""
    save_strategy: Literal["steps", "epoch", "both", "no"] = "steps"
    """When to write a checkpoint: every `save_steps`, at each epoch end, both, or never."""
    save_steps: int = 500
    """Checkpoint every N optimizer steps (with `save_strategy: steps|both`)."""
    save_total_limit: int | None = 3
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
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on one process (derived or configured)."""
        if self.effective_batch_size is not None:
            return self.effective_batch_size // self.per_device_train_batch_size
        return self.gradient_accumulation_steps

    @property
    def samples_per_step(self) -> int:
        """Rows per optimizer step (the effective batch) of a single-process run."""
        return self.per_device_train_batch_size * self.accumulation_steps

    def rows_per_step(self, world_size: int = 1) -> int:
        """Rows per optimizer step over all `world_size` processes.

        `effective_batch_size` when set: the same on any number of processes, so the optimizer
        steps are those of one process. Otherwise Hugging Face's rule: per_device_train_batch_size
        x gradient_accumulation_steps x world_size.
        """
        if self.effective_batch_size is not None:
            return self.effective_batch_size
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size

    def accumulation_for(self, world_size: int = 1) -> int:
        """Micro-batches of `per_device_train_batch_size` rows per optimizer step on each of
        `world_size` processes (rounded up when the step's rows do not split evenly)."""
        per_pass = self.per_device_train_batch_size * world_size
        return -(-self.rows_per_step(world_size) // per_pass)


def field_names(cls: type = SFTConfig) -> list[str]:
    """The config keys of a config dataclass, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def _check_values(c: SFTConfig) -> None:
    """Cross-field and range rules (the types are already right)."""

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
        "lora_r",
        "lora_alpha",
    ):
        if getattr(c, key) < 1:
            fail(key, f"must be at least 1, got {getattr(c, key)}")
    if c.max_steps == 0 or c.max_steps < -1:
        fail(
            "max_steps", f"must be -1 (use num_train_epochs) or a positive count, got {c.max_steps}"
        )
    if c.learning_rate <= 0:
        fail("learning_rate", f"must be positive, got {c.learning_rate}")
    if c.weight_decay < 0:
        fail("weight_decay", f"must not be negative, got {c.weight_decay}")
    if c.max_grad_norm < 0:
        fail("max_grad_norm", f"must not be negative (0 disables clipping), got {c.max_grad_norm}")
    if not 0 <= c.lora_dropout < 1:
        fail("lora_dropout", f"must be in [0, 1), got {c.lora_dropout}")
    if not c.lora_target_modules:
        fail("lora_target_modules", "must name at least one module")
    if isinstance(c.warmup_steps, float) and not 0 <= c.warmup_steps < 1:
        fail("warmup_steps", f"a float is a fraction of all steps in [0, 1), got {c.warmup_steps}")
    if isinstance(c.warmup_steps, int) and c.warmup_steps < 0:
        fail("warmup_steps", f"must not be negative, got {c.warmup_steps}")
    if isinstance(c.max_length, int) and c.max_length < 16:
        fail("max_length", f"must be `auto` or at least 16 tokens, got {c.max_length}")
    if c.pack_tokens is not None and c.pack_tokens < 16:
        fail(
            "pack_tokens",
            f"must be at least 16 tokens (or null for max_length), got {c.pack_tokens}",
        )
    if c.max_samples is not None and c.max_samples < 1:
        fail("max_samples", f"must be at least 1 (or null for all rows), got {c.max_samples}")
    if not 0 <= c.reasoning_dropout <= 1:
        fail("reasoning_dropout", f"must be in [0, 1], got {c.reasoning_dropout}")
    if not 0 <= c.eval_split_ratio < 0.5:
        fail("eval_split_ratio", f"must be in [0, 0.5), got {c.eval_split_ratio}")
    if c.eval_split_ratio == 0 and c.eval_strategy != "no":
        fail("eval_strategy", "needs held-out rows: set eval_split_ratio > 0, or eval_strategy: no")
    if c.early_warning_patience < 0:
        fail(
            "early_warning_patience", f"must be 0 (off) or positive, got {c.early_warning_patience}"
        )
    if c.save_total_limit is not None and c.save_total_limit < 1:
        fail(
            "save_total_limit",
            f"must be at least 1 (or null to keep all), got {c.save_total_limit}",
        )
    if c.chat_template is not None and c.chat_template not in CHAT_TEMPLATES:
        fail(
            "chat_template",
            f"{c.chat_template!r} is not allowed; allowed values: {', '.join(CHAT_TEMPLATES)}, null",
        )
    if not c.resume.strip():
        fail("resume", "allowed values: auto, never, or a checkpoint folder")
    if not c.output_dir.strip():
        fail("output_dir", "must not be empty")
    if c.debug_nan_at_step is not None and c.debug_nan_at_step < 1:
        fail("debug_nan_at_step", f"must be a step number >= 1, got {c.debug_nan_at_step}")
    if c.effective_batch_size is not None:
        if c.effective_batch_size % c.per_device_train_batch_size:
            fail(
                "effective_batch_size",
                f"{c.effective_batch_size} is not a multiple of per_device_train_batch_size "
                f"({c.per_device_train_batch_size})",
            )
        derived = c.effective_batch_size // c.per_device_train_batch_size
        if c.gradient_accumulation_steps not in (1, derived):
            fail(
                "gradient_accumulation_steps",
                f"{c.gradient_accumulation_steps} contradicts effective_batch_size "
                f"{c.effective_batch_size} / per_device_train_batch_size "
                f"{c.per_device_train_batch_size} = {derived}; set only one of them",
            )


@dataclass
class DPOConfig(SFTConfig):
    """HS-DPO settings: every R-SFT key, stage-2 defaults, and the DPO keys below."""

    dataset: str = ""
    """The pair file(s) from `reasonguard mine` (a .jsonl file or a folder of them)."""
    learning_rate: float = 5e-6
    """Peak learning rate (the paper's HS-DPO value)."""
    num_train_epochs: int = 2
    """Passes over the pairs (the paper: 2)."""
    output_dir: str = "runs/dpo"
    """The run directory."""
    beta: float = 0.01
    """DPO temperature: how far the policy may move from the reference (the paper: 0.01)."""
    loss_type: Literal["sigmoid"] = "sigmoid"
    """The DPO loss: `sigmoid` = -log sigmoid(beta * margin) (the paper's)."""
    pref_ftx: float = 2.0
    """Weight of the SFT (mean NLL) term on the chosen output (LLaMA-Factory's name; the paper: 2.0)."""
    init_adapter: Literal["continue", "merge"] = "continue"
    """When starting from a LoRA output: keep training that adapter, or merge it into the base
    and train a new adapter (final/ then holds merged full weights)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise UserError(f"config key 'beta': must be positive, got {self.beta}")
        if self.pref_ftx < 0:
            raise UserError(f"config key 'pref_ftx': must not be negative, got {self.pref_ftx}")
        if self.reasoning_dropout:
            raise UserError(
                "config key 'reasoning_dropout': an R-SFT setting (train sft); DPO pairs are "
                "trained as mined. A dual-mode R-SFT model keeps its fast mode through DPO."
            )
        if self.labels_without_response != "keep":
            raise UserError(
                "config key 'labels_without_response': an R-SFT setting (train sft); DPO pairs "
                "are trained as mined"
            )
        if self.finetuning == "qlora" and self.init_adapter == "merge":
            raise UserError(
                "config key 'init_adapter': merge is not possible with finetuning: qlora (merging "
                "into 4-bit weights loses precision); use continue, or finetuning: lora"
            )
