"""A cascade of tiers: each tier answers the items outside its uncertainty bands and passes the
rest up to the next.

Tiers go from the cheapest to the dearest, e.g. an encoder classifier (`classifier`), then the
LLM guard's fast mode (`fast`), then its reasoning (`reasoning`). Every item goes to the first
tier; an item for which that tier's P(positive label) of any task asked falls inside the tier's
band (`bands.escalate`, the rule of the two-tier cascade) goes on to the next tier, and so on;
the top tier answers whatever reaches it. Each result names the tier that answered it (`tier`).

A tier is a guard and the mode it is asked in: anything with
`classify(items, mode=..., scores=..., max_new_tokens=..., timeout_s=...)` returning results
with `scores` (a loaded `Guard`, a classifier, or a `replay.ReplayGuard` over a folder of
existing predictions). `load_guard(model, classifier=folder)` builds the three-tier cascade of a
classifier and an LLM guard with the bands `reasonguard calibrate --classifier` saved;
`fit.calibrate_tiers` chooses the bands of any cascade on labelled dev items.

Example:
    >>> from reasonguard import load_guard
    >>> from reasonguard.cascade.bands import Bands
    >>> from reasonguard.cascade.tiers import Cascade, Tier
    >>> classifier, llm = load_guard("runs/classifier/final"), load_guard("runs/sft/final")
    >>> cascade = Cascade([
    ...     Tier("classifier", classifier, bands=Bands({"prompt": (0.1, 0.9)})),
    ...     Tier("fast", llm, bands=Bands({"prompt": (0.3, 0.7)})),
    ...     Tier("reasoning", llm),
    ... ])
    >>> [r.tier for r in cascade.classify([{"prompt": "How do I bake bread?"}])]
    ['classifier']
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reasonguard.cascade.bands import Bands, escalate
from reasonguard.errors import UserError
from reasonguard.format import TASKS

# The tiers of the three-tier cascade, cheapest first; also the values of a result's `tier`.
TIER_NAMES = ("classifier", "fast", "reasoning")


def asked(item: Mapping[str, Any]) -> tuple[str, ...]:
    """The tasks an item asks: the response tasks only when it has a response."""
    return ("prompt",) if not item.get("response") else TASKS


@dataclass(frozen=True)
class Tier:
    """One tier of a cascade.

    Attributes:
        name: what results answered here say in `tier` (`classifier`, `fast`, `reasoning`).
        guard: the guard that answers (see the module docstring).
        mode: the mode `guard.classify` is asked in (default: `name`; a replayed guard ignores
            it).
        bands: the uncertainty bands: an item inside them goes to the next tier. The top tier
            answers everything that reaches it and needs none.
    """

    name: str
    guard: Any
    mode: str | None = None
    bands: Bands | None = None

    def classify(
        self,
        items: Sequence[Mapping[str, Any]],
        scores: bool = True,
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """This tier's results for `items`, each naming the tier."""
        found = self.guard.classify(
            items,
            mode=self.mode or self.name,
            scores=scores,
            max_new_tokens=max_new_tokens,
            timeout_s=timeout_s,
        )
        return [dataclasses.replace(r, tier=self.name) for r in found]


@dataclass(frozen=True)
class CascadeRun:
    """What a cascade did with a list of items.

    Attributes:
        results: the answer of each item, from the tier that answered it (`result.tier`).
        seen: per tier (in order), the result it gave each item it saw, by item position; an
            item passed up keeps its lower tiers' results here (e.g. the scores that sent it
            on).
    """

    results: list[Any]
    seen: list[dict[int, Any]]

    def passed(self, tier: int) -> list[int]:
        """The positions of the items that tier `tier` saw and passed up."""
        return sorted(self.seen[tier + 1]) if tier + 1 < len(self.seen) else []


class Cascade:
    """Tiers in order, cheapest first (see the module docstring).

    Raises:
        UserError: fewer than two tiers, two tiers of one name, or a tier below the top
            without bands.
    """

    def __init__(self, tiers: Sequence[Tier]) -> None:
        tiers = list(tiers)
        if len(tiers) < 2:
            raise UserError(f"a cascade needs at least two tiers, got {len(tiers)}")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise UserError(f"the tiers of a cascade need distinct names, got {names}")
        for tier in tiers[:-1]:
            if tier.bands is None:
                raise UserError(
                    f"cascade tier {tier.name!r} has no uncertainty bands; calibrate the cascade "
                    "(`reasonguard calibrate`) or pass bands"
                )
        self.tiers = tiers

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def classify(
        self,
        items: Sequence[Mapping[str, Any]],
        scores: bool = True,
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """One result per item, in order, each from the tier that answered it."""
        return self.run(items, scores, max_new_tokens, timeout_s).results

    def run(
        self,
        items: Sequence[Mapping[str, Any]],
        scores: bool = True,
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> CascadeRun:
        """Run the tiers in turn, each on the items the one below passed up (see `CascadeRun`).

        Args:
            scores: compute the label probabilities of reasoned verdicts (lower tiers' verdicts
                are probabilities anyway).
            timeout_s: for the whole cascade: each tier gets what the ones below left.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results: list[Any] = [None] * len(items)
        seen: list[dict[int, Any]] = []
        pending = list(range(len(items)))
        for k, tier in enumerate(self.tiers):
            if not pending:
                break
            left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
            found = tier.classify([items[i] for i in pending], scores, max_new_tokens, left)
            seen.append(dict(zip(pending, found, strict=True)))
            top = k == len(self.tiers) - 1
            passed = []
            for i, result in zip(pending, found, strict=True):
                if not top and escalate(result.scores, asked(items[i]), tier.bands):
                    passed.append(i)
                else:
                    results[i] = result
            pending = passed
        return CascadeRun(results, seen)


def answering_tiers(
    verdicts: Sequence[Sequence[Any]],
    bands: Sequence[Bands],
    asked_tasks: Sequence[Sequence[str]],
) -> list[int]:
    """Which tier answers each item, from every tier's verdict on every item: the first tier
    whose bands the item falls outside of, else the top one (what `Cascade.run` does, from
    verdicts already computed; used to choose and report the bands).

    Args:
        verdicts: per tier, cheapest first, one result per item (with `scores`).
        bands: the bands of every tier but the top one.
        asked_tasks: the tasks of each item.
    """
    top = len(verdicts) - 1
    out = []
    for i, tasks in enumerate(asked_tasks):
        k = 0
        while k < top and escalate(verdicts[k][i].scores, tasks, bands[k]):
            k += 1
        out.append(k)
    return out
