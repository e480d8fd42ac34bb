"""The hardware and model tables of `reasonguard plan`: GPU classes and Llama-style model shapes.

- `GPUS`: the GPU classes a plan can target (`TARGETS` adds `cpu`), with their peak dense
  TFLOPS and memory from NVIDIA's public spec sheets, and the MFU assumed per fine-tuning mode;
  `custom_gpu` describes any other GPU by its memory and bf16 TFLOPS.
- `Architecture`: the shapes of a Llama-style decoder and the parameter counts derived from
  them; `KNOWN_ARCHITECTURES` holds the public config.json numbers of the models the shipped
  configs name, so those plan offline; `model_architecture` finds any model's shapes.
- `this_machine`, `ram_bytes`, `cpu_label`: the local target.

Example:
    >>> from reasonguard.plan.hardware import GPUS, KNOWN_ARCHITECTURES
    >>> GPUS["4090"].memory_gib, f"{KNOWN_ARCHITECTURES['meta-llama/Llama-3.2-3B'].total_params:,}"
    (24, '3,212,749,824')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.hub import hub_reachable

GIB = 1024**3

# --------------------------------------------------------------------------------------------
# GPU classes


@dataclass(frozen=True)
class GPUClass:
    """One GPU class of the throughput and memory model."""

    label: str
    bf16_tflops: float
    """Peak dense bf16 tensor-core TFLOPS (FP32 accumulate), spec sheet, no sparsity."""
    fp32_tflops: float
    """Peak FP32 (non-tensor) TFLOPS: the rate for `bf16: false` (PyTorch's matmuls do not use
    TF32 by default)."""
    memory_gib: float
    """Device memory (nominal; a little less is usable)."""
    mfu: dict[str, float]
    """Model FLOPs utilisation assumed per fine-tuning mode."""


# Peak numbers from NVIDIA's public spec sheets, dense (the sheets' headline figures are with 2:4
# sparsity, twice these):
#   H100 SXM5 80GB datasheet: BF16 tensor 1,979 TFLOPS sparse -> 989.4 dense; FP32 67; 80 GB.
#   A100 SXM4 80GB datasheet: BF16 tensor 624 sparse -> 312 dense; FP32 19.5; 80 GB.
#   L40S datasheet: BF16 tensor 733 sparse -> 362.05 dense; FP32 91.6; 48 GB.
#   RTX 4090 (Ada Lovelace architecture whitepaper, GeForce RTX 4090 column): BF16 tensor with
#     FP32 accumulate 165.2 dense (330.4 sparse; GeForce runs FP32-accumulate at half the
#     FP16-accumulate rate, and PyTorch accumulates in FP32); FP32 82.6; 24 GB.
#   RTX 4070 Ti SUPER (nvidia.com spec page): 706 "AI TOPS" = FP8 with sparsity, so bf16 dense with
#     FP32 accumulate = 706 / 8 = 88.2 (the same /8 rule gives 1,321 / 8 = 165.2 for the 4090);
#     FP32 44.1 (66 SMs x 128 lanes x 2 x 2.61 GHz); 16 GB.
#   RTX A6000 (NVIDIA Ampere GA102 GPU architecture whitepaper v2.0, Appendix C): peak BF16
#     tensor with FP32 accumulate 154.8 dense (309.7 sparse); FP32 38.7; 48 GB.
#   L4 datasheet: BF16 tensor 242 sparse -> 121 dense; FP32 30.3; 24 GB.
#   A10 datasheet: BF16 tensor 125 dense (250 sparse); FP32 31.2; 24 GB.
#   RTX 3090 (GA102 whitepaper, Appendix A, GeForce RTX 3090 column): peak BF16 tensor with
#     FP32 accumulate 71 dense (142 sparse; GeForce again at half the FP16-accumulate rate);
#     FP32 35.6; 24 GB.
#
# MFU assumptions (fraction of the bf16 peak a run sustains), per fine-tuning mode:
#   full 0.40, lora 0.35: from published throughputs: torchtune's Llama-3.2-3B figures on an
#   A100, 7,075 tok/s packed full fine-tuning (x 6 x 3.2B FLOPs = 44% of 312 TFLOPS) and
#   8,210 tok/s LoRA (x ~4 x 3.2B = 34%); NVIDIA NeMo's Llama-3-8B LoRA on one H100, ~41% MFU.
#   qlora 0.23 = 0.65 x the LoRA figure: bitsandbytes dequantises every NF4 weight before each
#   matmul, forward and backward, which commonly costs ~30-40% of LoRA's speed.
#   The same values are used for every class: no comparable measurements exist for L40S / GeForce
#   cards, and this project's own GPU benchmark (bench/train_throughput.py, GPU mode) has not run
#   yet. Replace them with measured values when it has.
_MFU = {"full": 0.40, "lora": 0.35, "qlora": 0.23}

GPUS: dict[str, GPUClass] = {
    "h100": GPUClass("NVIDIA H100 SXM 80GB", 989.4, 67.0, 80, dict(_MFU)),
    "a100": GPUClass("NVIDIA A100 SXM 80GB", 312.0, 19.5, 80, dict(_MFU)),
    "l40s": GPUClass("NVIDIA L40S 48GB", 362.05, 91.6, 48, dict(_MFU)),
    "a6000": GPUClass("NVIDIA RTX A6000 48GB", 154.8, 38.7, 48, dict(_MFU)),
    "l4": GPUClass("NVIDIA L4 24GB", 121.0, 30.3, 24, dict(_MFU)),
    "a10": GPUClass("NVIDIA A10 24GB", 125.0, 31.2, 24, dict(_MFU)),
    "4090": GPUClass("NVIDIA GeForce RTX 4090 24GB", 165.2, 82.6, 24, dict(_MFU)),
    "3090": GPUClass("NVIDIA GeForce RTX 3090 24GB", 71.0, 35.6, 24, dict(_MFU)),
    "4070ti-super": GPUClass("NVIDIA GeForce RTX 4070 Ti SUPER 16GB", 88.2, 44.1, 16, dict(_MFU)),
}
TARGETS = (*GPUS, "cpu")
CUSTOM = "custom"  # the target name of a GPU described by --gpu-memory-gib / --gpu-tflops
MFU_SOURCE = (
    "ASSUMED: from published fine-tuning throughputs on A100 / H100, not measured on this GPU "
    "class; pass --tokens-per-second with a measured rate to replace it"
)


def custom_gpu(
    base: str | None = None, memory_gib: float | None = None, bf16_tflops: float | None = None
) -> GPUClass:
    """A GPU class from given numbers: a table class (`base`) with its memory and/or bf16
    TFLOPS replaced, or, without `base`, any GPU from both numbers (the table's assumed MFU;
    no FP32 rate, so a `bf16: false` run needs a measured rate).

    Raises:
        UserError: a number that is not positive and finite, or `base` None without both.
    """
    import math

    for flag, value in (("--gpu-memory-gib", memory_gib), ("--gpu-tflops", bf16_tflops)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a positive number, got {value}")
    if base is None:
        if memory_gib is None or bf16_tflops is None:
            raise UserError(
                "to plan for a GPU not in the table, give both --gpu-memory-gib and --gpu-tflops "
                "(its dense bf16 tensor TFLOPS from the spec sheet, without sparsity); or "
                "choose the closest --gpu CLASS and override one of them"
            )
        label = f"a GPU with {memory_gib:g} GiB and {bf16_tflops:g} bf16 TFLOPS (as given)"
        return GPUClass(label, bf16_tflops, float("nan"), memory_gib, dict(_MFU))
    cls = GPUS[base]
    given = []
    if memory_gib is not None:
        given.append(f"{memory_gib:g} GiB")
    if bf16_tflops is not None:
        given.append(f"{bf16_tflops:g} bf16 TFLOPS")
    return GPUClass(
        f"{cls.label} with {' and '.join(given)} (as given)",
        cls.bf16_tflops if bf16_tflops is None else bf16_tflops,
        cls.fp32_tflops,
        cls.memory_gib if memory_gib is None else memory_gib,
        dict(cls.mfu),
    )


def this_machine() -> str:
    """The target for `--gpu` left out: the local GPU's class, or `cpu` without CUDA.

    Raises:
        UserError: a CUDA GPU that is none of the known classes.
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    found = gpu_class_of(torch.cuda.get_device_name(0))
    if found is None:
        raise UserError(
            f"this GPU ({torch.cuda.get_device_name(0)}) is not in the plan's table; pass "
            f"--gpu {'|'.join(TARGETS)} (the closest class), describe it with --gpu-memory-gib "
            "and --gpu-tflops, or give --tokens-per-second"
        )
    return found


# CUDA device names of the table's classes; word boundaries keep the A10 apart from the A100
# and the AWS A10G, the L4 from the L40S, the 3090 from the 3090 Ti.
_DEVICE_NAMES = {
    "h100": r"\bH100\b",
    "a100": r"\bA100\b",
    "l40s": r"\bL40S\b",
    "a6000": r"\bRTX A6000\b",
    "l4": r"\bL4\b",
    "a10": r"\bA10\b",
    "4090": r"\b4090\b",
    "3090": r"\b3090\b(?! ?Ti)",
    "4070ti-super": r"\b4070 ?Ti ?SUPER\b",
}


def gpu_class_of(device_name: str) -> str | None:
    """The table class of a CUDA device name (`torch.cuda.get_device_name`), or None.

    Examples:
        >>> gpu_class_of("NVIDIA GeForce RTX 3090"), gpu_class_of("NVIDIA A10G")
        ('3090', None)
    """
    import re

    for key, pattern in _DEVICE_NAMES.items():
        if re.search(pattern, device_name, re.IGNORECASE):
            return key
    return None


def ram_bytes() -> float:
    """Physical memory of this machine (infinite when the OS does not say)."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return float("inf")


def cpu_label() -> str:
    """The device line of a CPU plan."""
    return f"this machine's CPU ({os.cpu_count()} cores, {ram_bytes() / GIB:.0f} GiB RAM)"


# --------------------------------------------------------------------------------------------
# Model architecture


@dataclass(frozen=True)
class Architecture:
    """The shapes of a Llama-style decoder (the numbers of its config.json)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one layer, by its Llama module name."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def body_params(self) -> int:
        """Weights of the decoder layers' matmuls (what the FLOPs of a token scale with)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the LM head when it is not tied to it."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def small_params(self) -> int:
        """Norm weights (two per layer plus the final one)."""
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        return self.body_params + self.embedding_params + self.small_params

    def lora_params(self, rank: int, modules: list[str]) -> int:
        """Adapter weights: r x (in + out) per adapted projection per layer."""
        shapes = self.linear_shapes()
        return self.layers * sum(rank * sum(shapes[m]) for m in modules if m in shapes)

    def describe(self) -> str:
        return (
            f"{self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
            f"{self.heads}/{self.kv_heads} heads, vocab {self.vocab:,}"
            + (", tied embeddings" if self.tied_embeddings else "")
        )


# Public config.json numbers of the models the shipped configs name, so a hub id plans offline.
KNOWN_ARCHITECTURES = {
    "meta-llama/Llama-3.2-1B": Architecture(16, 2048, 8192, 32, 8, 64, 128256, True),
    "meta-llama/Llama-3.2-3B": Architecture(28, 3072, 8192, 24, 8, 128, 128256, True),
    "meta-llama/Llama-3.1-8B": Architecture(32, 4096, 14336, 32, 8, 128, 128256, False),
    "HuggingFaceTB/SmolLM2-135M": Architecture(30, 576, 1536, 9, 3, 64, 49152, True),
}


def architecture_from_config(config: dict[str, Any], source: str = "") -> Architecture:
    """A Llama-style `Architecture` from a Hugging Face config.json mapping.

    Raises:
        UserError: a key the model needs is missing.
    """
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return Architecture(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            # transformers' LlamaConfig defaults to untied; SmolLM2 and Llama 3.2 tie them.
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            source=source,
        )
    except KeyError as exc:
        raise UserError(f"{source}: config.json has no {exc.args[0]!r}") from None


def model_architecture(name: str) -> Architecture:
    """The architecture of a model name: a local folder or offline alias (its config.json), the
    local hub cache, the built-in table of known models, or (when reachable) the hub.

    Raises:
        UserError: the model is none of these.
    """
    from reasonguard.models import ALIASES, resolve_model

    if name in ALIASES or Path(name).expanduser().is_dir():
        folder = Path(resolve_model(name)).expanduser()
        if (folder / "adapter_config.json").is_file():
            base = json.loads((folder / "adapter_config.json").read_text())
            return model_architecture(str(base.get("base_model_name_or_path")))
        path = folder / "config.json"
        if not path.is_file():
            raise UserError(f"model {name!r}: no config.json in {folder}")
        return architecture_from_config(json.loads(path.read_text()), f"{path}")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return architecture_from_config(json.loads(Path(cached).read_text()), "local hub cache")
    base = name.removesuffix("-Instruct")
    for known, arch in KNOWN_ARCHITECTURES.items():
        if base.lower() in (known.lower(), known.split("/")[-1].lower()):
            return Architecture(**{**arch.__dict__, "source": f"built-in table ({known})"})
    if hub_reachable():
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(name, "config.json")
        except Exception as exc:  # gated, missing, network: one message for all
            raise UserError(
                f"model {name!r}: cannot read its config.json from the hub: {exc}"
            ) from None
        return architecture_from_config(json.loads(Path(path).read_text()), "hub")
    known = ", ".join(KNOWN_ARCHITECTURES)
    raise UserError(
        f"model {name!r}: no local config.json and no hub access; use a local model folder or "
        f"one of the built-in architectures ({known}, with or without -Instruct)"
    )
