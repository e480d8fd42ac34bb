"""Where a classifier's labels come from: one source per config (`load_items`).

- `dataset`: guard training records, validated as `data validate` does; gold labels from each
  record's answer block;
- `teacher_predictions`: a teacher's predictions folder (`teacher.py`): its labels and, where
  present, its probabilities;
- `benchmarks`: benchmark files' gold labels, read as `evaluate` reads them.

Example:
    >>> from reasonguard.classifier.sources import record_item
    >>> item = record_item({"input": "Human user:\\nHi\\n\\nAI assistant:\\nNone\\n\\n",
    ...     "output": "Answers: \\nRequest: unharmful\\nCompletion: None\\nResponse: None"}, "row 1")
    >>> item.response, item.targets
    (None, {'prompt': 0.0, 'response': None, 'refusal': None})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reasonguard.classifier.items import LabelledItem, hard_targets
from reasonguard.classifier.teacher import teacher_items
from reasonguard.errors import UserError
from reasonguard.format import parse_labels, split_input


def record_item(record: Mapping[str, Any], place: str) -> LabelledItem:
    """A validated guard record as an item (gold labels from its answer block)."""
    prompt, response = split_input(record["input"])
    return LabelledItem(
        prompt, response, hard_targets(parse_labels(record["output"]), response), place
    )


def record_items(config: Any) -> tuple[list[LabelledItem], dict[str, Any]]:
    """Items from the config's guard records (`dataset`, `splits`, `max_samples`,
    `skip_invalid`), validated by `data.validate`.

    Raises:
        UserError: unreadable source, unknown split, or an invalid record without `skip_invalid`.
    """
    from reasonguard.train.data import load_records

    triples, validation = load_records(config)
    items = [
        record_item(record, f"{config.dataset}: split {split!r} row {row + 1}")
        for split, row, record in triples
    ]
    return items, {"dataset": config.dataset, "validation": validation}


def benchmark_items(config: Any) -> tuple[list[LabelledItem], dict[str, Any]]:
    """Items from benchmark files' gold labels (`benchmarks` in `benchmark_dir`).

    Raises:
        UserError: an unknown or missing benchmark, or a row without a readable label.
    """
    from reasonguard.cascade.calibrate import items_from_benchmarks

    items: list[LabelledItem] = []
    used: dict[str, int] = {}
    for name in config.benchmarks:
        rows = items_from_benchmarks([name], config.benchmark_dir)[: config.max_samples]
        used[name] = len(rows)
        items += [
            LabelledItem(r.prompt, r.response, hard_targets(r.truth, r.response), r.place)
            for r in rows
        ]
    return items, {"benchmarks": used, "benchmark_dir": config.benchmark_dir}


def load_items(config: Any) -> tuple[list[LabelledItem], dict[str, Any]]:
    """The config's items from its one label source, and what was read (for training_info).

    Items without any label (a benchmark row labelled `None`) are left out and counted.

    Raises:
        UserError: see the source's reader; also when no item has a label.
    """
    if config.source == "dataset":
        items, summary = record_items(config)
    elif config.source == "teacher_predictions":
        items, summary = teacher_items(
            config.teacher_predictions,
            config.skip_invalid,
            config.benchmark_dir,
            config.max_samples,
        )
    else:
        items, summary = benchmark_items(config)
    labelled = [item for item in items if item.num_labels]
    if not labelled:
        raise UserError(f"{getattr(config, config.source)}: no item has a label to train on")
    summary = {
        "source": config.source,
        **summary,
        "items_without_labels": len(items) - len(labelled),
    }
    return labelled, summary
