"""The weighted DPO loss of hard-sample DPO (GuardReasoner stage 2), and sequence log-probs.

TRL's `DPOTrainer` has no per-pair weight, and the GuardReasoner release patches LLaMA-Factory to
get one; here the loss is a few lines of our own, so the maths is visible and tested.

For pair i with prompt x, chosen y+ and rejected y-, policy pi and frozen reference pi_ref
(the model before stage 2), with log p summed over each output's tokens:

    margin_i = beta * ( [log pi(y+|x) - log pi_ref(y+|x)] - [log pi(y-|x) - log pi_ref(y-|x)] )
    dpo_i    = -log sigmoid(margin_i)                        (the "sigmoid" loss of DPO)
    sft_i    = -log pi(y+|x) / |y+|                          (mean NLL per chosen output token)
    loss_i   = w_i * (dpo_i + ftx * sft_i)

and the loss of an optimizer step is the mean of `loss_i` over its pairs (a sum over the step's
micro-batches divided by the step's pair count, so the cut into micro-batches does not matter).
The sample weight multiplies the whole pair term: a pair of weight 0 contributes no gradient.
`ftx` is LLaMA-Factory's `pref_ftx` (2.0 in the paper): the SFT term keeps the policy close to
the right reasoning while DPO pushes the wrong one down.

Example:
    >>> import torch
    >>> from reasonguard.train.dpo.loss import weighted_dpo_losses
    >>> zero = torch.zeros(1)
    >>> losses, margins = weighted_dpo_losses(zero, zero, zero, zero, torch.ones(1),
    ...     torch.ones(1), beta=0.01, ftx=0.0)
    >>> round(float(losses[0]), 4)  # -log sigmoid(0) = log 2
    0.6931
"""

from __future__ import annotations

from typing import Any

from reasonguard.train.dpo.logprobs import DEFAULT_CHUNK_SIZE


def weighted_dpo_losses(
    policy_chosen: Any,
    policy_rejected: Any,
    reference_chosen: Any,
    reference_rejected: Any,
    chosen_tokens: Any,
    weights: Any,
    beta: float,
    ftx: float,
) -> tuple[Any, Any]:
    """Per-pair weighted losses and reward margins (see the module docstring).

    Args:
        policy_chosen, policy_rejected: summed log-probs of each output under the policy, [n].
        reference_chosen, reference_rejected: the same under the reference model, [n].
        chosen_tokens: the number of labelled tokens of each chosen output, [n].
        weights: the pairs' sample weights, [n].
        beta: DPO temperature.
        ftx: weight of the SFT term on the chosen output.

    Returns:
        (losses [n], margins [n]); `margins` = beta * (chosen log-ratio - rejected log-ratio),
        detached: positive where the policy already prefers the chosen output (reward accuracy).
    """
    import torch.nn.functional as F

    margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    dpo = -F.logsigmoid(margins)
    sft = -policy_chosen / chosen_tokens.clamp(min=1)
    return weights * (dpo + ftx * sft), margins.detach()


def sequence_logps(
    model: Any,
    batch: dict[str, Any],
    num_sequences: int,
    head: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_liger: bool = False,
) -> tuple[Any, Any]:
    """Summed log-probs of the labelled tokens of each sequence in a (packed or padded) batch.

    The model runs its own forward (so engines see a normal call) with the LM head applied only
    at labelled positions and replaced, for that call, by a chunked log-prob computation
    (`train.labelled_head`, `train.dpo.logprobs`): no labels x vocabulary log-softmax is held at
    once, in forward or backward.

    Args:
        model: a causal LM (plain, peft-wrapped or wrapped by a training engine).
        batch: `input_ids`, `labels`, optional `attention_mask` / `position_ids`, and
            `sequence_ids`: for each position, the index of the sequence it belongs to.
        num_sequences: how many sequences the batch holds.
        head: the model's LM head module (default: `model.get_output_embeddings()`).
        chunk_size: labelled positions per chunk of the LM head.
        use_liger: use liger-kernel's fused kernel where it can run (CUDA, liger-kernel >=
            0.8.2, a plain head; see `train.dpo.logprobs.liger_problem`), else the chunked path.

    Returns:
        (log-prob sums [num_sequences] in fp32, labelled token counts [num_sequences]).
    """
    import torch

    from reasonguard.train.dpo.logprobs import chunked_token_logps, liger_problem, liger_token_logps
    from reasonguard.train.labelled_head import (
        head_logits,
        is_plain_linear,
        labelled_positions,
        run_head,
    )

    head = model.get_output_embeddings() if head is None else head
    positions, mask, targets = labelled_positions(batch["labels"].cpu())
    owners = batch["sequence_ids"][:, 1:].cpu()[:, positions][mask]
    device = batch["input_ids"].device
    mask, targets = mask.to(device), targets.to(device)

    def logps_head(module: Any, hidden: Any) -> Any:
        h = hidden[mask]
        if not is_plain_linear(module):  # a LoRA-wrapped head: its own forward, whole
            logits = head_logits(module, h).float()
            return torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        if use_liger and liger_problem(h, module) is None:
            return liger_token_logps(h, module.weight, module.bias, targets)
        return chunked_token_logps(h, module.weight, module.bias, targets, chunk_size)

    inputs = {**batch, "positions": positions.to(device)}
    token_logps = run_head(model, head, inputs, logps_head)
    owners = owners.to(token_logps.device)
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=token_logps.device)
    counts = torch.zeros(num_sequences, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, owners, token_logps)
    counts = counts.index_add(0, owners, torch.ones_like(token_logps))
    return sums, counts
