"""reasonguard: train, evaluate and serve reasoning-based LLM guardrails (the GuardReasoner recipe).

Heavy dependencies (torch, transformers) are imported only by the modules that need them, so
`import reasonguard` and the model-free commands (`evaluate`, `compare`) start fast.
`reasonguard.load_guard` is `reasonguard.infer.guard.load_guard`, imported on first use.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


class _NoKernelHubNotice(logging.Filter):
    """Drops one bitsandbytes notice, nothing else it logs.

    bitsandbytes (0.50) logs at import, on CPUs with AVX-512 BF16, "Failed to load CPU
    gemm_4bit_forward from kernels-community: No module named 'kernels'": it tried an optional
    4-bit CPU kernel that the `kernels` package would download from the Hugging Face Hub at run
    time, and uses its own CPU code instead. Nothing is wrong and nothing is for a user to do (the
    download cannot work offline), yet it reached every command that imports bitsandbytes
    (through peft or transformers).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# Set on the logger before bitsandbytes exists: its module asks for the same logger object.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelHubNotice())

__all__ = ["__version__", "load_guard"]

if TYPE_CHECKING:
    from reasonguard.infer.guard import load_guard


def __getattr__(name: str) -> Any:
    # Lazy export: the real function (its signature and docstring for help()), imported when
    # first asked for; the guard module imports no heavy library itself.
    if name == "load_guard":
        from reasonguard.infer.guard import load_guard

        globals()["load_guard"] = load_guard
        return load_guard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
