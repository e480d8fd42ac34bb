"""Calibrating a cascade of any number of tiers (`reasonguard calibrate --classifier`).

Every tier runs on every dev item. The items are split as for the two-tier cascade
(`calibrate.split_dev`, a seeded stratified split; `per_source` also stratifies by source
file, so each file gives its share to both parts). On the calibration part the bands are chosen
from the top down: the tier just below the top first, then the one below it, each with
`bands.choose_band`, the rule of the two-tier cascade, counted against the F1 of the top tier
alone. The budget is shared evenly: the tier `k` places below the top may bring the cascade to
`k / (tiers - 1)` of `max_f1_drop` below the top tier, so with three tiers the fast tier keeps
the cascade within half the budget and the classifier within all of it. Each tier's band is
chosen given the bands above it: an item it passes up gets the answer of the cascade above.

Both parts are reported (`held_out` is what the choice never read): per task the F1 of the top
tier, of each tier alone and of the cascade, and the drop; the share of items each tier
answered; the same per source file (`by_source`); and the generated tokens and seconds per item.

Example:
    >>> from reasonguard import load_guard
    >>> from reasonguard.cascade.calibrate import items_from_benchmarks
    >>> from reasonguard.cascade.fit import calibrate_tiers
    >>> from reasonguard.cascade.replay import ReplayGuard
    >>> from reasonguard.cascade.tiers import Tier
    >>> items = items_from_benchmarks(["AegisSafetyTest"], "data/benchmarks")
    >>> tiers = [Tier("classifier", load_guard("runs/classifier/final")),
    ...          Tier("reasoning", ReplayGuard("predictions/GuardReasoner-1B"))]
    >>> record = calibrate_tiers(tiers, items, max_f1_drop=1.0, held_out_share=0.5)
    >>> record["tier_bands"]["classifier"], record["held_out"]["escalated_share"]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from reasonguard.cascade.bands import (
    Bands,
    TaskEvidence,
    choose_band,
    f1_score,
    positive_probability,
)
from reasonguard.cascade.calibrate import DEFAULT_MAX_F1_DROP, DevItem, split_dev
from reasonguard.cascade.holdout import (
    DEFAULT_HELD_OUT_SHARE,
    DEFAULT_SEED,
    HASH_METHOD,
    METHOD,
    item_hash,
)
from reasonguard.cascade.tiers import Tier, answering_tiers
from reasonguard.errors import UserError
from reasonguard.format import POSITIVE_LABEL, TASKS


def _asked(item: DevItem) -> tuple[str, ...]:
    return ("prompt",) if item.response is None else TASKS


def source_of(item: DevItem) -> str:
    """The file (or split) a dev item came from: its place without the row."""
    return item.place.rsplit(" row ", 1)[0]


def _labelled(items: Sequence[DevItem], positions: Sequence[int], task: str) -> list[int]:
    return [k for k in positions if task in _asked(items[k]) and items[k].truth[task] is not None]


def _positive(result: Any, task: str) -> bool:
    return result.label(task) == POSITIVE_LABEL[task]


def choose_tier_bands(
    items: Sequence[DevItem],
    verdicts: Mapping[str, Sequence[Any]],
    positions: Sequence[int],
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    tasks: Sequence[str] | None = None,
) -> tuple[dict[str, Bands], dict[str, dict[str, Any]]]:
    """The bands of every tier but the top, chosen from the top down on `positions` (see the
    module docstring).

    Args:
        verdicts: per tier name, cheapest first, one result (`label(task)`, `scores`) per item.
        tasks: the tasks to choose bands for (default all); another task gets no band, so it
            never sends an item up (the lower tier's verdict stands for it). A task without
            labelled items gets the band [0, 1] (everything asking it goes up) unless left out
            here.

    Returns:
        (bands per lower tier; per lower tier and task, what `choose_band` saw: its
        `reasoning_f1` is that of the cascade above the tier, `budget` the tier's share of
        `max_f1_drop`).

    Raises:
        UserError: fewer than two tiers, or a tier without one verdict per item.
    """
    names = list(verdicts)
    if len(names) < 2:
        raise UserError(f"a cascade needs at least two tiers, got {names}")
    for name in names:
        if len(verdicts[name]) != len(items):
            raise UserError(
                f"tier {name!r}: {len(verdicts[name])} verdicts for {len(items)} dev items"
            )
    top = names[-1]
    chosen: dict[str, Bands] = {}
    choice: dict[str, dict[str, Any]] = {}
    above = list(verdicts[top])  # what an item passed up from the tier being fitted gets
    for k in range(len(names) - 2, -1, -1):
        name = names[k]
        drop = max_f1_drop * (len(names) - 1 - k) / (len(names) - 1)
        choice[name], ranges = {}, {}
        for task in TASKS if tasks is None else [t for t in TASKS if t in tasks]:
            keep = _labelled(items, positions, task)
            truth = [items[i].truth[task] == POSITIVE_LABEL[task] for i in keep]
            evidence = TaskEvidence(
                truth=truth,
                reasoning=[_positive(above[i], task) for i in keep],
                fast=[_positive(verdicts[name][i], task) for i in keep],
                p_fast=[positive_probability(verdicts[name][i].scores, task) for i in keep],
            )
            reference = f1_score(truth, [_positive(verdicts[top][i], task) for i in keep])
            found = choose_band(evidence, drop, reference)
            choice[name][task] = {**found, "budget": round(drop, 4)}
            if found["band"] is not None:
                ranges[task] = (found["band"][0], found["band"][1])
        chosen[name] = Bands(ranges)
        lower = answering_tiers([verdicts[name], above], [chosen[name]], [_asked(i) for i in items])
        above = [verdicts[name][i] if t == 0 else above[i] for i, t in enumerate(lower)]
    return {name: chosen[name] for name in names[:-1]}, {n: choice[n] for n in names[:-1]}


def fit_tiers(
    items: Sequence[DevItem],
    verdicts: Mapping[str, Sequence[Any]],
    split: tuple[Sequence[int], Sequence[int]],
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Choose every lower tier's bands on the calibration positions of `split`
    (`choose_tier_bands`, with `tasks`) and report the cascade on both parts.

    Returns:
        `tiers` (the names), `tier_bands` (per lower tier, `Bands.to_dict`), `band_choice`,
        `max_f1_drop`, `items`, and per part (`calibration`, `held_out`) its `report_part`.
    """
    calibration, held_out = split
    _check_tasks(tasks)
    chosen, choice = choose_tier_bands(items, verdicts, calibration, max_f1_drop, tasks)
    names = list(verdicts)
    answered = answering_tiers(
        [verdicts[n] for n in names], [chosen[n] for n in names[:-1]], [_asked(i) for i in items]
    )
    return {
        "tiers": names,
        "tier_bands": {name: bands.to_dict() for name, bands in chosen.items()},
        "band_choice": choice,
        "max_f1_drop": max_f1_drop,
        "items": len(items),
        "calibration": report_part(items, verdicts, answered, calibration),
        "held_out": report_part(items, verdicts, answered, held_out),
    }


def _check_tasks(tasks: Sequence[str] | None) -> None:
    unknown = [t for t in tasks or () if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; expected {', '.join(TASKS)}")


def report_part(
    items: Sequence[DevItem],
    verdicts: Mapping[str, Sequence[Any]],
    answered: Sequence[int],
    positions: Sequence[int],
    by_source: bool = True,
) -> dict[str, Any]:
    """The cascade on `positions`: per task the F1 of the top tier (`top_f1`), of each tier
    alone (`f1` by tier), of the cascade (`cascade_f1`) and `f1_drop` (points below the top);
    the items each tier answered (`answered`, `answered_share`); `escalated` (answered by the
    top tier) and its share; and, with `by_source`, the same per source file."""
    names = list(verdicts)
    top = names[-1]
    tasks: dict[str, Any] = {}
    for task in TASKS:
        keep = _labelled(items, positions, task)
        if not keep:
            tasks[task] = {"items": 0}
            continue
        truth = [items[i].truth[task] == POSITIVE_LABEL[task] for i in keep]
        alone = {n: round(f1_score(truth, [_positive(verdicts[n][i], task) for i in keep]), 2)
                 for n in names}  # fmt: skip
        cascade = f1_score(truth, [_positive(verdicts[names[answered[i]]][i], task) for i in keep])
        tasks[task] = {
            "items": len(keep),
            "top_f1": alone[top],
            "f1": alone,
            "cascade_f1": round(cascade, 2),
            "f1_drop": round(alone[top] - cascade, 2) + 0.0,  # + 0.0: no -0.0
        }
    n = len(positions)
    counts = {name: sum(names[answered[i]] == name for i in positions) for name in names}
    part: dict[str, Any] = {
        "items": n,
        "tasks": tasks,
        "answered": counts,
        "answered_share": {name: (c / n if n else None) for name, c in counts.items()},
        "escalated": counts[top],
        "escalated_share": counts[top] / n if n else None,
    }
    if by_source:
        sources: dict[str, list[int]] = {}
        for i in positions:
            sources.setdefault(source_of(items[i]), []).append(i)
        part["by_source"] = {
            source: report_part(items, verdicts, answered, kept, by_source=False)
            for source, kept in sources.items()
        }
    return part


def measure_tiers(
    tiers: Sequence[Tier],
    items: Sequence[DevItem],
    max_new_tokens: int | None = None,
    log: Callable[[str], Any] | None = None,
) -> tuple[dict[str, list[Any]], dict[str, float]]:
    """Every tier's verdicts on every item, and each tier's seconds per item. The top tier's
    reasoned verdicts are not scored (nothing reads their probabilities)."""
    say = log or (lambda text: None)
    pairs = [{"prompt": i.prompt, "response": i.response} for i in items]
    verdicts, seconds = {}, {}
    for k, tier in enumerate(tiers):
        say(f"{tier.name} tier on {len(items)} dev items ...")
        clock = time.perf_counter()
        verdicts[tier.name] = tier.classify(pairs, k < len(tiers) - 1, max_new_tokens)
        seconds[tier.name] = (time.perf_counter() - clock) / max(len(items), 1)
    return verdicts, seconds


def calibrate_tiers(
    tiers: Sequence[Tier],
    items: Sequence[DevItem],
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    held_out_share: float = DEFAULT_HELD_OUT_SHARE,
    seed: int = DEFAULT_SEED,
    per_source: bool = False,
    max_new_tokens: int | None = None,
    log: Callable[[str], Any] | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every tier on `items`, choose the bands on a seeded stratified part of them and
    report the cascade on the rest (see the module docstring).

    Args:
        tiers: cheapest first; their `bands` are ignored (they are what is chosen).
        per_source: stratify the split by source file too (each file split in its share).
        tasks: the tasks to choose bands for (see `choose_tier_bands`).

    Returns:
        The `cascade.json` record: that of `fit_tiers`, plus `bands` (the fast tier's, which
        the two-tier cascade of the same guard reads, when there is a fast tier), `split`,
        `seconds_per_item` and `tokens_per_item` per tier and for the cascade (its
        seconds estimated from each tier's and the held-out shares; None for a replayed tier,
        whose outputs cost nothing here, and tokens None where the top tier does not count
        them, as released predictions do not), and `item_hashes`.

    Raises:
        UserError: no items, a negative budget, a held-out share outside (0, 1), fewer than
            two distinct items or two tiers.
    """
    if not items:
        raise UserError("the dev set has no items")
    if max_f1_drop < 0:
        raise UserError(f"--max-f1-drop must not be negative, got {max_f1_drop}")
    if len(tiers) < 2:
        raise UserError(f"a cascade needs at least two tiers, got {len(tiers)}")
    _check_tasks(tasks)
    split = split_dev(items, held_out_share, seed, per_source)  # fails before any tier runs
    verdicts, seconds = measure_tiers(tiers, items, max_new_tokens, log)
    record = fit_tiers(items, verdicts, split, max_f1_drop, tasks)
    names = record["tiers"]
    held = record["held_out"]
    reach = 1.0  # the share of held-out items that reach each tier
    estimated: float | None = 0.0
    for tier in tiers:
        if getattr(tier.guard, "replayed", False):
            seconds[tier.name] = None  # type: ignore[assignment]
        if estimated is not None and seconds[tier.name] is not None:
            estimated += seconds[tier.name] * reach
        else:
            estimated = None
        reach -= held["answered_share"][tier.name] or 0.0
    top = tiers[-1]
    counted = getattr(top.guard, "token_counts", True)
    tokens = [r.num_tokens for r in verdicts[names[-1]]]
    answered = answering_tiers(
        [verdicts[n] for n in names],
        [Bands.from_dict(record["tier_bands"][n]) for n in names[:-1]],
        [_asked(i) for i in items],
    )
    top_answered = [k for k in split[1] if answered[k] == len(names) - 1]
    cascade_tokens = sum(tokens[k] for k in top_answered)
    out: dict[str, Any] = {**record}
    if "fast" in record["tier_bands"]:
        out = {"bands": record["tier_bands"]["fast"], **out}
    return {
        **out,
        "split": {
            "method": METHOD,
            "held_out_share": held_out_share,
            "seed": seed,
            "strata": "the true labels of the three tasks"
            + (" and the source file" if per_source else ""),
        },
        "seconds_per_item": {**seconds, "cascade_estimated": estimated},
        "tokens_per_item": {
            names[-1]: sum(tokens) / len(items) if counted else None,
            "cascade": cascade_tokens / len(split[1]) if counted else None,
        },
        "item_hashes": {
            "method": HASH_METHOD,
            **{
                name: [item_hash(items[k].prompt, items[k].response) for k in positions]
                for name, positions in (("calibration", split[0]), ("held_out", split[1]))
            },
        },
    }


def render_summary(record: dict[str, Any]) -> str:
    """The printed table of a cascade of tiers: per task each lower tier's band, then on the
    held-out items the F1 of the top tier, of each tier alone and of the cascade, and the drop;
    then the share of held-out items each tier answered (`reasonguard calibrate --classifier`
    prints it)."""
    split, held = record["split"], record["held_out"]
    cal = record["calibration"]
    names = record["tiers"]
    lower, top = names[:-1], names[-1]
    lines = [
        f"{len(names)}-tier cascade ({', then '.join(names)}): bands chosen on {cal['items']} dev "
        f"items, reported on {held['items']} held out ({split['method']}, held-out share "
        f"{split['held_out_share']}, seed {split['seed']}); F1 budget {record['max_f1_drop']} "
        f"points below {top}",
        "| task | "
        + " | ".join(f"{n} band" for n in lower)
        + " | items (calibration / held out) | "
        + " | ".join(f"{n} F1" for n in names)
        + " | cascade F1 | F1 drop |",
        "|---|" + "---|" * len(lower) + "---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for task, got in held["tasks"].items():
        bands = [record["tier_bands"][n][task] for n in lower]
        f1 = got.get("f1") or {}
        lines.append(
            f"| {task} | "
            + " | ".join("none" if b is None else f"[{b[0]:.3f}, {b[1]:.3f}]" for b in bands)
            + f" | {cal['tasks'][task]['items']} / {got['items']} | "
            + " | ".join(_num(f1.get(n)) for n in names)
            + f" | {_num(got.get('cascade_f1'))} | {_num(got.get('f1_drop'))} |"
        )
    shares = ", ".join(f"{n} {100 * (held['answered_share'][n] or 0):.0f}%" for n in names)
    tokens = record["tokens_per_item"]
    cost = (
        ""
        if tokens.get(top) is None
        else f"; generated tokens per item: {top} {tokens[top]:.1f}, cascade "
        f"{tokens['cascade']:.1f}"
    )
    lines.append(f"held-out items answered by each tier: {shares}{cost}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
