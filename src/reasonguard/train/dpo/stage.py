"""Hard-sample DPO (GuardReasoner stage 2): weighted DPO on mined pairs, from an R-SFT model.

Run it:

    reasonguard train dpo --config configs/guardreasoner-hsdpo-3b.yaml [key=value ...] [--dry-run]

The run is the R-SFT run (`train.recipe`: transformers' `Trainer` under `train.engine`,
checkpoints, `resume: auto`, NaN guard, OOM retry, TensorBoard, status.json,
training_info.json, loss curve, dry run) with a different step: each optimizer step takes
`samples_per_step` *pairs* and minimises the weighted DPO + SFT loss of `train.dpo.loss` (its
maths is in that module's docstring). TRL's `DPOTrainer` has no per-pair weight, which
hard-sample DPO needs, so the loss is our own; the engine is the same `Trainer` as R-SFT.

Log-probs are computed at the labelled positions only, in chunks of positions (`train.dpo.logprobs`):
no fp32 labels x vocabulary log-softmax is ever held whole.

The reference model is the model the run starts from. Its log-probs of every pair are computed
once, when training begins (the model already placed and, under FSDP / ZeRO-3, sharded), and
saved in `RUN_DIR/reference_logps.safetensors`: no second copy of the model is held in memory,
and a resumed run reads them back instead of recomputing them with already-updated weights.
This works the same for full fine-tuning, LoRA and QLoRA. TRL's `precompute_ref_log_probs`
(TRL 1.16) does the same only inside its `DPOTrainer`, which has no given per-pair weight (its
`use_weighting` is WPO's weight from the policy's own probabilities), and keeps the log-probs in
the datasets cache under a model hash, not in the run directory a resumed run reads.

`model_name_or_path` is usually the R-SFT output folder. A full model is trained as is. A LoRA
output (adapter) is either trained further (`init_adapter: continue`, the default; the result is
an adapter on the same base, loadable like the R-SFT one) or merged into its base before a fresh
adapter is trained on top (`init_adapter: merge`; `final/` then holds the merged full weights, as
an adapter on a merged model has no base on disk). QLoRA can only continue (merging into 4-bit
weights loses precision).

A packed micro-batch holds whole pairs, its budget twice `pack_tokens` (or `max_length`) since
a pair is two sequences. The prompt format must be the one the R-SFT model was trained with
(checked against its `reasonguard.json`).

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.train.dpo.stage import DPOConfig, run_dpo
    >>> config = load_config("configs/guardreasoner-hsdpo-3b.yaml", cls=DPOConfig)
    >>> run_dpo(config)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from reasonguard.errors import UserError
from reasonguard.train.config import DPOConfig
from reasonguard.train.data import micro_batches, pack
from reasonguard.train.dpo.loss import sequence_logps, weighted_dpo_losses
from reasonguard.train.dpo.pairs import (
    REFERENCE_FILE,
    PairData,
    PairExample,
    attach_reference,
    check_sources,
    collate_pairs,
    prepare_pairs,
    saved_reference,
)
from reasonguard.train.engine import GuardTrainer
from reasonguard.train.recipe import Recipe, TrainResult

__all__ = ["REFERENCE_FILE", "DPOConfig", "DPORecipe", "DPOTrainer", "run_dpo"]


class DPOTrainer(GuardTrainer):
    """HS-DPO steps: whole pairs per micro-batch, the weighted DPO + SFT loss per pair."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.window = {"pairs": 0, "right": 0, "margin": 0.0}
        self.eval_right = 0

    def micro_batches(self, rows: list[PairExample], micro_batch: int) -> list[list[PairExample]]:
        c = self.recipe.config
        if not c.packing:
            return micro_batches(rows, micro_batch)
        budget = 2 * self.recipe.pack_budget * micro_batch // c.per_device_train_batch_size
        return pack(rows, max(1, budget))

    def step_count(self, rows: list[PairExample]) -> int:
        return len(rows)

    def sequence_logps(self, model: Any, pairs: list[PairExample], packed: bool) -> tuple[Any, Any]:
        """Summed log-probs and labelled token counts of the 2n sequences (chosen, then rejected)."""
        batch = collate_pairs(pairs, packed, self.recipe.tokenizer.pad_token_id)
        liger = bool(self.recipe.decisions["liger"].value)
        return sequence_logps(
            model, self.to_device(batch), 2 * len(pairs), head=self.head, use_liger=liger
        )

    def batch_loss(self, model: Any, rows: list[PairExample], train: bool) -> Any:
        import torch

        packed = train and self.recipe.config.packing
        sums, counts = self.sequence_logps(model, rows, packed)
        n, device, c = len(rows), sums.device, self.recipe.config
        ref_c = torch.tensor([p.reference_chosen for p in rows], device=device)
        ref_r = torch.tensor([p.reference_rejected for p in rows], device=device)
        weights = torch.tensor([p.weight for p in rows], device=device)
        losses, margins = weighted_dpo_losses(
            sums[:n], sums[n:], ref_c, ref_r, counts[:n], weights, c.beta, c.pref_ftx
        )
        right = int((margins > 0).sum())
        if train:
            self.window["pairs"] += n
            self.window["right"] += right
            self.window["margin"] += float(margins.sum())
        else:
            self.eval_right += right
        return losses.sum()

    def _passes(self, model: Any, rows: list[PairExample], step: int) -> float:
        self.window_mark = dict(self.window)  # an OOM retry must not count a step twice
        return super()._passes(model, rows, step)

    def _shrink_after_oom(self, model: Any) -> None:
        self.window = dict(self.window_mark)
        super()._shrink_after_oom(model)

    def after_step(self, rows: list[PairExample]) -> None:
        self.recipe.count_step(rows)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self.eval_right = 0
        return super().evaluate(*args, **kwargs)

    def eval_metrics(self, total: float) -> dict[str, float]:
        right = self._sum([float(self.eval_right)])[0]
        n = len(self.eval_rows)
        self.recipe.last_eval_reward_accuracy = right / n
        return {"eval_loss": total / n, "eval_reward_accuracy": right / n}

    def log_fields(self) -> dict[str, float]:
        """Reward accuracy and margin over the pairs since the last log (every rank's)."""
        pairs, right, margin = self._sum(
            [self.window["pairs"], self.window["right"], self.window["margin"]]
        )
        self.window = {"pairs": 0, "right": 0, "margin": 0.0}
        if not pairs:
            return {}
        return {"reward_accuracy": right / pairs, "reward_margin": margin / pairs}

    def policy_logps(self, pairs: list[PairExample]) -> tuple[Any, Any]:
        """Summed log-probs of chosen and rejected outputs under the current model (eval mode);
        each rank computes its share of the pairs and the shares are summed."""
        import torch

        size = self.args.per_device_eval_batch_size
        chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]), reverse=True)
        order = order[self._rank :: self._world]
        chunks = self._aligned([order[s : s + size] for s in range(0, len(order), size)])
        model = self.model_wrapped
        model.eval()
        with torch.no_grad():
            for index in chunks:
                with self.compute_loss_context_manager():
                    if index is None:  # a pass that adds nothing, for the collectives
                        self.sequence_logps(model, [min(pairs, key=len)], packed=False)
                        continue
                    sums, _ = self.sequence_logps(model, [pairs[i] for i in index], packed=False)
                n = len(index)
                chosen[index] = sums[:n].cpu()
                rejected[index] = sums[n:].cpu()
        model.train()
        if self._world > 1:
            chosen = torch.tensor(self._sum(chosen.tolist()))
            rejected = torch.tensor(self._sum(rejected.tolist()))
        return chosen, rejected


class _ReferenceLogps(TrainerCallback):
    """Computes the reference log-probs when training begins: the model is then placed (and
    sharded) by the engine and still untouched (a resumed run has read them back already)."""

    def __init__(self, recipe: DPORecipe) -> None:
        self.recipe = recipe

    def on_train_begin(self, args, state, control, **kwargs):
        if self.recipe.reference_missing:
            self.recipe.compute_reference()


class DPORecipe(Recipe):
    """One HS-DPO run: the R-SFT run with pairs, reference log-probs and the weighted DPO loss."""

    stage = "dpo"
    trainer_class = DPOTrainer
    # Per-token log-probs through liger-kernel's fused kernel where it computes their gradient
    # right (`train.dpo.logprobs.liger_problem`), else the chunked computation.
    liger_loss = True

    def __init__(self, config: DPOConfig) -> None:
        super().__init__(config)
        self.last_eval_reward_accuracy: float | None = None
        self.reference_missing = True

    def sharding_problems(self) -> list[str]:
        from reasonguard.models import resolve_model
        from reasonguard.train.modeling import is_adapter_dir
        from reasonguard.train.recipe.arguments import true_env

        problems = super().sharding_problems()
        c = self.config
        merges = is_adapter_dir(resolve_model(c.model_name_or_path)) and c.init_adapter == "merge"
        if (
            merges
            and c.finetuning != "full"
            and (true_env("ACCELERATE_USE_FSDP") or true_env("ACCELERATE_USE_DEEPSPEED"))
        ):
            problems.append(
                "init_adapter: merge folds the adapter into the whole model on save, which a "
                "sharded launch does not hold in one place: use init_adapter: continue, or DDP"
            )
        return problems

    def prepare_data(self) -> PairData:
        self._check_prompt_format()
        return prepare_pairs(self.config, self.tokenizer)

    def _check_prompt_format(self) -> None:
        from reasonguard.models import read_guard_config, resolve_model

        record = read_guard_config(resolve_model(self.config.model_name_or_path)) or {}
        trained = record.get("prompt_format")
        if trained and trained != self.config.prompt_format:
            raise UserError(
                f"config key 'prompt_format': {self.config.model_name_or_path} was trained with "
                f"prompt_format {trained}, this config says {self.config.prompt_format}; DPO must "
                f"prompt the model as R-SFT did: set prompt_format: {trained}"
            )

    def pack_budget_tokens(self) -> int:
        return 2 * self.pack_budget  # a pair is two sequences

    @property
    def _groups(self) -> dict[str, list[PairExample]]:
        return {"train": self.data.train, "eval": self.data.eval}

    def after_setup(self) -> None:
        """Read the saved reference log-probs back, or arrange for them to be computed."""
        tensors = self._agreed(
            lambda: saved_reference(self.run_dir, self._groups, self.resume_from is not None)
        )
        if tensors is not None:
            attach_reference(self._groups, tensors)
            self.reference_missing = False
        self.trainer.add_callback(_ReferenceLogps(self))

    def compute_reference(self) -> None:
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        tensors = {}
        for name, pairs in self._groups.items():
            if pairs:
                chosen, rejected = self.trainer.policy_logps(pairs)
                tensors[f"{name}_chosen"], tensors[f"{name}_rejected"] = chosen, rejected
        if self.is_main:
            path = self.run_dir / REFERENCE_FILE
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            tmp.rename(path)
        attach_reference(self._groups, tensors)
        self.reference_missing = False
        self.timings["reference_seconds"] = time.perf_counter() - t0

    def log_fields(self) -> dict[str, float]:
        return self.trainer.log_fields()

    def loss_description(self) -> str:
        c = self.config
        return (
            f"mean over each step's pairs of sample_weight x (-log sigmoid(beta x margin) + "
            f"pref_ftx x chosen mean NLL), beta {c.beta}, pref_ftx {c.pref_ftx}; reference "
            "log-probs precomputed from the starting model"
        )

    def title(self) -> str:
        c = self.config
        return f"HS-DPO {c.model_name_or_path} ({c.finetuning}, beta {c.beta})"

    def checkpoint_identity(self) -> tuple[str, str] | None:
        """As `saved_model` records it, without merging; None for an adapter trained on a merged
        starting adapter: its checkpoints hold an adapter on a base that exists only in memory,
        and serve only as resume points (`final/` holds the merged model)."""
        from reasonguard.models import resolve_model
        from reasonguard.train.modeling import is_adapter_dir

        c = getattr(self, "run_config", None) or self.config
        merged_start = c.init_adapter == "merge" and is_adapter_dir(
            resolve_model(c.model_name_or_path)
        )
        if c.finetuning != "full" and merged_start:
            return None
        return super().checkpoint_identity()

    def saved_model(self) -> tuple[Any, str, str]:
        """(model to save, finetuning to record, base model to record)."""
        from reasonguard.models import base_model_of, read_guard_config, resolve_model
        from reasonguard.train.modeling import is_adapter_dir

        c = getattr(self, "run_config", None) or self.config  # qlora may have become lora
        start = resolve_model(c.model_name_or_path)
        if c.finetuning == "full":
            return self.model, "full", c.model_name_or_path
        if is_adapter_dir(start) and c.init_adapter == "merge":
            return self.model.merge_and_unload(), "full", c.model_name_or_path
        # An adapter: on the starting adapter's base when continuing one, else on the start.
        base = c.model_name_or_path
        if is_adapter_dir(start):  # as the R-SFT run recorded it (an alias stays an alias)
            base = (read_guard_config(start) or {}).get("base_model") or base_model_of(Path(start))
        return self.model, c.finetuning, base

    def training_info(self, outcome: str, message: str | None) -> dict[str, Any]:
        info = super().training_info(outcome, message)
        info["dpo"] = {
            "beta": self.config.beta,
            "loss_type": self.config.loss_type,
            "pref_ftx": self.config.pref_ftx,
            "init_adapter": self.config.init_adapter,
            "reference": f"log-probs of the starting model, in {REFERENCE_FILE}",
            "final_eval_reward_accuracy": self.last_eval_reward_accuracy,
        }
        return info


def run_dpo(config: DPOConfig) -> TrainResult:
    """Train, save and record one HS-DPO run (resuming it when `resume: auto` finds a checkpoint).

    Raises:
        UserError: bad pairs or config, a machine that cannot run it, NaN loss, out of memory.
    """
    from reasonguard.train.recipe import run_recipe

    check_sources(config)  # before the run directory or any weights: name the missing input
    return run_recipe(DPORecipe(config))
