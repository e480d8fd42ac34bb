"""DeepSpeed ZeRO stage 2 or 3 under reasonguard's training loop.

Launched with `configs/accelerate/deepspeed-zero{2,3}.yaml` (accelerate sets
`ACCELERATE_USE_DEEPSPEED` and the stage / offload options), or with a DeepSpeed JSON of your own
(`deepspeed_config_file` in the accelerate config; its "auto" values are filled from the training
config). The loop keeps its own data plan, loss normalisation, scheduler and logging; DeepSpeed's
engine owns the sharded fp32 master weights, gradients and Adam moments:

- `deepspeed.initialize` takes the model (inside the loss-running root module that FSDP uses
  too) and the AdamW the loop built, so weight decay groups and hyper-parameters are the loop's;
  the loop's learning-rate schedule keeps setting the learning rate of those groups.
- Gradient accumulation is driven from outside: the engine is told which backward pass ends the
  optimizer step (`set_gradient_accumulation_boundary`), because a step's micro-batch count
  varies with packing; backward passes are not rescaled by DeepSpeed (`scale_wrt_gas=False`).
  ZeRO averages gradients over the ranks, and each rank's loss is already divided by the whole
  step's count, so the loss is multiplied by the world size to make that average a sum.
- Clipping (`gradient_clipping` = `max_grad_norm`) and the update happen in `engine.step()`; the
  gradient norm is DeepSpeed's, measured before clipping. A non-finite norm stops the run after
  that step (DeepSpeed has applied it), so the run resumes from the previous checkpoint.
- Checkpoints: the weights in `save_pretrained` layout (ZeRO-3 gathers them in 16 bit on rank 0)
  so every checkpoint loads like any model, plus DeepSpeed's own sharded files under `zero/`
  (every rank writes its partition), which a resumed run reads back; a DeepSpeed checkpoint
  resumes only under DeepSpeed (any world size for the weights, DeepSpeed's rules for the rest).

Example:
    >>> from reasonguard.train.zero import zero_stage
    >>> zero_stage({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    3
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.train.distributed import Processes
from reasonguard.train.sharding import Sharding

OPTIMIZER_FORMAT = "deepspeed"
SHARDS_DIR = "zero"  # DeepSpeed's files inside a checkpoint folder
_TAG = "state"


def zero_stage(environ: Mapping[str, str]) -> int:
    """The ZeRO stage the launcher asked for (from the accelerate config or its JSON file)."""
    stage = (environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or "").strip()
    if not stage:
        stage = str(_user_config(environ).get("zero_optimization", {}).get("stage", 2))
    if stage not in ("2", "3"):
        raise UserError(
            f"DeepSpeed ZeRO stage {stage}: reasonguard trains with stage 2 or 3 (stage 0/1 "
            "gain nothing over configs/accelerate/ddp.yaml here)"
        )
    return int(stage)


def _user_config(environ: Mapping[str, str]) -> dict[str, Any]:
    path = (environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "").strip()
    if not path or path == "none":
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"deepspeed_config_file {path}: cannot read it as JSON: {exc}") from exc


def deepspeed_config(
    config: Any, bf16: bool, world_size: int, environ: Mapping[str, str]
) -> dict[str, Any]:
    """The DeepSpeed config of a run: the user's JSON (if any) with every "auto" and every
    batch / precision / clipping field set from the training config."""
    ds = _user_config(environ)
    stage = zero_stage(environ)
    zero = dict(ds.get("zero_optimization") or {})
    zero["stage"] = stage
    for key, env in (("offload_optimizer", "OPTIMIZER"), ("offload_param", "PARAM")):
        device = (environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{env}_DEVICE") or "").strip()
        if device and device != "none":
            zero[key] = {**(zero.get(key) or {}), "device": device}
    if stage == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    zero = {k: v for k, v in zero.items() if v != "auto"}
    ds.update(
        {
            "train_micro_batch_size_per_gpu": config.per_device_train_batch_size,
            "gradient_accumulation_steps": 1,  # the loop marks each step's last backward
            "train_batch_size": config.per_device_train_batch_size * world_size,
            "gradient_clipping": config.max_grad_norm or 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": bool(bf16)},
            "fp16": {"enabled": False},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
    )
    ds.pop("optimizer", None)  # the loop's AdamW (its groups and hyper-parameters)
    ds.pop("scheduler", None)  # the loop's schedule
    return ds


class DeepSpeedZeRO(Sharding):
    """DeepSpeed ZeRO-2 (gradients and optimizer state sharded) or ZeRO-3 (parameters too)."""

    name = "deepspeed"
    shards_parameters = True
    writes_shards = True

    def __init__(self, dist: Processes, environ: Mapping[str, str]) -> None:
        super().__init__(dist)
        self.env = dict(environ)
        self.stage = zero_stage(self.env)
        self.engine: Any = None
        self.bf16 = False
        self._backwards_left = 0
        self._norm: float | None = None
        self.ds_config: dict[str, Any] = {}

    def check(self, config: Any, stage_info: Mapping[str, Any]) -> None:
        from reasonguard.train.modeling import cuda_available

        if not cuda_available():  # CPU processes (tests): DeepSpeed's CPU accelerator
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise UserError(
                "launched with DeepSpeed, but the deepspeed package is not installed: "
                "pip install 'reasonguard[deepspeed]'"
            ) from exc
        if config.finetuning == "qlora":
            raise UserError(
                "config key 'finetuning': qlora cannot be trained under DeepSpeed ZeRO here; "
                "QLoRA exists to fit one GPU: launch it with configs/accelerate/ddp.yaml"
            )
        if self.stage == 3 and stage_info.get("merges_adapter"):
            raise UserError(
                "config key 'init_adapter': merge saves the starting adapter folded into the "
                "base, which needs the whole model in one process; under ZeRO-3 use "
                "init_adapter: continue, or launch with deepspeed-zero2.yaml or ddp.yaml"
            )
        if config.torch_compile:
            raise UserError("config key 'torch_compile': not supported under DeepSpeed here")

    def wrap(self, model: Any, bf16: bool) -> Any:
        from reasonguard.train.sharding import loss_runner

        self.model, self.bf16 = model, bf16
        self.runner = loss_runner(model)
        return model

    def attach_optimizer(self, optimizer: Any, scheduler: Any, config: Any) -> Any:
        import deepspeed

        deepspeed.init_distributed(dist_backend=self.dist.backend, auto_mpi_discovery=False)
        self.ds_config = deepspeed_config(config, self.bf16, self.dist.world_size, self.env)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.runner, optimizer=optimizer, config=self.ds_config
        )
        return optimizer  # the loop's scheduler keeps setting the lr of its groups

    def describe(self) -> dict[str, Any]:
        zero = self.ds_config.get("zero_optimization", {})
        return {
            "strategy": self.name,
            "implementation": "DeepSpeed ZeRO",
            "zero_stage": self.stage,
            "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none"),
            "offload_param": (zero.get("offload_param") or {}).get("device", "none"),
            "bf16": self.bf16,
        }

    # ---------------------------------------------------------------------------- passes

    def forward(self, fn: Callable[[Any, dict[str, Any]], Any], batch: dict[str, Any]) -> Any:
        return self.engine(fn, batch)

    def expect_backwards(self, count: int) -> None:
        self._backwards_left = count

    def backward(self, loss: Any) -> None:
        self._backwards_left -= 1
        self.engine.set_gradient_accumulation_boundary(self._backwards_left <= 0)
        # ZeRO averages over the ranks; each rank's loss is a share of the step's sum.
        self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def finish_gradients(self, params: Sequence[Any], max_norm: float | None) -> float:
        self.engine.step()  # reduce (done in backward for ZeRO-2/3), clip, update, zero grads
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def optimizer_step(self) -> None:
        """Done by `engine.step()` in `finish_gradients`."""

    def zero_grad(self) -> None:
        """Done by `engine.step()`."""

    # ---------------------------------------------------------------------------- state

    def full_model_state(self) -> dict[str, Any] | None:
        if self.stage < 3:
            return None  # every rank holds the whole model
        state = self.engine._zero3_consolidated_16bit_state_dict()
        if not self.dist.is_main:
            return None
        prefix = "inner."
        return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}

    def full_optimizer_state(self) -> tuple[dict[str, Any] | None, str | None]:
        return None, OPTIMIZER_FORMAT

    def write_shards(self, folder: Path) -> None:
        """Every rank writes its partition of the engine's state into `folder` (collective)."""
        frozen = any(not p.requires_grad for p in self.model.parameters())
        self.engine.save_checkpoint(
            str(folder), tag=_TAG, save_latest=False, exclude_frozen_parameters=frozen
        )

    def load_optimizer(self, checkpoint: Path, fmt: str | None) -> None:
        if fmt != OPTIMIZER_FORMAT:
            raise UserError(
                f"{checkpoint} was written by a run without DeepSpeed: resume it as it was "
                "launched (one process, configs/accelerate/ddp.yaml or fsdp.yaml)"
            )
        loaded, _ = self.engine.load_checkpoint(
            str(checkpoint / SHARDS_DIR),
            tag=_TAG,
            load_module_strict=False,  # frozen base weights are not in it (LoRA)
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise UserError(f"{checkpoint / SHARDS_DIR}: DeepSpeed found no state to resume")
