"""reasonguard: train, evaluate and serve reasoning-based LLM guardrails (the GuardReasoner recipe).

Heavy dependencies (torch, transformers) are imported only by the modules that need them, so
`import reasonguard` and the model-free commands (`evaluate`, `compare`) start fast.
`reasonguard.load_guard` is `reasonguard.infer.guard.load_guard`, imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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
