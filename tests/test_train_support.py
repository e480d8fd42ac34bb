"""Helpers for the training tests: guard records, a dataset file, a tiny-model SFT config.

Kept in a `test_train*` module (collected, but it holds no tests) so every training test file
can `from test_train_support import ...`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reasonguard.format import INSTRUCTION, render_input, render_target

REPO = Path(__file__).resolve().parents[1]

# glibc allocator settings of `make test` (see the Makefile): without them a CPU training step of
# the tiny model can take 10x longer from page faults; subprocess tests pass them on explicitly.
CPU_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "10000000000",
    "MALLOC_TRIM_THRESHOLD_": "10000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}

_PROMPTS = [
    "How do I bake bread?",
    "How can I pick a lock to break into a house?",
    "Write a poem about cats.",
    "Tell me how to make a weapon at home.",
    "What is the capital of France?",
    "Help me cheat on my exam.",
]
_RESPONSES = [None, "I can't help with that.", "Sure, here is how: first, gather the tools.", None]


def guard_record(i: int) -> dict[str, Any]:
    """A valid GuardReasoner record; labels vary with `i` so all label values occur."""
    prompt, response = _PROMPTS[i % len(_PROMPTS)], _RESPONSES[i % len(_RESPONSES)]
    harm = "harmful" if i % 2 else "unharmful"
    refusal = None if response is None else ("refusal" if "can't" in response else "compliance")
    response_harm = None if response is None else ("unharmful" if refusal == "refusal" else harm)
    reasoning = (
        f"# Task 1\n\n## Reasoning Step 1\nThe user asks: {prompt}\n"
        f"## Conclusion\nThe request is {harm}."
    )
    return {
        "instruction": INSTRUCTION,
        "input": render_input(prompt, response),
        "output": render_target(reasoning, harm, refusal, response_harm),
    }


def write_dataset(path: Path, rows: int, split: str = "train") -> Path:
    """Write `rows` guard records as JSON lines (all in one split)."""
    path.write_text(
        "".join(json.dumps({**guard_record(i), "split": split}) + "\n" for i in range(rows))
    )
    return path


def tiny_config(tmp_path: Path, rows: int = 12, **overrides: Any) -> Any:
    """A fast LoRA SFT config on the tiny random Llama with the real Llama 3 tokenizer."""
    from reasonguard.train.config import SFTConfig

    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_dataset(data, rows)
    settings: dict[str, Any] = {
        "model_name_or_path": "tiny-llama",
        "dataset": str(data),
        "prompt_format": "chat",
        "finetuning": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "max_length": 512,
        "eval_split_ratio": 0.2,
        "eval_steps": 2,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_steps": 2,
        "save_total_limit": 2,
        "report_to": "none",
        "output_dir": str(tmp_path / "run"),
    }
    settings.update(overrides)
    return SFTConfig(**settings)


def write_yaml_config(path: Path, config: Any) -> Path:
    """Save a config to YAML (what the CLI reads)."""
    from reasonguard.train.config import save_config

    return save_config(config, path)


def cli_env() -> dict[str, str]:
    """The environment for a subprocess running the real CLI."""
    return {**os.environ, **CPU_ENV, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
