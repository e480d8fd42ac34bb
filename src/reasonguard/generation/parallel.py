"""Data-parallel generation: each job's inputs split across N worker processes, merged in order.

`run_jobs(..., data_parallel=N)` and `reasonguard generate|evaluate --data-parallel N` run here.
Every worker loads its own model, on a device of its own (`placement.py`). The rows a job still
needs are cut into N contiguous shards on window boundaries (`shards.py`), so a worker runs the
very windows one process runs and the merged files equal a single process's, greedy or sampled.
The workers are subprocesses that the parent starts, watches and stops (`workers.py`).

Files. Shard rows go to `OUT/_generate/shards/<first>-<stop>/<relpath>`, appended durably as in
one process (`resume.JsonlAppender`). When every worker is done, each job's output is rewritten
as its earlier rows followed by the shards in order, in a temporary file renamed into place: the
output is the old file or the complete one, so `done`, and with it the shard plan, changes only
when a job is complete. A run killed at any moment and rerun with the same command (same N and
batch size) finds the same shards and resumes each where it stopped; shards of another plan are
ignored, and removed once the job is merged. The folder's manifest and lock are the parent's
(`RunState`), and N is not one of the run's settings: one process may continue a data-parallel
run and the other way round (work in unmerged shards is then redone).

Example:
    >>> from reasonguard.generation.run import Decoding, benchmark_jobs, run_jobs
    >>> jobs = benchmark_jobs(["all"], "data/benchmarks")
    >>> run_jobs("runs/sft/final", jobs, "runs/preds", Decoding(), data_parallel=4)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reasonguard.generation.jobs import Decoding, Job, add_cost, read_cost, record_key, remove_cost
from reasonguard.generation.placement import place_workers
from reasonguard.generation.resume import STATE_DIR, JsonlAppender, RunState, fingerprint
from reasonguard.generation.shards import Part, open_part, part_of, shard_ranges
from reasonguard.generation.windows import check_resume
from reasonguard.generation.workers import RowCounter, WorkerError, WorkerSpec, run_workers
from reasonguard.infer.loading import planned_window_size

__all__ = ["WorkerError", "run_data_parallel", "shard_ranges"]

SHARDS = "shards"  # OUT/_generate/shards
MERGE_TMP = "merge.tmp"  # the merged file being written, renamed into place


def run_data_parallel(
    model: str,
    jobs: Sequence[Job],
    out_dir: str | os.PathLike[str],
    decoding: Decoding,
    params: Mapping[str, Any],
    *,
    workers: int,
    limit: int | None,
    progress: bool,
    log: Callable[[str], Any],
    scores: bool,
    backend_options: Mapping[str, Any],
) -> dict[str, int]:
    """`run_jobs` with `workers` processes (see the module docstring); called by `run_jobs`,
    which checks the settings and builds `params` (the manifest's).

    Returns:
        Rows in each output file, by relative path.

    Raises:
        UserError: as `run_jobs`, and a worker's user error, prefixed with its shard number.
        WorkerError: a worker failed otherwise (its message and log file in the error).
    """
    backend = params["backend"]
    window = planned_window_size(backend, backend_options.get("batch_size"))
    out = Path(out_dir)
    root = out / STATE_DIR / SHARDS
    state = RunState(out, params)
    try:
        plans: list[tuple[Job, int, int, list[tuple[int, int] | None]]] = []
        counts: dict[str, int] = {}
        for job in jobs:
            state.claim(job.relpath, fingerprint(record_key(job, r)[1] for r in job.records))
            total = len(job.records) if limit is None else min(limit, len(job.records))
            with JsonlAppender(out / job.relpath) as final:
                done = check_resume(job, final, final.open())
            counts[job.relpath] = max(done, total)
            plans.append((job, done, total, shard_ranges(done, total, window, workers)))
        todo: list[list[Part]] = [[] for _ in range(workers)]
        files, wanted, present = [], 0, 0
        for job, _, _, ranges in plans:
            for shard, bounds in enumerate(ranges):
                if bounds is None:
                    continue
                part = part_of(job, *bounds, window, root)
                shard_file, next_row = open_part(part)
                shard_file.close()
                wanted += len(part.job.records) - part.first
                present += next_row - part.first
                files.append(part.path)
                if next_row < len(part.job.records):
                    todo[shard].append(part)
        if any(todo):
            placements, where = place_workers(workers, backend, backend_options)
            log(f"data-parallel: {sum(map(bool, todo))} of {workers} workers busy ({where})")
            specs = [
                WorkerSpec(
                    shard=shard,
                    model=str(model),
                    backend=backend,
                    prompt_format=params["prompt_format"],
                    decoding=decoding,
                    scores=scores,
                    options={**backend_options, **placements[shard][1]},
                    window=window,
                    parts=tuple(parts),
                    error_path=str(root / f"worker-{shard}.error.json"),
                )
                for shard, parts in enumerate(todo)
                if parts
            ]
            envs = {spec.shard: placements[spec.shard][0] for spec in specs}
            run_workers(specs, envs, root, RowCounter(files), wanted, present, progress)
        for job, done, total, ranges in plans:
            path = out / job.relpath
            if done >= total:
                log(f"{job.name}: all {total} rows already generated -> {path}")
                continue
            shards = [(Path(part_of(job, *b, window, root).path), b[1] - b[0]) for b in ranges if b]
            _merge(path, shards, root / MERGE_TMP)
            # The workers' generation seconds, summed (worker time, not the wall time of the run).
            for shard, _ in shards:
                cost = read_cost(str(shard)[: -len(job.relpath)], job.relpath)
                add_cost(out, job.relpath, cost["seconds"], cost["rows"])
            log(
                f"{job.name}: {total} rows ({done} were already there; {len(shards)} "
                f"shard{'s' if len(shards) > 1 else ''}) -> {path}"
            )
        _clean(root, [job.relpath for job in jobs])
    finally:
        state.close()
    return counts


def _merge(final: Path, shards: Sequence[tuple[Path, int]], tmp: Path) -> None:
    """Replace `final` by its rows followed by the shards' rows, atomically."""
    for path, rows in shards:
        with JsonlAppender(path) as shard:
            found = shard.open() if path.exists() else 0
        if found != rows:  # the workers all succeeded: a bug
            raise RuntimeError(f"{path}: {found} rows, expected {rows}")
    with tmp.open("wb") as dst:
        for path in [final, *(p for p, _ in shards)]:
            with path.open("rb") as src:
                shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, final)


def _clean(root: Path, relpaths: Sequence[str]) -> None:
    """Remove every shard file of these outputs (of any plan) and the worker logs, then the
    folders left empty. Shards of outputs not in this run stay for their own rerun."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.is_dir():
            for relpath in relpaths:
                (entry / relpath).unlink(missing_ok=True)
                remove_cost(entry, relpath)
        elif entry.name.startswith("worker-") or entry.name == MERGE_TMP:
            entry.unlink()
    for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if not os.listdir(folder):
            os.rmdir(folder)
