"""Several training processes (data parallel): one per GPU, or CPU processes (gloo) for tests.

Run it:

    accelerate launch --config_file configs/accelerate/ddp.yaml -m reasonguard train sft --config C.yaml
    reasonguard train sft --config C.yaml --num-processes 4          # the same, launched for you
    reasonguard train sft --config C.yaml --num-processes 2 --cpu    # CPU processes, gloo

A launcher (`accelerate launch`, torchrun, mpirun) starts the processes and sets `WORLD_SIZE`,
`RANK`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; `Processes.from_env` reads them and
`start()` joins the process group with plain `torch.distributed` (nccl on CUDA, gloo on CPU).
Why not accelerate's `Accelerator` / `PartialState`: the loop needs four collectives (sum the
gradients, sum a few numbers, broadcast the starting weights, share rank 0's decisions) and none
of Accelerator's wrapping of model, optimizer and dataloader. The launcher is accelerate's, the
process group torch's.

How the maths stays that of one process. Every rank computes the same step plan
(`train.data.step_plan`) and takes its share of every step's rows (`shard`: the rows sorted by
length, then every world_size-th, so the ranks get similar token counts). The loss of each
micro-batch is divided by the label count (SFT) or pair count (DPO) of the *whole* step; every rank
holds the whole step's rows, so that global count is a local sum (no communication, and exactly
what an all_reduce of the per-rank counts would return). The gradients are then summed over the
ranks (`sum_gradients`) before clipping and the optimizer step: the sum is the gradient one process
would compute (up to float summation order), so every rank applies the same update to the same
weights, and the optimizer steps are those of one process.

Not DistributedDataParallel: DDP syncs gradients inside backward and needs every rank to run the
same number of backward passes, while packed micro-batches differ in number between ranks and a
rank can get no row at all in an epoch's short last step. One all_reduce after the accumulation
is what DDP does with `no_sync` on all but the last micro-batch, minus DDP's overlap of that
communication with the last backward (small for LoRA gradients; for full fine-tuning of a big
model, FSDP or DeepSpeed ZeRO shard the state instead: `train.sharding`, `train.zero`).

Random numbers (dropout): all ranks seed alike, so new LoRA weights start equal (and rank 0's are
broadcast anyway). With several processes the torch generator is then reseeded before every
optimizer step from (seed, step, rank) (`step_seed`): each rank draws its own dropout masks, and
a resumed run draws the same masks at the same step and rank without per-rank RNG files. With
one process nothing is reseeded (the single-process run is unchanged; its checkpoints keep the
RNG state).

Only rank 0 writes: status.json, metrics.jsonl, TensorBoard, the progress bar and log lines,
checkpoints, training_info.json, final/ and the DPO reference log-probs. Each rank reads the
checkpoint rank 0 chose, so a multi-node run needs `output_dir` on a filesystem every node sees.

Example:
    >>> from reasonguard.train.distributed import Processes
    >>> Processes.from_env({}).world_size
    1
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reasonguard.errors import UserError

# Gradients are summed in flat buckets of at most this many bytes (one all_reduce each).
BUCKET_BYTES = 64 * 1024**2

# Launcher variables, first match wins: torchrun / accelerate, then MPI launchers.
_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_LOCAL_RANK = (
    "LOCAL_RANK",
    "MPI_LOCALRANKID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_LOCAL_RANK",
)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def forced_cpu(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the launcher asked for CPU processes (`ACCELERATE_USE_CPU`, set by `--cpu`)."""
    return _true((os.environ if environ is None else environ).get("ACCELERATE_USE_CPU"))


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


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of optimizer step `step` on `rank` in a multi-process run (distinct for
    every (step, rank) below 65,536 ranks)."""
    return seed + 65_536 * step + rank


@dataclass
class Processes:
    """This process's place among the training processes; every method is a no-op (or the
    identity) for a single process, so the single-process loop runs the code it always ran."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    _owns_group: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Processes:
        """Read the launcher's variables (a single process when there are none)."""
        env = os.environ if environ is None else environ
        world = _first_int(env, _WORLD) or 1
        if world <= 1:
            return cls()
        rank = _first_int(env, _RANK)
        if rank is None:
            raise UserError(f"WORLD_SIZE is {world} but no RANK is set: start with a launcher")
        local = _first_int(env, _LOCAL_RANK)
        return cls(rank=rank, world_size=world, local_rank=rank if local is None else local)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Refuse launches this loop cannot serve, then join the process group (nccl on CUDA,
        gloo on CPU); a single process only gets the checks.

        Raises:
            UserError: `accelerate launch --cpu` asked for several processes (it starts one).
        """
        problem = unsupported_launch()
        if problem:
            raise UserError(problem)
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        from reasonguard.train.modeling import cuda_available

        if not dist.is_initialized():
            cuda = cuda_available()
            if cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(
                "nccl" if cuda else "gloo", rank=self.rank, world_size=self.world_size
            )
            self._owns_group = True
        self.backend = str(dist.get_backend())
        _die_with_parent()

    def stop(self) -> None:
        """Leave the process group this object joined."""
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    # ---------------------------------------------------------------------------- data

    def shard(self, items: Sequence[Any]) -> Sequence[Any]:
        """This rank's share of `items`: sorted by length (longest first, ties in input order),
        every world_size-th from position `rank`; one process gets `items` itself."""
        if not self.enabled:
            return items
        ordered = sorted(items, key=len, reverse=True)
        return ordered[self.rank :: self.world_size]

    # ---------------------------------------------------------------------------- collectives

    def _comm_device(self) -> Any:
        import torch

        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (float64); one process gets them back unchanged."""
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        tensor = tensor.to(self._comm_device())
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def all_max(self, values: Sequence[float]) -> list[float]:
        """Each value's maximum over the ranks (float64); one process gets them unchanged."""
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        tensor = tensor.to(self._comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.cpu().tolist()

    def all_sum_tensor(self, tensor: Any) -> Any:
        """`tensor` summed over the ranks (a new tensor on its device); one process: itself."""
        if not self.enabled or tensor.numel() == 0:
            return tensor
        import torch.distributed as dist

        summed = tensor.to(self._comm_device(), copy=True)
        dist.all_reduce(summed)
        return summed.to(tensor.device)

    def sum_gradients(self, params: Sequence[Any]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (a rank that saw no row
        contributes zeros), in flat buckets of at most `BUCKET_BYTES`."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        grads = []
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        for bucket in _buckets(grads, BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def broadcast_parameters(self, params: Sequence[Any]) -> None:
        """Copy rank 0's values of `params` to every rank (as DDP does at wrap time)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for param in params:
            dist.broadcast(param.data, src=0)

    def decide(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 and give every rank its result (or raise its `UserError` on every
        rank), so all ranks act on one decision, e.g. which checkpoint to resume from."""
        if not self.enabled:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except UserError as exc:
                box[0], error = ("error", str(exc)), exc
            except Exception as exc:
                box[0], error = ("error", f"rank 0 failed: {type(exc).__name__}: {exc}"), exc
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if error is not None:
            raise error
        if kind == "error":
            raise UserError(value)
        return value


def _buckets(tensors: Sequence[Any], limit: int) -> list[list[Any]]:
    """Consecutive tensors of one dtype and device, each group at most `limit` bytes (a bigger
    tensor gets a group of its own)."""
    groups: list[list[Any]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        last = groups[-1] if groups else None
        if (
            last is None
            or size + nbytes > limit
            or last[0].dtype != tensor.dtype
            or last[0].device != tensor.device
        ):
            groups.append([tensor])
            size = nbytes
        else:
            last.append(tensor)
            size += nbytes
    return groups


def _die_with_parent() -> None:
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


def mixed_precision_note(bf16: bool, environ: Mapping[str, str] | None = None) -> str | None:
    """A warning when the launcher's mixed precision differs from the config's `bf16`."""
    env = os.environ if environ is None else environ
    wanted = (env.get("ACCELERATE_MIXED_PRECISION") or "no").strip().lower()
    if wanted in ("no", "bf16" if bf16 else "no"):
        return None
    return (
        f"the launcher asked for mixed precision {wanted!r}; reasonguard's precision comes from "
        f"the training config (bf16: {'on' if bf16 else 'off'} here), the launcher's is ignored"
    )


# --------------------------------------------------------------------------------------------
# `reasonguard train ... --num-processes N`


# `--sharding` of `reasonguard train`: the accelerate launch options of each strategy (the same
# settings as configs/accelerate/*.yaml, which an installed package does not ship).
SHARDING_LAUNCH_OPTIONS = {
    "ddp": ["--multi_gpu"],
    "fsdp": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true"],
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_save_16bit_model", "true"],
}


def launch_command(
    argv: Sequence[str],
    num_processes: int,
    cpu: bool,
    environ: Mapping[str, str] | None = None,
    sharding: str = "ddp",
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command (and its environment) that runs `reasonguard *argv` in
    `num_processes` processes on this machine, data parallel (`ddp`) or sharded (`fsdp`,
    `zero2`, `zero3`: see train.sharding).

    `--multi_gpu` (or a sharding option) is what makes accelerate start several processes
    (through torchrun); with `cpu` the GPUs are hidden and the processes use gloo (accelerate's
    own `--cpu` would start one process).
    """
    env = dict(os.environ if environ is None else environ)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *SHARDING_LAUNCH_OPTIONS[sharding],
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",  # precision comes from the training config (bf16)
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",  # a free port: several runs can share a machine
        "-m",
        "reasonguard",
        *argv,
    ]
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return command, env


def launch(argv: Sequence[str], num_processes: int, cpu: bool, sharding: str = "ddp") -> int:
    """Run `reasonguard *argv` in `num_processes` processes; the launcher's exit status.

    Raises:
        UserError: already inside a launch, or more GPU processes than GPUs.
    """
    if Processes.from_env().enabled:
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
