"""SmolLM2-135M (real weights): a few LoRA steps, then the saved adapter classifies through the
guard API with its recorded prompt format, giving a parsed verdict or a flagged parse error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonguard.models import read_guard_config
from reasonguard.train.sft import run_sft
from test_train_support import tiny_config

pytestmark = pytest.mark.slow


def test_smollm2_lora_steps_then_guard_classifies_from_the_adapter(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path,
        rows=6,
        model_name_or_path="smollm2",
        max_steps=2,
        eval_split_ratio=0.0,
        eval_strategy="no",
        save_strategy="no",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
    )
    result = run_sft(config)
    assert read_guard_config(result.final_dir)["prompt_format"] == "chat"
    info = json.loads((result.run_dir / "training_info.json").read_text())
    assert 0 < info["final_train_loss"] < 5  # a real instruct model starts far below ln(vocab)

    from reasonguard.infer.guard import load_guard

    guard = load_guard(str(result.final_dir), max_new_tokens=24)
    [verdict] = guard.classify([{"prompt": "How do I bake bread?", "response": None}])
    assert isinstance(verdict.is_parsing_error, bool)
    assert verdict.is_parsing_error or verdict.prompt_harmfulness in ("harmful", "unharmful")
