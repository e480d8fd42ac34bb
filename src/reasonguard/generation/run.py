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
  `scores` its label probabilities, and each row says its `mode` and the `tier` that answered it;
  in a cascade each row also says whether it was `escalated` to reasoning, with its
  `fast_scores` (None where a classifier in front answered it: `Decoding.classifier`, whose
  `classifier_scores` every row of such a cascade carries);
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
    >>> from reasonguard.generation.run import Decoding, benchmark_jobs, run_jobs
    >>> jobs = benchmark_jobs(["AegisSafetyTest"], "data/benchmarks")
    >>> run_jobs("smollm2", jobs, "runs/preds", Decoding(max_new_tokens=256), batch_size=8)
    {'AegisSafetyTest/generated_predictions.jsonl': 359}
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.generation.jobs import (
    Decoding,
    Job,
    add_cost,
    benchmark_jobs,
    check_mode_decoding,
    cost_path,
    data_jobs,
    read_cost,
    record_key,
)
from reasonguard.generation.parallel import run_data_parallel
from reasonguard.generation.resume import JsonlAppender, RunState, fingerprint
from reasonguard.generation.windows import check_resume, generate_job
from reasonguard.infer.backends import Backend, check_sampling, resolve_prompt_format
from reasonguard.infer.classifier import check_classifier_tier, check_model_mode
from reasonguard.infer.loading import load_backend
from reasonguard.models import resolve_model

# The job and decoding types are part of this module's interface (`generate.Decoding`, ...).
__all__ = [
    "Decoding",
    "Job",
    "add_cost",
    "benchmark_jobs",
    "check_mode_decoding",
    "cost_path",
    "data_jobs",
    "read_cost",
    "run_jobs",
]


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
        model: alias, hub id or model folder (see `loading.load_backend`).
        jobs: from `benchmark_jobs` or `data_jobs`.
        out_dir: the output folder.
        decoding: decoding settings (fixed for the life of `out_dir`); default greedy.
        backend: `hf` or `vllm`.
        prompt_format: for models without a guard record.
        limit: only the first `limit` inputs of each job (a later, larger limit extends).
        progress: show a progress bar per job (rows/s, ETA, tokens/s).
        log: where one-line summaries go (default: stderr).
        scores: benchmark jobs: store the label probabilities of each `predict`
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
    if scores and any(job.kind != "benchmark" for job in jobs):
        raise UserError("--scores goes with benchmarks, not training data")
    check_mode_decoding(decoding, jobs)
    if data_parallel < 1:
        raise UserError(f"--data-parallel must be at least 1, got {data_parallel}")
    path = resolve_model(model)
    check_model_mode(str(model), path, decoding.mode)
    if decoding.mode == "classifier":
        _check_classifier_options(backend, prompt_format, data_parallel)
    if decoding.classifier is not None:
        check_classifier_tier(
            str(model), path, decoding.classifier, "cascade", decoding.classifier_bands
        )
        if data_parallel > 1:
            raise UserError("--data-parallel: a cascade with --classifier runs in one process")
    params = {
        "model": str(model),
        # A classifier reads the item, not a prompt: it has no prompt format.
        "prompt_format": None
        if decoding.mode == "classifier"
        else resolve_prompt_format(path, prompt_format),
        "backend": backend,
        **decoding.params(),
    }
    if scores:
        params["scores"] = True  # only when on: folders written before the option still resume
    if data_parallel > 1:
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
    first: Backend | None = None  # the classifier tier of a three-tier cascade
    try:
        for job in jobs:
            state.claim(job.relpath, fingerprint(record_key(job, r)[1] for r in job.records))
            total = len(job.records) if limit is None else min(limit, len(job.records))
            with JsonlAppender(Path(out_dir) / job.relpath) as out:
                done = check_resume(job, out, out.open())
                if done < total:
                    if loaded is None:
                        loaded = load_backend(
                            model,
                            backend,
                            params["prompt_format"],
                            max_new_tokens=decoding.max_new_tokens,
                            **backend_options,
                        )
                    if decoding.classifier is not None and first is None:
                        first = load_backend(
                            decoding.classifier,
                            device=backend_options.get("device"),
                            threads=backend_options.get("threads"),
                        )
                    generate_job(
                        loaded, job, out, done, total, decoding, progress, scores, classifier=first
                    )
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


def _check_classifier_options(backend: str, prompt_format: str | None, data_parallel: int) -> None:
    """Options of a generating model refused for a classifier, by name, before the run's
    folder is touched."""
    if backend != "hf":
        raise UserError("an encoder classifier runs on transformers: use --backend hf")
    if prompt_format is not None:
        raise UserError("--prompt-format: an encoder classifier reads the item, not a prompt")
    if data_parallel > 1:
        # Shards start on multiples of a generating backend's window (`planned_window_size`),
        # which a classifier's batches do not share.
        raise UserError("--data-parallel: an encoder classifier runs in one process")
