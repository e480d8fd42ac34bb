"""Per-token log-probs of the labelled positions, without a full labels x vocabulary softmax.

DPO needs log p(target) at every labelled position. The direct way, `log_softmax(head(h))`,
holds fp32 [n, vocab] logits, their log-softmax and, in backward, their gradients at once: for
one 4,096-token pack on Llama 3's 128,256-token vocabulary that is about 2.1 GB per tensor. Here
the positions are cut into chunks; each chunk's log-prob is its target's logit minus the
logsumexp over the vocabulary, and each chunk runs under non-reentrant activation checkpointing
(`torch.utils.checkpoint`), so the backward recomputes one chunk's logits at a time instead of
keeping every chunk's alive. Peak memory is then a few [chunk, vocab] tensors.

`chunked_token_logps(hidden, weight, bias, targets)` takes the head's weight itself: it runs
inside the LM head module's forward (`train.labelled_head.run_head`), where an engine that
gathers parameters in the module's forward hooks (DeepSpeed ZeRO-3, an FSDP unit) has gathered
it.

On CUDA, `liger_token_logps` uses liger-kernel's fused linear cross-entropy with
`reduction="none"` (its per-token loss is -log p(target)). Its gradient for a per-token upstream
gradient, which DPO's loss gives, is right only from liger-kernel 0.8.2 on
(https://github.com/linkedin/Liger-Kernel/pull/1298); `liger_problem` says why it cannot be used
(old version, no CUDA, a sharded or wrapped head), and the caller then uses the chunked
computation.

Example:
    >>> import torch
    >>> head = torch.nn.Linear(4, 10, bias=False)
    >>> hidden, targets = torch.randn(5, 4), torch.tensor([1, 2, 3, 4, 5])
    >>> logps = chunked_token_logps(hidden, head.weight, head.bias, targets, chunk_size=2)
    >>> full = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None])[:, 0]
    >>> bool(torch.allclose(logps, full, atol=1e-6))
    True
"""

from __future__ import annotations

import importlib.util
from typing import Any

# Positions per chunk: 512 x 128,256 fp32 logits are 263 MB, and a 512-row matmul still keeps
# a GPU busy.
DEFAULT_CHUNK_SIZE = 512
# The first liger-kernel release whose reduction="none" backward applies per-token gradients.
LIGER_MIN_VERSION = "0.8.2"


def chunked_token_logps(
    hidden: Any, weight: Any, bias: Any, targets: Any, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Any:
    """log p(target) at each position for the head `hidden @ weight.T + bias`, in chunks.

    Args:
        hidden: [n, hidden]; weight: [vocab, hidden]; bias: [vocab] or None; targets: [n].
        chunk_size: positions per chunk.

    Returns:
        The log-probs, [n] fp32, differentiable w.r.t. `hidden`, `weight` and `bias`.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    def chunk_logps(chunk: Any, chunk_targets: Any) -> Any:
        logits = F.linear(chunk, weight, bias).float()
        picked = logits.gather(1, chunk_targets[:, None])[:, 0]
        return picked - torch.logsumexp(logits, dim=-1)

    pieces = []
    # At least one chunk, empty when there is no position, so the result is always connected
    # to the head's weight.
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        chunk = hidden[start : start + chunk_size]
        chunk_targets = targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            # Keeps only the chunk's input; its logits are recomputed in backward.
            pieces.append(checkpoint(chunk_logps, chunk, chunk_targets, use_reentrant=False))
        else:
            pieces.append(chunk_logps(chunk, chunk_targets))
    return torch.cat(pieces)


def liger_token_logps(hidden: Any, weight: Any, bias: Any, targets: Any) -> Any:
    """log p(target) at each position with liger-kernel's fused linear cross-entropy (CUDA,
    liger-kernel >= 0.8.2; see `liger_problem`). Same arguments as `chunked_token_logps`."""
    import torch
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(weight.dtype)
    # All positions carry a label, so no ignore_index is hit; with no label smoothing or
    # z-loss the per-token loss is exactly -log p(target).
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, targets, bias)
    if isinstance(loss, tuple):
        loss = loss[0]
    return -loss.float()


def liger_problem(hidden: Any, head: Any) -> str | None:
    """Why liger-kernel's fused kernel cannot compute these log-probs (None when it can)."""
    import torch

    if type(head) is not torch.nn.Linear:
        # peft's LoRA layer, an FSDP unit: the effective weight is not `head.weight` itself.
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        return f"the LM head is a {kind}, not a plain torch.nn.Linear"
    if hasattr(head.weight, "ds_id") or head.weight.numel() == 0:
        return "the LM head's weight is partitioned (DeepSpeed ZeRO-3)"
    if hidden.device.type != "cuda":
        return "liger-kernel is a CUDA (Triton) kernel and the hidden states are not on CUDA"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    version = _liger_version()
    if version is None:
        return "cannot tell the installed liger-kernel's version"
    if version < _version(LIGER_MIN_VERSION):
        return (
            f"liger-kernel {version} computes wrong gradients for per-token losses "
            f"(reduction='none'); {LIGER_MIN_VERSION} fixed it"
        )
    return None


# ------------------------------------------------------------------------------ internals


def _liger_version() -> Any:
    from importlib import metadata

    try:
        return _version(metadata.version("liger-kernel"))
    except metadata.PackageNotFoundError:  # e.g. only the nightly distribution
        try:
            return _version(metadata.version("liger-kernel-nightly"))
        except metadata.PackageNotFoundError:
            return None


def _version(text: str) -> Any:
    from packaging.version import Version

    return Version(text)
