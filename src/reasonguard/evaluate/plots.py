"""Charts of `compare`: grouped bars of F1 per benchmark, one PNG per task, and F1 against
generated tokens per item, one point per run (matplotlib, Agg backend).

matplotlib is imported inside the functions, so importing this module costs nothing.

Example:
    >>> from reasonguard.evaluate.plots import bar_chart
    >>> bar_chart("Prompt harmfulness (F1 %)", ["AegisSafetyTest", "Weighted avg"],
    ...           {"exp18": [80.1, 75.0], "exp19": [88.0, 81.2]}, "prompt.png")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from reasonguard.errors import UserError
from reasonguard.evaluate.cost import tier_text


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is needed for charts: pip install matplotlib") from None
    return plt


def cost_chart(points: Sequence[Mapping], path: str | os.PathLike[str]) -> None:
    """Overall F1 against generated tokens per item (log scale), one labelled point per run.

    Args:
        points: dicts with `name`, `mode`, `overall_f1` and `tokens_per_item`, and optionally
            `tier_shares` (`compare.cost_points`: a cascade of several tiers is labelled with
            the share each answered); points without an F1 are left out.

    Raises:
        UserError: matplotlib is not installed.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for p in points:
        if p["overall_f1"] is None:
            continue
        # Fast mode and a classifier generate nothing: draw them at 0.1 tokens on the log axis.
        x = max(p["tokens_per_item"], 0.1)
        ax.scatter([x], [p["overall_f1"]], s=40)
        tiers = tier_text(p)
        ax.annotate(
            f"{p['name']} ({p['mode']})" + ("" if tiers == "-" else f"\n{tiers}"),
            (x, p["overall_f1"]),
            fontsize=8,
            textcoords="offset points",
            xytext=(5, 4),
        )
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per item (log; fast mode and classifiers drawn at 0.1)")
    ax.set_ylabel("overall F1 (%)")
    ax.set_title("Quality against cost")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def bar_chart(
    title: str,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike[str],
) -> None:
    """Draw one bar group per category, one bar per series (a missing value draws no bar).

    Raises:
        UserError: matplotlib is not installed.
    """
    plt = _pyplot()
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(categories) + 2), 5.0))
    for i, (name, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        kept = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        bars = ax.bar([x for x, _ in kept], [v for _, v in kept], width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("F1 (%)")
    ax.set_title(title)
    # Below the axes, so the legend never hides a bar.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=min(len(series), 3))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
