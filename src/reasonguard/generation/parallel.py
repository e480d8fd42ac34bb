"""Data-parallel generation: each job's inputs split across N worker processes, merged in order.

`run_jobs(..., data_parallel=N)` and `reasonguard generate|evaluate --data-parallel N` run here.
Every worker loads its own model: on CUDA, worker i sees only GPU i (`CUDA_VISIBLE_DEVICES`;
with vLLM, `tensor_parallel_size` GPUs per worker, one engine each); on a CPU each worker gets
cores // N torch threads (or `--threads`).

Shards. The rows a job still needs, `done`..`total`, are cut into N contiguous shards whose
boundaries fall on multiples of the window size (`Backend.window_size`). A worker therefore runs
the very windows one process runs: the same prompts in the same batches, with seeds that follow
an input's position in the whole job, not in the shard. The merged files equal a single
process's, greedy or sampled. A job with fewer windows than workers leaves some workers without
a shard of it.

Files. Shard rows go to `OUT/_generate/shards/<first>-<stop>/<relpath>`, appended durably as in
one process (`resume.JsonlAppender`). When every worker is done, each job's output is rewritten
as its earlier rows followed by the shards in order, in a temporary file renamed into place: the
output is the old file or the complete one, so `done`, and with it the shard plan, changes only
when a job is complete. A run killed at any moment and rerun with the same command (same N and
batch size) finds the same shards and resumes each where it stopped; shards of another plan are
ignored, and removed once the job is merged. The folder's manifest and lock are the parent's
(`RunState`), and N is not one of the run's settings: one process may continue a data-parallel
run and the other way round (work in unmerged shards is then redone).

Workers are subprocesses, `python -m reasonguard.generation.parallel`, that read their shards (a
pickled `_Spec`) from stdin. Chosen over `multiprocessing` / `torch.multiprocessing` spawn: the
environment (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS) is set before the interpreter starts;
nothing re-imports the caller's `__main__` (spawn re-runs a script's top level, a trap for
library callers without a main guard); a worker that dies hard (killed for memory, a CUDA fault)
is just an exit status. A worker keeps stdin open and exits at its end of file, so a parent
killed outright leaves no orphan holding a GPU. Worker output goes to
`OUT/_generate/shards/worker-<i>.log`; a failure stops the other workers and is raised as
`data-parallel shard i: <the worker's message>`, a `UserError` (exit code 2) when the worker's
error was one.

Example:
    >>> from reasonguard.generation.run import Decoding, benchmark_jobs, run_jobs
    >>> jobs = benchmark_jobs(["all"], "data/benchmarks")
    >>> run_jobs("runs/sft/final", jobs, "runs/preds", Decoding(), data_parallel=4)
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.generation.jobs import Decoding, Job, add_cost, read_cost, record_key, remove_cost
from reasonguard.generation.resume import STATE_DIR, JsonlAppender, RunState, fingerprint
from reasonguard.generation.windows import check_resume, generate_job
from reasonguard.infer.loading import load_backend, planned_window_size

SHARDS = "shards"  # OUT/_generate/shards
MERGE_TMP = "merge.tmp"  # the merged file being written, renamed into place
WORKER_MODULE = "reasonguard.generation.parallel"
POLL_S = 0.5  # how often the parent checks its workers and counts their rows


class WorkerError(RuntimeError):
    """A worker failed on something other than a user error (a bug, out of memory, a signal)."""


@dataclass(frozen=True)
class _Part:
    """One shard of one job, as its worker sees it.

    Attributes:
        job: the job cut down to the shard's windows.
        offset: the position of `job.records[0]` in the whole job (a multiple of the window).
        first: the first row the shard writes, in `job.records` (earlier ones are done already).
        path: the shard file.
    """

    job: Job
    offset: int
    first: int
    path: str


@dataclass(frozen=True)
class _Spec:
    """Everything a worker needs, sent pickled on its stdin."""

    shard: int
    model: str
    backend: str
    prompt_format: str
    decoding: Decoding
    scores: bool
    options: dict[str, Any]
    window: int
    parts: tuple[_Part, ...]
    error_path: str


# --------------------------------------------------------------------------------------------
# Planning


def shard_ranges(done: int, total: int, window: int, shards: int) -> list[tuple[int, int] | None]:
    """Split rows `done`..`total` into `shards` contiguous ranges on multiples of `window` (the
    first range starts at `done`, the last ends at `total`).

    Returns:
        `(first, stop)` per shard; None for a shard left without rows (fewer windows than shards).

    Example:
        >>> shard_ranges(5, 30, 4, 3)  # windows 1..7 of 4 rows: 3, 2 and 2 windows
        [(5, 16), (16, 24), (24, 30)]
    """
    if done >= total:
        return [None] * shards
    low = done // window
    count = -(-total // window) - low  # windows touched by rows done..total
    bounds = [low + -(-count * i // shards) for i in range(shards + 1)]
    return [
        (max(a * window, done), min(b * window, total)) if a < b else None
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def _part(job: Job, first: int, stop: int, window: int, root: Path) -> _Part:
    low = first // window * window  # the window `first` falls in starts here
    cut = Job(job.name, job.relpath, job.records[low:stop], job.kind)
    return _Part(cut, low, first - low, str(root / f"{first}-{stop}" / job.relpath))


def _open_part(part: _Part) -> tuple[JsonlAppender, int]:
    """Open a shard file (cutting off a partial last line) and check its rows; return it and
    the position, in `part.job.records`, of the next row to write."""
    out = JsonlAppender(part.path)
    try:
        done = part.first + out.open()
        check_resume(part.job, out, done)
    except BaseException:
        out.close()
        raise
    return out, done


def _placements(
    workers: int, backend: str, options: Mapping[str, Any]
) -> tuple[list[tuple[dict[str, str], dict[str, Any]]], str]:
    """Per worker, the environment and backend options that put it on its device; and a line
    saying where the workers run.

    Raises:
        UserError: vLLM missing or too few GPUs for it, or `--device` naming a single device.
    """
    if backend == "vllm":
        import importlib.util

        from reasonguard.infer.vllm.backend import MISSING

        if importlib.util.find_spec("vllm") is None:
            raise UserError(MISSING)
        each = options.get("tensor_parallel_size") or 1
        gpus = _visible_gpus()
        if not gpus and each == 1 and options.get("device") != "cuda":
            return _vllm_cpu_placements(workers)
        if len(gpus) < workers * each:
            raise UserError(
                f"--backend vllm --data-parallel {workers} --tensor-parallel-size {each} needs "
                f"{workers * each} GPUs; {len(gpus)} visible"
            )
        groups = [",".join(gpus[i * each : (i + 1) * each]) for i in range(workers)]
        where = "vLLM engines on GPUs " + " | ".join(groups)
        return [({"CUDA_VISIBLE_DEVICES": g}, {}) for g in groups], where
    device = options.get("device")
    if device not in (None, "cpu", "cuda"):
        raise UserError(
            f"--device {device} names one device; with --data-parallel every worker takes its "
            "own GPU (give --device cuda or cpu, or leave it out)"
        )
    gpus = [] if device == "cpu" else _visible_gpus()
    if device == "cuda" and not gpus:
        raise UserError("--device cuda: no CUDA GPU is available")
    if gpus:
        chosen = [gpus[i % len(gpus)] for i in range(workers)]
        shared = f", {workers} workers sharing {len(gpus)}" if len(gpus) < workers else ""
        where = f"GPUs {','.join(chosen)}{shared}"
        return [({"CUDA_VISIBLE_DEVICES": g}, {"device": "cuda"}) for g in chosen], where
    threads = options.get("threads")
    if threads is None:
        threads = max(1, _cores() // workers)
    elif threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    env = {"OMP_NUM_THREADS": str(threads)}
    where = f"CPU, {threads} thread{'s' if threads != 1 else ''} each"
    return [(env, {"device": "cpu", "threads": threads})] * workers, where


def _vllm_cpu_placements(workers: int) -> tuple[list[tuple[dict[str, str], dict[str, Any]]], str]:
    """vLLM's CPU build, one engine per worker on its own cores: vLLM pins its threads to the
    cores named in VLLM_CPU_OMP_THREADS_BIND (by default, to all of them, so two engines would
    fight over each core)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = cores or list(range(os.cpu_count() or 1))
    if len(cores) < workers:
        raise UserError(
            f"--backend vllm --data-parallel {workers} on the CPU needs a core per worker; "
            f"{len(cores)} available"
        )
    each = len(cores) // workers
    groups = [cores[i * each : (i + 1) * each] for i in range(workers)]
    placements = [
        (
            {
                "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in group),
                "OMP_NUM_THREADS": str(len(group)),
            },
            {},
        )
        for group in groups
    ]
    shown = " | ".join(",".join(str(c) for c in g) for g in groups)
    return placements, f"vLLM CPU engines on cores {shown}"


def _visible_gpus() -> list[str]:
    """The CUDA GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [g.strip() for g in listed.split(",") if g.strip()][:count]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# The parent


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
        todo: list[list[_Part]] = [[] for _ in range(workers)]
        files, wanted, present = [], 0, 0
        for job, _, _, ranges in plans:
            for shard, bounds in enumerate(ranges):
                if bounds is None:
                    continue
                part = _part(job, *bounds, window, root)
                shard_file, next_row = _open_part(part)
                shard_file.close()
                wanted += len(part.job.records) - part.first
                present += next_row - part.first
                files.append(part.path)
                if next_row < len(part.job.records):
                    todo[shard].append(part)
        if any(todo):
            placements, where = _placements(workers, backend, backend_options)
            log(f"data-parallel: {sum(map(bool, todo))} of {workers} workers busy ({where})")
            specs = [
                _Spec(
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
            _run_workers(specs, envs, root, _RowCounter(files), wanted, present, progress)
        for job, done, total, ranges in plans:
            path = out / job.relpath
            if done >= total:
                log(f"{job.name}: all {total} rows already generated -> {path}")
                continue
            shards = [(Path(_part(job, *b, window, root).path), b[1] - b[0]) for b in ranges if b]
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


class _RowCounter:
    """Counts the complete rows added to a set of files since the last call (the progress bar)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.offsets = {path: _size(path) for path in paths}

    def new_rows(self) -> int:
        added = 0
        for path, offset in self.offsets.items():
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            added += data.count(b"\n", 0, end)
            self.offsets[path] = offset + end
        return added


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _run_workers(
    specs: Sequence[_Spec],
    envs: Mapping[int, Mapping[str, str]],
    root: Path,
    counter: _RowCounter,
    wanted: int,
    present: int,
    progress: bool,
) -> None:
    """Start a worker per spec and wait for all; on the first failure stop the rest and raise."""
    from tqdm.auto import tqdm

    root.mkdir(parents=True, exist_ok=True)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    bar = tqdm(
        total=wanted,
        initial=present,
        desc=f"generate ({len(specs)} workers)",
        unit="row",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for spec in specs:
            Path(spec.error_path).unlink(missing_ok=True)
            procs[spec.shard] = _start(spec, envs[spec.shard], _log_path(root, spec.shard))
        while True:
            running = False
            for spec in specs:
                code = procs[spec.shard].poll()
                if code is None:
                    running = True
                elif code != 0:
                    raise _failure(spec, code, _log_path(root, spec.shard))
            added = counter.new_rows()
            if added:
                bar.update(added)
            if not running:
                return
            time.sleep(POLL_S)
    finally:
        _stop(procs.values())
        bar.close()


def _log_path(root: Path, shard: int) -> Path:
    return root / f"worker-{shard}.log"


def _start(spec: _Spec, env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    import reasonguard

    environ = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    package_root = Path(reasonguard.__file__).resolve().parents[1]
    if package_root.name not in ("site-packages", "dist-packages"):
        # A source checkout the parent imports from (an editable install, or `sys.path` set by
        # the caller): make sure the worker imports the same code.
        environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(package_root), environ.get("PYTHONPATH")) if p
        )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
        )
    assert proc.stdin is not None
    try:
        proc.stdin.write(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
        proc.stdin.flush()
    except BrokenPipeError:
        pass  # the worker died on start; its exit status and log say why
    return proc  # stdin stays open: the worker runs until it ends


def _stop(procs: Any) -> None:
    """End workers still running (their stdin closes, so they exit) and reap them all."""
    procs = list(procs)
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _failure(spec: _Spec, code: int, log_path: Path) -> Exception:
    """The error to raise for a worker that exited with `code`."""
    try:
        report = json.loads(Path(spec.error_path).read_text())
    except (OSError, ValueError):
        report = None
    where = f"data-parallel shard {spec.shard}"
    if report is not None and report.get("user"):
        return UserError(f"{where}: {report['message']}")
    if report is not None:
        detail = report["message"]
    else:
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        tail = _tail(log_path)
        detail = f"{how}{': ' + tail if tail else ''}"
    return WorkerError(f"{where} failed: {detail} (worker log: {log_path})")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line for line in text.strip().splitlines()[-lines:])


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


# --------------------------------------------------------------------------------------------
# The worker


def worker_main() -> int:
    """The worker process: read a `_Spec` from stdin, generate its shards, exit 0 (done),
    2 (a user error, reported in `spec.error_path`) or 1 (another error, likewise)."""
    spec: _Spec = pickle.load(sys.stdin.buffer)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    try:
        _work(spec)
    except UserError as exc:
        _report(spec, user=True, message=str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        traceback.print_exc()
        _report(spec, user=False, message=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def _exit_with_parent() -> None:
    # os.read, not sys.stdin: a thread blocked in a buffered read holds a lock that interpreter
    # shutdown then waits for.
    while os.read(0, 1 << 16):
        pass
    os._exit(3)  # end of file: the parent closed stdin or died


def _report(spec: _Spec, user: bool, message: str) -> None:
    Path(spec.error_path).write_text(json.dumps({"user": user, "message": message}))


def _work(spec: _Spec) -> None:
    backend = None
    for part in spec.parts:
        out, done = _open_part(part)
        with out:
            total = len(part.job.records)
            if done >= total:
                continue
            if backend is None:
                backend = load_backend(
                    spec.model,
                    spec.backend,
                    spec.prompt_format,
                    max_new_tokens=spec.decoding.max_new_tokens,
                    **spec.options,
                )
                if backend.window_size() != spec.window:
                    raise RuntimeError(
                        f"window size {backend.window_size()} != planned {spec.window}: "
                        "backends.planned_window_size is out of date"
                    )
            generate_job(
                backend,
                part.job,
                out,
                done,
                total,
                spec.decoding,
                progress=False,
                scores=spec.scores,
                offset=part.offset,
            )


if __name__ == "__main__":
    # Run as `python -m reasonguard.generation.parallel`: hand over to the imported module, whose
    # classes the parent's pickle names.
    from reasonguard.generation.parallel import worker_main as _main

    raise SystemExit(_main())
