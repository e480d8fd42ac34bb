"""The LM head at labelled positions only, computed inside the model's own forward.

A guard's training rows are mostly prompt (the 490-character instruction, the user text) and
only the output is labelled, so the LM head (vocabulary x hidden: the largest matmul of a small
model) and the softmax are wasted on most positions. Two standard hooks of a transformers causal
LM make the head run only where labels are, without leaving the model's forward:

- `logits_to_keep` (a tensor of positions) makes the model apply its head to the hidden states of
  those positions only;
- for the duration of one call, the head module's `forward` is replaced by the loss we need
  (`cross_entropy_sum`, liger-kernel's fused linear cross-entropy on CUDA, or DPO's chunked
  per-token log-probs in `train.dpo.loss`).

Staying inside `model(...)` is what makes this correct under every engine: DDP sees a normal
forward, and FSDP / DeepSpeed ZeRO-3 gather the head's weight in the head module's own forward
hooks, around our replacement (a loss that read `head.weight` outside the module's forward would
see a ZeRO-3 partition stub). What the head returns is what the model returns as `logits`.

Example:
    >>> import torch
    >>> labels = torch.tensor([[-100, -100, 5, 6]])
    >>> labelled_positions(labels)[0].tolist()  # positions 1 and 2 predict tokens 5 and 6
    [1, 2]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from reasonguard.data.tokenize import IGNORE_INDEX

HeadFn = Callable[[Any, Any], Any]  # (head module, hidden [rows, kept, hidden]) -> anything


def labelled_positions(labels: Any) -> tuple[Any, Any, Any]:
    """Where the head must run for a batch's labels (computed on the host, before the batch
    moves to the device, so no device-to-host sync happens per step).

    Args:
        labels: [rows, length] token labels, IGNORE_INDEX where there is none.

    Returns:
        (positions [kept]: every position that predicts a label in some row; mask [rows, kept]:
        which of them predict a label in each row; targets [n]: those labels, row-major).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    positions = keep.any(dim=0).nonzero()[:, 0]
    mask = keep[:, positions]
    return positions, mask, targets[:, positions][mask]


@contextmanager
def head_replaced(head: Any, fn: HeadFn) -> Iterator[None]:
    """Within the block, calling `head(hidden)` returns `fn(head, hidden)`; the module's hooks
    (ZeRO-3 / FSDP parameter gathering) still run around it."""
    head.forward = lambda hidden: fn(head, hidden)
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def run_head(model: Any, head: Any, batch: dict[str, Any], fn: HeadFn) -> Any:
    """Run `model` (plain, peft-wrapped or wrapped by an engine) on `batch` with its head applied
    only at `batch["positions"]` and replaced by `fn`; returns what `fn` returned."""
    with head_replaced(head, fn):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            logits_to_keep=batch["positions"],
            use_cache=False,
        )
    return out.logits


def _labelled(hidden: Any, mask: Any) -> Any:
    return hidden[mask]


def is_plain_linear(head: Any) -> bool:
    """A head whose logits are `hidden @ head.weight.T + head.bias` (not a LoRA-wrapped layer,
    whose `weight` is only its base layer's)."""
    import torch

    return type(head) is torch.nn.Linear


def head_logits(head: Any, hidden: Any) -> Any:
    """The head's own computation (its class's forward: a LoRA layer adds its adapter)."""
    return type(head).forward(head, hidden)


def cross_entropy_sum(mask: Any, targets: Any) -> HeadFn:
    """A head that returns the summed next-token cross-entropy at the labelled positions (fp32)."""
    import torch.nn.functional as F

    def fn(head: Any, hidden: Any) -> Any:
        logits = head_logits(head, _labelled(hidden, mask))
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    return fn


def liger_cross_entropy_sum(mask: Any, targets: Any) -> HeadFn:
    """`cross_entropy_sum` with liger-kernel's fused linear cross-entropy (CUDA): the head and
    the loss run together in chunks, so the labels x vocabulary logits are never all held.

    Not Trainer's `use_liger_kernel`: in transformers 5.19 it calls `apply_liger_kernel`, which
    swaps the model's forward for liger's own, computing a loss from `labels` there; that
    forward would skip this head replacement, where the loss is summed for the engine to divide
    by the whole step's label count.
    """
    import torch
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

    def fn(head: Any, hidden: Any) -> Any:
        inputs = _labelled(hidden, mask)
        if not is_plain_linear(head):  # a LoRA-wrapped head: its own forward, then the loss
            import torch.nn.functional as F

            return F.cross_entropy(head_logits(head, inputs).float(), targets, reduction="sum")
        if inputs.dtype != head.weight.dtype and not torch.is_autocast_enabled(inputs.device.type):
            inputs = inputs.to(head.weight.dtype)
        loss = loss_fn(head.weight, inputs, targets, head.bias)
        return (loss[0] if isinstance(loss, tuple) else loss).float()

    return fn
