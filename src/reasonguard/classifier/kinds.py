"""What a model folder holds: a trained encoder classifier, an encoder, or a causal LM.

Read from its `reasonguard.json` and `config.json` alone (no weights, no torch), so a command can
refuse the wrong kind of model before anything loads: `train classifier` needs an encoder, `train
sft` and `train dpo` a causal language model, and `load_guard` serves a classifier folder through
the classifier backend.

The encoder / causal-LM line follows transformers' own auto-model tables: a config whose
`architectures` name a `...ForCausalLM` or `...LMHeadModel` class, or whose `model_type` has a
causal-LM class and no masked-LM class (Llama, Qwen, GPT-2 style), is a causal LM; anything else
(BERT, DeBERTa-v2/v3, ModernBERT, RoBERTa, ...) is an encoder.

Example:
    >>> from reasonguard.classifier.kinds import config_kind
    >>> config_kind("bert", ["BertModel"]), config_kind("llama", ["LlamaForCausalLM"])
    ('encoder', 'causal-lm')
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CLASSIFIER_KIND = "encoder-classifier"  # the `kind` of a trained classifier's reasonguard.json
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def config_kind(model_type: str | None, architectures: Sequence[str] | None) -> str:
    """`causal-lm` or `encoder` for a model config's `model_type` and `architectures`."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if any(str(a).endswith(CAUSAL_SUFFIXES) for a in architectures or ()):
        return "causal-lm"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return "causal-lm"
    return "encoder"


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_classifier(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a folder holding a classifier trained by `train classifier`."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    record = _json(folder / "reasonguard.json") or {}
    return record.get("kind") == CLASSIFIER_KIND


def folder_kind(path: str | os.PathLike[str]) -> str | None:
    """`classifier`, `encoder` or `causal-lm` for a local model folder; None for anything
    else (a hub id, a folder without config.json: a LoRA adapter is judged by its base)."""
    folder = Path(path)
    if is_classifier(folder):
        return "classifier"
    config = _json(folder / "config.json") if folder.is_dir() else None
    if config is None:
        return None
    return config_kind(config.get("model_type"), config.get("architectures"))
