"""The worker processes of a data-parallel run: how the parent starts, watches and stops them,
and what each one runs.

Workers are subprocesses, `python -m reasonguard.generation.workers`, that read their shards (a
pickled `WorkerSpec`) from stdin. Chosen over `multiprocessing` / `torch.multiprocessing` spawn:
the environment (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS) is set before the interpreter starts;
nothing re-imports the caller's `__main__` (spawn re-runs a script's top level, a trap for
library callers without a main guard); a worker that dies hard (killed for memory, a CUDA fault)
is just an exit status. A worker keeps stdin open and exits at its end of file, so a parent
killed outright leaves no orphan holding a GPU. Worker output goes to
`OUT/_generate/shards/worker-<i>.log`; a failure stops the other workers and is raised as
`data-parallel shard i: <the worker's message>`, a `UserError` (exit code 2) when the worker's
error was one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.generation.jobs import Decoding
from reasonguard.generation.shards import Part, open_part
from reasonguard.generation.windows import generate_job
from reasonguard.infer.loading import load_backend

WORKER_MODULE = "reasonguard.generation.workers"
POLL_S = 0.5  # how often the parent checks its workers and counts their rows


class WorkerError(RuntimeError):
    """A worker failed on something other than a user error (a bug, out of memory, a signal)."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, sent pickled on its stdin."""

    shard: int
    model: str
    backend: str
    prompt_format: str
    decoding: Decoding
    scores: bool
    options: dict[str, Any]
    window: int
    parts: tuple[Part, ...]
    error_path: str


# --------------------------------------------------------------------------------------------
# The parent's side


class RowCounter:
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


def run_workers(
    specs: Sequence[WorkerSpec],
    envs: Mapping[int, Mapping[str, str]],
    root: Path,
    counter: RowCounter,
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


def _start(spec: WorkerSpec, env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
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


def _failure(spec: WorkerSpec, code: int, log_path: Path) -> Exception:
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


# --------------------------------------------------------------------------------------------
# The worker


def worker_main() -> int:
    """The worker process: read a `WorkerSpec` from stdin, generate its shards, exit 0 (done),
    2 (a user error, reported in `spec.error_path`) or 1 (another error, likewise)."""
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
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


def _report(spec: WorkerSpec, user: bool, message: str) -> None:
    Path(spec.error_path).write_text(json.dumps({"user": user, "message": message}))


def _work(spec: WorkerSpec) -> None:
    backend = None
    for part in spec.parts:
        out, done = open_part(part)
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
    # Run as `python -m reasonguard.generation.workers`: hand over to the imported module, whose
    # classes the parent's pickle names.
    from reasonguard.generation.workers import worker_main as _main

    raise SystemExit(_main())
