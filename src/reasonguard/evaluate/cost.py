"""What generating a set of predictions cost (`CostTally`): items, generated tokens per item,
wall seconds per item (from the timing file `generate` keeps beside the predictions), the share
of items a cascade escalated to reasoning, the run's mode (reasoning, fast, cascade, or
classifier: an encoder classifier's rows, which generate no tokens either), and the share of
items each tier answered (`tier_shares`: from each row's `tier`, or its `mode` in rows written
before rows named their tier; a cascade with a classifier in front has three tiers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CostTally:
    """What a set of prediction rows cost: items, generated tokens, seconds, escalations."""

    items: int = 0
    tokens: int = 0
    with_tokens: int = 0
    seconds: float = 0.0
    with_seconds: int = 0
    escalated: int = 0
    with_escalated: int = 0
    fast: int = 0
    classifier: int = 0
    tiers: dict[str, int] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.items += 1
        tokens = row.get("num_tokens")
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
            self.tokens += tokens
            self.with_tokens += 1
        if isinstance(row.get("escalated"), bool):
            self.with_escalated += 1
            self.escalated += row["escalated"]
        self.fast += row.get("mode") == "fast"
        self.classifier += row.get("mode") == "classifier"
        tier = row.get("tier", row.get("mode", "reasoning"))
        if isinstance(tier, str):
            self.tiers[tier] = self.tiers.get(tier, 0) + 1

    def add_timing(self, pred_path: Path) -> None:
        """Seconds and rows from the timing file `generate` keeps for these predictions
        (`PRED_DIR/_generate/cost/<Benchmark>/generated_predictions.jsonl.json`)."""
        folder = pred_path.parent
        path = folder.parent / "_generate" / "cost" / folder.name / f"{pred_path.name}.json"
        try:
            timing = json.loads(path.read_text(encoding="utf-8"))
            seconds, rows = float(timing["seconds"]), int(timing["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # no timing kept (predictions from elsewhere): seconds stay unknown
        if seconds >= 0 and rows > 0:
            self.seconds += seconds
            self.with_seconds += rows

    def merge(self, other: CostTally) -> CostTally:
        merged = CostTally(
            *(
                getattr(self, f) + getattr(other, f)
                for f in self.__dataclass_fields__
                if f != "tiers"
            )
        )
        for counts in (self.tiers, other.tiers):
            for tier, n in counts.items():
                merged.tiers[tier] = merged.tiers.get(tier, 0) + n
        return merged

    @property
    def mode(self) -> str | None:
        if not self.items:
            return None
        if self.with_escalated:
            return "cascade"
        if self.classifier == self.items:
            return "classifier"
        return "fast" if self.fast == self.items else "reasoning"

    def to_dict(self) -> dict[str, Any]:
        """Per-item means over the rows that record each quantity (None when none does)."""
        return {
            "mode": self.mode,
            "items": self.items,
            "tokens_per_item": self.tokens / self.with_tokens if self.with_tokens else None,
            "seconds_per_item": self.seconds / self.with_seconds if self.with_seconds else None,
            "escalated_share": (
                self.escalated / self.with_escalated if self.with_escalated else None
            ),
            "tier_shares": {tier: self.tiers[tier] / self.items for tier in _ordered(self.tiers)},
        }


TIER_ORDER = ("classifier", "fast", "reasoning")


def _ordered(tiers: dict[str, int]) -> list[str]:
    """Tier names cheapest first (known ones), then any other in name order."""
    return [t for t in TIER_ORDER if t in tiers] + sorted(t for t in tiers if t not in TIER_ORDER)


def tier_text(cost: dict[str, Any]) -> str:
    """`classifier 60% / fast 30% / reasoning 10%`, or `-` for a run of one tier."""
    shares = cost.get("tier_shares") or {}
    if len(shares) < 2:
        return "-"
    return " / ".join(f"{tier} {100 * share:.0f}%" for tier, share in shares.items())
