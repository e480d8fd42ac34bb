"""Generating one job's rows on a loaded backend, window by window, in input order.

A window is a few batches at a fixed position (a multiple of `Backend.window_size`): a restart
redoes the window it stopped in as the same batch computation with the same seed, so resumed rows
equal uninterrupted ones. Used by `generate.run_jobs` in one process and by each worker of
`parallel.run_data_parallel`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from reasonguard.errors import UserError
from reasonguard.generation.jobs import (
    Decoding,
    Job,
    add_cost,
    instruction_of,
    output_row,
    record_key,
    score_tasks,
)
from reasonguard.generation.resume import JsonlAppender
from reasonguard.infer.backends import Backend, Generation


def check_resume(job: Job, out: JsonlAppender, done: int) -> int:
    """Confirm the rows on disk belong to these inputs; return how many are done."""
    if done > len(job.records):
        raise UserError(f"{out.path} has {done} rows for {len(job.records)} inputs")
    last = out.last_row()
    if last is not None:
        field, expected = record_key(job, job.records[done - 1])
        if last.get(field) != expected:
            raise UserError(
                f"{out.path}: row {done} does not match input {done}; the file belongs to other "
                "inputs: remove it or choose another --out"
            )
    return done


class _OrderedWriter:
    """Collects a window's finished rows (rows finish out of order: they are sorted by length
    and end at different steps) and appends the contiguous prefix, skipping rows already on
    disk. With a `score` function, rows are scored as they finish."""

    def __init__(
        self,
        job: Job,
        out: JsonlAppender,
        start: int,
        done: int,
        bar: Any,
        score: Callable[[list[int], list[str]], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.job, self.out, self.start, self.done, self.bar = job, out, start, done, bar
        self.score = score
        self.cursor = start
        self.ready: dict[int, tuple[list[Generation], dict[str, Any] | None]] = {}
        self.tokens = 0

    def __call__(self, positions: list[int], outputs: list[list[Generation]]) -> None:
        scored: list[dict[str, Any] | None] = [None] * len(positions)
        if self.score is not None:
            scored = list(self.score(positions, [g[0].text for g in outputs]))
        for position, generations, scores in zip(positions, outputs, scored, strict=True):
            self.ready[self.start + position] = (generations, scores)
            self.tokens += sum(g.num_tokens for g in generations)
        rows = []
        while self.cursor in self.ready:
            generations, scores = self.ready.pop(self.cursor)
            if self.cursor >= self.done:
                record = self.job.records[self.cursor]
                rows.append(output_row(self.job, record, generations, scores))
            self.cursor += 1
        self.out.append(rows)
        self.bar.update(len(rows))


def _scorer(
    backend: Backend, records: Sequence[Mapping[str, Any]], prompts: list[str]
) -> Callable[[list[int], list[str]], list[dict[str, Any]]]:
    """Scores of finished rows of a window, by position in the window."""

    def score(positions: list[int], texts: list[str]) -> list[dict[str, Any]]:
        tasks = [score_tasks(records[p]) for p in positions]
        found = backend.answer_scores([prompts[p] for p in positions], texts, tasks)
        if found is None:
            raise UserError(f"{backend.name}: this backend cannot compute scores")
        return found

    return score


def generate_job(
    backend: Backend,
    job: Job,
    out: JsonlAppender,
    done: int,
    total: int,
    decoding: Decoding,
    progress: bool,
    scores: bool = False,
    offset: int = 0,
    classifier: Backend | None = None,
) -> None:
    """Generate rows `done`..`total` of `job` into `out`.

    `classifier` is the first tier of a three-tier cascade (`Decoding.classifier`, loaded).

    `offset` is the position of `job.records[0]` in the whole input, for a data-parallel shard
    (a multiple of the window size): seeds follow the global position, so a shard's rows equal
    the rows one process generates for those inputs.
    """
    from tqdm.auto import tqdm

    window = backend.window_size()
    bar = tqdm(
        total=total,
        initial=done,
        desc=job.name,
        unit="row",
        disable=not progress,
        dynamic_ncols=True,
    )
    started, tokens = time.perf_counter(), 0
    try:
        # Windows sit at fixed positions (multiples of `window`): a restart redoes the window it
        # stopped in, as the same batch computation, so resumed rows equal uninterrupted ones.
        for start in range((done // window) * window, total, window):
            stop = min(start + window, total)
            records = job.records[start:stop]
            clock = time.perf_counter()
            if decoding.mode != "reasoning":
                tokens += _fast_window(
                    backend, job, out, start, records, done, decoding, scores, classifier
                )
                bar.update(stop - max(start, done))
                _window_cost(out, job, time.perf_counter() - clock, stop - max(start, done))
                continue
            prompts = [backend.build_prompt(r["input"], instruction_of(r)) for r in records]
            score = _scorer(backend, records, prompts) if scores else None
            writer = _OrderedWriter(job, out, start, done, bar, score)
            backend.generate(
                prompts,
                max_new_tokens=decoding.max_new_tokens,
                temperature=decoding.temperature,
                top_p=decoding.top_p,
                num_samples=decoding.samples,
                seed=decoding.seed + offset + start,
                on_batch=writer,
                with_scores=scores,
            )
            if writer.cursor != stop:  # a backend that skipped its callback: a bug
                raise RuntimeError(f"{job.name}: rows {writer.cursor}..{stop} were not written")
            tokens += writer.tokens
            _window_cost(out, job, time.perf_counter() - clock, stop - max(start, done))
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{rate:.0f} tok/s")
    finally:
        bar.close()


def _window_cost(out: JsonlAppender, job: Job, seconds: float, rows: int) -> None:
    add_cost(str(out.path)[: -len(job.relpath)], job.relpath, seconds, rows)


def _fast_window(
    backend: Backend,
    job: Job,
    out: JsonlAppender,
    start: int,
    records: Sequence[Mapping[str, Any]],
    done: int,
    decoding: Decoding,
    scores: bool,
    classifier: Backend | None = None,
) -> int:
    """Fast mode, a classifier or the cascade (of two tiers, or three with `classifier` in
    front) over one window of a benchmark job; returns tokens generated.

    The whole window is computed (as a reasoning window is, so a resumed window equals an
    uninterrupted one) and its rows from `done` on are written in order. Each row names the
    tier that answered it (`tier`, and `mode` as before).
    """
    from reasonguard.cascade.bands import Bands, escalate

    tasks = [score_tasks(r) for r in records]
    cascade = decoding.mode == "cascade"
    first: dict[int, Any] = {}
    pending = list(range(len(records)))
    if classifier is not None:
        prompts = [classifier.build_fast_prompt(r["input"]) for r in records]
        first = dict(enumerate(classifier.fast_verdicts(prompts, tasks)))
        passed = Bands.from_dict(decoding.classifier_bands or {})
        pending = [i for i in pending if escalate(first[i].scores, tasks[i], passed)]
    fast: dict[int, Any] = {}
    if pending:
        prompts = [
            backend.build_fast_prompt(records[i]["input"], instruction_of(records[i]))
            for i in pending
        ]
        found = backend.fast_verdicts(prompts, [tasks[i] for i in pending])
        fast = dict(zip(pending, found, strict=True))
    hard: list[int] = []
    if cascade:
        bands = Bands.from_dict(decoding.bands or {})
        hard = [i for i in pending if escalate(fast[i].scores, tasks[i], bands)]
    reasoned: dict[int, tuple[Generation, dict[str, Any] | None]] = {}
    if hard:
        prompts = [
            backend.build_prompt(records[i]["input"], instruction_of(records[i])) for i in hard
        ]
        generations = backend.generate(
            prompts,
            max_new_tokens=decoding.max_new_tokens,
            seed=decoding.seed + start,
            with_scores=scores,
        )
        texts = [g[0].text for g in generations]
        found = backend.answer_scores(prompts, texts, [tasks[i] for i in hard]) if scores else None
        for k, i in enumerate(hard):
            reasoned[i] = (generations[k][0], found[k] if found else None)
    fast_tier = "classifier" if decoding.mode == "classifier" else "fast"
    rows, tokens = [], 0
    for i, record in enumerate(records):
        if start + i < done:
            continue
        if i in reasoned:
            generation, reasoning_scores = reasoned[i]
            row = output_row(job, record, [generation], reasoning_scores)
            tokens += generation.num_tokens
            tier = "reasoning"
        else:
            verdict, tier = (fast[i], fast_tier) if i in fast else (first[i], "classifier")
            answer = Generation(text=verdict.text, num_tokens=0, hit_token_limit=False)
            row = output_row(job, record, [answer], verdict.scores)
        row["mode"] = row["tier"] = tier
        if cascade:
            row["escalated"] = i in reasoned
            row["fast_scores"] = fast[i].scores if i in fast else None
        if classifier is not None:
            row["classifier_scores"] = first[i].scores
        rows.append(row)
    out.append(rows)
    return tokens
