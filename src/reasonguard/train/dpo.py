"""Hard-sample DPO (GuardReasoner stage 2): weighted DPO on mined pairs, from an R-SFT model.

Run it:

    reasonguard train dpo --config configs/guardreasoner-hsdpo-3b.yaml [key=value ...] [--dry-run]

The run is the R-SFT loop (`reasonguard.train.sft.SFTRecipe`: checkpoints, `resume: auto`,
NaN guard, OOM retry, TensorBoard, status.json, training_info.json, loss curve, dry run) with a
different step: each optimizer step takes `samples_per_step` *pairs* and minimises the weighted
DPO + SFT loss of `reasonguard.train.dpo_loss` (its maths is in that module's docstring).

The reference model is the model the run starts from. Its log-probs of every pair are computed
once, before the first update, and saved in `RUN_DIR/reference_logps.safetensors`: no second copy
of the model is held in memory, and a resumed run reads them back instead of recomputing them
with already-updated weights. This works the same for full fine-tuning, LoRA and QLoRA.

`model_name_or_path` is usually the R-SFT output folder. A full model is trained as is. A LoRA
output (adapter) is either trained further (`init_adapter: continue`, the default; the result is
an adapter on the same base, loadable like the R-SFT one) or merged into its base before a fresh
adapter is trained on top (`init_adapter: merge`; `final/` then holds the merged full weights, as
an adapter on a merged model has no base on disk). QLoRA can only continue (merging into 4-bit
weights loses precision).

With several processes (`reasonguard.train.distributed`) each rank computes the reference
log-probs of its share of the pairs, the shares are summed into the full tensors on every rank,
and rank 0 writes the file; on resume rank 0 reads it and every rank receives its content. Each
step's loss is divided by the step's pair count over all ranks.

A packed micro-batch holds whole pairs, its budget twice `pack_tokens` (or `max_length`) since
a pair is two sequences. The prompt format must be the one the R-SFT model was trained with
(checked against its `reasonguard.json`).

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.train.dpo import DPOConfig, run_dpo
    >>> config = load_config("configs/guardreasoner-hsdpo-3b.yaml", cls=DPOConfig)
    >>> run_dpo(config)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from reasonguard.errors import UserError
from reasonguard.train.config import SFTConfig
from reasonguard.train.dpo_data import PairData, PairExample, collate_pairs, prepare_pairs
from reasonguard.train.dpo_loss import sequence_logps, weighted_dpo_losses
from reasonguard.train.sft import SFTRecipe, SFTResult

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class DPOConfig(SFTConfig):
    """HS-DPO settings: every R-SFT key, stage-2 defaults, and the DPO keys below."""

    dataset: str = ""
    """The pair file(s) from `reasonguard mine` (a .jsonl file or a folder of them)."""
    learning_rate: float = 5e-6
    """Peak learning rate (the paper's HS-DPO value)."""
    num_train_epochs: int = 2
    """Passes over the pairs (the paper: 2)."""
    output_dir: str = "runs/dpo"
    """The run directory."""
    beta: float = 0.01
    """DPO temperature: how far the policy may move from the reference (the paper: 0.01)."""
    loss_type: Literal["sigmoid"] = "sigmoid"
    """The DPO loss: `sigmoid` = -log sigmoid(beta * margin) (the paper's)."""
    pref_ftx: float = 2.0
    """Weight of the SFT (mean NLL) term on the chosen output (LLaMA-Factory's name; the paper: 2.0)."""
    init_adapter: Literal["continue", "merge"] = "continue"
    """When starting from a LoRA output: keep training that adapter, or merge it into the base
    and train a new adapter (final/ then holds merged full weights)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise UserError(f"config key 'beta': must be positive, got {self.beta}")
        if self.pref_ftx < 0:
            raise UserError(f"config key 'pref_ftx': must not be negative, got {self.pref_ftx}")
        if self.finetuning == "qlora" and self.init_adapter == "merge":
            raise UserError(
                "config key 'init_adapter': merge is not possible with finetuning: qlora (merging "
                "into 4-bit weights loses precision); use continue, or finetuning: lora"
            )


class DPORecipe(SFTRecipe):
    """One HS-DPO run: the SFT loop with pairs, reference log-probs and the weighted DPO loss."""

    stage = "dpo"
    liger_loss = False  # per-sequence log-probs (`dpo_loss.sequence_logps`), not a summed loss

    def __init__(self, config: DPOConfig) -> None:
        super().__init__(config)
        self.window = {"pairs": 0, "right": 0, "margin": 0.0}
        self.last_eval_reward_accuracy: float | None = None

    # ------------------------------------------------------------------------------ hooks

    def _prepare_data(self) -> PairData:
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

    def _after_model_loaded(self) -> None:
        """Attach the reference log-probs to every pair: read them back (resume) or compute
        them now with the untouched starting model."""
        from safetensors.torch import save_file

        path = self.run_dir / REFERENCE_FILE
        groups = {"train": self.data.train, "eval": self.data.eval}
        # Rank 0 reads the file (or finds none) and every rank gets its content.
        tensors = self.dist.decide(lambda: self._saved_reference(path, groups))
        if tensors is None:
            t0 = time.perf_counter()
            tensors = {}
            for name, pairs in groups.items():
                tensors[f"{name}_chosen"], tensors[f"{name}_rejected"] = self._policy_logps(pairs)
            if self.dist.is_main:
                tmp = path.with_suffix(".tmp")
                save_file(tensors, str(tmp))
                tmp.rename(path)
            self.timings["reference_seconds"] = time.perf_counter() - t0
        for name, pairs in groups.items():
            chosen, rejected = tensors[f"{name}_chosen"], tensors[f"{name}_rejected"]
            for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist(), strict=True):
                pair.reference_chosen, pair.reference_rejected = c, r

    def _saved_reference(self, path: Path, groups: dict[str, list[PairExample]]) -> dict | None:
        """The reference log-probs saved in the run dir, or None when they are still to compute.

        Raises:
            UserError: the file holds another number of pairs, or it is missing on resume.
        """
        from safetensors.torch import load_file

        if path.is_file():
            saved = load_file(str(path))
            for name, pairs in groups.items():
                if len(saved[f"{name}_chosen"]) != len(pairs):
                    raise UserError(
                        f"{path} holds reference log-probs of {len(saved[f'{name}_chosen'])} "
                        f"{name} pairs, the data now has {len(pairs)}: the pairs changed; use a "
                        "new output_dir"
                    )
            return saved
        if self.resume_from is not None:
            raise UserError(
                f"cannot resume {self.run_dir}: {REFERENCE_FILE} is missing, and the reference "
                "log-probs cannot be recomputed from trained weights; start a new output_dir"
            )
        return None

    def _policy_logps(self, pairs: list[PairExample]) -> tuple[Any, Any]:
        """Summed log-probs of chosen and rejected outputs under the current model (eval mode).

        With several processes each rank computes every world_size-th pair (by length) and
        the zero-filled shares are summed, so every rank returns all values."""
        import torch

        size = self.config.per_device_eval_batch_size
        chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]), reverse=True)
        order = order[self.dist.rank :: self.dist.world_size]
        chunks = [order[start : start + size] for start in range(0, len(order), size)]
        self.model.eval()
        with torch.no_grad():
            for index in self._aligned(chunks):
                if index is None:  # sharded parameters: a pass that adds nothing
                    self._logps([min(pairs, key=len)])
                    continue
                sums, _ = self._logps([pairs[i] for i in index])
                n = len(index)
                chosen[index] = sums[:n].cpu()
                rejected[index] = sums[n:].cpu()
        self.model.train()
        return self.dist.all_sum_tensor(chosen), self.dist.all_sum_tensor(rejected)

    def _logps(self, pairs: list[PairExample]) -> tuple[Any, Any]:
        batch = collate_pairs(pairs, self.config.packing, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._autocast():
            return self.sharding.forward(
                lambda model, b: sequence_logps(model, b, 2 * len(pairs)), batch
            )

    def _loss(self, pairs: list[PairExample]) -> tuple[Any, Any]:
        """Per-pair weighted losses and margins of some pairs under the current model."""
        import torch

        sums, counts = self._logps(pairs)
        n = len(pairs)
        device = sums.device
        ref_c = torch.tensor([p.reference_chosen for p in pairs], device=device)
        ref_r = torch.tensor([p.reference_rejected for p in pairs], device=device)
        weights = torch.tensor([p.weight for p in pairs], device=device)
        c = self.config
        return weighted_dpo_losses(
            sums[:n], sums[n:], ref_c, ref_r, counts[:n], weights, c.beta, c.pref_ftx
        )

    def _pack_budget_tokens(self) -> int:
        return 2 * self.pack_budget  # a pair is two sequences

    def _micro_batches(self, rows: list[Any]) -> list[list[Any]]:
        from reasonguard.train.data import micro_batches, pack

        if not self.config.packing:
            return micro_batches(rows, self.micro_batch)
        budget = 2 * self.pack_budget * self.micro_batch // self.config.per_device_train_batch_size
        return pack(rows, max(1, budget))

    def _train_step(self, rows: list[Any], step: int) -> tuple[float, int, int]:
        """Forward/backward over one optimizer step's pairs; returns (loss, labels, tokens).

        Each micro-batch's summed pair losses are divided by the step's pair count, so the
        accumulated gradient is that of the mean over the step's pairs. With several processes
        each rank runs its share of the pairs, divided by the whole step's pair count.
        """
        import torch

        n_pairs = len(rows)
        n_labels = sum(r.num_labels for r in rows)
        n_tokens = sum(len(r) for r in rows)
        mine = self.dist.shard(rows)
        while True:
            try:
                total, right, margin = 0.0, 0, 0.0
                for chunk in self._aligned(self._micro_batches(mine), backward=True):
                    if chunk is None:  # sharded parameters: a pass that adds nothing
                        self.sharding.backward(self._loss([min(rows, key=len)])[0].sum() * 0.0)
                        continue
                    losses, margins = self._loss(chunk)
                    self.sharding.backward(losses.sum() / n_pairs)
                    total += float(losses.detach().sum())
                    right += int((margins > 0).sum())
                    margin += float(margins.sum())
                if self.dist.enabled:
                    total, right, margin = self.dist.all_sum([total, right, margin])
                    right = round(right)
                loss = total / n_pairs
                if self.config.debug_nan_at_step == step:
                    loss = float("nan")
                self.window["pairs"] += n_pairs
                self.window["right"] += right
                self.window["margin"] += margin
                return loss, n_labels, n_tokens
            except torch.cuda.OutOfMemoryError:
                pass
            self._shrink_micro_batch()

    def _extra_log_fields(self) -> dict[str, float]:
        w = self.window
        if not w["pairs"]:
            return {}
        fields = {
            "reward_accuracy": w["right"] / w["pairs"],
            "reward_margin": w["margin"] / w["pairs"],
        }
        self.window = {"pairs": 0, "right": 0, "margin": 0.0}
        return fields

    def evaluate(self) -> float:
        """The training objective (weighted DPO + SFT term) averaged over the held-out pairs;
        also sets `last_eval_reward_accuracy` (share of pairs whose margin is positive). Each
        rank evaluates its share."""
        import torch

        pairs = self.dist.shard(sorted(self.data.eval, key=len, reverse=True))
        size = self.config.per_device_eval_batch_size
        chunks = [pairs[start : start + size] for start in range(0, len(pairs), size)]
        total, right = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for chunk in self._aligned(chunks):
                if chunk is None:  # sharded parameters: a pass that adds nothing
                    self._loss([min(self.data.eval, key=len)])
                    continue
                losses, margins = self._loss(chunk)
                total += float(losses.sum())
                right += int((margins > 0).sum())
        self.model.train()
        total, right = self.dist.all_sum([total, right])
        n = len(self.data.eval)
        self.last_eval_reward_accuracy = right / n
        self.status["eval_reward_accuracy"] = self.last_eval_reward_accuracy
        return total / n

    def _loss_description(self) -> str:
        c = self.config
        return (
            f"mean over each step's pairs of sample_weight x (-log sigmoid(beta x margin) + "
            f"pref_ftx x chosen mean NLL), beta {c.beta}, pref_ftx {c.pref_ftx}; reference "
            "log-probs precomputed from the starting model"
        )

    def _title(self) -> str:
        c = self.config
        return f"HS-DPO {c.model_name_or_path} ({c.finetuning}, beta {c.beta})"

    # ------------------------------------------------------------------------------ save

    def _merges_adapter_on_save(self) -> bool:
        from reasonguard.models import resolve_model
        from reasonguard.train.modeling import is_adapter_dir

        c = getattr(self, "run_config", None) or self.config
        start = resolve_model(c.model_name_or_path)
        return c.finetuning != "full" and is_adapter_dir(start) and c.init_adapter == "merge"

    def _saved_model(self) -> tuple[Any, str, str]:
        """(model to save, finetuning to record, base model to record)."""
        from reasonguard.infer.hf import base_model_of
        from reasonguard.models import read_guard_config, resolve_model
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

    def _training_info(self, outcome: str, message: str | None) -> dict[str, Any]:
        info = super()._training_info(outcome, message)
        info["dpo"] = {
            "beta": self.config.beta,
            "loss_type": self.config.loss_type,
            "pref_ftx": self.config.pref_ftx,
            "init_adapter": self.config.init_adapter,
            "reference": f"log-probs of the starting model, in {REFERENCE_FILE}",
            "final_eval_reward_accuracy": self.last_eval_reward_accuracy,
        }
        return info


def run_dpo(config: DPOConfig) -> SFTResult:
    """Train, save and record one HS-DPO run (resuming it when `resume: auto` finds a checkpoint).

    Raises:
        UserError: bad pairs or config, a machine that cannot run it, NaN loss, out of memory.
    """
    from reasonguard.train.sft import run_recipe

    return run_recipe(DPORecipe(config))
