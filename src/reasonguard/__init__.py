"""reasonguard: train, evaluate and serve reasoning-based LLM guardrails (the GuardReasoner recipe).

Heavy dependencies (torch, transformers) are imported only by the modules that need them, so
`import reasonguard` and the model-free commands (`evaluate`, `compare`) start fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_guard"]


def load_guard(*args: Any, **kwargs: Any) -> Any:
    """Load a guard model for classification (see `reasonguard.infer.guard.load_guard`)."""
    from reasonguard.infer.guard import load_guard as _load_guard

    return _load_guard(*args, **kwargs)
