"""The SFT config: one dataclass, YAML keys 1:1 with its fields, `key=value` overrides.

Field names follow Hugging Face `TrainingArguments` where one exists (`learning_rate`,
`per_device_train_batch_size`, `save_total_limit`, ...). Every check that does not need a model
runs here, when the config is loaded: an unknown or mistyped key, a wrong type or a value outside
a field's allowed set raises `UserError` naming the key, so a typo never costs a model load.

Example:
    >>> from reasonguard.train.config import load_config
    >>> config = load_config("configs/demo-cpu.yaml", ["learning_rate=1e-4", "lora_r=8"])
    >>> config.learning_rate, config.lora_r  # doctest: +SKIP
    (0.0001, 8)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from reasonguard.errors import UserError

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
        _check_types(self)
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


# --------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    cls: type = SFTConfig,
    overrides_from: str = "command-line override",
) -> Any:
    """Read a YAML config, apply `key=value` overrides and validate everything.

    Args:
        path: the YAML file; None starts from the defaults.
        overrides: `key=value` strings; values are parsed as YAML scalars (`lr=5e-5` is a float,
            `splits=[a,b]` a list, `max_length=null` None); dotted keys address nested mappings.
        cls: the config dataclass (SFT by default; DPO brings its own).
        overrides_from: what an error caused by an override calls it (see
            `config_with_overrides`).

    Returns:
        A validated `cls` instance.

    Raises:
        UserError: unreadable file or YAML, unknown key (with a close match and the allowed keys),
            wrong type, or a value outside the allowed set; named after the file, or after the
            override that causes it.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    source = str(path) if path is not None else "config"
    return config_with_overrides(data, overrides, cls, source, overrides_from)


def config_with_overrides(
    data: Mapping[str, Any],
    overrides: Sequence[str],
    cls: type = SFTConfig,
    source: str = "config",
    overrides_from: str = "command-line override",
) -> Any:
    """Build a validated config from a mapping plus `key=value` overrides, and blame an error on
    whoever caused it: the file (`source`), or the override.

    When the mapping is valid on its own, the overrides are applied one at a time and the first
    one that makes the config invalid is named (`command-line override learning_rate=fast: config
    key 'learning_rate': expected a number, got 'fast'`). When the mapping is invalid on its own,
    the error is the file's, unless the key it names was set by an override.

    Raises:
        UserError: see `load_config`.
    """
    combined = apply_overrides(data, overrides)  # a malformed override fails here, by itself
    try:
        return config_from_dict(combined, cls, source)
    except UserError as exc:
        if not overrides:
            raise
        error = exc
    # The override that sets the key the error names is to blame. Only when none does are the
    # overrides replayed one at a time, since a prefix of them can be inconsistent on its own
    # (eval_split_ratio=0 before eval_strategy=no) where the whole list is not.
    key = _named_key(str(error).removeprefix(f"{source}: "))
    for item in reversed(overrides):
        if key is not None and _override_key(item) == key:
            raise _override_error(item, error, source, overrides_from) from None
    try:
        config_from_dict(data, cls, source)
    except UserError:
        raise error from None
    for i, item in enumerate(overrides):
        try:
            config_from_dict(apply_overrides(data, overrides[: i + 1]), cls, source)
        except UserError as exc:
            raise _override_error(item, exc, source, overrides_from) from None
    raise error


def _override_key(item: str) -> str:
    """The top-level config key an override sets (`lora.r=8` sets `lora`)."""
    return item.partition("=")[0].strip().split(".")[0]


def _named_key(message: str) -> str | None:
    """The config key an error message is about (`config key 'K': ...`), if it names one."""
    for prefix in ("config key '", "unknown config key '"):
        if message.startswith(prefix):
            return message[len(prefix) :].partition("'")[0]
    return None


def _override_error(item: str, error: UserError, source: str, overrides_from: str) -> UserError:
    """`<overrides_from> key=value: <what is wrong>`, the file's name left out."""
    message = str(error).removeprefix(f"{source}: ")
    return UserError(f"{overrides_from} {item.strip()}: {message}")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML mapping from a file (`yaml.safe_load`).

    Raises:
        UserError: unreadable file, invalid YAML, not a mapping, or a file that sets nothing
            (empty or only comments): that would silently train every default, which is the
            whole GuardReasonerTrain on the default model, not what anyone writes a file for.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from exc
    if data is None or data == {}:
        raise UserError(
            f"{path}: the config sets nothing (the file is empty or only comments); name at "
            "least model_name_or_path and dataset (the shipped configs/ are examples)"
        )
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with `key=value` overrides applied (the input is not modified).

    Raises:
        UserError: an override without `=` or with an empty key, or a value that is not YAML.
    """
    result = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value (e.g. learning_rate=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"override {item!r}: the value is not valid YAML: {exc}") from exc
        target = result
        parts = key.split(".")
        for part in parts[:-1]:
            nested = target.get(part)
            if not isinstance(nested, dict):
                nested = {}
                target[part] = nested
            target = nested
        target[parts[-1]] = value
    return result


def config_from_dict(data: Mapping[str, Any], cls: type = SFTConfig, source: str = "config") -> Any:
    """Build a validated config from a mapping (unknown keys rejected before anything else);
    errors are prefixed with `source`."""
    allowed = field_names(cls)
    for key in data:
        if key not in allowed:
            raise UserError(f"{source}: {_unknown_key_message(str(key), allowed)}")
    try:
        return cls(**data)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def save_config(config: Any, path: str | os.PathLike[str], header: str = "") -> Path:
    """Write a config as YAML (every field, in declaration order), loadable by `load_config`."""
    out = Path(path)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    out.write_text((header.rstrip("\n") + "\n" if header else "") + text, encoding="utf-8")
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _unknown_key_message(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key.replace(".", "_"), allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{hint}; allowed keys: {', '.join(allowed)}"


# --------------------------------------------------------------------------------------------
# Type and value checks


def _check_types(config: Any) -> None:
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        ok, converted = _coerce(value, hints[f.name])
        if not ok:
            raise UserError(_type_message(f.name, value, hints[f.name]))
        setattr(config, f.name, converted)


def _coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    """(is valid, value converted to the annotated type) for the annotation kinds we use."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        members = typing.get_args(annotation)
        # Exact matches first, so `int | float` keeps an int an int.
        for member in members:
            if _is_exact(value, member):
                return True, value
        for member in members:
            ok, converted = _coerce(value, member)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value is False and "no" in allowed:
            return True, "no"  # YAML 1.1 reads a bare `no` (or `off`, `false`) as False
        return value in allowed and type(value) is type(allowed[0]), value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str) and item_type is str:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return False, value
        items = [_coerce(item, item_type) for item in value]
        if not all(ok for ok, _ in items):
            return False, value
        return True, [item for _, item in items]
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int | float):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-5` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config annotation {annotation!r}")


def _is_exact(value: Any, annotation: Any) -> bool:
    if typing.get_origin(annotation) is not None:
        return False
    if annotation is type(None):
        return value is None
    return type(value) is annotation


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number"}.get(
        annotation, "a string"
    )


def _type_message(name: str, value: Any, annotation: Any) -> str:
    literals = _literal_values(annotation)
    if literals and isinstance(value, str):
        members = typing.get_args(annotation) if typing.get_origin(annotation) else ()
        booleans = ["true/false"] if bool in members else []
        return (
            f"config key {name!r}: {value!r} is not allowed; allowed values: "
            f"{', '.join(booleans + [str(v) for v in literals])}"
        )
    return f"config key {name!r}: expected {_type_name(annotation)}, got {value!r}"


def _literal_values(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return list(typing.get_args(annotation))
    if origin in (types.UnionType, typing.Union):
        return [v for a in typing.get_args(annotation) for v in _literal_values(a)]
    return []


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
        if self.finetuning == "qlora" and self.init_adapter == "merge":
            raise UserError(
                "config key 'init_adapter': merge is not possible with finetuning: qlora (merging "
                "into 4-bit weights loses precision); use continue, or finetuning: lora"
            )
