"""The GPU check's numbers from what its rows recorded: the timing window, MFU, the plan constants
to replace, and the Markdown table (no heavy imports: the driver runs on any Python).

MFU, two ways, both over the GPU's peak dense bf16 TFLOPS (`PEAK_BF16_TFLOPS`, by device name;
an unknown GPU gets no MFU, with the reason, unless `--peak-tflops` is given):
- `mfu`: the usual model FLOPs, 6 x N x tokens + attention (N: every matmul weight, the LM head
  included; attention 12 x layers x q_dim x keys per token over each sample's causal triangle);
- `mfu_plan`: the FLOPs model of `reasonguard plan` (`plan.timing.flops_per_token` with the
  row's LoRA/QLoRA, checkpointing, padding or packing and attention kernel, plus the LM head at
  the labelled tokens), the number the plan's assumed MFU stands for.
"""

from __future__ import annotations

from typing import Any

# Peak dense bf16 tensor TFLOPS (no sparsity) by CUDA device name, first match wins. H100/H200
# SXM: 1,979 sparse -> 989.4 dense (NVIDIA datasheets); the NVL cards 1,671 -> 835.5; H100 PCIe
# 1,513 -> 756.5. Other GPUs: `reasonguard plan`'s table (`plan.hardware.GPUS`).
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("H200", "NVL"), 835.5, "H200 NVL datasheet, dense bf16"),
    (("H200",), 989.4, "H200 SXM datasheet, dense bf16"),
    (("H100", "NVL"), 835.5, "H100 NVL datasheet, dense bf16"),
    (("H100", "PCIE"), 756.5, "H100 PCIe datasheet, dense bf16"),
    (("H100",), 989.4, "H100 SXM datasheet, dense bf16"),
)


def peak_bf16_tflops(device_name: str | None, override: float | None = None) -> dict[str, Any]:
    """The GPU's peak dense bf16 TFLOPS and where it comes from; `tflops` None (with the
    reason) for a CPU or a GPU in no table."""
    if override:
        return {"tflops": override, "source": "--peak-tflops"}
    if not device_name:
        return {"tflops": None, "source": "no CUDA GPU: MFU is not computed"}
    upper = device_name.upper()
    for words, tflops, source in PEAK_BF16_TFLOPS:
        if all(w in upper for w in words):
            return {"tflops": tflops, "source": source}
    from reasonguard.plan.hardware import GPUS, gpu_class_of

    key = gpu_class_of(device_name)
    if key is not None:
        return {"tflops": GPUS[key].bf16_tflops, "source": f"reasonguard plan's table ({key})"}
    return {
        "tflops": None,
        "source": f"unknown GPU {device_name!r}: no peak bf16 TFLOPS known, so no MFU "
        "(pass --peak-tflops with its dense bf16 figure)",
    }


def model_flops(arch: Any, tokens: float, keys_per_token: float) -> float:
    """Training FLOPs by the usual MFU convention: 6 x N per token, N every matmul weight (the
    decoder's projections and the LM head), plus attention: 4 x q_dim FLOPs per key per layer
    forward, x 3 with the backward."""
    n = arch.body_params + arch.hidden * arch.vocab
    attention = 12.0 * arch.layers * arch.q_dim * keys_per_token
    return tokens * (6.0 * n + attention)


def plan_flops(
    arch: Any,
    finetuning: str,
    trainable: int,
    checkpointing: bool,
    computed_tokens: float,
    label_tokens: float,
    keys_per_computed_token: float,
) -> float:
    """The same work by `reasonguard plan`'s FLOPs model (frozen base: no weight gradients;
    recomputation under checkpointing; the LM head at the labelled tokens only)."""
    from reasonguard.plan.timing import flops_per_token, lm_head_flops

    per_token = flops_per_token(arch, finetuning, trainable, checkpointing, keys_per_computed_token)
    return computed_tokens * sum(per_token.values()) + label_tokens * lm_head_flops(
        arch, finetuning
    )


def window(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Tokens and seconds between the end of the first logged step and the last one (the first
    step pays for kernel selection, allocator growth and the optimizer's state)."""
    steps = [e for e in events if "train_loss" in e and e.get("elapsed_seconds") is not None]
    if len(steps) < 2:
        return None
    first, last = steps[0], steps[-1]
    seconds = last["elapsed_seconds"] - first["elapsed_seconds"]
    tokens = last["tokens_seen"] - first["tokens_seen"]
    if seconds <= 0 or tokens <= 0:
        return None
    return {
        "steps_timed": last["step"] - first["step"],
        "tokens_timed": tokens,
        "seconds_timed": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 2),
    }


def mfu(
    model_config: dict[str, Any],
    row: dict[str, Any],
    profile: dict[str, Any],
    peak: dict[str, Any],
    on_gpu: bool,
) -> dict[str, Any]:
    """Both MFUs of a measured training row, or None with the reason.

    `profile`: the row's batching of the check's rows (`gpu_rows.data_profile`): padding
    efficiency, label share, and keys per token per sample and over whole padded/packed rows.
    """
    from reasonguard.plan.batch_profile import per_sample_attention
    from reasonguard.plan.hardware import architecture_from_config

    if row.get("trainable_parameters") is None:
        return {"mfu": None, "mfu_plan": None, "mfu_reason": "the run recorded no facts"}
    arch = architecture_from_config(model_config, "gpu_check model")
    tokens, seconds = row["tokens_timed"], row["seconds_timed"]
    kernel = row.get("attention") or "sdpa"
    per_sample = per_sample_attention(kernel, bool(row.get("packing")), on_gpu)
    computed = tokens / profile["padding_efficiency"]
    useful = model_flops(arch, tokens, profile["keys_per_real_token"])
    planned = plan_flops(
        arch,
        row["finetuning"],
        row["trainable_parameters"],
        bool(row.get("gradient_checkpointing")),
        computed,
        tokens * profile["label_share"],
        profile["keys_per_computed_token"]["per_sample" if per_sample else "whole_row"],
    )
    result: dict[str, Any] = {
        "model_tflops_per_second": round(useful / seconds / 1e12, 3),
        "plan_tflops_per_second": round(planned / seconds / 1e12, 3),
    }
    if peak["tflops"]:
        result["mfu"] = round(useful / seconds / (peak["tflops"] * 1e12), 4)
        result["mfu_plan"] = round(planned / seconds / (peak["tflops"] * 1e12), 4)
    else:
        result |= {"mfu": None, "mfu_plan": None, "mfu_reason": peak["source"]}
    return result


def plan_constants(rows: list[dict[str, Any]], peak: dict[str, Any], gpu: str | None) -> dict:
    """Which of `reasonguard plan`'s assumed MFU values the measured ones should replace (the
    Experiment 19 row for QLoRA, the bf16 LoRA row for LoRA)."""
    from reasonguard.plan.hardware import _MFU

    measured = {}
    for mode, name in (("qlora", "exp19"), ("lora", "lora-bf16")):
        row = next((r for r in rows if r["name"] == name), None)
        if row and row.get("mfu_plan") is not None:
            measured[mode] = row["mfu_plan"]
    text = (
        "reasonguard plan's MFU assumptions are `_MFU` in src/reasonguard/plan/hardware.py "
        "(the plan divides its FLOPs by peak x MFU). "
    )
    if not measured:
        text += "Nothing measured here can replace them" + (
            f" ({peak['source']})." if not peak.get("tflops") else "."
        )
    else:
        pairs = "; ".join(f"_MFU[{m!r}] {_MFU[m]} -> {v}" for m, v in measured.items())
        text += f"Measured on {gpu or 'this GPU'}: {pairs} (mfu_plan: the plan's FLOPs model). "
        text += "_MFU['full'] is not measured by this check."
    return {
        "constant": "_MFU",
        "file": "src/reasonguard/plan/hardware.py",
        "assumed": dict(_MFU),
        "measured": measured,
        "advice": text,
    }


# --------------------------------------------------------------------------------------------
# What the rows recorded


def key_rows_unmeasured(rows: list[dict[str, Any]], key_rows: tuple[str, ...]) -> dict[str, str]:
    """The key rows with no tokens/s, each with why."""
    by_name = {r["name"]: r for r in rows}
    unmeasured = {}
    for name in key_rows:
        row = by_name.get(name)
        if row is None:
            unmeasured[name] = "not asked for (--rows)"
        elif row.get("tokens_per_second") is None:
            why = row.get("error") or row.get("reason")
            unmeasured[name] = row["status"] + (f": {why}" if why else "")
    return unmeasured


def failure_reason(run: dict[str, Any], text: str) -> str:
    """One line saying why a row's process gave no result: its last error line, if any."""
    if run["timed_out"]:
        return f"timed out after {run['seconds']:.0f} s"
    errors = [
        line.strip()
        for line in text.splitlines()[-200:]
        if "Error" in line or line.startswith("error:")
    ]
    last = errors[-1] if errors else "no error line in its output"
    return f"exit code {run['exit_code']}: {last[:300]}"


def run_facts(info: dict[str, Any] | None) -> dict[str, Any]:
    """What a row's training_info.json says about it (nothing when the run was killed before
    writing it)."""
    if not info:
        return {}
    model = info.get("model") or {}
    plan = info.get("plan") or {}
    decisions = model.get("decisions") or {}
    memory = info.get("memory_per_rank") or {}

    def first(values: Any) -> Any:
        return values[0] if isinstance(values, list) and values else None

    def decided(key: str) -> Any:
        return (decisions.get(key) or {}).get("value")

    return {
        "outcome": info.get("outcome"),
        "steps_completed": info.get("steps_completed"),
        "finetuning": model.get("finetuning"),
        "peak_rss_gib": first(memory.get("peak_rss_gib")),
        "trainable_parameters": (model.get("parameters") or {}).get("trainable"),
        "quantization": decided("quantization"),
        "attention": decided("attention"),
        "liger": decided("liger"),
        "packing": plan.get("packing"),
        "max_length": plan.get("max_length"),
        "micro_batch_size": plan.get("micro_batch_size_used"),
        "gradient_checkpointing": model.get("gradient_checkpointing"),
        "bf16": model.get("bf16"),
        "optimizer": model.get("optimizer"),
        "final_train_loss": info.get("final_train_loss"),
    }


# --------------------------------------------------------------------------------------------
# The table


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _memory(row: dict[str, Any]) -> str:
    """allocated / reserved / NVML peak GiB on a GPU; the process's peak RSS on a CPU."""
    gpu = [row.get(k) for k in ("peak_allocated_gib", "peak_reserved_gib", "peak_nvml_gib")]
    if any(v is not None for v in gpu):
        return " / ".join(_fmt(v, 2) for v in gpu)
    rss = row.get("peak_rss_gib")
    return f"{_fmt(rss, 2)} (RSS)" if rss is not None else "-"


def rate(row: dict[str, Any]) -> str:
    """A row's speed: trained tokens/s, generated tokens/s, or items/s (fast mode)."""
    if row.get("tokens_per_second") is not None:
        return _fmt(row["tokens_per_second"]) + " tokens/s"
    if row.get("output_tokens_per_second") is not None:
        return _fmt(row["output_tokens_per_second"]) + " generated tokens/s"
    if row.get("items_per_second") is not None:
        return _fmt(row["items_per_second"], 2) + " items/s"
    return "-"


def _note(row: dict[str, Any]) -> str:
    parts = []
    if row["status"] in ("failed", "skipped", "not run"):
        return (row.get("error") or row.get("reason") or "").replace("|", "/")
    if row.get("kind") == "train":
        parts.append(f"{row.get('quantization') or '?'}, attention {row.get('attention') or '?'}")
        parts.append(f"liger {'on' if row.get('liger') else 'off'}")
        parts.append("packed" if row.get("packing") else "padded")
        parts.append(f"max_length {row.get('max_length')}")
        parts.append(f"{row.get('optimizer')}")
    else:
        parts.append(f"{row.get('items')} items, batch {row.get('batch_size')}")
        if row.get("max_new_tokens"):
            parts.append(f"{row['max_new_tokens']} new tokens at most")
    if row.get("error"):
        parts.append(row["error"])
    if row.get("mfu_reason"):
        parts.append(row["mfu_reason"])
    return "; ".join(str(p) for p in parts).replace("|", "/")


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a header line, the rows' table, the plan constants."""
    machine = report.get("machine") or {}
    versions = report.get("versions") or {}
    lines = [
        f"# GPU check, {report['date']}",
        "",
        f"{machine.get('gpu_name') or 'CPU (no GPU)'}; Python {report.get('python')}, torch "
        f"{_fmt(machine.get('torch'))}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "torch")
        + f"; commit {_fmt(report.get('git_commit'))}; {report.get('status')}",
        "",
    ]
    if report.get("error"):
        lines += [f"**error**: {report['error']}", ""]
    unchecked = report.get("private_apis_unchecked") or []
    if unchecked:
        lines += ["Private APIs at releases never checked: " + "; ".join(unchecked), ""]
    lines += [
        "| row | status | speed | peak GiB (allocated / reserved / NVML) | MFU | MFU (plan) "
        "| note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report.get("rows", []):
        cells = [
            r["name"],
            r["status"],
            rate(r),
            _memory(r),
            _fmt(r.get("mfu"), 3),
            _fmt(r.get("mfu_plan"), 3),
            _note(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    constants = report.get("plan_constants")
    if constants:
        lines += ["", constants["advice"]]
    if report.get("plan_constants_error"):
        lines += ["", f"plan constants: {report['plan_constants_error']}"]
    return "\n".join(lines) + "\n"
