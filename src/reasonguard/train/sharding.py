"""How the model's state is spread over the training processes: replicated, FSDP2 or ZeRO.

The launcher picks the strategy (`accelerate launch --config_file configs/accelerate/X.yaml`
sets `ACCELERATE_USE_FSDP` / `ACCELERATE_USE_DEEPSPEED` and their options); the training loop
(`train.sft`, `train.dpo`) calls the same few methods whatever it is:

- `wrap(model)` once after the weights load, before the optimizer is built;
- `forward(fn, batch)` for every loss / log-prob computation (`fn(model, batch)`);
- `agree_count(n)`: sharded parameters are gathered by collectives inside every forward and
  backward, so all ranks must run as many passes; a rank with fewer micro-batches runs
  zero-weighted passes to make up the difference (`SFTRecipe._aligned`);
- `backward(loss)`, `finish_gradients(params, max_norm)` (sum over ranks, clip; the norm) and
  `optimizer_step()`;
- `full_model_state()` / `full_optimizer_state()` / `load_optimizer_state()` for checkpoints,
  and `full_model_state()` again for final/.

Strategies:

`Replicated` (one process, or data parallel: `configs/accelerate/ddp.yaml`): a full replica per
rank, gradients summed by `Processes.sum_gradients` after the accumulation.

`FSDP` (`configs/accelerate/fsdp.yaml`): torch's FSDP2 (`fully_shard`) on every transformer
block (`_no_split_modules` of the model, or the launcher's `fsdp_transformer_layer_cls_to_wrap`)
and on a root module that runs the loss, so parameters, gradients and optimizer state are
sharded across ranks. Gradients are reduce-scattered in every backward with a divide factor of 1
(a sum: the loss is already divided by the whole step's count). Under bf16 the sharded fp32
master weights are gathered and computed in bf16 (`MixedPrecisionPolicy`), gradients reduced in
fp32.

Checkpoints are the same files in every strategy: weights in `save_pretrained` layout and the
optimizer state keyed by parameter name, gathered to rank 0's CPU memory. So a run started on 4
GPUs with FSDP can resume on 2, or with DDP, and every checkpoint loads like any model; the price
is rank 0's host memory for one full copy of the trainable weights and their Adam moments at
save time (about 16 bytes per trainable parameter: ~130 GB for a full fine-tune of 8B).

Example:
    >>> from reasonguard.train.sharding import strategy_name
    >>> strategy_name({})
    'replicated'
    >>> strategy_name({"ACCELERATE_USE_FSDP": "true"})
    'fsdp'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.train.distributed import Processes

OPTIMIZER_FORMAT_BY_NAME = "by_name"  # trainer_state.json "optimizer_format" of named states


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def strategy_name(environ: Mapping[str, str] | None = None) -> str:
    """`replicated`, `fsdp` or `deepspeed`, from the launcher's environment."""
    env = os.environ if environ is None else environ
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        return "deepspeed"
    if _true(env.get("ACCELERATE_USE_FSDP")):
        return "fsdp"
    return "replicated"


def make_sharding(dist: Processes, environ: Mapping[str, str] | None = None) -> Sharding:
    """The strategy the launcher asked for (a single process is always `Replicated`: there is
    nothing to shard over)."""
    env = dict(os.environ if environ is None else environ)
    name = strategy_name(env) if dist.enabled else "replicated"
    if name == "fsdp":
        return FSDP(dist, env)
    if name == "deepspeed":
        from reasonguard.train.zero import DeepSpeedZeRO

        return DeepSpeedZeRO(dist, env)
    return Replicated(dist)


class Sharding:
    """The interface; `Replicated` is the plain implementation."""

    name = "replicated"
    shards_parameters = False  # whether passes involve collectives (equal counts needed)
    writes_shards = False  # whether every rank writes checkpoint files (`write_shards`)

    def __init__(self, dist: Processes) -> None:
        self.dist = dist
        self.model: Any = None
        self.optimizer: Any = None

    def check(self, config: Any, stage_info: Mapping[str, Any]) -> None:
        """Refuse a config this strategy cannot train (before the weights load)."""

    def wrap(self, model: Any, bf16: bool) -> Any:
        """Take over the freshly loaded model (weights equal on every rank); returns it."""
        self.model = model
        return model

    def attach_optimizer(self, optimizer: Any, scheduler: Any, config: Any) -> Any:
        """Take over the optimizer built on the wrapped model's parameters; returns the one to
        step (DeepSpeed wraps it)."""
        self.optimizer = optimizer
        return optimizer

    def describe(self) -> dict[str, Any]:
        """What training_info.json records about the strategy."""
        return {"strategy": self.name}

    # ---------------------------------------------------------------------------- passes

    def forward(self, fn: Callable[[Any, dict[str, Any]], Any], batch: dict[str, Any]) -> Any:
        return fn(self.model, batch)

    def agree_count(self, count: int) -> int:
        """How many passes every rank runs when this rank has `count` to run."""
        if not (self.shards_parameters and self.dist.enabled):
            return count
        return int(self.dist.all_max([count])[0])

    def expect_backwards(self, count: int) -> None:
        """The number of backward passes of the coming optimizer step (all ranks alike)."""

    def backward(self, loss: Any) -> None:
        loss.backward()

    def finish_gradients(self, params: Sequence[Any], max_norm: float | None) -> float:
        """Make the gradients the whole step's (summed over ranks), clip them to `max_norm`
        (None: no clipping) and return their norm before clipping."""
        import torch

        self.dist.sum_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
        return float(norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------------------- state

    def full_model_state(self) -> dict[str, Any] | None:
        """The whole model's state dict on rank 0 (CPU tensors), None on the other ranks;
        collective. None from `Replicated` too: the model itself holds it."""
        return None

    def full_optimizer_state(self) -> tuple[dict[str, Any] | None, str | None]:
        """(optimizer state for optimizer.pt on rank 0, its format); collective. The plain
        optimizer's own state_dict for `Replicated` (format None)."""
        return self.optimizer.state_dict(), None

    def write_shards(self, folder: Path) -> None:
        """Every rank writes its part of the training state into `folder` (collective)."""

    def load_optimizer(self, checkpoint: Path, fmt: str | None) -> None:
        """Restore a checkpoint's optimizer state (`fmt`: its trainer_state optimizer_format)."""
        from reasonguard.train.checkpoint import read_optimizer_state

        if fmt not in (None, OPTIMIZER_FORMAT_BY_NAME):
            raise UserError(
                f"{checkpoint} holds {fmt} optimizer state: resume it under the launch that "
                "wrote it (e.g. configs/accelerate/deepspeed-zero3.yaml)"
            )
        state = read_optimizer_state(checkpoint)
        if fmt == OPTIMIZER_FORMAT_BY_NAME:  # written by a sharded run
            _load_named_optimizer_state(self.model, self.optimizer, state, broadcast=False)
        else:
            self.optimizer.load_state_dict(state)


class Replicated(Sharding):
    """A full replica on every rank (one process, or data parallel with summed gradients)."""


_RUNNER_CLASS: Any = None


def loss_runner(model: Any) -> Any:
    """A module holding `model` whose forward runs a loss function on it: the root that FSDP
    and DeepSpeed wrap, so the loss's direct calls to the decoder and the LM head happen inside
    one root forward (where the root's parameters are gathered and its gradients reduced)."""
    global _RUNNER_CLASS
    if _RUNNER_CLASS is None:
        from torch import nn

        class LossRunner(nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, fn: Callable[[Any, dict[str, Any]], Any], batch: dict) -> Any:
                return fn(self.inner, batch)

        _RUNNER_CLASS = LossRunner
    return _RUNNER_CLASS(model)


def _load_named_optimizer_state(
    model: Any, optimizer: Any, state: dict[str, Any] | None, broadcast: bool
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model,
        optimizer,
        state if state is not None else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast),
    )


def _layer_classes(model: Any, environ: Mapping[str, str]) -> set[str]:
    """Class names of the modules each FSDP unit wraps (one transformer block each)."""
    named = (environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or "").strip()
    if named:
        return {n.strip() for n in named.split(",") if n.strip()}
    found: set[str] = set()
    for module in model.modules():
        found.update(getattr(module, "_no_split_modules", None) or [])
    return found


class FSDP(Sharding):
    """PyTorch FSDP2: parameters, gradients and optimizer state sharded over the ranks."""

    name = "fsdp"
    shards_parameters = True

    def __init__(self, dist: Processes, environ: Mapping[str, str]) -> None:
        super().__init__(dist)
        self.env = dict(environ)
        self.runner: Any = None
        self.wrapped: list[str] = []
        self.settings: dict[str, Any] = {}

    def check(self, config: Any, stage_info: Mapping[str, Any]) -> None:
        if config.finetuning == "qlora":
            raise UserError(
                "config key 'finetuning': qlora cannot be trained under FSDP (its 4-bit weights "
                "are not shardable parameters); QLoRA exists to fit one GPU: launch it with "
                "configs/accelerate/ddp.yaml, or use finetuning: lora or full with FSDP"
            )
        if stage_info.get("merges_adapter"):
            raise UserError(
                "config key 'init_adapter': merge saves the starting adapter folded into the "
                "base, which needs the whole model in one process; under FSDP use "
                "init_adapter: continue, or launch with configs/accelerate/ddp.yaml"
            )

    def wrap(self, model: Any, bf16: bool) -> Any:
        import torch
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        classes = _layer_classes(model, self.env)
        if not classes:
            raise UserError(
                f"FSDP: cannot tell the transformer blocks of {type(model).__name__} (no "
                "_no_split_modules): name them with fsdp_transformer_layer_cls_to_wrap in the "
                "accelerate config"
            )
        reshard = self.env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
        reshard_after_forward = reshard not in ("false", "no_shard", "shard_grad_op", "2", "3")
        offload = _true(self.env.get("FSDP_OFFLOAD_PARAMS"))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        kwargs = {
            "reshard_after_forward": reshard_after_forward,
            "mp_policy": mp,
            "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
        }
        units = [
            (name, m)
            for name, m in model.named_modules()
            if type(m).__name__ in classes and any(True for _ in m.parameters())
        ]
        if not units:
            raise UserError(
                f"FSDP: no module of class {', '.join(sorted(classes))} in "
                f"{type(model).__name__}; check fsdp_transformer_layer_cls_to_wrap"
            )
        self.wrapped = sorted({type(m).__name__ for _, m in units})  # before FSDP renames them
        for _, module in units:
            fully_shard(module, **kwargs)

        runner = loss_runner(model)
        fully_shard(runner, **kwargs)
        for module in [runner, *(m for _, m in units)]:
            # A sum over ranks, not FSDP's mean: each rank's loss is already divided by the
            # count of the whole step. A plain SUM collective (gloo has no PREMUL_SUM / AVG).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
        self.runner, self.model = runner, model
        self.settings = {
            "units": len(units) + 1,
            "unit_classes": self.wrapped,
            "reshard_after_forward": reshard_after_forward,
            "offload_params": offload,
            "param_dtype": "bfloat16" if bf16 else "float32",
            "reduce_dtype": "float32",
        }
        return model

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "implementation": "torch FSDP2 fully_shard", **self.settings}

    def forward(self, fn: Callable[[Any, dict[str, Any]], Any], batch: dict[str, Any]) -> Any:
        return self.runner(fn, batch)

    def finish_gradients(self, params: Sequence[Any], max_norm: float | None) -> float:
        import torch

        # The gradients were reduce-scattered (summed) in backward; the norm of sharded
        # gradients is computed across ranks by DTensor.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def full_model_state(self) -> dict[str, Any] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.dist.is_main:
            return None
        # Tied weights (an LM head sharing the embedding) come back as two gathered copies;
        # one tensor under both names lets save_pretrained store it once, as without FSDP.
        first: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if name in state:
                owner = first.setdefault(id(param), name)
                state[name] = state[owner]
        return state

    def full_optimizer_state(self) -> tuple[dict[str, Any] | None, str | None]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        state = get_optimizer_state_dict(
            self.model,
            self.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        return (state if self.dist.is_main else None), OPTIMIZER_FORMAT_BY_NAME

    def load_optimizer(self, checkpoint: Path, fmt: str | None) -> None:
        from reasonguard.train.checkpoint import read_optimizer_state

        if fmt != OPTIMIZER_FORMAT_BY_NAME:
            raise UserError(
                f"{checkpoint}: its optimizer state was written by a run without FSDP (keyed "
                f"by {'position' if fmt is None else fmt}, not parameter name): resume it as it "
                "was launched (one process, configs/accelerate/ddp.yaml or a DeepSpeed config)"
            )
        # Rank 0 reads the file; the values reach the other ranks' shards by broadcast.
        state = read_optimizer_state(checkpoint) if self.dist.is_main else None
        _load_named_optimizer_state(self.model, self.optimizer, state, broadcast=True)
