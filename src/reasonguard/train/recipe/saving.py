"""What a training run saves: its final model, and the guard record that makes a model or a
checkpoint servable as trained.

`final/` holds the model (adapter or full weights), its tokenizer and `reasonguard.json` (how to
prompt it, what it was trained from, where generation stops, its fast mode), written to a
temporary folder and renamed into place. Each checkpoint gets the same tokenizer and record
beside the weights the Trainer wrote, so `load_guard(checkpoint)` prompts it as trained.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from reasonguard.train.recipe.rundir import FINAL_DIR


class FinalModel:
    """Saving the run's model; mixed into `Recipe`, whose attributes (`config`, `run_dir`,
    `model`, `tokenizer`, `trainer`, `process`, `data`, `bf16`, `stage`) these methods read.
    A stage changes what is saved through `saved_model` and `checkpoint_identity`."""

    config: Any
    run_dir: Path
    model: Any
    tokenizer: Any
    trainer: Any
    process: Any
    data: Any
    bf16: bool
    stage: str
    is_main: bool

    def save(self) -> Path:
        """Write the trained model (adapter or full weights), tokenizer and guard record to
        `RUN_DIR/final`, atomically. Collective: sharded weights are gathered on rank 0."""
        import torch

        from reasonguard.models import end_of_turn_ids, write_guard_config

        final = self.run_dir / FINAL_DIR
        self.final_dir = final
        state_dict = self.trainer.accelerator.get_state_dict(self.trainer.model_wrapped)
        if not self.is_main:
            self.process.wait_for_everyone()
            return final
        tmp = self.run_dir / f".{FINAL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        eos_ids = end_of_turn_ids(self.tokenizer)
        model, finetuning, base_model = self.saved_model()
        if finetuning == "full":
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None:
                # Generation must stop at the end-of-turn token the model was trained to emit.
                generation_config.eos_token_id = eos_ids
                generation_config.pad_token_id = self.tokenizer.pad_token_id
            if state_dict is not None and getattr(model.config, "tie_word_embeddings", False):
                # The head is the embedding: stored once, as save_pretrained does for a model
                # (an engine's gathered state dict can hold it as a separate tensor).
                state_dict.pop("lm_head.weight", None)
            if self.bf16 and state_dict is not None:
                # The fp32 master weights were for exact updates; the model is used (and was
                # trained) in bf16, and half the size on disk.
                state_dict = {
                    k: v.to(torch.bfloat16) if v.is_floating_point() else v
                    for k, v in state_dict.items()
                }
        if model is not self.model:  # a merged copy: its own weights
            state_dict = None
        model.save_pretrained(tmp, state_dict=state_dict)
        self.tokenizer.save_pretrained(tmp)
        write_guard_config(tmp, **self.guard_record(finetuning, base_model))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.process.wait_for_everyone()
        return final

    def guard_record(self, finetuning: str, base_model: str) -> dict[str, Any]:
        """The `reasonguard.json` fields of a model this run saves (`models.write_guard_config`):
        how to prompt it, what it was trained from, where generation stops."""
        from reasonguard.models import end_of_turn_ids
        from reasonguard.train.modeling import nf4_base_record

        return {
            "prompt_format": self.config.prompt_format,
            "base_model": base_model,
            "finetuning": finetuning,
            "stage": self.stage,
            "max_length": self.data.max_length,
            "eos_token_ids": end_of_turn_ids(self.tokenizer),
            "chat_template": self.config.chat_template,
            **self.fast_mode_record(),
            # A QLoRA adapter is served on the 4-bit base it was trained on.
            **({"quantization": nf4_base_record(self.bf16)} if finetuning == "qlora" else {}),
        }

    def checkpoint_identity(self) -> tuple[str, str] | None:
        """(finetuning, base model) to record in a checkpoint, or None when a checkpoint cannot
        be served on its own (see the DPO stage). A checkpoint holds what `save` would save
        unmerged: the trained adapter on the run's base, or the full weights."""
        _, finetuning, base_model = self.saved_model()
        return finetuning, base_model

    def record_checkpoint(self, checkpoint: Path) -> None:
        """Make a checkpoint servable as trained: its tokenizer and `reasonguard.json` beside the
        weights the Trainer wrote (rank 0), so `load_guard(checkpoint)` prompts it in the run's
        format, with the run's chat template."""
        from reasonguard.models import write_guard_config

        identity = self.checkpoint_identity()
        if not self.is_main or identity is None or not checkpoint.is_dir():
            return
        self.tokenizer.save_pretrained(checkpoint)
        write_guard_config(checkpoint, **self.guard_record(*identity))

    def fast_mode_record(self) -> dict[str, Any]:
        """The dual-mode facts of reasonguard.json: the fast-mode marker the model learned (from
        this run's `reasoning_dropout`, or inherited from the model it started from)."""
        from reasonguard.format import FAST_MODE_MARKER
        from reasonguard.models import read_guard_config, resolve_model

        fraction = getattr(self.config, "reasoning_dropout", 0.0)
        if fraction:
            return {"fast_mode_marker": FAST_MODE_MARKER, "reasoning_dropout": fraction}
        start = Path(resolve_model(self.config.model_name_or_path))
        record = (read_guard_config(start) if start.is_dir() else None) or {}
        if record.get("fast_mode_marker"):
            return {
                "fast_mode_marker": record["fast_mode_marker"],
                "reasoning_dropout": record.get("reasoning_dropout"),
            }
        return {}

    def saved_model(self) -> tuple[Any, str, str]:
        """(model to save, finetuning to record, base model to record). The finetuning is the
        one trained (`lora` when `qlora_fallback_to_lora` chose a bf16 base), not the configured."""
        c = getattr(self, "run_config", None) or self.config
        return self.model, c.finetuning, c.model_name_or_path
