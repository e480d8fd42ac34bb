"""`reasonguard train classifier`: an encoder with one head per guard task, on `Trainer`.

Run it:

    reasonguard train classifier --config configs/classifier-minilm.yaml [key=value ...]

The run is a `train.recipe.Recipe` like R-SFT and DPO, so its run directory, resume after a kill
(`resume: auto`), `status.json`, `metrics.jsonl`, TensorBoard logs, `loss_curve.png` and
`training_info.json` are theirs; the engine is the same `GuardTrainer` (one optimizer step of
items per batch, a seeded data order that a resumed run replays, the NaN guard). What is the
classifier's own:

- **items**: one sequence per item, the request alone or the request and response as a pair
  (`inputs.encode_texts`), right-padded in micro-batches of `per_device_train_batch_size`;
- **the loss**: per task, binary cross-entropy of the head's logit against the target (1 / 0
  for a label, the teacher's probability for a soft target), masked where the item has no label
  for the task, summed over the step and divided by the step's label count;
- **the eval**: the same loss over the held-out items, and each head's accuracy against the
  held-out targets (thresholded at 0.5);
- **the final model**: `final/` is a classifier folder (`model.save_classifier`), which
  `load_guard`, `classify`, `generate`, `evaluate` and `serve` take as a guard.

Example:
    >>> from reasonguard.classifier.config import load_classifier_config
    >>> from reasonguard.classifier.train import run_classifier
    >>> result = run_classifier(load_classifier_config(None, ["dataset=samples"]))  # doctest: +SKIP
    >>> result.final_dir  # doctest: +SKIP
    PosixPath('runs/classifier/final')
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

from reasonguard.classifier.config import ClassifierConfig
from reasonguard.classifier.inputs import Encoded, collate, encode_texts
from reasonguard.errors import UserError
from reasonguard.format import TASKS
from reasonguard.train.data import micro_batches, split_train_eval
from reasonguard.train.engine import GuardTrainer
from reasonguard.train.recipe import FINAL_DIR, Recipe, TrainResult


@dataclass
class ClassifierData:
    """Encoded train and eval items plus the facts recorded in training_info.json."""

    train: list[Encoded]
    eval: list[Encoded]
    max_length: int
    stats: dict[str, Any] = field(default_factory=dict)


def position_limit(tokenizer: Any, model_config: Any) -> int | None:
    """The most tokens the encoder reads: its tokenizer's limit or its position table."""
    limits = [
        getattr(tokenizer, "model_max_length", None),
        getattr(model_config, "max_position_embeddings", None),
    ]
    found = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(found) if found else None


def prepare_classifier_data(
    config: ClassifierConfig, tokenizer: Any, limit: int | None
) -> ClassifierData:
    """Load the items of the config's label source, hold out the eval items and encode both.

    Raises:
        UserError: bad data (see `items.load_items`), or a `max_length` above the encoder's.
    """
    from reasonguard.classifier.sources import load_items

    if limit is not None and config.max_length > limit:
        raise UserError(
            f"config key 'max_length': {config.max_length} tokens, but {config.model_name_or_path} "
            f"reads at most {limit}"
        )
    items, source = load_items(config)
    train_items, eval_items = split_train_eval(
        items, config.eval_split_ratio, config.eval_split_seed
    )

    def encode(chosen: list[Any]) -> list[Encoded]:
        return encode_texts(
            tokenizer,
            [(item.prompt, item.response) for item in chosen],
            config.max_length,
            [item.targets for item in chosen],
            count_truncated=True,
        )

    train, held = encode(train_items), encode(eval_items)
    stats = {
        **source,
        "train_items": len(train),
        "eval_items": len(held),
        "eval_split_ratio": config.eval_split_ratio,
        "eval_split_seed": config.eval_split_seed,
        "eval_item_places": [item.place for item in eval_items],
        "max_length": config.max_length,
        "truncated_items": sum(e.truncated for e in [*train, *held]),
        "with_response": sum(item.response is not None for item in train_items),
        "labels": label_counts(train_items),
        "train_tokens_per_epoch": sum(len(e) for e in train),
    }
    return ClassifierData(train, held, config.max_length, stats)


def positive_weights(counts: dict[str, dict[str, int]]) -> dict[str, float]:
    """`class_balance`: per task, negative labels over positive ones in the training items (1.0
    where a task has no labels or only one class, so nothing is divided by zero)."""
    weights = {}
    for task in TASKS:
        labelled, positive = counts[task]["labelled"], counts[task]["positive"]
        balanced = 0 < positive < labelled
        weights[task] = (labelled - positive) / positive if balanced else 1.0
    return weights


def label_counts(items: list[Any]) -> dict[str, dict[str, int]]:
    """Per task: items labelled, of which positive (target >= 0.5), of which soft targets."""
    counts = {}
    for task in TASKS:
        targets = [(i.targets[task], i.soft) for i in items if i.targets[task] is not None]
        counts[task] = {
            "labelled": len(targets),
            "positive": sum(t >= 0.5 for t, _ in targets),
            "soft": sum(soft for _, soft in targets),
        }
    return counts


class ClassifierTrainer(GuardTrainer):
    """Classifier steps: padded micro-batches, the masked per-task loss (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._correct = [0.0] * len(TASKS)
        self._counted = [0.0] * len(TASKS)

    def micro_batches(self, rows: list[Encoded], micro_batch: int) -> list[list[Encoded]]:
        return micro_batches(rows, micro_batch)

    def step_count(self, rows: list[Encoded]) -> int:
        return sum(r.num_labels for r in rows)

    def batch_loss(self, model: Any, rows: list[Encoded], train: bool) -> Any:
        import torch.nn.functional as F

        batch = self.to_device(collate(rows, self.recipe.tokenizer.pad_token_id))
        targets, mask = batch.pop("targets"), batch.pop("label_mask")
        logits = model(**batch).float()
        weights = self.recipe.positive_weights
        if weights is not None:
            weights = weights.to(logits.device)
        loss = F.binary_cross_entropy_with_logits(
            logits, targets, reduction="none", pos_weight=weights
        )
        if not train:  # each head's accuracy on the held-out items
            right = ((logits > 0) == (targets >= 0.5)) & mask
            for k in range(len(TASKS)):
                self._correct[k] += float(right[:, k].sum())
                self._counted[k] += float(mask[:, k].sum())
        return (loss * mask).sum()

    def after_step(self, rows: list[Encoded]) -> None:
        self.recipe.count_step(rows)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._correct = [0.0] * len(TASKS)
        self._counted = [0.0] * len(TASKS)
        return super().evaluate(*args, **kwargs)

    def eval_metrics(self, total: float) -> dict[str, float]:
        metrics = super().eval_metrics(total)
        counts = self._sum(self._correct + self._counted)
        for k, task in enumerate(TASKS):
            right, n = counts[k], counts[len(TASKS) + k]
            if n:
                metrics[f"eval_accuracy_{task}"] = 100.0 * right / n
        return metrics


class ClassifierRecipe(Recipe):
    """One classifier run: `setup()`, `train()`, `save()`, `cleanup()` (see `run_classifier`)."""

    stage = "classifier"
    trainer_class = ClassifierTrainer
    liger_loss = False

    def environment_problems(self) -> list[str]:
        from reasonguard.train.modeling import cuda_available

        problems = []
        if self.world_size > 1:
            problems.append(
                "train classifier runs in one process (an encoder this size needs no more)"
            )
        if self.config.bf16 is True and cuda_available():
            import torch

            if not torch.cuda.is_bf16_supported():
                problems.append("bf16: true, but this GPU has no bf16 support; use bf16: false")
        return problems

    def load_tokenizer(self) -> Any:
        """The encoder's tokenizer, once the config named an encoder (a causal LM fails here,
        before any data loads)."""
        from transformers import AutoTokenizer

        from reasonguard.classifier.model import check_encoder
        from reasonguard.models import resolve_model

        c = self.config
        self.encoder_config = check_encoder(c.model_name_or_path, c.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model(c.model_name_or_path), trust_remote_code=c.trust_remote_code
        )
        if tokenizer.pad_token_id is None:
            raise UserError(f"the tokenizer of {c.model_name_or_path} has no padding token")
        return tokenizer

    positive_weights: Any = None  # `class_balance`: one pos_weight per task, else None

    def prepare_data(self) -> ClassifierData:
        limit = position_limit(self.tokenizer, self.encoder_config)
        data = prepare_classifier_data(self.config, self.tokenizer, limit)
        if self.config.class_balance:
            import torch

            weights = positive_weights(data.stats["labels"])
            data.stats["positive_weights"] = weights
            self.positive_weights = torch.tensor([weights[task] for task in TASKS])
        return data

    def decide(self) -> dict[str, Any]:
        return {}  # nothing is `auto` here but bf16, decided by `use_bf16`

    def effective_config(self) -> Any:
        return self.config

    def load_model(self) -> Any:
        from reasonguard.classifier.model import build_classifier

        c = self.config
        return build_classifier(
            c.model_name_or_path, c.pooling, c.classifier_dropout, c.trust_remote_code
        )

    def trained_heads(self) -> dict[str, str]:
        """What each head learned from, in words (a head without labels keeps its init)."""
        labels = self.data.stats["labels"]
        return {
            task: (
                f"trained on {labels[task]['labelled']} labels ({labels[task]['positive']} positive)"
                if labels[task]["labelled"]
                else "untrained: the training data has no label for this task, so the head keeps "
                "its random initial weights and its probabilities carry no information"
            )
            for task in TASKS
        }

    def save(self) -> Any:
        """Write the classifier folder to `RUN_DIR/final`, atomically."""
        from reasonguard.classifier.model import save_classifier

        c = self.config
        final = self.run_dir / FINAL_DIR
        self.final_dir = final
        tmp = self.run_dir / f".{FINAL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_classifier(
            self.model,
            self.tokenizer,
            tmp,
            stage=self.stage,
            base_model=c.model_name_or_path,
            max_length=self.data.max_length,
            labels_from={"source": c.source, "value": getattr(c, c.source)},
            heads=self.trained_heads(),
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def checkpoint_identity(self) -> None:
        """A checkpoint holds the whole module's state dict for resuming, not a classifier
        folder; `final/` is the servable one (`save`)."""
        return None

    def plan_info(self) -> dict[str, Any]:
        from reasonguard.train.modeling import warmup_steps

        c = self.config
        return {
            "samples_per_step": self.samples_per_step,
            "micro_batch_size": c.per_device_train_batch_size,
            "micro_batch_size_used": getattr(self.trainer, "micro_batch", None),
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": warmup_steps(c, self.total_steps),
            "max_length": self.data.max_length,
            "processes": self.world_size,
        }

    def model_info(self) -> dict[str, Any]:
        from reasonguard.launch.runinfo import optimizer_name
        from reasonguard.models import resolve_model
        from reasonguard.train.modeling import parameter_counts

        c = self.config
        encoder = getattr(self, "encoder_config", None)
        return {
            "base": c.model_name_or_path,
            "resolved": resolve_model(c.model_name_or_path),
            "encoder": getattr(encoder, "model_type", None),
            "finetuning": c.finetuning,
            "pooling": c.pooling,
            "parameters": parameter_counts(self.model) if self.model is not None else None,
            "heads": self.trained_heads(),
            "bf16": getattr(self, "bf16", None),
            "device": str(self.process.device),
            "optimizer": optimizer_name(getattr(self.trainer, "optimizer", None)),
            "loss": self.loss_description(),
        }

    def title(self) -> str:
        c = self.config
        return f"classifier {c.model_name_or_path} ({c.source})"

    def loss_description(self) -> str:
        described = (
            "binary cross-entropy per task against the target (a label, or the teacher's "
            "probability), masked where the item has no label, averaged over the step's labels"
        )
        if self.config.class_balance:
            weights = self.data.stats["positive_weights"]
            given = ", ".join(f"{task} {w:.3g}" for task, w in weights.items())
            described += f"; positive labels weighted by negatives / positives ({given})"
        return described


def run_classifier(config: ClassifierConfig) -> TrainResult:
    """Train, save and record one classifier run (resuming it when `resume: auto` finds a
    checkpoint).

    Raises:
        UserError: bad data or config, a causal LM named as the encoder, NaN loss.
    """
    from reasonguard.train.recipe import run_recipe

    return run_recipe(ClassifierRecipe(config))
