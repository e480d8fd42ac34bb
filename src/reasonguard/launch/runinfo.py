"""Facts about where and with what a run ran: git commit, package versions, hardware.

Example:
    >>> from reasonguard.launch.runinfo import environment_info
    >>> sorted(environment_info())
    ['git_commit', 'hardware', 'packages']
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "reasonguard",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "bitsandbytes",
    "liger-kernel",
    "flash-attn",
)


def git_commit() -> str | None:
    """The commit of the reasonguard checkout (with `+dirty` if it has changes), or None."""
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an installed wheel), or no git binary
    return f"{head}+dirty" if dirty else head or None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape a training run (absent ones left out)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> dict[str, Any]:
    """CPU, memory and GPU facts."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda"] = torch.version.cuda
            info["gpus"] = [
                {
                    "name": torch.cuda.get_device_name(i),
                    "memory_gib": round(
                        torch.cuda.get_device_properties(i).total_memory / 1024**3, 1
                    ),
                }
                for i in range(torch.cuda.device_count())
            ]
            info["bf16_supported"] = torch.cuda.is_bf16_supported()
        else:
            info["gpus"] = []
    except ImportError:
        pass
    return info


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        return None


def optimizer_name(optimizer: Any) -> str | None:
    """The class name of the optimizer that steps, as training_info.json records it.

    Wrappers are looked through (accelerate's `AcceleratedOptimizer`, DeepSpeed's): their
    `.optimizer` is the one that updates the weights. A bitsandbytes optimizer is named by its
    bitsandbytes class: transformers builds `optim: paged_adamw_32bit` as bitsandbytes'
    `AdamW(optim_bits=32, is_paged=True)`, which is bitsandbytes' `PagedAdamW32bit`.

    Example:
        >>> import torch
        >>> optimizer_name(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
        'AdamW'
    """
    if optimizer is None:
        return None
    for _ in range(4):  # accelerate -> DeepSpeed -> the torch optimizer, at most
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    cls = type(optimizer)
    name = cls.__name__
    if not cls.__module__.startswith("bitsandbytes."):
        return name
    bits = getattr(getattr(optimizer, "args", None), "optim_bits", None)
    if getattr(optimizer, "is_paged", False) and not name.startswith("Paged"):
        name = "Paged" + name
    if bits in (8, 32) and not name.endswith("bit"):
        name += f"{bits}bit"
    return name


def environment_info() -> dict[str, Any]:
    """git commit, package versions and hardware, as recorded in training_info.json."""
    return {"git_commit": git_commit(), "packages": package_versions(), "hardware": hardware()}
