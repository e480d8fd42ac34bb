"""When a planned run does not fit its GPU: the override sets that would (`smaller_alternatives`:
checkpointing, a smaller micro-batch, LoRA or QLoRA) and the fewest GPUs at which a sharded
launch would (`sharded_fit`), each estimated with the memory model (`plan.memory`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from reasonguard.plan.batch_profile import token_profile
from reasonguard.plan.hardware import Architecture
from reasonguard.plan.memory import memory_estimate

# The process counts the "does not fit" advice tries with fsdp / zero3 (GPUs of one node).
SHARDED_PROCESS_COUNTS = (2, 4, 8)


def sharded_fit(
    arch: Architecture,
    c: Any,
    bf16: bool,
    rows: tuple[Any, Any, int, bool],
    checkpointing: bool,
    capacity: float,
    current: tuple[str, int],
) -> dict[str, Any]:
    """The smallest process count of `SHARDED_PROCESS_COUNTS` at which fsdp or zero3 fits,
    with the per-GPU estimate of each that does (the current strategy and count left out).

    `rows` are the training rows' (lengths, label counts, pack budget, per-sample attention): each count
    shares every step's rows out anew, which sets its largest micro-batch. Checkpointing is the
    run's: train decides `auto` from one process's full replica, the same for every count.

    Returns:
        {"num_processes": N or None, "options": [{"sharding", "total_bytes"}...],
        "tried": the counts tried}.
    """
    lengths, labels, budget, per_sample = rows
    for n in SHARDED_PROCESS_COUNTS:
        profile = token_profile(lengths, labels, c, budget, per_sample, n)
        options = []
        for sharding in ("fsdp", "zero3"):
            if (sharding, n) == current:
                continue
            total = memory_estimate(
                arch,
                c,
                bf16,
                profile["max_micro_tokens"],
                profile["max_micro_label_tokens"],
                checkpointing,
                True,
                sharding,
                n,
            )["total"]
            if total <= capacity:
                options.append({"sharding": sharding, "total_bytes": total})
        if options:
            return {"num_processes": n, "options": options, "tried": list(SHARDED_PROCESS_COUNTS)}
    return {"num_processes": None, "options": [], "tried": list(SHARDED_PROCESS_COUNTS)}


def smaller_alternatives(
    arch: Architecture,
    c: Any,
    bf16: bool,
    profile: dict[str, Any],
    checkpointing: bool,
    on_gpu: bool,
    capacity: float,
    sharding: str = "ddp",
    processes: int = 1,
    limit: int = 4,
) -> list[dict[str, Any]]:
    """Override sets whose memory estimate fits: each a combination of checkpointing on, a
    smaller micro-batch, and a frozen (LoRA) or 4-bit (QLoRA) base, fewest changes first, then
    the cheapest in speed (checkpointing, micro-batch, LoRA, QLoRA); a set that contains a
    fitting smaller set is left out. Estimated per GPU under `sharding` over `processes` (QLoRA
    only with ddp: it cannot be sharded)."""
    share = profile["max_micro_label_tokens"] / max(1, profile["max_micro_tokens"])
    tokens = profile["max_micro_tokens"]
    ckpt_choices: list[list[str]] = [[]] + (
        [] if checkpointing else [["gradient_checkpointing=true"]]
    )
    # A smaller micro-batch: a smaller token budget (packed), or fewer rows (padded) with more
    # accumulation so the rows per optimizer step stay the same.
    base = (c.pack_tokens or tokens) if c.packing else c.per_device_train_batch_size
    sizes, size = [base], base
    while size > (256 if c.packing else 1):
        size //= 2
        if c.packing or c.samples_per_step % size == 0:
            sizes.append(size)

    def resize(size: int) -> list[str]:
        if c.packing:
            return [f"pack_tokens={size}"]
        if c.effective_batch_size is not None:  # the accumulation is derived from it
            return [f"per_device_train_batch_size={size}"]
        accumulation = c.samples_per_step // size
        return [
            f"per_device_train_batch_size={size}",
            f"gradient_accumulation_steps={accumulation}",
        ]

    modes = [c.finetuning] + [
        m
        for m in ("lora", "qlora")
        if m != c.finetuning
        and c.finetuning != "qlora"
        and (m == "lora" or (on_gpu and sharding == "ddp"))
    ]
    # Each axis is ordered from mild to drastic; a candidate at least as drastic as a fitting
    # one on every axis adds nothing.
    candidates = []
    for (mi, mode), (si, size), ckpt in itertools.product(
        enumerate(modes), enumerate(sizes), ckpt_choices
    ):
        overrides = list(ckpt)
        overrides += resize(size) if si else []
        overrides += [f"finetuning={mode}"] if mi else []
        rank = (len(ckpt), si, mi)
        changes = len(ckpt) + (si > 0) + (mi > 0)
        candidates.append(((changes, mi, si, len(ckpt)), rank, overrides, mode, size))
    fitting: list[dict[str, Any]] = []
    ranks: list[tuple[int, int, int]] = []
    for _, rank, overrides, mode, size in sorted(candidates, key=lambda x: x[0]):
        if not overrides or any(all(f <= r for f, r in zip(fr, rank, strict=True)) for fr in ranks):
            continue
        cfg = dataclasses.replace(c, finetuning=mode)
        micro = max(1, tokens * size // base)
        ckpt = checkpointing or rank[0] > 0
        total = memory_estimate(
            arch, cfg, bf16, micro, round(micro * share), ckpt, on_gpu, sharding, processes
        )
        if total["total"] <= capacity:
            fitting.append({"overrides": overrides, "total_bytes": total["total"]})
            ranks.append(rank)
    return fitting[:limit]
