"""The encoder classifier: a pretrained encoder, a pooled vector, one logistic head per task.

`EncoderClassifier(encoder)` reads one item per sequence (`inputs.encode_texts`) and returns, per
task in `format.TASKS` order (request harmful, response harmful, response refusal), the logit of
the positive label; the sigmoid of it is the verdict's probability. Each head is its own
`Linear(hidden, 1)`, so a task without labels in the training data leaves the others untouched
(its head keeps its initial weights: what it answers then is said in training_info.json).

A trained classifier folder (`RUN_DIR/final`) is an ordinary Hugging Face encoder folder
(`config.json`, `model.safetensors`, the tokenizer: `AutoModel.from_pretrained` loads it) plus
`classifier_heads.safetensors` and `reasonguard.json` (`kind: encoder-classifier`, pooling,
max length, what it was trained on). Training checkpoints hold the whole module's state dict
(`model.safetensors` with `encoder.` and `heads.` keys), as `Trainer` saves a plain module.

Why our own module: transformers' `AutoModelForSequenceClassification` has one head over one
label set and a loss without a mask, and sentence-transformers' pooling lives in another package;
three independent masked logistic heads over a pooled encoder are a few lines.

Example:
    >>> from reasonguard.classifier.model import build_classifier
    >>> model = build_classifier("minilm")
    >>> model.heads["prompt"]
    Linear(in_features=384, out_features=1, bias=True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from reasonguard.classifier.kinds import CLASSIFIER_KIND, config_kind, is_classifier
from reasonguard.errors import UserError
from reasonguard.format import TASKS
from reasonguard.models import GUARD_CONFIG_FILE, resolve_model

HEADS_FILE = "classifier_heads.safetensors"
POOLINGS = ("mean", "cls")


class EncoderClassifier(torch.nn.Module):
    """An encoder with one logistic head per guard task (see the module docstring)."""

    def __init__(self, encoder: Any, pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        if getattr(encoder, "pooler", None) is not None:
            # BERT's own pooler (a dense layer over the first token, trained for next-sentence
            # prediction): `pooling` replaces it, so it is neither run nor saved.
            encoder.pooler = None
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = torch.nn.Dropout(dropout)
        hidden = encoder.config.hidden_size
        self.heads = torch.nn.ModuleDict({task: torch.nn.Linear(hidden, 1) for task in TASKS})

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the positive label, shape (batch, len(TASKS))."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).last_hidden_state
        pooled = self.dropout(self.pool(hidden, attention_mask))
        return torch.cat([self.heads[task](pooled) for task in TASKS], dim=-1)


def check_encoder(name: str, trust_remote_code: bool = False) -> Any:
    """The encoder's config, after checking that `name` is an encoder at all.

    Raises:
        UserError: a causal language model (Llama, SmolLM2, GPT-2 ...), or a config that cannot
            be read (no such folder, no hub).
    """
    from transformers import AutoConfig

    path = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model config of {name!r}: {exc}") from None
    if config_kind(config.model_type, getattr(config, "architectures", None)) == "causal-lm":
        shown = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise UserError(
            f"config key 'model_name_or_path': {name!r} is a causal language model ({shown}), "
            "not an encoder: the classifier reads each item in one forward pass of an encoder "
            "(an AutoModel checkpoint such as BERT, DeBERTa-v3, ModernBERT or RoBERTa; offline: "
            "the alias minilm). Causal guards are trained with `reasonguard train sft`"
        )
    return config


def build_classifier(
    name: str, pooling: str = "mean", dropout: float = 0.1, trust_remote_code: bool = False
) -> EncoderClassifier:
    """An encoder with new heads (seeded by the caller), or a trained classifier to go on
    training (its heads too, and its recorded pooling).

    Raises:
        UserError: see `check_encoder`.
    """
    check_encoder(name, trust_remote_code)
    path = resolve_model(name)
    trained = is_classifier(path)
    if trained:
        recorded = read_classifier_record(path)["pooling"]
        if recorded != pooling:
            raise UserError(
                f"config key 'pooling': {name} was trained with pooling {recorded}; its heads "
                f"read that vector, so pooling: {pooling} would start from heads that no longer fit"
            )
    encoder = load_encoder(path, trust_remote_code)
    model = EncoderClassifier(encoder, pooling, dropout)
    if trained:
        _load_heads(model, Path(path))
    return model


def load_encoder(path: str, trust_remote_code: bool = False) -> Any:
    """`AutoModel.from_pretrained(path)`, without transformers' notice that a saved classifier
    has no pooler weights (it never had a pooler: see `EncoderClassifier`)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(level)


def _load_heads(model: EncoderClassifier, folder: Path) -> None:
    from safetensors.torch import load_file

    path = folder / HEADS_FILE
    if not path.is_file():
        raise UserError(f"{folder}: a classifier folder without {HEADS_FILE}")
    state = load_file(path)
    try:
        model.heads.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: heads do not fit the encoder ({exc})") from None


def save_classifier(
    model: EncoderClassifier, tokenizer: Any, folder: str | os.PathLike[str], **record: Any
) -> Path:
    """Write a classifier folder (module docstring): encoder, heads, tokenizer, reasonguard.json.

    Args:
        record: facts for reasonguard.json besides kind and pooling (base model, max length,
            what it was trained on).
    """
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    heads = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
    save_file(heads, out / HEADS_FILE, metadata={"format": "pt"})
    full = {"kind": CLASSIFIER_KIND, "tasks": list(TASKS), "pooling": model.pooling, **record}
    (out / GUARD_CONFIG_FILE).write_text(json.dumps(full, indent=2) + "\n")
    return out


def read_classifier_record(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The reasonguard.json of a classifier folder.

    Raises:
        UserError: not a classifier folder, or an unknown pooling in it.
    """
    path = Path(folder) / GUARD_CONFIG_FILE
    if not is_classifier(folder):
        raise UserError(
            f"{folder}: not a classifier folder (no {GUARD_CONFIG_FILE} of kind {CLASSIFIER_KIND})"
        )
    record = json.loads(path.read_text())
    if record.get("pooling") not in POOLINGS:
        raise UserError(f"{path}: 'pooling' must be one of {', '.join(POOLINGS)}")
    return record


def load_classifier(
    folder: str | os.PathLike[str], device: str | None = None
) -> tuple[EncoderClassifier, Any, dict[str, Any]]:
    """A trained classifier in eval mode, its tokenizer and its record.

    Raises:
        UserError: not a classifier folder, or one without its heads.
    """
    from transformers import AutoTokenizer

    record = read_classifier_record(folder)
    encoder = load_encoder(str(folder))
    model = EncoderClassifier(encoder, record["pooling"], dropout=0.0)
    _load_heads(model, Path(folder))
    model.eval()
    if device is not None:
        model.to(device)
    return model, AutoTokenizer.from_pretrained(folder), record
