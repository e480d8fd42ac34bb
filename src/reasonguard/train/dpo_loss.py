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
    >>> from reasonguard.train.dpo_loss import weighted_dpo_losses
    >>> zero = torch.zeros(1)
    >>> losses, margins = weighted_dpo_losses(zero, zero, zero, zero, torch.ones(1),
    ...     torch.ones(1), beta=0.01, ftx=0.0)
    >>> round(float(losses[0]), 4)  # -log sigmoid(0) = log 2
    0.6931
"""

from __future__ import annotations

from typing import Any


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


def sequence_logps(model: Any, batch: dict[str, Any], num_sequences: int) -> tuple[Any, Any]:
    """Summed log-probs of the labelled tokens of each sequence in a (packed or padded) batch.

    Like `labelled_loss_sum`, the LM head runs only at labelled positions.

    Args:
        model: a causal LM (plain or peft-wrapped).
        batch: `input_ids`, `labels`, optional `attention_mask` / `position_ids`, and
            `sequence_ids`: for each position, the index of the sequence it belongs to.
        num_sequences: how many sequences the batch holds.

    Returns:
        (log-prob sums [num_sequences] in fp32, labelled token counts [num_sequences]).
    """
    import torch

    from reasonguard.train.modeling import labelled_hidden

    inputs, targets, keep = labelled_hidden(model, batch)
    logits = model.get_output_embeddings()(inputs).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    owners = batch["sequence_ids"][:, 1:][keep]
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=token_logps.device)
    counts = torch.zeros(num_sequences, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, owners, token_logps)
    counts = counts.index_add(0, owners, torch.ones_like(token_logps))
    return sums, counts
