"""The HS-DPO pipeline's config (`HSDPOConfig`, `load_pipeline_config`) and the plan it gives:
the main and diversity R-SFT configs and the generation jobs, in mining-merge order.

Relative paths in a pipeline config: `sft_config`, `dpo_config` and `main_model` name files
that exist before the pipeline runs, so each is looked up, in this order, in the pipeline file's
own folder, in the current directory, then in each folder above the pipeline file; the first
that exists is used (a path given as a `key=value` override on the command line is looked up in
the current directory only). So `configs/hsdpo/guardreasoner-3b.yaml`, which names
`configs/guardreasoner-rsft-3b.yaml`, works from any directory, and a pipeline file may name
its configs beside it (`sft_config: rsft.yaml`). A `main_model` found nowhere stays as written
(relative to the current directory, where stage 1 wrote it). `output_dir` is always relative to
the current directory, like every run directory.

Example:
    >>> from reasonguard.hsdpo.config import load_pipeline_config
    >>> load_pipeline_config("configs/hsdpo/guardreasoner-3b.yaml").samples  # doctest: +SKIP
    4
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from reasonguard.errors import UserError
from reasonguard.train.config import (
    SFTConfig,
    check_types,
    config_with_overrides,
    load_config,
    read_yaml,
)

PAPER_LEAVE_OUT = ["AegisTrainR", "BeaverTailsTrainR", "ToxicChatTrainR"]
MAIN = "main"
SFT_OVERRIDE = "pipeline key 'sft_overrides' entry"
DPO_OVERRIDE = "pipeline key 'dpo_overrides' entry"


@dataclass
class HSDPOConfig:
    """The settings of the whole stage. How relative paths resolve: see the module docstring."""

    sft_config: str = ""
    """The main R-SFT config (configs/*rsft*.yaml); the diversity models are derived from it."""
    dpo_config: str = ""
    """The DPO config (configs/*hsdpo*.yaml); its model and dataset are set by the pipeline."""
    output_dir: str = "runs/hsdpo"
    """Where every stage writes, relative to the current directory (see the module docstring)."""
    main_model: str | None = None
    """An existing R-SFT output to use as the main model; null trains `sft_config` here."""
    sft_overrides: list[str] = field(default_factory=list)
    """`key=value` overrides for every R-SFT run (main and diversity)."""
    dpo_overrides: list[str] = field(default_factory=list)
    """`key=value` overrides for the DPO run."""
    leave_out: list[str] = field(default_factory=lambda: list(PAPER_LEAVE_OUT))
    """One diversity model per source here, trained without it (the paper: Aegis, BeaverTails,
    ToxicChat)."""
    samples: int = 4
    """k: sampled outputs per training prompt (the paper: 4)."""
    temperature: float = 0.7
    """Sampling temperature (the paper: 0.7)."""
    top_p: float = 0.95
    """Nucleus sampling mass (the paper: 0.95)."""
    max_new_tokens: int = 2048
    """Token budget per sampled output (the paper: 2048)."""
    seed: int = 0
    """Base sampling seed."""
    backend: Literal["hf", "vllm"] = "hf"
    """Generation backend."""
    batch_size: int = 16
    """Prompts generated together (HF backend)."""
    data_parallel: int = 1
    """Generation worker processes (one per GPU; see `reasonguard generate --data-parallel`)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per engine, for models too large for one GPU."""
    generation_limit: int | None = None
    """Sample only the first N prompts of each split (null: all of them)."""
    max_norm: float = 0.2
    """Sample weights are min-max scaled to [1 - max_norm, 1 + max_norm] per generation file."""
    skip_invalid: bool = False
    """Count and skip invalid generation rows when mining instead of stopping."""

    def __post_init__(self) -> None:
        check_types(self)
        for key in ("sft_config", "dpo_config"):
            if not getattr(self, key):
                raise UserError(f"config key {key!r}: required (a path to a YAML config)")
        for key in (
            "samples",
            "max_new_tokens",
            "batch_size",
            "data_parallel",
            "tensor_parallel_size",
        ):
            if getattr(self, key) < 1:
                raise UserError(f"config key {key!r}: must be at least 1, got {getattr(self, key)}")
        if self.samples < 2:
            raise UserError(
                "config key 'samples': mining needs at least 2 outputs per prompt (the paper: 4)"
            )
        if self.temperature <= 0:
            raise UserError(
                "config key 'temperature': must be positive: k greedy outputs would all be equal"
            )
        if not 0 <= self.max_norm < 1:
            raise UserError(f"config key 'max_norm': must be in [0, 1), got {self.max_norm}")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise UserError("config key 'tensor_parallel_size': needs backend: vllm")
        if len(set(self.leave_out)) != len(self.leave_out):
            raise UserError("config key 'leave_out': a source is named twice")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


INPUT_PATHS = ("sft_config", "dpo_config", "main_model")


def load_pipeline_config(path: str | Path, overrides: Sequence[str] = ()) -> HSDPOConfig:
    """Read and validate a pipeline config (`key=value` overrides applied on top), its relative
    input paths resolved as the module docstring says."""
    config = config_with_overrides(read_yaml(path), overrides, HSDPOConfig, source=str(path))
    overridden = {item.partition("=")[0].strip() for item in overrides}
    folder = Path(path).expanduser().parent
    for key in INPUT_PATHS:
        if key not in overridden:
            setattr(config, key, resolve_relative(getattr(config, key), folder))
    return config


def resolve_relative(value: str | None, folder: Path) -> str | None:
    """A path named in a pipeline file in `folder`: itself when absolute; else the first that
    exists of `folder / value`, `value` (the current directory), and `value` under each folder
    above `folder`; `value` unchanged when none exists."""
    if not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    base = Path(os.path.abspath(folder))
    if (base / path).exists():
        return os.path.normpath(base / path)
    if path.exists():
        return value
    for parent in base.parents:
        if (parent / path).exists():
            return os.path.normpath(parent / path)
    return value


# --------------------------------------------------------------------------------------------
# The plan: which models and generation jobs the config gives


def main_sft_config(p: HSDPOConfig) -> SFTConfig:
    out = str(Path(p.output_dir) / "rsft-main")
    return load_config(
        p.sft_config, [*p.sft_overrides, f"output_dir={out}"], overrides_from=SFT_OVERRIDE
    )


def source_splits(sft: SFTConfig) -> list[str]:
    """The splits the R-SFT config trains on (loading the source when it names none)."""
    if sft.splits:
        return list(sft.splits)
    from reasonguard.data.sources import PUBLISHED_ROWS, load_source

    if sft.dataset in PUBLISHED_ROWS and not Path(sft.dataset).exists():
        return list(PUBLISHED_ROWS[sft.dataset])  # no need to download it to name its splits

    return list(load_source(sft.dataset))


def diversity_configs(p: HSDPOConfig, splits: Sequence[str]) -> dict[str, SFTConfig]:
    """One R-SFT config per left-out source: the main config without that source.

    Raises:
        UserError: a left-out source that is not one of the splits.
    """
    configs = {}
    for source in p.leave_out:
        if source not in splits:
            raise UserError(
                f"config key 'leave_out': {source!r} is not a split of the R-SFT data "
                f"({', '.join(splits)})"
            )
        kept = [s for s in splits if s != source]
        out = str(Path(p.output_dir) / f"rsft-no-{source}")
        configs[source] = load_config(
            p.sft_config,
            [*p.sft_overrides, f"splits=[{', '.join(kept)}]", f"output_dir={out}"],
            overrides_from=SFT_OVERRIDE,
        )
    return configs


def generation_plan(p: HSDPOConfig, splits: Sequence[str]) -> list[tuple[str, str]]:
    """(model name, split) generation jobs in mining-merge order: the main model on every
    split not left out, then each left-out split by each diversity model that trained on it."""
    plan = [(MAIN, s) for s in splits if s not in p.leave_out]
    for split in p.leave_out:
        plan += [(f"no-{other}", split) for other in p.leave_out if other != split]
    return plan
