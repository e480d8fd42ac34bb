"""The GPU check's rows and the code each runs in its own process.

`python bench/gpu_rows.py build SPEC RESULT` builds the random-init model folder and the rows
file; `... train RESULT -- <reasonguard arguments>` runs `reasonguard train sft` in this
process and then records torch's peak CUDA memory (allocated and reserved), which the run's own
`training_info.json` does not hold in full; `... generate SPEC RESULT` times the HF backend in
reasoning or fast mode. The driver (`gpu_check.py`) starts them, one at a time, under limits.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import REPO, read_json, torch_facts, write_json, write_jsonl  # noqa: E402

EXP19 = REPO / "configs" / "exp19-qlora-3b-instruct.yaml"
EXP19_NAME = "configs/exp19-qlora-3b-instruct.yaml"

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
# The dry run's model: the same family and vocabulary, small enough for a 2-core CPU.
DRY_RUN_MODEL: dict[str, Any] = {
    **LLAMA_3_2_3B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}


@dataclass(frozen=True)
class Row:
    """One row of the check: a `train sft` run of Experiment 19's config with `overrides`, or a
    generation run of the HF backend in `mode`."""

    name: str
    title: str
    kind: str  # train | generate | absent
    overrides: tuple[str, ...] = ()
    mode: str = ""
    cuda_only: bool = False
    reason: str = ""  # why an `absent` row never runs


# Most valuable first. The Experiment 19 rows keep Liger off: `use_liger_kernel: auto` turns it
# on only where liger-kernel is installed, which `pip install reasonguard[qlora]` (what the
# config names) does not do; `qlora-liger` measures that difference.
ROWS = (
    Row(
        "exp19",
        "Experiment 19 as configured (QLoRA NF4, padded)",
        "train",
        ("use_liger_kernel=false",),
    ),
    Row(
        "exp19-packed",
        "Experiment 19 with packing on",
        "train",
        ("use_liger_kernel=false", "packing=true"),
    ),
    Row(
        "lora-bf16",
        "bf16 LoRA (Experiment 19 otherwise)",
        "train",
        ("finetuning=lora", "use_liger_kernel=false"),
    ),
    Row(
        "qlora-liger",
        "Experiment 19 with Liger's fused cross-entropy",
        "train",
        ("use_liger_kernel=true",),
        cuda_only=True,
    ),
    Row("hf-reasoning", "HF backend, reasoning mode", "generate", mode="reasoning"),
    Row("hf-fast", "HF backend, fast mode (no reasoning)", "generate", mode="fast"),
    Row(
        "vllm",
        "vLLM backend",
        "absent",
        reason="not measured: vLLM cannot travel to the GPU machine (its wheel is larger than "
        "the 64 MiB a call carries)",
    ),
)
KEY_ROWS = ("exp19", "lora-bf16")  # the check fails unless both measured


@dataclass(frozen=True)
class Sizes:
    """How much each row does, and its time limit (seconds, model loading included)."""

    model: dict[str, Any]
    steps: int
    rows_per_step: int
    reasoning_items: int
    fast_items: int
    batch_size: int
    max_new_tokens: int
    limits: dict[str, float]


# One H200: the limits sum to 495 s (8.25 minutes), the row processes' imports and model loads
# included, inside a 9-minute call with pip's install of the carried wheels.
GPU_SIZES = Sizes(
    model=LLAMA_3_2_3B,
    steps=8,
    rows_per_step=8,
    reasoning_items=64,
    fast_items=256,
    batch_size=32,
    max_new_tokens=256,
    limits={
        "build": 60,
        "exp19": 100,
        "exp19-packed": 75,
        "lora-bf16": 75,
        "qlora-liger": 75,
        "hf-reasoning": 65,
        "hf-fast": 45,
    },
)
# The CPU dry run: a tiny model, the fewest steps that time one; limits with room for a busy
# CI machine (each row's process imports torch and transformers).
DRY_SIZES = Sizes(
    model=DRY_RUN_MODEL,
    steps=2,
    rows_per_step=2,
    reasoning_items=4,
    fast_items=8,
    batch_size=4,
    max_new_tokens=8,
    limits={
        "build": 300,
        "exp19": 400,
        "exp19-packed": 400,
        "lora-bf16": 400,
        "qlora-liger": 400,
        "hf-reasoning": 300,
        "hf-fast": 300,
    },
)


def train_overrides(
    row: Row | None, sizes: Sizes, model_dir: str, rows_file: str, run_dir: str
) -> list[str]:
    """Experiment 19's config made into one short row: the local model and rows, `steps`
    optimizer steps of `rows_per_step` rows (its micro-batch of 2 kept), no evaluation, no
    checkpoints, a log event every step; then the row's own overrides."""
    settings = {
        "model_name_or_path": model_dir,
        "dataset": rows_file,
        "max_steps": sizes.steps,
        "gradient_accumulation_steps": max(1, sizes.rows_per_step // 2),
        "eval_split_ratio": 0,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 1,
        "output_dir": run_dir,
        "resume": "never",
    }
    return [f"{k}={v}" for k, v in settings.items()] + list(row.overrides if row else ())


def read_data(path: str) -> dict[str, Any]:
    """The prepared rows and prompts (`gpu_prepare.py`)."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


# --------------------------------------------------------------------------------------------
# build


def data_profile(config: Any, tokenizer: Any) -> dict[str, Any]:
    """How `train sft` batches the check's rows under `config`: padding (or packing) efficiency,
    the label share, and attention keys per token, per sample and over whole rows."""
    from reasonguard.plan.batch_profile import token_profile
    from reasonguard.train.data import prepare

    data = prepare(config, tokenizer)  # exactly what `train sft` will train on
    lengths = [len(r) for r in data.train]
    labels = [r.num_labels for r in data.train]
    budget = config.pack_tokens or data.max_length
    profiles = {
        kind: token_profile(lengths, labels, config, budget, per_sample)
        for kind, per_sample in (("per_sample", True), ("whole_row", False))
    }
    per_sample = profiles["per_sample"]
    return {
        "rows": len(lengths),
        "max_length": data.max_length,
        "tokens": sum(lengths),
        "padding_efficiency": round(per_sample["padding_efficiency"], 4),
        "label_share": round(sum(labels) / sum(lengths), 4),
        "keys_per_real_token": per_sample["attention_keys"] / sum(lengths),
        "keys_per_computed_token": {
            kind: p["attention_keys"] / p["computed_tokens"] for kind, p in profiles.items()
        },
    }


def build(spec: dict[str, Any]) -> dict[str, Any]:
    """Save the random model and the rows file; describe the machine and the rows' batching."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from reasonguard.models import load_tokenizer
    from reasonguard.train.config import load_config

    machine = torch_facts()
    if spec["require_cuda"] and not machine["cuda_available"]:
        return {"machine": machine, "error": "no CUDA GPU visible to torch"}
    data = read_data(spec["data_file"])
    sizes = Sizes(**spec["sizes"])
    count = sizes.steps * sizes.rows_per_step
    if len(data["train_rows"]) < count:
        raise SystemExit(f"{spec['data_file']}: {len(data['train_rows'])} rows, {count} needed")
    write_jsonl(Path(spec["rows_file"]), data["train_rows"][:count])

    tokenizer = load_tokenizer("llama3-tokenizer")
    config = LlamaConfig(**sizes.model, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    started = time.perf_counter()
    # Initialised on the GPU when there is one: 3.2B random numbers take a minute on a CPU.
    with torch.device("cuda" if machine["cuda_available"] else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    parameters = sum(p.numel() for p in model.parameters())
    folder = Path(spec["model_dir"])
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    seconds = time.perf_counter() - started
    profiles = {}
    for packing in (False, True):
        overrides = train_overrides(
            None, sizes, spec["model_dir"], spec["rows_file"], spec["work_dir"]
        )
        config_ = load_config(EXP19, [*overrides, f"packing={str(packing).lower()}"])
        profiles["packed" if packing else "padded"] = data_profile(config_, tokenizer)
    return {
        "machine": machine,
        "model": {
            "parameters": parameters,
            "build_and_save_seconds": round(seconds, 1),
            "safetensors_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        },
        "profiles": profiles,
    }


# --------------------------------------------------------------------------------------------
# train


def cuda_peaks() -> dict[str, Any]:
    """torch's peak CUDA memory of this process, GiB (None without CUDA)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    gib = 2**30
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3),
    }


def train(argv: list[str], result: Path) -> int:
    """`reasonguard ARGV` in this process, then its peak CUDA memory into `result` (also when
    it fails or is interrupted)."""
    from reasonguard.cli import main

    code: int | str | None = 1
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    finally:
        write_json(result, {"exit_code": code, **cuda_peaks()})
    return code if isinstance(code, int) else 1


# --------------------------------------------------------------------------------------------
# generate


def generate(spec: dict[str, Any]) -> dict[str, Any]:
    """The HF backend on the check's benchmark items: reasoning (a fixed token budget, greedy)
    or fast (the answer block's label probabilities, no tokens generated)."""
    from reasonguard import load_guard

    sizes = Sizes(**spec["sizes"])
    mode = spec["mode"]
    data = read_data(spec["data_file"])
    count = sizes.reasoning_items if mode == "reasoning" else sizes.fast_items
    items = [{"prompt": p["prompt"], "response": p["response"]} for p in data["prompts"][:count]]
    started = time.perf_counter()
    guard = load_guard(
        spec["model_dir"],
        prompt_format="chat",
        batch_size=sizes.batch_size,
        max_new_tokens=sizes.max_new_tokens,
    )
    load_seconds = time.perf_counter() - started
    guard.classify(items[:2], mode=mode, max_new_tokens=4, scores=False)  # warm-up, not timed
    started = time.perf_counter()
    results = guard.classify(items, mode=mode, scores=False)
    seconds = time.perf_counter() - started
    generated = sum(r.num_tokens for r in results)
    out = {
        "mode": mode,
        "items": len(items),
        "batch_size": sizes.batch_size,
        "device": str(guard.backend.device),
        "load_seconds": round(load_seconds, 1),
        "seconds_timed": round(seconds, 3),
        "items_per_second": round(len(items) / seconds, 3),
        **cuda_peaks(),
    }
    if mode == "reasoning":
        out |= {
            "max_new_tokens": sizes.max_new_tokens,
            "generated_tokens": generated,
            "output_tokens_per_second": round(generated / seconds, 2),
            "hit_max_new_tokens": sum(r.num_tokens >= sizes.max_new_tokens for r in results),
        }
    return out


def main(argv: list[str]) -> int:
    what = argv[0]
    if what == "train":
        result, rest = Path(argv[1]), argv[argv.index("--") + 1 :]
        return train(rest, result)
    spec, result = read_json(Path(argv[1])), Path(argv[2])
    got = build(spec) if what == "build" else generate(spec)
    write_json(result, got)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
