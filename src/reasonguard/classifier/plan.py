"""`reasonguard train classifier --dry-run`: the config and labels checked, the run's plan printed,
no weights loaded.

Example:
    >>> from reasonguard.classifier.config import load_classifier_config
    >>> from reasonguard.classifier.plan import format_classifier_plan, plan_classifier
    >>> print(format_classifier_plan(plan_classifier(load_classifier_config(None, ["dataset=samples"]))))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from reasonguard.classifier.config import ClassifierConfig
from reasonguard.format import TASKS


def plan_classifier(config: ClassifierConfig) -> dict[str, Any]:
    """Check the encoder (its config only) and read the labels; the items, labels and steps.

    Raises:
        UserError: a causal LM as the encoder, or bad labels (as training would).
    """
    from reasonguard.classifier.model import check_encoder
    from reasonguard.classifier.sources import load_items
    from reasonguard.classifier.train import label_counts
    from reasonguard.train.data import split_train_eval, total_steps

    encoder = check_encoder(config.model_name_or_path, config.trust_remote_code)
    items, source = load_items(config)
    train, held = split_train_eval(items, config.eval_split_ratio, config.eval_split_seed)
    per_step = config.rows_per_step()
    return {
        "encoder": f"{config.model_name_or_path} ({encoder.model_type})",
        "source": source,
        "train_items": len(train),
        "eval_items": len(held),
        "labels": label_counts(train),
        "items_per_step": per_step,
        "total_steps": total_steps(len(train), per_step, config.num_train_epochs, config.max_steps),
        "max_length": config.max_length,
    }


def format_classifier_plan(plan: dict[str, Any]) -> str:
    lines = [
        f"encoder:      {plan['encoder']}",
        f"labels from:  {plan['source']['source']}",
        f"items:        {plan['train_items']} train, {plan['eval_items']} held out",
    ]
    skipped = plan["source"].get("skipped_rows")
    if skipped:
        lines.append(f"skipped rows: {skipped} (skip_invalid)")
    for task in TASKS:
        counts = plan["labels"][task]
        soft = f", {counts['soft']} soft" if counts["soft"] else ""
        note = "" if counts["labelled"] else "  (no labels: this head stays untrained)"
        lines.append(
            f"  {task:<9} {counts['labelled']} labels, {counts['positive']} positive{soft}{note}"
        )
    lines += [
        f"steps:        {plan['total_steps']} of {plan['items_per_step']} items",
        f"max length:   {plan['max_length']} tokens",
    ]
    return "\n".join(lines)
