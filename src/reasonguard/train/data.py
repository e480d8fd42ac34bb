"""SFT data: load and validate records, hold out the eval split, encode, and plan the batches.

The batch plan is a pure function of (row count, seed, epoch): optimizer step `s` of epoch `e`
always trains on the same rows, so a resumed run needs only the step number to continue with the
exact data order, and a multi-process run can give each rank a slice of every step.
Inside a step the rows are sorted by length before being cut into micro-batches: the step's
gradient is the same (the loss is normalised over the whole step), the padding is smaller.

Example:
    >>> from reasonguard.train.data import split_train_eval, step_plan
    >>> train, held_out = split_train_eval(list(range(90)), ratio=0.01, seed=42)
    >>> len(train), len(held_out)
    (89, 1)
    >>> [len(step) for step in step_plan(5, samples_per_step=2, seed=0, epoch=0)]
    [2, 2, 1]
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reasonguard.data.tokenize import IGNORE_INDEX, encode_records
from reasonguard.errors import UserError

ENCODE_CHUNK = 1024  # rows per tokenizer call


@dataclass
class Example:
    """One encoded training row: token ids and labels (-100 on the prompt), as int32 arrays.

    Arrays rather than Python lists: the full dataset is ~73M tokens, which as Python ints would
    take ~5 GB; as int32 arrays it takes ~0.6 GB.
    """

    input_ids: Any
    labels: Any
    split: str
    row: int
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_labels(self) -> int:
        """Tokens the loss is computed on (labels are shifted by one: the first never counts)."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


@dataclass
class SFTData:
    """The encoded train and eval rows plus the facts recorded in training_info.json."""

    train: list[Example]
    eval: list[Example]
    max_length: int
    stats: dict[str, Any] = field(default_factory=dict)


def limit_rows(
    records_by_split: Mapping[str, Sequence[Any]], max_samples: int | None
) -> dict[str, list[Any]]:
    """The first `max_samples` rows of each split (all when None), as new lists."""
    return {split: list(rows[:max_samples]) for split, rows in records_by_split.items()}


def split_train_eval(items: Sequence[Any], ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out `ratio` of the items (at least one when ratio > 0), chosen with `seed`.

    Both parts keep the input order. The held-out count is `max(1, round(n * ratio))`, capped so
    at least one item is left to train on.

    Raises:
        UserError: fewer than 2 items while a held-out split is asked for, or no items at all.
    """
    n = len(items)
    if n == 0:
        raise UserError("no training rows left (check dataset, splits and max_samples)")
    if ratio <= 0:
        return list(items), []
    if n < 2:
        raise UserError(
            f"only {n} row: cannot hold out an eval split; set eval_split_ratio: 0 and "
            "eval_strategy: no, or add rows"
        )
    count = min(n - 1, max(1, round(n * ratio)))
    held = set(random.Random(seed).sample(range(n), count))
    train = [item for i, item in enumerate(items) if i not in held]
    held_out = [item for i, item in enumerate(items) if i in held]
    return train, held_out


def encode(
    records: Sequence[tuple[str, int, Mapping[str, Any]]],
    tokenizer: Any,
    prompt_format: str,
    max_length: int | None,
) -> list[Example]:
    """Encode `(split, row, record)` triples with `encode_records` (loss on the output only)."""
    import numpy as np

    examples: list[Example] = []
    for start in range(0, len(records), ENCODE_CHUNK):
        chunk = records[start : start + ENCODE_CHUNK]
        encoded = encode_records([r for _, _, r in chunk], tokenizer, prompt_format, max_length)
        for (split, row, _), enc in zip(chunk, encoded, strict=True):
            examples.append(
                Example(
                    input_ids=np.asarray(enc["input_ids"], dtype=np.int32),
                    labels=np.asarray(enc["labels"], dtype=np.int32),
                    split=split,
                    row=row,
                    truncated=enc["truncated"],
                )
            )
    return examples


def p95(lengths: Sequence[int]) -> float:
    """The 95th percentile (numpy's linear interpolation, as `data.stats` computes it)."""
    import numpy as np

    return float(np.percentile(np.asarray(lengths), 95)) if len(lengths) else 0.0


# --------------------------------------------------------------------------------------------
# Batch plan


def steps_per_epoch(num_rows: int, samples_per_step: int) -> int:
    """Optimizer steps in one epoch; the last step of an epoch may hold fewer rows."""
    return math.ceil(num_rows / samples_per_step)


def total_steps(num_rows: int, samples_per_step: int, epochs: int, max_steps: int) -> int:
    """All optimizer steps of a run: `max_steps` when positive, else epochs x steps per epoch."""
    if max_steps > 0:
        return max_steps
    return epochs * steps_per_epoch(num_rows, samples_per_step)


def step_plan(num_rows: int, samples_per_step: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each optimizer step of one epoch (a seeded shuffle, then consecutive cuts).

    The shuffle has its own generator seeded with `seed + epoch`, untouched by anything else the
    run does, so resuming at any step reproduces the data order exactly.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_rows, generator=generator).tolist()
    return [order[i : i + samples_per_step] for i in range(0, num_rows, samples_per_step)]


def micro_batches(examples: Sequence[Example], micro_batch_size: int) -> list[list[Example]]:
    """Cut one step's rows into micro-batches, longest first (less padding; an OOM shows early)."""
    ordered = sorted(examples, key=len, reverse=True)
    return [ordered[i : i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a micro-batch into `input_ids`, `attention_mask` and `labels` tensors."""
    import torch

    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example)
        input_ids[i, :n] = torch.from_numpy(example.input_ids.astype("int64"))
        labels[i, :n] = torch.from_numpy(example.labels.astype("int64"))
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(examples: Sequence[Example], budget: int) -> list[list[Example]]:
    """Group one step's rows into packed micro-batches of at most `budget` tokens (best-fit
    decreasing): longest row first, each into the fullest bin it still fits, else a new bin.

    Every row lands in exactly one bin; a row longer than `budget` gets a bin of its own. The
    result is a pure function of the rows (ties keep input order), so a resumed run packs a step
    exactly as the interrupted one did.
    """
    bins: list[list[Example]] = []
    free: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        n = len(example)
        best = -1
        for i, room in enumerate(free):
            if n <= room and (best < 0 or room < free[best]):
                best = i
        if best < 0:
            bins.append([example])
            free.append(budget - n)
        else:
            bins[best].append(example)
            free[best] -= n
    return bins


def collate_packed(examples: Sequence[Example]) -> dict[str, Any]:
    """Concatenate rows into one `(1, total)` row with `position_ids` restarting at 0 per row.

    No attention mask: with `position_ids` alone (and no KV cache), transformers builds a
    block-diagonal causal mask for sdpa/eager from the position restarts, so no token sees another row.
    The first label of each row is ignored, so no row's last token is trained to predict the
    next row's first token.
    """
    import torch

    input_ids = torch.cat([torch.from_numpy(e.input_ids.astype("int64")) for e in examples])
    labels = []
    for e in examples:
        row = torch.from_numpy(e.labels.astype("int64"))
        row[0] = IGNORE_INDEX
        labels.append(row)
    position_ids = torch.cat([torch.arange(len(e), dtype=torch.long) for e in examples])
    return {
        "input_ids": input_ids[None],
        "labels": torch.cat(labels)[None],
        "position_ids": position_ids[None],
    }


# --------------------------------------------------------------------------------------------
# The whole data step of a run


def load_records(config: Any) -> tuple[list[tuple[str, int, dict]], dict[str, Any]]:
    """Load and validate the configured records as `(split, row, record)` triples.

    Returns:
        The triples (row = 0-based index in its split as loaded) and the validation summary.

    Raises:
        UserError: unreadable source, unknown split, or an invalid row without `skip_invalid`.
    """
    from reasonguard.data.response_labels import apply_setting
    from reasonguard.data.sources import load_source
    from reasonguard.data.validate import validate_records

    loaded = load_source(config.dataset, config.splits)
    clean, report = validate_records(loaded, config.skip_invalid, source=config.dataset)
    # Keep each row's index in its split as loaded (so held-out rows can be named): the valid
    # rows come back in order with the invalid ones dropped; match them back by position.
    bad = {(r.split, r.row) for r in report.invalid}
    by_split: dict[str, list[tuple[str, int, dict]]] = {}
    for split, rows in loaded.items():
        kept = iter(clean.get(split, []))
        by_split[split] = [
            (split, row, next(kept)) for row in range(len(rows)) if (split, row) not in bad
        ]
    limited = limit_rows(by_split, config.max_samples)
    setting = getattr(config, "labels_without_response", "keep")  # the classifier has no such key
    triples = [t for rows in limited.values() for t in rows]
    triples, labels = apply_setting(triples, report.label_mismatches, setting)
    summary = {**report.to_dict(), "labels_without_response": labels}
    summary["used_rows"] = {split: len(rows) for split, rows in limited.items()}
    return triples, summary


def prepare(config: Any, tokenizer: Any) -> SFTData:
    """Load, validate, split and encode the data of a run.

    The max length is resolved here: `auto` takes the p95 of the token lengths of all used rows
    clamped to [1024, 2048] (`data.stats.auto_max_length`). Rows whose prompt alone fills the max
    length keep no label; they are dropped (they would teach nothing) and counted.
    """
    from reasonguard.data.stats import auto_max_length

    triples, validation = load_records(config)
    train_triples, eval_triples = split_train_eval(
        triples, config.eval_split_ratio, config.eval_split_seed
    )
    train_triples, answer_only, dual = drop_reasoning(
        train_triples, getattr(config, "reasoning_dropout", 0.0), config.seed
    )
    if config.max_length == "auto":
        full = encode(train_triples + eval_triples, tokenizer, config.prompt_format, None)
        # The rule is about reasoning rows: answer-only rows (dual-mode) do not lower it.
        p95_tokens = p95([len(e) for e in full if (e.split, e.row) not in answer_only])
        max_length = auto_max_length(p95_tokens)
        by_key = {(e.split, e.row): e for e in full}
        cut = [_truncate(by_key[(s, r)], max_length) for s, r, _ in train_triples]
        held = [_truncate(by_key[(s, r)], max_length) for s, r, _ in eval_triples]
        length_source = f"auto: p95 {p95_tokens:.0f} tokens clamped to [1024, 2048]"
    else:
        max_length = config.max_length
        cut = encode(train_triples, tokenizer, config.prompt_format, max_length)
        held = encode(eval_triples, tokenizer, config.prompt_format, max_length)
        length_source = "given"
    train = [e for e in cut if e.num_labels > 0]
    held_out = [e for e in held if e.num_labels > 0]
    if not train:
        raise UserError(
            f"no training row keeps an output token within max_length {max_length}; raise it"
        )
    stats = split_stats(config, validation, cut, held, train, held_out, max_length, length_source)
    if dual is not None:
        stats["reasoning_dropout"] = dual
    return SFTData(train=train, eval=held_out, max_length=max_length, stats=stats)


def drop_reasoning(
    triples: list[tuple[str, int, dict]], fraction: float, seed: int
) -> tuple[list[tuple[str, int, dict]], set[tuple[str, int]], dict[str, Any] | None]:
    """Dual-mode training rows: a seeded `fraction` of the rows becomes answer-only (the answer
    block as the output, the fast-mode marker in the instruction; `format` defines both).

    Rows are chosen with `random.Random(seed)` among the rows, so a resumed run picks the same
    ones; a row whose output has no parseable answer block keeps its reasoning (counted). With
    `fraction` 0 the rows are returned untouched.

    Returns:
        The rows, the (split, row) keys made answer-only, and the summary for training_info.json
        (None when `fraction` is 0).
    """
    from reasonguard.format import (
        FAST_MODE_MARKER,
        INSTRUCTION,
        answer_only_target,
        fast_mode_instruction,
    )

    if not fraction:
        return triples, set(), None
    picked = set(random.Random(seed).sample(range(len(triples)), round(fraction * len(triples))))
    out, converted, unparseable = [], set(), 0
    for i, (split, row, record) in enumerate(triples):
        target = answer_only_target(record["output"]) if i in picked else None
        if i in picked and target is None:
            unparseable += 1
        if target is not None:
            instruction = record.get("instruction") or INSTRUCTION
            record = {
                **record,
                "instruction": fast_mode_instruction(instruction),
                "output": target,
            }
            converted.add((split, row))
        out.append((split, row, record))
    summary = {
        "fraction": fraction,
        "marker": FAST_MODE_MARKER,
        "answer_only_rows": len(converted),
        "kept_reasoning_unparseable": unparseable,
        "reasoning_rows": len(triples) - len(converted),
    }
    return out, converted, summary


def split_stats(
    config: Any,
    validation: dict[str, Any],
    cut: Sequence[Any],
    held: Sequence[Any],
    train: Sequence[Any],
    held_out: Sequence[Any],
    max_length: int,
    length_source: str,
) -> dict[str, Any]:
    """The data facts of training_info.json, for SFT rows or DPO pairs alike.

    `cut` / `held` are the encoded train / eval items before the ones without labels were
    dropped, `train` / `held_out` after; items have `len()`, `num_labels`, `truncated`, `split`
    and `row`.
    """
    return {
        "source": config.dataset,
        "validation": validation,
        "train_rows": len(train),
        "eval_rows": len(held_out),
        "eval_split_ratio": config.eval_split_ratio,
        "eval_split_seed": config.eval_split_seed,
        "eval_row_ids": [[e.split, e.row] for e in held_out],
        "max_length": max_length,
        "max_length_source": length_source,
        "truncated_rows": sum(e.truncated for e in [*cut, *held]),
        "dropped_rows_without_labels": len(cut) - len(train) + len(held) - len(held_out),
        "train_tokens_per_epoch": sum(len(e) for e in train),
        "train_label_tokens_per_epoch": sum(e.num_labels for e in train),
    }


def _truncate(example: Example, max_length: int) -> Example:
    if len(example) <= max_length:
        return example
    return Example(
        input_ids=example.input_ids[:max_length],
        labels=example.labels[:max_length],
        split=example.split,
        row=example.row,
        truncated=True,
    )
