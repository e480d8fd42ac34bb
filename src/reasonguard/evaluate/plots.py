"""Grouped bar charts of F1 per benchmark, one PNG per task (matplotlib, Agg backend).

matplotlib is imported inside `bar_chart`, so importing this module costs nothing.

Example:
    >>> from reasonguard.evaluate.plots import bar_chart
    >>> bar_chart("Prompt harmfulness (F1 %)", ["AegisSafetyTest", "Weighted avg"],
    ...           {"exp18": [80.1, 75.0], "exp19": [88.0, 81.2]}, "prompt.png")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from reasonguard.errors import UserError


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
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is needed for charts: pip install matplotlib") from None

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
