"""What a training run records about itself: training_info.json, the loss curve and the last
status.json, written after success and after failure alike, so a stopped run still says why.

training_info.json holds the config, the plan (steps, batch, length, packing, processes), the
data's statistics, the model and its decisions, the machine, the timings, the tokens seen, each
rank's peak memory and model state, and the losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reasonguard.train import monitor
from reasonguard.train.peak_memory import PeakMemory, memory_fields
from reasonguard.train.recipe.rundir import FINAL_DIR, INFO_FILE


class RunRecord:
    """Recording the run; mixed into `Recipe`, whose attributes (`config`, `run_dir`, `data`,
    `trainer`, `model`, `process`, `status`, `state`, `timings`, `warnings`, ...) these methods
    read. A stage adds its own facts through `training_info`, `plan_info`, `model_info`,
    `title` and `loss_description`."""

    config: Any
    run_dir: Path
    data: Any
    trainer: Any
    model: Any
    process: Any
    stage: str
    is_main: bool
    world_size: int
    status: dict[str, Any]
    timings: dict[str, float]
    started_at: str
    warnings: list[str]
    samples_per_step: int
    steps_per_epoch: int
    total_steps: int
    pack_budget: int
    memory: PeakMemory

    def cleanup(self, error: BaseException | None = None) -> None:
        """Close the logs; write training_info.json, the loss curve and the final status.

        Runs after success and after failure (NaN, OOM, Ctrl-C), so a stopped run still says why.
        """
        if self.data is None or not self.is_main:
            return
        if error is None:
            outcome, message = "finished", None
        elif isinstance(error, KeyboardInterrupt):
            outcome, message = "interrupted", "stopped by the user (Ctrl-C)"
        else:
            outcome, message = "failed", str(error)
        events = monitor.read_metrics(self.run_dir / monitor.METRICS_FILE)
        monitor.plot_loss_curve(events, self.run_dir / monitor.LOSS_CURVE_FILE, title=self.title())
        monitor.write_json_atomic(self.run_dir / INFO_FILE, self.training_info(outcome, message))
        self.status.update(state=outcome, message=message, checkpoints=self.checkpoint_names())
        s = getattr(self, "state", {})
        self.status.update(
            step=s.get("step", self.status.get("step")),
            elapsed_seconds=round(s.get("train_seconds", 0.0), 2),
        )
        if outcome != "finished":
            self.status.update(eta_seconds=None)  # a stopped run has no time left to estimate
        if outcome == "finished":
            self.status.update(eta_seconds=0, final_dir=str(self.run_dir / FINAL_DIR))
        monitor.write_status(self.run_dir, self.status)

    def title(self) -> str:
        c = self.config
        return f"R-SFT {c.model_name_or_path} ({c.finetuning}, {c.prompt_format})"

    def loss_description(self) -> str:
        return "token-normalised cross-entropy over output tokens, per optimizer step"

    def training_info(self, outcome: str, message: str | None) -> dict[str, Any]:
        from reasonguard import __version__
        from reasonguard.launch.runinfo import environment_info

        c, s = self.config, getattr(self, "state", {})
        return {
            "stage": self.stage,
            "reasonguard_version": __version__,
            "outcome": outcome,
            "message": message,
            "run_dir": str(self.run_dir.resolve()),
            "final_dir": str((self.run_dir / FINAL_DIR).resolve())
            if outcome == "finished"
            else None,
            "config": c.to_dict(),
            "plan": self.plan_info(),
            "data": self.data.stats,
            "model": self.model_info(),
            **environment_info(),
            "timings": {
                "started_at": self.started_at,
                "finished_at": monitor.now_iso(),
                **{k: round(v, 2) for k, v in self.timings.items()},
                "train_seconds_all_sessions": round(s.get("train_seconds", 0.0), 2),
            },
            "steps_completed": s.get("step", 0),
            # Forward/backward passes of each rank (the same on every rank): above the steps,
            # gradients were accumulated over several micro-batches per step.
            "micro_batches_per_rank": s.get("micro_batches", 0),
            "tokens_seen": {
                "total": s.get("tokens_seen", 0),
                "labelled": s.get("label_tokens_seen", 0),
            },
            "memory_per_rank": getattr(self, "peak_memory", None),
            "final_train_loss": s.get("last_train_loss"),
            "final_eval_loss": s.get("last_eval_loss"),
            "best_eval_loss": s.get("best_eval_loss"),
            "resumed_from": s.get("resumed_from", []),
            "warnings": self.warnings,
        }

    def plan_info(self) -> dict[str, Any]:
        """The `plan` of training_info.json: steps, batch, length, packing, processes."""
        from reasonguard.train.modeling import warmup_steps

        c, trainer = self.config, self.trainer
        return {
            "samples_per_step": self.samples_per_step,
            "micro_batch_size": c.per_device_train_batch_size,
            "micro_batch_size_used": getattr(trainer, "micro_batch", None),
            "gradient_accumulation_steps": c.accumulation_for(self.world_size),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": warmup_steps(c, self.total_steps),
            "max_length": self.data.max_length,
            "packing": c.packing,
            "pack_tokens": self.pack_budget if c.packing else None,
            "processes": self.world_size,
            "distributed": _distributed(trainer, self.process),
        }

    def model_info(self) -> dict[str, Any]:
        """The `model` of training_info.json: what was trained, how, with which decisions."""
        from reasonguard.launch.allocenv import decision as allocator_decision
        from reasonguard.models import resolve_model
        from reasonguard.train.modeling import parameter_counts

        c = self.config
        run_config = getattr(self, "run_config", None)
        decisions = getattr(self, "decisions", None)
        optimizer = getattr(self.trainer, "optimizer", None) if self.trainer is not None else None
        return {
            "base": c.model_name_or_path,
            "resolved": resolve_model(c.model_name_or_path),
            "finetuning": c.finetuning,
            "parameters": parameter_counts(self.model) if self.model is not None else None,
            "bf16": getattr(self, "bf16", None),
            "device": str(self.process.device),
            "gradient_checkpointing": (
                run_config.gradient_checkpointing if run_config else c.gradient_checkpointing
            ),
            "optimizer": _optimizer_name(optimizer),
            "cpu_allocator": allocator_decision(),
            "decisions": {k: d.to_dict() for k, d in decisions.items()} if decisions else None,
            "loss": self.loss_description(),
        }

    def gathered_peak_memory(self) -> dict[str, Any]:
        """Each rank's memory (GiB): its peaks (`train.peak_memory`: resident set; on a GPU
        torch's allocated and reserved, and NVML's reading) and the model state it holds
        (weights; optimizer master copies and moments): what sharding divides. Collective:
        every rank sends its own."""
        gib = 1024**3
        peaks = self.memory.reading()
        state = model_state_bytes(self.trainer.model_wrapped, self.trainer.optimizer)
        readings = {
            **{k: v or 0.0 for k, v in peaks.items()},
            "weights": state["weights"] / gib,
            "optimizer": state["optimizer"] / gib,
        }
        world, rank = self.world_size, self.trainer._rank
        mine = [0.0] * (len(readings) * world)
        for i, value in enumerate(readings.values()):
            mine[i * world + rank] = value
        every = self.trainer._sum(mine)
        columns = {k: every[i * world : (i + 1) * world] for i, k in enumerate(readings)}
        available = {k: v is not None for k, v in peaks.items()}
        return memory_fields(columns, available, self.memory.measured())


def model_state_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes of model state this process holds: `weights` (its parameters, or its shards of
    them) and `optimizer` (master copies the optimizer keeps apart from the model's parameters,
    as DeepSpeed's fp32 partitions, plus every state tensor: AdamW's moments)."""
    import torch

    def local(t: Any) -> int:
        if hasattr(t, "to_local"):  # an FSDP2 DTensor: this rank's shard
            t = t.to_local()
        t = getattr(t, "ds_tensor", None) if hasattr(t, "ds_tensor") else t  # ZeRO-3 partition
        return 0 if t is None else t.numel() * t.element_size()

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's / DeepSpeed's wrapper
    own = {id(p) for p in model.parameters()}
    weights = sum(local(p) for p in model.parameters())
    groups = getattr(inner, "param_groups", [])
    masters = sum(local(p) for g in groups for p in g["params"] if id(p) not in own)
    moments = sum(
        local(v)
        for st in getattr(inner, "state", {}).values()
        for v in (st.values() if isinstance(st, dict) else [])
        if torch.is_tensor(v)
    )
    return {"weights": weights, "optimizer": masters + moments}


def _optimizer_name(optimizer: Any) -> str | None:
    from reasonguard.launch.runinfo import optimizer_name

    return None if optimizer is None else optimizer_name(optimizer)


def _distributed(trainer: Any, process: Any) -> str:
    """How the processes share the work: NO, MULTI_CPU / MULTI_GPU (DDP), FSDP or DEEPSPEED."""
    if trainer is not None and getattr(trainer, "is_deepspeed_enabled", False):
        return "DEEPSPEED"
    if trainer is not None and getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    return str(process.distributed_type).split(".")[-1]
