"""Resumable generation over the benchmarks or a training set (`reasonguard generate`).

Outputs:

- benchmarks: `OUT/<Benchmark>/generated_predictions.jsonl`, the official layout, one row per
  benchmark row in benchmark order: `prompt` (instruction + "\\n" + input, as the official files
  write it whatever the model's prompt format), `label` (the benchmark's `output`), `predict`,
  plus `truncated` and `num_tokens`; with several samples also `samples` and `samples_truncated`
  (`predict` is the first sample); with `scores=True` also `scores`, the label probabilities at
  the answers of `predict` (`{"prompt_harmfulness": {"harmful": p, "unharmful": 1 - p}, ...}`,
  None where the output has no such answer or the input no response), read by `evaluate`;
  in fast mode `predict` is the answer block fast mode chose (no reasoning, `num_tokens` 0) and
  `scores` its label probabilities, and each row says its `mode`; in a cascade each row also says
  whether it was `escalated` to reasoning, with its `fast_scores`;
- training data: `OUT/<split>.jsonl` rows `instruction, input, output, source, samples,
  samples_truncated`, the input of hard-sample mining.

Work goes in windows of a few batches (`Backend.window_size`) at fixed positions. Rows are
written in input order as soon as they are ready, durably (`resume.JsonlAppender`). A restart
with the same command regenerates the window it stopped in and writes only the rows missing, so
the file ends with exactly one row per input, and (same batch size) the very rows an
uninterrupted run writes: each window is the same batch computation with the same seed.

Timing stays out of the rows (they are the same in every run): `OUT/_generate/cost/<output
path>.json` adds up, per output file, the generation seconds and the rows generated over the
runs that wrote it (model loading excluded), which `evaluate` turns into seconds per item.

`data_parallel=N` (`--data-parallel N`) splits each job's inputs across N worker processes on
window boundaries and merges their outputs in input order (see `parallel.py`); the files are
the same as one process writes.

Example:
    >>> from reasonguard.infer.generate import Decoding, benchmark_jobs, run_jobs
    >>> jobs = benchmark_jobs(["AegisSafetyTest"], "data/benchmarks")
    >>> run_jobs("smollm2", jobs, "runs/preds", Decoding(max_new_tokens=256), batch_size=8)
    {'AegisSafetyTest/generated_predictions.jsonl': 359}
"""

from __future__ import annotations

import difflib
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.evaluate.registry import BENCHMARKS, PREDICTIONS_FILE
from reasonguard.format import INSTRUCTION, TASKS, split_input
from reasonguard.infer.backends import (
    Backend,
    Generation,
    check_sampling,
    load_backend,
    resolve_prompt_format,
)
from reasonguard.infer.resume import STATE_DIR, JsonlAppender, RunState, fingerprint
from reasonguard.models import resolve_model


@dataclass(frozen=True)
class Decoding:
    """How to decode; these settings are part of a run and fixed across restarts.

    Attributes:
        samples: continuations per input (k of hard-sample mining; 1 for benchmarks).
        temperature: 0 for greedy, else sampling (the paper samples at 0.7).
        top_p: nucleus mass for sampling (the paper: 0.95).
        max_new_tokens: the token budget per continuation (the official 2048).
        seed: base sampling seed.
        mode: `reasoning` (generate, the paper's way), `fast` (the forced answer block's label
            probabilities, no generation) or `cascade` (fast, then reasoning for the items
            inside `bands`); fast and cascade are for benchmarks, greedy, one sample.
        bands: the cascade's uncertainty bands (`cascade.Bands.to_dict()`).
    """

    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 2048
    seed: int = 0
    mode: str = "reasoning"
    bands: dict[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        """The settings a run folder records; mode and bands only when used, so folders written
        before they existed still resume."""
        values = asdict(self)
        if self.mode == "reasoning":
            values.pop("mode")
        if self.bands is None:
            values.pop("bands")
        return values


@dataclass(frozen=True)
class Job:
    """One output file and the records it is generated from.

    Attributes:
        name: the benchmark or split name (progress bars, logs).
        relpath: the output path under the output folder.
        records: `{instruction, input, output, ...}` rows in output order.
        kind: `benchmark` (official prediction rows) or `data` (mining rows).
    """

    name: str
    relpath: str
    records: tuple[Mapping[str, Any], ...]
    kind: str


# --------------------------------------------------------------------------------------------
# Jobs


def benchmark_jobs(names: Sequence[str], benchmark_dir: str | os.PathLike[str]) -> list[Job]:
    """Jobs for benchmarks by result name (`all`: every benchmark whose file is present).

    Raises:
        UserError: an unknown name, or a named benchmark whose file is missing.
    """
    from reasonguard.evaluate.files import read_json_rows

    folder = Path(benchmark_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: benchmark folder not found")
    wanted = list(dict.fromkeys(names))
    if not wanted:
        raise UserError("no benchmark named; use --benchmarks all or benchmark names")
    if "all" in wanted:
        wanted = [name for name, b in BENCHMARKS.items() if (folder / b.filename).is_file()]
        if not wanted:
            raise UserError(f"{folder}: none of the benchmark files is there")
    jobs = []
    for name in wanted:
        if name not in BENCHMARKS:
            close = difflib.get_close_matches(name, list(BENCHMARKS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(
                f"unknown benchmark {name!r}{hint}; known: {', '.join(BENCHMARKS)}, all"
            )
        path = folder / BENCHMARKS[name].filename
        if not path.is_file():
            raise UserError(
                f"{path}: benchmark file not found (see `reasonguard benchmarks download`)"
            )
        rows = read_json_rows(path)
        for i, row in enumerate(rows):
            _check_record(row, f"{path} row {i}")
        jobs.append(Job(name, f"{name}/{PREDICTIONS_FILE}", tuple(rows), "benchmark"))
    return jobs


def data_jobs(source: str, splits: Sequence[str] | None = None) -> list[Job]:
    """Jobs for the splits of a training-data source (see `reasonguard.data.sources.load_source`).

    Raises:
        UserError: the source cannot be loaded, or a record has no string `input`.
    """
    from reasonguard.data.sources import load_source

    jobs = []
    for split, records in load_source(source, splits).items():
        for i, record in enumerate(records):
            _check_record(record, f"{source}: split {split!r} row {i}")
        jobs.append(Job(split, f"{split}.jsonl", tuple(records), "data"))
    return jobs


def _check_record(record: Any, place: str) -> None:
    if not isinstance(record, Mapping):
        raise UserError(f"{place}: expected a JSON object with instruction/input/output")
    if not isinstance(record.get("input"), str):
        raise UserError(f"{place}: field 'input': missing or not a string")
    instruction = record.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise UserError(f"{place}: field 'instruction': not a string")


def _instruction(record: Mapping[str, Any]) -> str:
    return record.get("instruction") or INSTRUCTION


def _key(job: Job, record: Mapping[str, Any]) -> tuple[str, str]:
    """The row field that identifies an input, and its value (checked when resuming)."""
    if job.kind == "benchmark":
        return "prompt", f"{_instruction(record)}\n{record['input']}"
    return "input", record["input"]


def _score_tasks(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The tasks to score an input on: the response tasks only when there is a response."""
    try:
        _, response = split_input(record["input"])
    except ValueError:
        return TASKS  # not in the `Human user: ... AI assistant:` layout: score what is there
    return ("prompt",) if response is None else TASKS


def _row(
    job: Job,
    record: Mapping[str, Any],
    generations: list[Generation],
    scores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    texts = [g.text for g in generations]
    flags = [g.truncated for g in generations]
    if job.kind == "benchmark":
        first = generations[0]
        row = {
            "prompt": _key(job, record)[1],
            "label": record.get("output"),
            "predict": first.text,
            "truncated": first.truncated,
            "num_tokens": first.num_tokens,
        }
        if len(generations) > 1:
            row.update(samples=texts, samples_truncated=flags)
        if scores is not None:
            row["scores"] = scores
        return row
    return {
        "instruction": _instruction(record),
        "input": record["input"],
        "output": record.get("output"),
        "source": record.get("source") or job.name,
        "samples": texts,
        "samples_truncated": flags,
    }


# --------------------------------------------------------------------------------------------
# Running


def run_jobs(
    model: str,
    jobs: Sequence[Job],
    out_dir: str | os.PathLike[str],
    decoding: Decoding | None = None,
    *,
    backend: str = "hf",
    prompt_format: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], Any] | None = None,
    scores: bool = False,
    data_parallel: int = 1,
    **backend_options: Any,
) -> dict[str, int]:
    """Generate every job's outputs under `out_dir`, resuming whatever is already there.

    The model is loaded only when some output is incomplete, after the settings were checked
    against the folder's manifest.

    Args:
        model: alias, hub id or model folder (see `backends.load_backend`).
        jobs: from `benchmark_jobs` or `data_jobs`.
        out_dir: the output folder.
        decoding: decoding settings (fixed for the life of `out_dir`); default greedy.
        backend: `hf` or `vllm`.
        prompt_format: for models without a guard record.
        limit: only the first `limit` inputs of each job (a later, larger limit extends).
        progress: show a progress bar per job (rows/s, ETA, tokens/s).
        log: where one-line summaries go (default: stderr).
        scores: benchmark jobs, HF backend: store the label probabilities of each `predict`
            (see the module docstring); fixed for the life of `out_dir` like `decoding`.
        data_parallel: worker processes, each with its own model (one GPU each on CUDA); the
            outputs are the same for any number (see `parallel.run_data_parallel`).
        **backend_options: `batch_size`, `device`, `tensor_parallel_size`, ...

    Returns:
        Rows in each output file, by relative path.

    Raises:
        UserError: bad settings, settings or inputs unlike the folder's earlier run, another
            run on the folder, model loading failures.
    """
    say = log or (lambda text: print(text, file=sys.stderr))
    decoding = decoding or Decoding()
    check_sampling(decoding.temperature, decoding.top_p, decoding.samples, decoding.max_new_tokens)
    if limit is not None and limit < 0:
        raise UserError(f"--limit must be at least 0, got {limit}")
    if scores and backend != "hf":
        raise UserError("--scores needs --backend hf (vLLM gives no label probabilities)")
    if scores and any(job.kind != "benchmark" for job in jobs):
        raise UserError("--scores goes with benchmarks, not training data")
    check_mode_decoding(decoding, jobs, backend)
    if data_parallel < 1:
        raise UserError(f"--data-parallel must be at least 1, got {data_parallel}")
    params = {
        "model": str(model),
        "prompt_format": resolve_prompt_format(resolve_model(model), prompt_format),
        "backend": backend,
        **decoding.params(),
    }
    if scores:
        params["scores"] = True  # only when on: folders written before the option still resume
    if data_parallel > 1:
        from reasonguard.infer.parallel import run_data_parallel

        return run_data_parallel(
            model,
            jobs,
            out_dir,
            decoding,
            params,
            workers=data_parallel,
            limit=limit,
            progress=progress,
            log=say,
            scores=scores,
            backend_options=backend_options,
        )
    state = RunState(out_dir, params)
    counts: dict[str, int] = {}
    loaded: Backend | None = None
    try:
        for job in jobs:
            state.claim(job.relpath, fingerprint(_key(job, r)[1] for r in job.records))
            total = len(job.records) if limit is None else min(limit, len(job.records))
            with JsonlAppender(Path(out_dir) / job.relpath) as out:
                done = _check_resume(job, out, out.open())
                if done < total:
                    if loaded is None:
                        loaded = load_backend(
                            model, backend, params["prompt_format"], **backend_options
                        )
                    _generate_job(loaded, job, out, done, total, decoding, progress, scores)
                    say(f"{job.name}: {total} rows ({done} were already there) -> {out.path}")
                else:
                    say(f"{job.name}: all {total} rows already generated -> {out.path}")
                counts[job.relpath] = max(done, total)
    finally:
        state.close()
        close = getattr(loaded, "close", None)
        if close is not None:  # a vLLM engine's processes stop now, not at interpreter exit
            close()
    return counts


def check_mode_decoding(decoding: Decoding, jobs: Sequence[Job], backend: str) -> None:
    """Reject a fast or cascade run that cannot work, naming the option."""
    from reasonguard.infer.cascade import MODES

    if decoding.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {decoding.mode!r}")
    if decoding.mode == "reasoning":
        return
    if backend != "hf":
        raise UserError(f"--mode {decoding.mode} needs --backend hf (its label probabilities)")
    if any(job.kind != "benchmark" for job in jobs):
        raise UserError(f"--mode {decoding.mode} goes with benchmarks, not training data")
    if decoding.samples != 1 or decoding.temperature > 0:
        raise UserError(f"--mode {decoding.mode} is greedy with one sample")
    if decoding.mode == "cascade" and decoding.bands is None:
        raise UserError("--mode cascade needs calibrated bands (run `reasonguard calibrate`)")


def _check_resume(job: Job, out: JsonlAppender, done: int) -> int:
    """Confirm the rows on disk belong to these inputs; return how many are done."""
    if done > len(job.records):
        raise UserError(f"{out.path} has {done} rows for {len(job.records)} inputs")
    last = out.last_row()
    if last is not None:
        field, expected = _key(job, job.records[done - 1])
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
                rows.append(_row(self.job, record, generations, scores))
            self.cursor += 1
        self.out.append(rows)
        self.bar.update(len(rows))


def _scorer(
    backend: Backend, records: Sequence[Mapping[str, Any]], prompts: list[str]
) -> Callable[[list[int], list[str]], list[dict[str, Any]]]:
    """Scores of finished rows of a window, by position in the window."""

    def score(positions: list[int], texts: list[str]) -> list[dict[str, Any]]:
        tasks = [_score_tasks(records[p]) for p in positions]
        found = backend.answer_scores([prompts[p] for p in positions], texts, tasks)
        if found is None:
            raise UserError(f"{backend.name}: this backend cannot compute scores")
        return found

    return score


def _generate_job(
    backend: Backend,
    job: Job,
    out: JsonlAppender,
    done: int,
    total: int,
    decoding: Decoding,
    progress: bool,
    scores: bool = False,
    offset: int = 0,
) -> None:
    """Generate rows `done`..`total` of `job` into `out`.

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
                tokens += _fast_window(backend, job, out, start, records, done, decoding, scores)
                bar.update(stop - max(start, done))
                _window_cost(out, job, time.perf_counter() - clock, stop - max(start, done))
                continue
            prompts = [backend.build_prompt(r["input"], _instruction(r)) for r in records]
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
            )
            if writer.cursor != stop:  # a backend that skipped its callback: a bug
                raise RuntimeError(f"{job.name}: rows {writer.cursor}..{stop} were not written")
            tokens += writer.tokens
            _window_cost(out, job, time.perf_counter() - clock, stop - max(start, done))
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{rate:.0f} tok/s")
    finally:
        bar.close()


def cost_path(out_dir: str | os.PathLike[str], relpath: str) -> Path:
    """The timing file of one output file of a run folder (under its state folder, which data
    loading and the evaluator skip)."""
    return Path(out_dir) / STATE_DIR / "cost" / f"{relpath}.json"


def read_cost(out_dir: str | os.PathLike[str], relpath: str) -> dict[str, Any]:
    """The timing of one output file: `{"seconds", "rows"}` (zeros when none is kept)."""
    import json

    try:
        cost = json.loads(cost_path(out_dir, relpath).read_text())
        return {"seconds": float(cost["seconds"]), "rows": int(cost["rows"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"seconds": 0.0, "rows": 0}


def add_cost(out_dir: str | os.PathLike[str], relpath: str, seconds: float, rows: int) -> None:
    """Add generation seconds and rows written to an output's timing file (atomically; a window
    redone after a restart counts its time and its new rows)."""
    import json

    cost = read_cost(out_dir, relpath)
    cost = {"seconds": round(cost["seconds"] + seconds, 3), "rows": cost["rows"] + rows}
    path = cost_path(out_dir, relpath)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cost) + "\n")
    tmp.replace(path)


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
) -> int:
    """Fast mode or the cascade over one window of a benchmark job; returns tokens generated.

    The whole window is computed (as a reasoning window is, so a resumed window equals an
    uninterrupted one) and its rows from `done` on are written in order.
    """
    from reasonguard.infer.cascade import Bands, escalate

    tasks = [_score_tasks(r) for r in records]
    fast_prompts = [backend.build_fast_prompt(r["input"], _instruction(r)) for r in records]
    verdicts = backend.fast_verdicts(fast_prompts, tasks)
    hard: list[int] = []
    if decoding.mode == "cascade":
        bands = Bands.from_dict(decoding.bands or {})
        hard = [i for i, v in enumerate(verdicts) if escalate(v.scores, tasks[i], bands)]
    reasoned: dict[int, tuple[Generation, dict[str, Any] | None]] = {}
    if hard:
        prompts = [
            backend.build_prompt(records[i]["input"], _instruction(records[i])) for i in hard
        ]
        generations = backend.generate(
            prompts, max_new_tokens=decoding.max_new_tokens, seed=decoding.seed + start
        )
        texts = [g[0].text for g in generations]
        found = backend.answer_scores(prompts, texts, [tasks[i] for i in hard]) if scores else None
        for k, i in enumerate(hard):
            reasoned[i] = (generations[k][0], found[k] if found else None)
    rows, tokens = [], 0
    for i, (record, verdict) in enumerate(zip(records, verdicts, strict=True)):
        if start + i < done:
            continue
        if i in reasoned:
            generation, reasoning_scores = reasoned[i]
            row = _row(job, record, [generation], reasoning_scores)
            tokens += generation.num_tokens
        else:
            fast = Generation(text=verdict.text, num_tokens=0, hit_token_limit=False)
            row = _row(job, record, [fast], verdict.scores)
        row["mode"] = "reasoning" if i in reasoned else "fast"
        if decoding.mode == "cascade":
            row["escalated"] = i in reasoned
            row["fast_scores"] = verdict.scores
        rows.append(row)
    out.append(rows)
    return tokens
