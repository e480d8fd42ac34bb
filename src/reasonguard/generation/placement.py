"""Where data-parallel workers run: the environment and backend options of each worker.

On CUDA, worker i sees only its own GPU (`CUDA_VISIBLE_DEVICES`; with vLLM,
`tensor_parallel_size` GPUs per worker, one engine each); on a CPU each worker gets
cores // N torch threads (or `--threads`), and vLLM's CPU engines each get cores of their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from reasonguard.errors import UserError


def place_workers(
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
