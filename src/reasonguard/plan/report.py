"""The text report of `reasonguard plan`: the lines it prints for a plan of `plan.estimate`.

`format_training_plan` turns the plan mapping into one line per part (model, tokens, batching,
steps, memory with and without checkpointing, compute, throughput, time), then the notes and,
when the memory estimate exceeds the device, a warning with the overrides that would fit.

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.plan.estimate import plan_training
    >>> from reasonguard.plan.report import format_training_plan
    >>> plan = plan_training(load_config("configs/demo-cpu.yaml"), gpu="4090")  # doctest: +SKIP
    >>> print(format_training_plan(plan))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from reasonguard.plan.hardware import GIB


def hours_text(seconds: float) -> str:
    """`about N hours` with a precision that suits the size (minutes when under an hour).

    Examples:
        >>> hours_text(972_000), hours_text(9_000), hours_text(150)
        ('about 270 hours', 'about 2.5 hours', 'about 0.04 hours (2.5 minutes)')
    """
    hours = seconds / 3600
    if hours >= 10:
        return f"about {hours:.0f} hours"
    if hours >= 1:
        return f"about {hours:.1f} hours"
    return f"about {hours:.2f} hours ({seconds / 60:.1f} minutes)"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _count(n: float) -> str:
    """A parameter or FLOP count with a K/M/B suffix (`3.21B`)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


# What each strategy does to a memory component: held whole on every GPU, or 1/N of it.
_WHOLE_WEIGHTS = ("ddp", "zero2")
_TRANSIENT_LABEL = {
    "zero2": "reduce bucket",
    "zero3": "gathered + reduce bucket",
    "fsdp": "gathered",
}


def _memory_line(label: str, part: dict[str, float], parallel: dict[str, Any], chosen: str) -> str:
    """One `memory ... checkpointing` line; with several GPUs, per GPU and marked whole / 1/N."""
    n, sharding = parallel["num_processes"], parallel["sharding"]
    if n == 1:
        return (
            f"memory {label:<7} checkpointing: {_gib(part['total'])} = weights "
            f"{_gib(part['weights'])} + trainable/AdamW {_gib(part['trainable_and_optimizer'])} "
            f"+ activations {_gib(part['activations'])} + LM head {_gib(part['lm_head'])} + "
            f"runtime {_gib(part['runtime'])}{chosen}"
        )
    share = f" (1/{n})"
    weights = " (whole)" if sharding in _WHOLE_WEIGHTS else share
    optimizer = " (whole)" if sharding == "ddp" else share
    transient = (
        f" + {_TRANSIENT_LABEL[sharding]} {_gib(part['sharding_transient'])}"
        if sharding in _TRANSIENT_LABEL
        else ""
    )
    return (
        f"memory {label:<7} checkpointing: {_gib(part['total'])} per GPU = weights "
        f"{_gib(part['weights'])}{weights} + trainable/AdamW "
        f"{_gib(part['trainable_and_optimizer'])}{optimizer}{transient} + activations "
        f"{_gib(part['activations'])} + LM head {_gib(part['lm_head'])} + runtime "
        f"{_gib(part['runtime'])}{chosen}"
    )


def _sharded_advice(sharded: dict[str, Any] | None) -> str:
    """The fsdp / zero3 part of the does-not-fit warning ('' when not tried)."""
    if sharded is None:
        return ""
    counts = ", ".join(str(n) for n in sharded["tried"])
    if sharded["num_processes"] is None:
        return f"; as it is, none of --num-processes {counts} with --sharding fsdp or zero3 fits"
    options = " or ".join(
        f"--sharding {o['sharding']} ({_gib(o['total_bytes'])} per GPU)" for o in sharded["options"]
    )
    return f"; as it is, it fits with --num-processes {sharded['num_processes']} {options}"


def format_training_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines `reasonguard plan` prints."""
    c, d, m, s = plan["config"], plan["data"], plan["model"], plan["steps"]
    mem, t, tp, comp = plan["memory"], plan["time"], plan["throughput"], plan["compute"]
    method = c["finetuning"] + ("" if c["finetuning"] == "full" else f" r={c['lora_r']}")
    batching = (
        f"packed into {c['pack_tokens']}-token micro-batches"
        if c["packing"]
        else f"padded micro-batches of {c['per_device_train_batch_size']} rows"
    )
    est = " (ESTIMATED)" if d["estimated"] else ""
    par = plan["parallel"]
    n = par["num_processes"]
    device = plan["device"] if n == 1 else f"{n} x {plan['device']} ({par['sharding']})"
    shared = "" if n == 1 else f" shared by {n} GPUs"
    lines = [f"plan           {c['model']} [{method}] on {device}"]
    if n > 1:
        lines.append(
            f"gpus           {n} processes, one per GPU; {par['sharding']} = {par['strategy']}; "
            "memory is per GPU"
        )
    lines += [
        f"model          {_count(m['total_params'])} params ({m['shape']}; {m['source']}); "
        f"trainable {_count(m['trainable_params'])}",
        f"tokens         {d['tokens_per_epoch']:,} per epoch{est} in {d['train_rows']:,} rows, "
        f"{d['label_share']:.0%} labelled; max length {d['max_length']}",
        f"               {d['token_source']}",
        f"batching       {c['samples_per_step']} rows per step{shared}, {batching}: "
        f"{d['padding_efficiency']:.3f} real/computed tokens, largest micro-batch "
        f"{d['largest_micro_batch_tokens']:,} tokens",
        f"steps          {s['per_epoch']:,} per epoch, {s['total']:,} in all "
        f"({s['epochs']:g} epoch{'' if s['epochs'] == 1 else 's'}); {s['evaluations']} held-out "
        f"evaluation{'' if s['evaluations'] == 1 else 's'} of "
        f"{d['eval_rows']:,} rows",
    ]
    for key, label in (("without_checkpointing", "without"), ("with_checkpointing", "with")):
        part = mem[key]
        chosen = "  <- this run" if mem["checkpointing"] == (key == "with_checkpointing") else ""
        lines.append(_memory_line(label, part, par, chosen))
    parts = comp["flops_per_computed_token"]
    lines.append(
        f"compute        {_count(sum(parts.values()))} FLOPs per computed token (projections "
        f"{_count(parts['projections'])}, adapters {_count(parts['adapters'])}, recompute "
        f"{_count(parts['recompute'])}, attention {_count(parts['attention'])}) + LM head "
        f"{_count(comp['lm_head_flops_per_label_token'])} per label token: "
        f"{comp['train_flops']:.3g} FLOPs training, {comp['eval_flops']:.3g} eval"
    )
    assumed = " (ASSUMED)" if tp.get("mfu_assumed") else ""
    if tp["source"] == "given":
        rate = f"given: {tp['tokens_per_second']:,.0f} tokens/s"
        rate += "" if n == 1 else f" (the whole run's over {n} GPUs; not scaled)"
    elif tp["source"] == "model" and n > 1:
        eff = tp["scaling_efficiency"]
        rate = (
            f"{tp['peak_flops'] / 1e12:,.1f} TFLOPS {tp['precision']} peak x MFU {tp['mfu']:.2f}"
            f"{assumed} = {tp['sustained_flops'] / 1e12:,.1f} TFLOPS -> "
            f"{tp['tokens_per_second'] / (n * eff):,.0f} tokens/s per GPU; x {n} GPUs x "
            f"{eff:.2f} {par['sharding']} scaling efficiency (ASSUMED, not measured) -> "
            f"{tp['tokens_per_second']:,.0f} tokens/s"
        )
    elif tp["source"] == "model":
        rate = (
            f"{tp['peak_flops'] / 1e12:,.1f} TFLOPS {tp['precision']} peak x MFU {tp['mfu']:.2f}"
            f"{assumed} = {tp['sustained_flops'] / 1e12:,.1f} TFLOPS -> "
            f"{tp['tokens_per_second']:,.0f} tokens/s"
        )
    else:
        shape = "x".join(str(n) for n in tp["matmul_shape"])
        rate = (
            f"{tp['matmul_dtype']} {shape} matmul measured at {tp['matmul_flops'] / 1e9:,.1f} "
            f"GFLOPS (one thread per CPU second x {tp['threads']} threads) x efficiency "
            f"{tp['efficiency']:.2f} = "
            f"{tp['sustained_flops'] / 1e9:,.1f} GFLOPS -> {tp['tokens_per_second']:,.0f} tokens/s"
        )
    lines.append(f"throughput     {rate}")
    if tp.get("mfu_source"):
        lines.append(f"               MFU {tp['mfu_source']}")
    lines.append(
        f"time           {hours_text(t['total_seconds'])}: training "
        f"{_duration(t['train_seconds'])} + evaluation {_duration(t['eval_seconds'])} "
        "(model loading and checkpoint writes not included)"
    )
    for note in plan["notes"]:
        lines.append(f"note           {note}")
    for problem in plan["problems"]:
        lines.append(f"this machine   cannot run it: {problem}")
    if not mem["fits"]:
        chosen = mem["with_checkpointing" if mem["checkpointing"] else "without_checkpointing"]
        fixes = "; ".join(
            f"{' '.join(f['overrides'])} ({_gib(f['total_bytes'])})"
            for f in mem.get("would_fit", [])
        )
        per_gpu = "" if n == 1 else " per GPU"
        sharded = mem.get("sharded_fit")
        advice = (
            f"would fit: {fixes}"
            if fixes
            else "no combination of checkpointing, a smaller micro-batch, LoRA or QLoRA fits"
        ) + _sharded_advice(sharded)
        if not fixes and not (sharded and sharded["num_processes"]):
            advice += ": use a larger GPU" if plan["target"] != "cpu" else ": use more memory"
        lines.append(
            f"WARNING        the memory estimate {_gib(chosen['total'])}{per_gpu} exceeds the "
            f"{_gib(mem['capacity_bytes'])} of {plan['device']}; {advice}"
        )
    return "\n".join(lines)
