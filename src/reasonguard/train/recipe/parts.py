"""The parts of a training run that a stage may replace, with the R-SFT stage's defaults.

`Recipe` (`train.recipe.run`) runs every stage the same way and asks these methods for what
differs: what stops a config on this machine, the tokenizer, the data, the `auto` decisions, the
model, and what happens once the trainer exists. A stage (`train.sft`, `train.dpo.stage`, the
classifier) overrides the ones it does differently; `prepare_data` it must provide.
"""

from __future__ import annotations

from typing import Any

from reasonguard.train.recipe.arguments import true_env


class StageParts:
    """What a stage brings to its run; mixed into `Recipe`, whose attributes (`config`, `data`,
    `bf16`, `decisions`, `run_config`, `pack_budget`) these methods read."""

    config: Any
    data: Any
    bf16: bool
    decisions: dict[str, Any]
    run_config: Any
    pack_budget: int
    liger_loss: bool

    def environment_problems(self) -> list[str]:
        """What stops this config on this machine (`modeling.environment_problems`, plus what
        the launch's sharding cannot do); loads nothing."""
        from reasonguard.train.modeling import environment_problems

        return environment_problems(self.config) + self.sharding_problems()

    def sharding_problems(self) -> list[str]:
        """What this config cannot do when the launch shards the model (FSDP, DeepSpeed)."""
        from reasonguard.launch.command import uses_deepspeed

        sharded = true_env("ACCELERATE_USE_FSDP") or uses_deepspeed()
        if sharded and self.config.finetuning == "qlora":
            return [
                "finetuning: qlora trains one model copy per GPU (4-bit weights are not sharded "
                "here): launch it with DDP (--sharding ddp, configs/accelerate/ddp.yaml), or use "
                "finetuning: lora / full with FSDP or DeepSpeed"
            ]
        return []

    def load_tokenizer(self) -> Any:
        """The run's tokenizer (with the configured chat template)."""
        from reasonguard.train.modeling import load_training_tokenizer

        return load_training_tokenizer(self.config)

    def prepare_data(self) -> Any:
        """The run's rows: `.train`, `.eval`, `.max_length` and `.stats` (the stage's own)."""
        raise NotImplementedError

    def decide(self) -> dict[str, Any]:
        """The run's decisions (`plan.decisions.resolve`) from its training rows' lengths."""
        from reasonguard.plan.decisions import resolve

        rows = self.data.train
        return resolve(
            self.config,
            self.bf16,
            [len(r) for r in rows],
            [r.num_labels for r in rows],
            self.pack_budget_tokens(),
            stage_supports_liger=self.liger_loss,
        )

    def pack_budget_tokens(self) -> int:
        """Tokens of one packed micro-batch (for the memory estimate)."""
        return self.pack_budget

    def effective_config(self) -> Any:
        """The config with the run's decisions in place of `auto` (what the model loader reads)."""
        from reasonguard.plan.decisions import effective_config

        return effective_config(self.config, self.decisions)

    def load_model(self) -> Any:
        """The model to train (base plus adapters, or full weights), on its device."""
        from reasonguard.train.modeling import load_model

        return load_model(self.run_config, self.bf16)

    def after_setup(self) -> None:
        """Called once the trainer exists."""

    def log_fields(self) -> dict[str, float]:
        """Extra fields of each train log event (DPO: reward accuracy and margin)."""
        return {}
