"""A training process's peak memory, as a user compares it with their machine: the
`memory_per_rank` of training_info.json.

Why more than `torch.cuda.max_memory_allocated`: that counts torch's live tensors only. The
card also holds what torch's caching allocator keeps reserved (`max_memory_reserved`), the CUDA
context, and memory outside torch's allocator (bitsandbytes' paged optimizer state lives in
CUDA unified memory), all of which `nvidia-smi` shows. So a GPU run records three readings:

- `peak_cuda_allocated_gib`: torch's tensors (`torch.cuda.max_memory_allocated`);
- `peak_cuda_reserved_gib`: torch's allocator, tensors plus its cache (`max_memory_reserved`);
- `peak_nvml_gib`: the device's used memory as NVML reports it (`torch.cuda.device_memory_used`,
  what nvidia-smi shows for the GPU, every process on it included), the highest of the readings
  taken after each optimizer step; recorded where `pynvml` (the `nvidia-ml-py` package) is
  importable, else None.

Every run records `peak_rss_gib`, the process's peak resident set (`getrusage` `ru_maxrss`):
on a CPU run that is the measure (the model, activations and optimizer all live in RAM), and
`measured` says in words what the fields of the run are.

Example:
    >>> peak = PeakMemory()
    >>> peak.sample()  # after each optimizer step
    >>> sorted(peak.reading())[:2]
    ['cuda_allocated', 'cuda_reserved']
"""

from __future__ import annotations

import importlib.util
import resource
from typing import Any

GIB = 1024**3

_CPU = (
    "peak_rss_gib: each rank's peak resident set (getrusage ru_maxrss), which holds the model, "
    "activations and optimizer state on a CPU run; no CUDA device, so no GPU readings"
)
_GPU = (
    "peak_rss_gib: each rank's peak resident set (getrusage ru_maxrss, host memory); "
    "peak_cuda_allocated_gib: torch's tensors on the GPU (torch.cuda.max_memory_allocated); "
    "peak_cuda_reserved_gib: torch's caching allocator, tensors plus its cache "
    "(torch.cuda.max_memory_reserved); "
)
_NVML = (
    "peak_nvml_gib: the GPU's used memory as NVML reports it (what nvidia-smi shows: reserved "
    "plus the CUDA context and memory outside torch's allocator, other processes on the GPU "
    "included), the highest reading after any optimizer step"
)
_NO_NVML = "peak_nvml_gib: not read (pynvml, from the nvidia-ml-py package, is not importable)"


class PeakMemory:
    """Readings of one process's memory; `sample` after each optimizer step (cheap: one NVML
    query on a GPU, nothing on a CPU), `reading` at the end."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.nvml = self.cuda and importlib.util.find_spec("pynvml") is not None
        self.nvml_peak = 0

    def sample(self) -> None:
        if self.nvml:
            import torch

            self.nvml_peak = max(self.nvml_peak, torch.cuda.device_memory_used())

    def reading(self) -> dict[str, float | None]:
        """This process's peaks in GiB (None where not measured here)."""
        import torch

        self.sample()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux
        return {
            "cuda_allocated": torch.cuda.max_memory_allocated() / GIB if self.cuda else None,
            "cuda_reserved": torch.cuda.max_memory_reserved() / GIB if self.cuda else None,
            "nvml": self.nvml_peak / GIB if self.nvml else None,
            "rss": rss,
        }

    def measured(self) -> str:
        """What the fields of `memory_per_rank` are, in words, for this machine."""
        if not self.cuda:
            return _CPU
        return _GPU + (_NVML if self.nvml else _NO_NVML)


def memory_fields(
    columns: dict[str, list[float]], available: dict[str, bool], measured: str
) -> dict[str, Any]:
    """The `memory_per_rank` record: one list per reading (a value per rank, in GiB, rounded),
    None for a reading this machine does not take.

    Args:
        columns: reading name -> every rank's value (as `Recipe` gathers them).
        available: reading name -> whether rank 0 took it.
        measured: `PeakMemory.measured()` of rank 0.
    """
    names = {
        "rss": "peak_rss_gib",
        "cuda_allocated": "peak_cuda_allocated_gib",
        "cuda_reserved": "peak_cuda_reserved_gib",
        "nvml": "peak_nvml_gib",
        "weights": "weights_gib",
        "optimizer": "optimizer_state_gib",
    }
    return {
        field: [round(v, 3) for v in columns[key]] if available.get(key, True) else None
        for key, field in names.items()
    } | {"measured": measured}
