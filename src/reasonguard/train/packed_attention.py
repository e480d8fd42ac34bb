"""Attention for packed training rows: each sample attends only to itself, computed per sample.

A packed row holds several samples back to back, with `position_ids` restarting at 0 for each
(`train.data.collate_packed`). Transformers' SDPA path turns that into a block-diagonal causal
mask over the whole row (built from the `position_ids` restarts): correct, but it computes the attention of every token
against every other token of the row (a 2048-token pack of five 400-token samples does ~5x the
attention work of the samples alone) and, with an explicit mask, SDPA cannot use its fused
causal kernels, so it materialises `heads x row x row` scores per layer. Here the row is cut at
the position restarts and each sample runs causal SDPA on its own tokens (what flash-attention's
variable-length kernel does on a GPU): the same result, the attention cost of unpacked samples.

Anything that is not a single packed row without a KV cache (generation, padded batches,
evaluation with an attention mask) goes to transformers' SDPA unchanged.

Example:
    >>> from reasonguard.train.packed_attention import use_packed_attention
    >>> use_packed_attention(model)  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Any

PACKED = "reasonguard_packed"  # the attention implementation name registered with transformers


def segment_bounds(position_ids: Any) -> list[tuple[int, int]]:
    """(start, end) of each sample in a packed row, from the positions restarting at 0."""
    import torch

    starts = torch.nonzero(position_ids == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*starts[1:], int(position_ids.shape[-1])]
    return list(zip(starts, ends, strict=True))


def packed_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: Any = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Per-sample causal SDPA over a packed row (see the module docstring); else plain SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (
        position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
    )
    if not packed:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            position_ids=position_ids,
            **kwargs,
        )
    gqa = query.shape[1] != key.shape[1]
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for start, end in segment_bounds(position_ids[0])
    ]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def use_packed_attention(model: Any) -> bool:
    """Switch a model using SDPA to per-sample attention for packed rows; return whether it is
    on (models configured with eager or flash attention keep theirs)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    if config._attn_implementation not in ("sdpa", PACKED):
        return False
    AttentionInterface.register(PACKED, packed_attention_forward)
    AttentionMaskInterface.register(PACKED, sdpa_mask)
    config._attn_implementation = PACKED
    return True
