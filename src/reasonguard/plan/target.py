"""What a plan is for: the target device (a GPU class, a described GPU, or this CPU) and the
process count and sharding it can model, refused as `train` would refuse them.

Example:
    >>> from reasonguard.plan.target import plan_target
    >>> plan_target("H100")[0]
    'h100'
"""

from __future__ import annotations

from typing import Any

from reasonguard.errors import UserError
from reasonguard.launch.command import SHARDINGS
from reasonguard.plan.hardware import CUSTOM, GPUS, TARGETS, GPUClass, custom_gpu, this_machine


def plan_target(
    gpu: str | None, memory_gib: float | None = None, tflops: float | None = None
) -> tuple[str, GPUClass | None]:
    """The plan's target name and its GPU class (None for `cpu`).

    Args:
        gpu: a `TARGETS` name in any case, or None for this machine (`this_machine`) or, when
            `memory_gib` or `tflops` is given, a GPU outside the table (`custom`).
        memory_gib, tflops: numbers that replace the class's (see `hardware.custom_gpu`).

    Raises:
        UserError: an unknown name, numbers with `cpu`, or an incomplete or bad description.
    """
    described = memory_gib is not None or tflops is not None
    if gpu is None:
        if described:
            return CUSTOM, custom_gpu(None, memory_gib, tflops)
        target = this_machine()
    else:
        target = gpu.strip().lower()
        if target not in TARGETS:
            raise UserError(
                f"--gpu {gpu!r} is not known; choose one of: {', '.join(TARGETS)}; or describe "
                "it with --gpu-memory-gib and --gpu-tflops (no --gpu)"
            )
    if target == "cpu":
        if described:
            raise UserError(
                "--gpu-memory-gib and --gpu-tflops describe a GPU; leave them out with --gpu cpu"
            )
        return target, None
    return target, custom_gpu(target, memory_gib, tflops) if described else GPUS[target]


def check_parallel(config: Any, target: str, num_processes: int, sharding: str) -> None:
    """Refuse a process count / sharding the trainer would refuse, or the plan cannot model.

    Raises:
        UserError: N < 1, an unknown sharding, a sharding other than ddp on one process,
            several processes on the CPU, or QLoRA sharded (train refuses it).
    """
    if num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {num_processes}")
    if sharding not in SHARDINGS:
        raise UserError(
            f"--sharding {sharding!r} is not known; choose one of: {', '.join(SHARDINGS)}"
        )
    if sharding != "ddp" and num_processes == 1:
        raise UserError(
            f"--sharding {sharding} shards over several GPUs: give --num-processes N (N >= 2)"
        )
    if num_processes > 1 and target == "cpu":
        raise UserError(
            "--num-processes N > 1 plans N GPUs; CPU processes share one machine's cores and "
            "memory, which the plan does not model: choose a --gpu class"
        )
    if sharding != "ddp" and config.finetuning == "qlora":
        raise UserError(
            f"finetuning qlora cannot be sharded with {sharding} (train refuses it: its 4-bit "
            "weights are not shardable); plan it with --sharding ddp, or use finetuning=lora"
        )
