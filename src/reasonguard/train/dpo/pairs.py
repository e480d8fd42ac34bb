"""Preference pairs for hard-sample DPO: load, validate, split, encode, and collate.

A pair file is what `reasonguard mine` writes: JSON lines (or any source `load_source` reads)
of `{"instruction", "input", "chosen", "rejected", "sample_weight", "task", "source"}`. A pair
is encoded as two training sequences sharing the prompt (labels -100 on the prompt, set on the
output and its end-of-turn token, exactly as R-SFT encodes a record) plus its weight.

Validation names the file, split, row and field: a missing or empty `input` / `chosen` /
`rejected`, an input not in the guard layout, `chosen == rejected` (no preference to learn), or a
`sample_weight` that is not a finite number >= 0 (absent means 1.0). With `skip_invalid`, bad
rows are dropped and counted in the report (never silently).

Example:
    >>> from reasonguard.train.dpo.pairs import check_pair
    >>> check_pair({"input": "x", "chosen": "a", "rejected": "a"})[0]
    'input'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reasonguard.data.sources import is_hub_dataset_id
from reasonguard.data.validate import InvalidRow, ValidationReport, check_texts
from reasonguard.errors import UserError
from reasonguard.hub import looks_like_hub_id
from reasonguard.models import ALIASES
from reasonguard.train.data import Example, encode, p95, split_stats, split_train_eval


@dataclass
class PairExample:
    """One encoded preference pair: chosen and rejected sequences, weight, reference log-probs."""

    chosen: Example
    rejected: Example
    weight: float
    split: str
    row: int
    reference_chosen: float | None = None
    reference_rejected: float | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def num_labels(self) -> int:
        return self.chosen.num_labels + self.rejected.num_labels

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


@dataclass
class PairData:
    """Encoded train / eval pairs plus the facts recorded in training_info.json."""

    train: list[PairExample]
    eval: list[PairExample]
    max_length: int
    stats: dict[str, Any] = field(default_factory=dict)


def check_pair(record: Any) -> tuple[str, str] | None:
    """The first problem of one pair record as `(field, message)`, or None when it is valid."""
    if not isinstance(record, Mapping):
        return (
            "record",
            f"expected an object with input/chosen/rejected, got {type(record).__name__}",
        )
    problem = check_texts(record, ("input", "chosen", "rejected"))
    if problem:
        return problem
    if record["chosen"].strip() == record["rejected"].strip():
        return "rejected", "equals `chosen`: a pair needs two different outputs"
    weight = record.get("sample_weight", 1.0)
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return "sample_weight", f"expected a number, got {type(weight).__name__}"
    if not math.isfinite(weight) or weight < 0:
        return "sample_weight", f"expected a finite number >= 0, got {weight}"
    return None


def validate_pairs(
    records_by_split: Mapping[str, Sequence[Any]], skip_invalid: bool, source: str
) -> tuple[list[tuple[str, int, dict]], ValidationReport]:
    """Valid pairs as `(split, row, record)` triples, and the validation report.

    Raises:
        UserError: the first invalid row (unless `skip_invalid`), naming source, split, row,
            field and what was expected.
    """
    report = ValidationReport(rows={}, source=source)
    triples: list[tuple[str, int, dict]] = []
    for split, records in records_by_split.items():
        report.rows[split] = len(records)
        for row, record in enumerate(records):
            problem = check_pair(record)
            if problem is None:
                triples.append((split, row, dict(record)))
                continue
            bad = InvalidRow(split, row, *problem)
            if not skip_invalid:
                raise UserError(
                    f"{source}: invalid pair: {bad.describe()}. Fix the pairs, or pass "
                    "--skip-invalid to drop invalid rows (they are counted in the report)"
                )
            report.invalid.append(bad)
    return triples, report


def _missing_path(name: str, hub_id: Any) -> bool:
    """Whether `name` is a local path that does not exist (not an alias, not a hub id)."""
    if name in ALIASES or Path(name).expanduser().exists():
        return False
    return not hub_id(name)


def check_sources(config: Any) -> None:
    """Before anything loads: the DPO stage's two inputs exist, else say which command makes each.

    The starting model is an R-SFT run's `final/` (`reasonguard train sft`), the pairs are what
    `reasonguard mine` wrote; the whole stage, both included, is `reasonguard hsdpo`.

    Raises:
        UserError: `model_name_or_path` or `dataset` is a local path that does not exist.
    """
    start = config.model_name_or_path
    if _missing_path(start, looks_like_hub_id):
        raise UserError(
            f"config key 'model_name_or_path': no such folder: {start}; DPO starts from an R-SFT "
            "model, the final/ folder of a `reasonguard train sft` run: train that first, or set "
            "model_name_or_path=FOLDER"
        )
    check_pairs_file(config.dataset)


def check_pairs_file(dataset: str | None) -> None:
    """The configured pair file is set and, when it is a local path, exists.

    Raises:
        UserError: no `dataset`, or a local path that does not exist (naming `reasonguard mine`).
    """
    if not dataset:
        raise UserError("config key 'dataset': name the pair file written by `reasonguard mine`")
    if _missing_path(dataset, is_hub_dataset_id):
        raise UserError(
            f"config key 'dataset': no such file: {dataset}; the preference pairs are "
            "written by `reasonguard mine` (or `reasonguard hsdpo`, which runs generation, "
            "mining and DPO): run it first, or set dataset=PAIRS"
        )


def load_pairs(config: Any) -> tuple[list[tuple[str, int, dict]], dict[str, Any]]:
    """Load and validate the configured pair file(s); at most `max_samples` pairs per split."""
    from reasonguard.data.sources import load_source

    check_pairs_file(config.dataset)
    loaded = load_source(config.dataset, config.splits)
    triples, report = validate_pairs(loaded, config.skip_invalid, config.dataset)
    if config.max_samples is not None:
        seen: dict[str, int] = {}
        kept = []
        for triple in triples:
            seen[triple[0]] = seen.get(triple[0], 0) + 1
            if seen[triple[0]] <= config.max_samples:
                kept.append(triple)
        triples = kept
    summary = report.to_dict()
    used: dict[str, int] = {}
    for split, _, _ in triples:
        used[split] = used.get(split, 0) + 1
    summary["used_rows"] = used
    return triples, summary


def prepare_pairs(config: Any, tokenizer: Any) -> PairData:
    """Load, validate, split and encode the pairs of a DPO run.

    `max_length: auto` takes the p95 of the longer sequence of each pair, clamped to
    [1024, 2048] (the R-SFT rule). A pair whose chosen or rejected output keeps no token within
    the max length is dropped and counted.
    """
    from reasonguard.data.stats import auto_max_length

    triples, validation = load_pairs(config)
    train_triples, eval_triples = split_train_eval(
        triples, config.eval_split_ratio, config.eval_split_seed
    )
    if config.max_length == "auto":
        # Encode every pair once, uncut; the length rule reads it, then each pair is cut.
        full = _encode_pairs(triples, tokenizer, config.prompt_format, None)
        p95_tokens = p95([max(len(p.chosen), len(p.rejected)) for p in full])
        max_length = auto_max_length(p95_tokens)
        length_source = f"auto: p95 {p95_tokens:.0f} tokens clamped to [1024, 2048]"
        by_key = {(p.split, p.row): p for p in full}
        train = [_cut(by_key[(s, r)], max_length) for s, r, _ in train_triples]
        held = [_cut(by_key[(s, r)], max_length) for s, r, _ in eval_triples]
    else:
        max_length, length_source = config.max_length, "given"
        train = _encode_pairs(train_triples, tokenizer, config.prompt_format, max_length)
        held = _encode_pairs(eval_triples, tokenizer, config.prompt_format, max_length)
    kept_train = [p for p in train if p.chosen.num_labels and p.rejected.num_labels]
    kept_eval = [p for p in held if p.chosen.num_labels and p.rejected.num_labels]
    if not kept_train:
        raise UserError(
            f"no training pair keeps output tokens within max_length {max_length}; raise it"
        )
    weights = [p.weight for p in kept_train]
    stats = split_stats(
        config, validation, train, held, kept_train, kept_eval, max_length, length_source
    )
    stats["sample_weight"] = {
        "min": min(weights),
        "max": max(weights),
        "mean": sum(weights) / len(weights),
    }
    return PairData(train=kept_train, eval=kept_eval, max_length=max_length, stats=stats)


def _sides(triples: Sequence[tuple[str, int, dict]]) -> tuple[list, list]:
    chosen = [(s, r, {**rec, "output": rec["chosen"]}) for s, r, rec in triples]
    rejected = [(s, r, {**rec, "output": rec["rejected"]}) for s, r, rec in triples]
    return chosen, rejected


def _cut(pair: PairExample, max_length: int) -> PairExample:
    """The pair with both sequences cut to `max_length` tokens (flagged when cut)."""
    from reasonguard.train.data import _truncate

    chosen, rejected = _truncate(pair.chosen, max_length), _truncate(pair.rejected, max_length)
    return PairExample(chosen, rejected, pair.weight, pair.split, pair.row)


def _encode_pairs(
    triples: Sequence[tuple[str, int, dict]], tokenizer: Any, fmt: str, max_length: int | None
) -> list[PairExample]:
    chosen, rejected = _sides(triples)
    a = encode(chosen, tokenizer, fmt, max_length)
    b = encode(rejected, tokenizer, fmt, max_length)
    pairs = []
    for (split, row, record), x, y in zip(triples, a, b, strict=True):
        weight = record.get("sample_weight")
        pairs.append(PairExample(x, y, 1.0 if weight is None else float(weight), split, row))
    return pairs


# --------------------------------------------------------------------------------------------
# Batches


def collate_pairs(pairs: Sequence[PairExample], packed: bool, pad_token_id: int) -> dict[str, Any]:
    """The sequences of some pairs as one batch: chosen ones first (sequence i), then the
    rejected ones (sequence n + i); `sequence_ids` says which sequence owns each position.

    Packed: one row, `position_ids` restarting per sequence (no attention across sequences);
    else right-padded rows with an attention mask.
    """
    import torch

    from reasonguard.train.data import collate, collate_packed

    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if packed:
        batch = collate_packed(sequences)
        batch["sequence_ids"] = torch.cat(
            [torch.full((len(e),), i, dtype=torch.long) for i, e in enumerate(sequences)]
        )[None]
    else:
        batch = collate(sequences, pad_token_id)
        rows, width = batch["input_ids"].shape
        batch["sequence_ids"] = torch.arange(rows)[:, None].expand(rows, width).contiguous()
    return batch


# --------------------------------------------------------------------------------------------
# The reference log-probs, computed once and saved in the run directory

REFERENCE_FILE = "reference_logps.safetensors"


def attach_reference(groups: dict[str, list[PairExample]], tensors: dict[str, Any]) -> None:
    """Give every pair its reference log-probs from `tensors` (`<group>_chosen/_rejected`)."""
    for name, pairs in groups.items():
        if not pairs:
            continue
        chosen, rejected = tensors[f"{name}_chosen"], tensors[f"{name}_rejected"]
        for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist(), strict=True):
            pair.reference_chosen, pair.reference_rejected = c, r


def saved_reference(
    run_dir: Path, groups: dict[str, list[PairExample]], resuming: bool
) -> dict | None:
    """The reference log-probs saved in `run_dir`, or None when they are still to compute.

    Raises:
        UserError: the file holds another number of pairs, or it is missing on resume.
    """
    from safetensors.torch import load_file

    path = run_dir / REFERENCE_FILE
    if path.is_file():
        saved = load_file(str(path))
        for name, pairs in groups.items():
            held = len(saved.get(f"{name}_chosen", []))
            if held != len(pairs):
                raise UserError(
                    f"{path} holds reference log-probs of {held} {name} pairs, the data now "
                    f"has {len(pairs)}: the pairs changed; use a new output_dir"
                )
        return saved
    if resuming:
        raise UserError(
            f"cannot resume {run_dir}: {REFERENCE_FILE} is missing, and the reference "
            "log-probs cannot be recomputed from trained weights; start a new output_dir"
        )
    return None
