"""Launching several training processes: `reasonguard train ... --num-processes N [--sharding S]`.

The processes themselves are accelerate's and transformers' (`Trainer` under `accelerate
launch`): this module only builds the `accelerate launch` command a user would type, so

    reasonguard train sft --config C.yaml --num-processes 4 --sharding zero3

is the same run as

    accelerate launch --config_file configs/accelerate/deepspeed-zero3.yaml -m reasonguard train sft --config C.yaml

`--cpu` starts CPU processes (gloo) even where GPUs exist: the GPUs are hidden and accelerate's
multi-GPU launcher is used, because `accelerate launch --cpu --num_processes N` starts one
process (its multi-CPU mode goes through mpirun).

Example:
    >>> from reasonguard.launch.command import forced_cpu
    >>> forced_cpu({"ACCELERATE_USE_CPU": "true"})
    True
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from reasonguard.errors import UserError


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def forced_cpu(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the launcher asked for CPU processes (`ACCELERATE_USE_CPU`, set by `--cpu`)."""
    return _true((os.environ if environ is None else environ).get("ACCELERATE_USE_CPU"))


# Launcher variables, first match wins: torchrun / accelerate, then MPI launchers.
_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _first_int(environ: Mapping[str, str], names: Sequence[str]) -> int | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return int(value)
    return None


def unsupported_launch(environ: Mapping[str, str] | None = None) -> str | None:
    """Why this launch cannot train correctly, or None (`accelerate launch --cpu` asked for
    several processes, and starts one)."""
    env = os.environ if environ is None else environ
    if (
        forced_cpu(env)
        and env.get("MASTER_ADDR")
        and _first_int(env, _WORLD) is None
        and "ACCELERATE_DYNAMO_BACKEND" in env
    ):
        # accelerate's simple launcher sets MASTER_ADDR only when asked for several processes,
        # yet starts one: its multi-CPU mode is mpirun (--mpirun_hostfile).
        return (
            "`accelerate launch --cpu --num_processes N` starts ONE process (accelerate runs "
            "several CPU processes only through mpirun); for N CPU processes run "
            "`reasonguard train STAGE --config C.yaml --num-processes N --cpu`, or "
            "`CUDA_VISIBLE_DEVICES= ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "--num_processes N -m reasonguard train STAGE --config C.yaml`"
        )
    return None


def visible_gpus() -> int:
    """The CUDA GPUs this process can use (0 without CUDA, or with `--cpu`)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() and not forced_cpu() else 0


def several_gpus_problem(
    gpus: int, environ: Mapping[str, str] | None = None, stage: str = "STAGE"
) -> str | None:
    """Why one training process (of `reasonguard train STAGE`) must not run on `gpus` visible
    GPUs, or None.

    Outside a launcher, transformers' Trainer spreads one process's batches over every visible
    GPU with `torch.nn.DataParallel`, which replicates the model per batch: the LM head that
    `train.labelled_head` replaces for the duration of a call is the device-0 module's, so the
    replicas would compute the wrong loss or fail. One process per GPU (a launcher) or one
    visible GPU is what trains correctly.
    """
    env = os.environ if environ is None else environ
    if gpus <= 1 or world_size(env) > 1 or forced_cpu(env):
        return None
    return (
        f"this training process sees {gpus} GPUs and was not started by a launcher: "
        "transformers' Trainer would split its batches over them with torch.nn.DataParallel, "
        "which reasonguard's loss (the LM head run at the labelled positions only) does not "
        f"support. Train on all {gpus} with one process each: `reasonguard train {stage} --config "
        f"C.yaml --num-processes {gpus}` (add --sharding fsdp|zero2|zero3 to shard the model); "
        f"or on one GPU: `CUDA_VISIBLE_DEVICES=0 reasonguard train {stage} --config C.yaml`"
    )


def precision_problem(bf16: bool, environ: Mapping[str, str] | None = None) -> str | None:
    """Why this launch's mixed precision cannot be used, or None.

    The rule, the same for every launch: the training config's `bf16` decides (`auto`: on on a
    CUDA GPU with bf16 support, off elsewhere). A launcher's `mixed_precision` (accelerate's
    `--mixed_precision`, or `mixed_precision:` in its config file) must be `no`, as in the
    shipped configs and `--num-processes`, or say the same as the config (`bf16` where bf16 is
    on): accelerate would otherwise autocast in a precision the run neither loads nor records.

    Args:
        bf16: the run's resolved `bf16` (`train.modeling.use_bf16`).
        environ: the environment (`ACCELERATE_MIXED_PRECISION`, set by `accelerate launch`).
    """
    env = os.environ if environ is None else environ
    asked = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if asked == "no" or (asked == "bf16" and bf16):
        return None
    if bf16:
        how = f"the training config trains in bf16, {asked} is not a precision it trains in"
    else:
        how = (
            "the training config's bf16 is off here (bf16: auto is on only on a CUDA GPU with "
            "bf16 support); set bf16: true in it to train in bf16"
        )
    return (
        f"the launcher asks for mixed_precision {asked}, but precision is the training "
        f"config's bf16 setting: {how}. Launch with --mixed_precision no (the shipped "
        "configs/accelerate/*.yaml say mixed_precision: 'no')"
    )


def uses_deepspeed(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was launched for DeepSpeed (`accelerate launch --use_deepspeed`)."""
    return _true((os.environ if environ is None else environ).get("ACCELERATE_USE_DEEPSPEED"))


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes of this launch (1 outside a launcher)."""
    env = os.environ if environ is None else environ
    return _first_int(env, _WORLD) or 1


def die_with_launcher() -> None:
    """Linux: have the kernel SIGTERM this process when its launcher dies.

    torchrun starts every worker in a session of its own, so a launcher killed with SIGKILL (an
    OOM kill, `kill -9` of its process group) would leave the workers training on and writing
    the run directory while a rerun resumes it. SIGTERM keeps its default action on purpose: a
    Python handler could not run while the process waits inside a collective for a dead peer.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


# `--sharding` of `reasonguard train`: the shipped accelerate config of each strategy. The launch
# reads the file itself (configs/accelerate/, installed with the package as
# reasonguard/launch/accelerate_configs/), so the shortcut and the documented
# `accelerate launch --config_file configs/accelerate/X.yaml` are one launch.
SHARDING_CONFIGS = {
    "ddp": "ddp.yaml",
    "fsdp": "fsdp.yaml",
    "zero2": "deepspeed-zero2.yaml",
    "zero3": "deepspeed-zero3.yaml",
}
SHARDINGS = tuple(SHARDING_CONFIGS)  # what `--sharding` accepts, everywhere it is taken
ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate_configs"


def accelerate_config(sharding: str) -> Path:
    """The shipped accelerate config file of a `--sharding` strategy."""
    return ACCELERATE_CONFIGS / SHARDING_CONFIGS[sharding]


def launch_command(
    argv: Sequence[str],
    num_processes: int,
    cpu: bool,
    environ: Mapping[str, str] | None = None,
    sharding: str = "ddp",
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command (and its environment) that runs `reasonguard *argv` in
    `num_processes` processes on this machine, data parallel (`ddp`) or sharded (`fsdp`,
    `zero2`, `zero3`: see train.sharding): `accelerate launch --config_file X.yaml
    --num_processes N -m reasonguard ...` with the strategy's shipped config, nothing else.

    With `cpu` the GPUs are hidden and the processes use gloo (accelerate's own `--cpu` would
    start one process).
    """
    env = dict(os.environ if environ is None else environ)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config(sharding)),
        "--num_processes",
        str(num_processes),
        "-m",
        "reasonguard",
        *argv,
    ]
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if sharding.startswith("zero"):
            # accelerate drops DeepSpeed from a CPU-only state; DeepSpeed finds the CPU itself.
            env.pop("ACCELERATE_USE_CPU", None)
        else:
            env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return command, env


def launch(argv: Sequence[str], num_processes: int, cpu: bool, sharding: str = "ddp") -> int:
    """Run `reasonguard *argv` in `num_processes` processes; the launcher's exit status.

    Raises:
        UserError: already inside a launch, or more GPU processes than GPUs.
    """
    if world_size() > 1:
        raise UserError(
            "--num-processes starts the processes itself; this command already runs under a "
            "launcher (WORLD_SIZE is set): drop --num-processes"
        )
    if not cpu:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if 0 < gpus < num_processes:
            raise UserError(
                f"--num-processes {num_processes} needs {num_processes} GPUs, this machine has "
                f"{gpus}: use --num-processes {gpus}, or add --cpu for CPU processes"
            )
        cpu = gpus == 0
    command, env = launch_command(argv, num_processes, cpu, sharding=sharding)
    shown = " ".join(command[2:]).replace("accelerate.commands.launch", "accelerate launch", 1)
    print(f"launching {num_processes} {'CPU ' if cpu else ''}processes: {shown}", file=sys.stderr)
    return subprocess.run(command, env=env, check=False).returncode
