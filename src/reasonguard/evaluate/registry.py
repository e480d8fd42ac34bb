"""The benchmark registry: the 11 GuardReasoner benchmark files and their 13 benchmark-task pairs.

Each entry says which file holds a benchmark, which tasks it scores, where its true labels come
from and how much it weighs in the paper's per-task weighted average. Scoring code reads only this
table, so a new benchmark is one new entry, never a special case elsewhere.

Example:
    >>> from reasonguard.evaluate.registry import BENCHMARKS, pairs
    >>> BENCHMARKS["AegisSafetyTest"].filename
    '0_1_AegisSafetyTest.json'
    >>> [b.name for b in pairs("refusal")]
    ['XSTestResponseRefusal', 'WildGuardTest']
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from reasonguard.errors import UserError
from reasonguard.format import TASKS

BENCHMARKS_ENV = "REASONGUARD_BENCHMARKS"
PREDICTIONS_FILE = "generated_predictions.jsonl"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark file.

    Attributes:
        name: the result name, also the prediction folder name (`<name>/generated_predictions.jsonl`).
        stem: the official file name without `.json`.
        tasks: the tasks this file is scored on.
        rows: the row count of the official file.
        weights: the sample count each task's weighted average gives this benchmark.
        label_columns: per task, the column that holds the true label; empty when the labels live
            in the `output` field (a bare label, or an `Answers:` block).
        gated: True when the file is not publicly downloadable.
    """

    name: str
    stem: str
    tasks: tuple[str, ...]
    rows: int
    weights: dict[str, int]
    label_columns: dict[str, str] = field(default_factory=dict)
    gated: bool = False

    @property
    def filename(self) -> str:
        return f"{self.stem}.json"


def _plain(name: str, stem: str, task: str, rows: int) -> Benchmark:
    # A single-task public file whose average weight is simply its row count.
    return Benchmark(name, stem, (task,), rows, {task: rows})


# WildGuardTest has 1,725 rows, but the paper's weighted averages only reproduce (to 0.01 for every
# row of Tables 1-3) with weights 1756 (prompt) and 1768 (response), and a WildGuardTest:XSTest
# ratio of 1777:499 for refusal. We keep XSTestResponseRefusal at its row count (449) and scale
# WildGuardTest to 1777 * 449 / 499 = 1599 (the ratio agrees to 4 digits). tests/test_evaluate_paper.py
# checks these weights against every published average.
_WILDGUARD = Benchmark(
    "WildGuardTest",
    "0_4_wild_guard_test",
    ("prompt", "response", "refusal"),
    1725,
    {"prompt": 1756, "response": 1768, "refusal": 1599},
    label_columns={
        "prompt": "prompt_harm_label",
        "response": "response_harm_label",
        "refusal": "response_refusal_label",
    },
    gated=True,
)

_ALL = (
    _plain("SimpleSafetyTests", "0_0_SimpleSafetyTests", "prompt", 100),
    _plain("AegisSafetyTest", "0_1_AegisSafetyTest", "prompt", 359),
    _plain("OpenAIModeration", "0_2_OpenAIModeration", "prompt", 1680),
    _plain("HarmBenchPrompt", "0_3_harmbench_prompt", "prompt", 239),
    _WILDGUARD,
    _plain("HarmBenchResponse", "0_5_harmbench_response", "response", 602),
    _plain("XSTestReponseHarmful", "0_6_xstest_response_harmful", "response", 446),
    _plain("XSTestResponseRefusal", "0_7_xstest_response_refusal", "refusal", 449),
    _plain("ToxicChat", "0_8_toxic_chat", "prompt", 2853),
    # The Request line of these two answer blocks is `None`; the label is the `Response:` line.
    _plain("SafeRLHF", "0_9_safe_rlhf", "response", 2000),
    _plain("BeaverTails", "0_A_beaver_tails", "response", 3021),
)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _ALL}

# Column order of the paper's Tables 1-3, which our reports follow.
TASK_ORDER: dict[str, tuple[str, ...]] = {
    "prompt": (
        "ToxicChat",
        "HarmBenchPrompt",
        "OpenAIModeration",
        "AegisSafetyTest",
        "SimpleSafetyTests",
        "WildGuardTest",
    ),
    "response": (
        "HarmBenchResponse",
        "SafeRLHF",
        "BeaverTails",
        "XSTestReponseHarmful",
        "WildGuardTest",
    ),
    "refusal": ("XSTestResponseRefusal", "WildGuardTest"),
}

TASK_TITLES = {
    "prompt": "Prompt harmfulness detection",
    "response": "Response harmfulness detection",
    "refusal": "Refusal detection",
}


def pairs(task: str) -> list[Benchmark]:
    """The benchmarks scored on `task`, in the paper's column order."""
    return [BENCHMARKS[name] for name in TASK_ORDER[task]]


def all_pairs() -> list[tuple[Benchmark, str]]:
    """Every (benchmark, task) pair, task by task in `TASKS` order: 13 in all."""
    return [(b, task) for task in TASKS for b in pairs(task)]


def resolve_benchmark_dir(given: str | os.PathLike[str] | None) -> Path | None:
    """The benchmark folder from `--benchmark-dir`, else `$REASONGUARD_BENCHMARKS`, else None.

    Raises:
        UserError: when the folder named is not a directory (a typo should not silently fall
            back to the labels inside the predictions).
    """
    source = "--benchmark-dir"
    if given is None:
        given, source = os.environ.get(BENCHMARKS_ENV) or None, f"${BENCHMARKS_ENV}"
    if given is None:
        return None
    path = Path(given)
    if not path.is_dir():
        raise UserError(f"{path}: benchmark folder not found (from {source})")
    return path
