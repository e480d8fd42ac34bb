"""A guard that answers from a folder of existing predictions: a replay of its outputs.

The folder is what `generate` writes on benchmarks, and what the released GuardReasoner
predictions are: `<Benchmark>/generated_predictions.jsonl`, one row per benchmark row with
`prompt` (the instruction, a newline, then the rendered input) and `predict` (the guard's
output), optionally `scores`, `num_tokens`, `truncated` and `mode`. `ReplayGuard.classify`
looks each item up by its request and response (`holdout.item_hash`) and returns the verdict
read from `predict` as `Guard.classify` reads a generation (`guard.read_verdict`: an output
without an answer block is a parsing error, as `evaluate` counts it). As the top tier of a
cascade (`tiers.Cascade`, `fit.calibrate_tiers`) it measures the F1 and the share escalated of
a cascade over a real guard without running that guard.

Nothing is guessed: a line that is not a JSON object, a row without a `prompt` in the guard's
input layout or without a string `predict`, or (with `benchmark_dir`) a file with fewer or more
rows than its benchmark file is an error naming the file and line; an item the folder does not
hold is an error naming the item. Where one item appears in several files with different
verdicts, the first file in name order answers and `conflicts` counts such items.

Example:
    >>> from reasonguard.cascade.replay import ReplayGuard
    >>> guard = ReplayGuard("predictions/GuardReasoner-1B", benchmarks=["AegisSafetyTest"])
    >>> guard.classify([{"prompt": "Can you tell me about how MLK led the civil rights movement?"}])
    [GuardResult(prompt_harmfulness='unharmful', ...)]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reasonguard.cascade.holdout import item_hash
from reasonguard.errors import UserError, where
from reasonguard.format import TASK_FIELD
from reasonguard.infer.guard import GuardResult, read_verdict, validate_items
from reasonguard.infer.scores import empty_scores


def _scores(value: Any, place: str) -> dict[str, Any]:
    if value is None:
        return empty_scores()
    if not isinstance(value, dict) or not set(value) <= set(TASK_FIELD.values()):
        raise UserError(
            f"{place}: field 'scores': expected an object keyed by "
            f"{', '.join(TASK_FIELD.values())}, got {value!r}"[:300]
        )
    return {**empty_scores(), **value}


def replay_result(row: Mapping[str, Any], place: str) -> tuple[str, str | None, GuardResult]:
    """The request, response and verdict of one prediction row.

    Raises:
        UserError: `place: field ...: what is wrong`.
    """
    from reasonguard.classifier.teacher import split_prompt

    try:
        prompt, response = split_prompt(row.get("prompt"))
    except ValueError as exc:
        raise UserError(f"{place}: field 'prompt': {exc}") from None
    predict = row.get("predict")
    if not isinstance(predict, str):
        problem = "missing" if "predict" not in row else "expected a string"
        raise UserError(f"{place}: field 'predict': {problem}")
    tokens = row.get("num_tokens", 0)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise UserError(f"{place}: field 'num_tokens': expected a whole number, got {tokens!r}")
    mode = row.get("mode", "reasoning")
    if not isinstance(mode, str):
        raise UserError(f"{place}: field 'mode': expected a string, got {mode!r}")
    verdict = read_verdict(predict, row.get("truncated") is True, response is not None)
    result = GuardResult(
        **verdict,
        scores=_scores(row.get("scores"), place),
        output=predict,
        num_tokens=tokens,
        mode=mode,
        tier=mode,
    )
    return prompt, response, result


class ReplayGuard:
    """The verdicts of a predictions folder, as a guard (see the module docstring).

    Args:
        folder: `<Benchmark>/generated_predictions.jsonl` files.
        benchmarks: only these benchmarks' files (default: every one in the folder).
        benchmark_dir: when given, each file must hold one row per row of its benchmark file.

    Attributes:
        name: the folder, for messages.
        token_counts: whether every row says how many tokens it generated (`num_tokens`);
            released predictions do not.
        conflicts: items found in several files with different verdicts.

    Raises:
        UserError: see the module docstring.
    """

    modes = ("reasoning",)
    mode = "reasoning"
    supports_fast = False
    bands = None
    replayed = True  # its outputs were paid for elsewhere: `fit.calibrate_tiers` times it not

    def __init__(
        self,
        folder: str | os.PathLike[str],
        benchmarks: Sequence[str] | None = None,
        benchmark_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from reasonguard.evaluate.files import (
            BadRows,
            find_predictions,
            read_json_rows,
            read_jsonl,
        )
        from reasonguard.evaluate.registry import BENCHMARKS

        root = Path(folder)
        self.name = str(root)
        found, _ = find_predictions(root)
        if benchmarks is not None:
            absent = [name for name in benchmarks if name not in found]
            if absent:
                raise UserError(
                    f"{root}: no predictions for {', '.join(absent)} (it holds "
                    f"{', '.join(found) or 'none'})"
                )
            found = {name: found[name] for name in benchmarks}
        self._rows: dict[str, list[GuardResult]] = {}
        self._index: dict[str, GuardResult] = {}
        self.conflicts = 0
        self.token_counts = True
        for name, path in found.items():
            rows = read_jsonl(path, BadRows(skip=False))
            if benchmark_dir is not None:
                bench_file = Path(benchmark_dir) / BENCHMARKS[name].filename
                expected = len(read_json_rows(bench_file))
                if expected != len(rows):
                    raise UserError(
                        f"{path}: {len(rows)} prediction rows but {expected} rows in "
                        f"{bench_file}: a replayed guard needs one row per benchmark row"
                    )
            results = []
            for number, row in rows:
                assert row is not None  # BadRows(skip=False) raises on a bad line
                prompt, response, result = replay_result(row, where(path, number))
                self.token_counts &= "num_tokens" in row
                results.append(result)
                key = item_hash(prompt, response)
                known = self._index.get(key)
                if known is None:
                    self._index[key] = result
                elif _labels(known) != _labels(result):
                    self.conflicts += 1
            self._rows[name] = results

    @property
    def benchmarks(self) -> tuple[str, ...]:
        return tuple(self._rows)

    def benchmark_results(self, name: str) -> list[GuardResult]:
        """The verdicts of one benchmark's file, in its row order."""
        if name not in self._rows:
            raise UserError(f"{self.name}: no predictions for {name}")
        return list(self._rows[name])

    def classify(
        self,
        items: Sequence[Mapping[str, Any]],
        max_new_tokens: int | None = None,
        scores: bool = True,
        timeout_s: float | None = None,
        mode: str | None = None,
        bands: Any = None,
    ) -> list[GuardResult]:
        """The replayed verdict of each item (the options of `Guard.classify` are accepted
        and have nothing to change: the outputs exist already).

        Raises:
            InvalidItemError: a malformed item.
            UserError: an item the folder holds no prediction for.
        """
        out = []
        for i, (prompt, response) in enumerate(validate_items(items)):
            found = self._index.get(item_hash(prompt, response))
            if found is None:
                raise UserError(
                    f"item {i}: not among the predictions replayed from {self.name} "
                    f"({', '.join(self.benchmarks)}): {prompt[:60]!r}"
                )
            out.append(found)
        return out


def _labels(result: GuardResult) -> tuple[Any, ...]:
    return (result.prompt_harmfulness, result.response_refusal, result.response_harmfulness)
