"""Token counts and micro-batch sizes of a run's rows, as the trainer would batch them.

`token_profile` cuts the first steps of epoch 0 into micro-batches with the trainer's own code
(`data.step_plan`, `data.micro_batches`, `data.pack`) and counts real, computed (padded or packed)
and labelled tokens, the attention work, and the largest micro-batch, which sets the peak memory
(`plan.memory`) and the FLOPs (`plan.timing`). When the rows are not tokenized locally,
`sample_lengths` draws row lengths matching published token statistics (`PUBLISHED_TOKENS`).

Attention work is counted the way the kernel the run uses computes it (`per_sample_attention`):
per sample (each sample's causal triangle, n(n+1)/2 keys) for packed rows under SDPA, which runs
per sample (`train.packed_attention`), and under flash-attention on a GPU (its variable-length
kernel, for packed rows and for padded ones, which transformers unpads); otherwise the kernel
gets an explicit mask and computes the whole square of each padded or packed row.

Example:
    >>> from types import SimpleNamespace
    >>> from reasonguard.plan.batch_profile import token_profile
    >>> c = SimpleNamespace(rows_per_step=lambda world: 2, seed=0, packing=True)
    >>> p = token_profile([3, 4], [1, 2], c, budget=8, per_sample=True)
    >>> p["computed_tokens"], p["attention_keys"]  # 3 x 4 / 2 + 4 x 5 / 2
    (7, 16)
"""

from __future__ import annotations

import math
from typing import Any

from reasonguard.errors import UserError

# GuardReasonerTrain (the GuardReasoner paper's training set, arXiv:2501.18492; hub dataset
# yueliu1999/GuardReasonerTrain) with the Llama 3 tokenizer: mean ~570 tokens a row, p50 ~520,
# p95 ~930. The label (output) share, 0.54, is measured on nine real rows of the dataset in chat
# format (1,948 of 3,591 tokens are output).
PUBLISHED_TOKENS = {
    "yueliu1999/GuardReasonerTrain": {"mean": 570, "p50": 520, "p95": 930, "label_share": 0.54}
}
SIMULATED_STEPS = 200  # steps of epoch 0 cut into micro-batches to measure padding / sizes


def per_sample_attention(attn_implementation: str, packing: bool, on_gpu: bool) -> bool:
    """Whether the run's attention kernel works per sample (causal, on each sample's own tokens)
    rather than over the whole square of each padded or packed row.

    - sdpa (or `auto`) with packing on CPU: per sample (`train.packed_attention` runs causal SDPA
      on each sample of a packed row).
    - flash_attention_2 on a GPU: per sample (the variable-length kernel; transformers unpads
      padded rows and splits packed ones at the position_ids restarts). `auto` picks it on a GPU
      only where flash-attn is installed, which a plan for another machine cannot know: the plan
      counts `auto` on a GPU as SDPA.
    - otherwise (eager; sdpa on a GPU, whose packed rows get a block-diagonal mask over the whole
      row; sdpa on padded rows, which gets an explicit padding mask): the square.

    Examples:
        >>> per_sample_attention("sdpa", True, False), per_sample_attention("sdpa", False, True)
        (True, False)
        >>> per_sample_attention("auto", True, True), per_sample_attention("eager", True, True)
        (False, False)
    """
    if attn_implementation == "flash_attention_2":
        return on_gpu
    return packing and attn_implementation in ("sdpa", "auto") and not on_gpu


class _Row:
    """A row as the batching code sees it: a length (and its label count)."""

    __slots__ = ("n", "labels")

    def __init__(self, n: int, labels: int) -> None:
        self.n, self.labels = n, labels

    def __len__(self) -> int:
        return self.n


def sample_lengths(rows: int, stats: dict[str, float], max_length: int, seed: int = 0) -> Any:
    """A seeded log-normal sample of row lengths with the published mean and the p50-p95 spread
    (sigma = ln(p95 / p50) / 1.645), cut at max_length."""
    import numpy as np

    sigma = math.log(stats["p95"] / stats["p50"]) / 1.645
    mu = math.log(stats["mean"]) - sigma**2 / 2  # so the mean, not the median, is exact
    lengths = np.random.default_rng(seed).lognormal(mu, sigma, size=rows)
    return np.minimum(np.maximum(lengths.round(), 16), max_length).astype(int)


def _rank_shares(rows: list[_Row], world_size: int) -> list[list[_Row]]:
    """Each rank's share of one step's rows, as `Processes.shard` cuts it: sorted longest first
    (ties in input order), every world_size-th row from the rank's position."""
    if world_size == 1:
        return [rows]
    ordered = sorted(rows, key=len, reverse=True)
    return [ordered[rank::world_size] for rank in range(world_size)]


def token_profile(
    lengths: Any,
    label_counts: Any,
    config: Any,
    budget: int,
    per_sample: bool,
    world_size: int = 1,
) -> dict[str, Any]:
    """Per-epoch token counts and micro-batch sizes of rows with these lengths, batched by the
    trainer's code on the first `SIMULATED_STEPS` steps of epoch 0 (scaled to the epoch).

    Args:
        lengths, label_counts: per training row, tokens and labelled tokens (after truncation).
        config: the run config (batch sizes, packing, seed).
        budget: tokens of one packed micro-batch.
        per_sample: attention runs per sample (`per_sample_attention`): each sample's causal
            triangle is counted; otherwise the whole square of each (padded or packed) row.
        world_size: training processes; each step's rows (`rows_per_step(world_size)`) are
            shared out among them and each cuts its share into its own micro-batches. Token
            counts are summed over the processes; the largest micro-batch is any one's.

    Returns:
        `real_tokens`, `label_tokens`, `computed_tokens` (with padding) and `attention_keys`
        (sum over computed tokens of the keys each one is scored against) per epoch, and the
        largest micro-batch in tokens (`max_micro_tokens`) with its labels.
    """
    from reasonguard.train.data import micro_batches, pack, step_plan

    rows = [_Row(int(n), int(k)) for n, k in zip(lengths, label_counts, strict=True)]
    plan = step_plan(len(rows), config.rows_per_step(world_size), config.seed, 0)
    seen = plan[:SIMULATED_STEPS]
    computed = attention = seen_tokens = 0
    largest: list[_Row] = []
    largest_tokens = 0
    for indices in seen:
        step_rows = [rows[i] for i in indices]
        seen_tokens += sum(r.n for r in step_rows)
        groups = []
        for share in _rank_shares(step_rows, world_size):
            if config.packing:
                groups += pack(share, budget)
            else:
                groups += micro_batches(share, config.per_device_train_batch_size)
        for group in groups:
            if config.packing:
                width = sum(r.n for r in group)
                tokens, square = width, width * width
            else:
                width = max(r.n for r in group)
                tokens, square = width * len(group), width * width * len(group)
            computed += tokens
            if per_sample:
                attention += sum(r.n * (r.n + 1) // 2 for r in group)
            else:
                attention += square
            if tokens > largest_tokens:
                largest, largest_tokens = group, tokens
    real = int(sum(lengths))
    scale = real / seen_tokens
    labels_largest = sum(r.labels for r in largest)
    return {
        "real_tokens": real,
        "label_tokens": int(sum(label_counts)),
        "computed_tokens": round(computed * scale),
        "attention_keys": round(attention * scale),
        "padding_efficiency": seen_tokens / computed,
        "max_micro_tokens": largest_tokens,
        "max_micro_label_tokens": labels_largest,
        "simulated_steps": len(seen),
    }


def row_tokens(c: Any, data: Any, data_plan: dict[str, Any], max_length: int) -> dict[str, Any]:
    """The token lengths of a run's rows: measured when the data was tokenized, else drawn.

    Args:
        c: the `SFTConfig`.
        data: the tokenized data (`train.data.prepare`'s result), or None when the rows were
            only counted (a hub dataset with no hub access).
        data_plan: the dry run's data plan (`dryrun.plan_sft`): its train and eval row counts.
        max_length: the row length cap the run uses.

    Returns:
        {"lengths", "labels"} of every training row, the evaluation set's "eval_tokens" and
        "eval_labels", a "source" text, whether it is "estimated", and "notes".

    Raises:
        UserError: the rows were not tokenized and no published statistics exist for them.
    """
    from reasonguard.data.sources import PUBLISHED_P95_TOKENS

    notes: list[str] = []
    if data is not None:
        return {
            "lengths": [len(e) for e in data.train],
            "labels": [e.num_labels for e in data.train],
            "eval_tokens": sum(len(e) for e in data.eval),
            "eval_labels": sum(e.num_labels for e in data.eval),
            "source": "measured: every training row, tokenized",
            "estimated": False,
            "notes": notes,
        }
    stats = PUBLISHED_TOKENS.get(c.dataset)
    if stats is None:
        raise UserError(
            f"cannot plan tokens: the rows of {c.dataset!r} were counted but not tokenized "
            "(tokenizer not reachable) and no published token statistics are known for it"
        )
    lengths = sample_lengths(data_plan["train_rows"], stats, max_length, seed=c.seed)
    eval_tokens = round(data_plan["eval_rows"] * stats["mean"])
    if c.dataset in PUBLISHED_P95_TOKENS and c.max_length == "auto":
        notes.append("max_length auto decided from the published p95 (ESTIMATED)")
    return {
        "lengths": lengths,
        "labels": [round(n * stats["label_share"]) for n in lengths],
        "eval_tokens": eval_tokens,
        "eval_labels": round(eval_tokens * stats["label_share"]),
        "source": (
            f"ESTIMATED: a seeded log-normal sample of row lengths with the published mean "
            f"{stats['mean']}, p50 {stats['p50']}, p95 {stats['p95']} (Llama 3 tokenizer), "
            f"{stats['label_share']:.0%} of tokens labelled"
        ),
        "estimated": True,
        "notes": notes,
    }
