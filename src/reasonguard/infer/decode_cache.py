"""The KV cache and attention of the HF backend's decode loop (`infer.batching`).

`GrowingLayer` keeps one layer's keys and values in buffers with spare rows and columns, so a
decode step writes one column in place and a row joining the batch takes a spare row, where
transformers' `DynamicLayer` concatenates the whole cache on every step. `ragged_attention` runs
a decode step's attention row by row over each row's own columns: on a CPU a decode step is bound
by memory traffic, and a padded batch would read every row's cache at the widest row's length.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

_SPARE = 256  # extra columns a cache buffer gets when it grows
RAGGED = "reasonguard_ragged"  # the attention implementation of `use_ragged_attention`
# Row-by-row attention costs a kernel call per row and layer; it pays when the padded batch
# would read this many times the columns the rows really have (measured on SmolLM2, CPU: at
# equal lengths the padded call is 15% faster, at 1.7x padding 10% slower).
RAGGED_ABOVE = 1.35


class GrowingLayer(DynamicLayer):
    """One layer's keys and values in buffers with spare rows and columns: `keys` and `values`
    are views of rows `[0, rows)` and columns `[start, end)`. Appending a token writes one column
    in place; a row joining the batch takes a spare row."""

    def __init__(self, row_capacity: int = 1, columns: int = 0) -> None:
        super().__init__()
        self.row_capacity = row_capacity
        self.columns = columns  # the room the first update allocates (0: what it needs + spare)
        self.buffers: list[torch.Tensor] = []  # keys, values: [rows, heads, columns, head dim]
        self.rows = self.start = self.end = 0

    def _views(self) -> None:
        k, v = self.buffers
        self.keys = k[: self.rows, :, self.start : self.end]
        self.values = v[: self.rows, :, self.start : self.end]

    def _reallocate(self, rows: int, columns: int, left: int = 0) -> None:
        """Move the used region into new `rows` x `columns` buffers, `left` empty columns first."""
        width = self.end - self.start
        moved = []
        for old in self.buffers:
            # Only the pad columns on the left are ever read before being written (masked, but
            # they must hold finite numbers): those need zeros.
            shape = (rows, old.shape[1], columns, old.shape[3])
            new = old.new_zeros(shape) if left else old.new_empty(shape)
            new[: self.rows, :, left : left + width] = old[: self.rows, :, self.start : self.end]
            moved.append(new)
        self.buffers, self.start, self.end = moved, 0, left + width

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, n = key_states.shape[0], key_states.shape[2]
        if not self.buffers:
            self.dtype, self.device = key_states.dtype, key_states.device
            shape = list(key_states.shape)
            shape[0], shape[2] = max(rows, self.row_capacity), max(n, self.columns or n + _SPARE)
            self.buffers = [key_states.new_empty(shape), value_states.new_empty(shape)]
            self.rows, self.is_initialized = rows, True
        elif self.end + n > self.buffers[0].shape[2]:
            self._reallocate(self.buffers[0].shape[0], self.end - self.start + n + _SPARE)
        for buf, states in zip(self.buffers, (key_states, value_states), strict=True):
            buf[:rows, :, self.end : self.end + n] = states
        self.end += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    # Batch edits (the decode loop keeps its mask in step with these).

    def pad_left(self, columns: int) -> None:
        """Add `columns` empty columns on the left of every row."""
        if self.start >= columns:
            self.start -= columns
            for buf in self.buffers:
                buf[: self.rows, :, self.start : self.start + columns] = 0
        else:
            width = self.end - self.start
            self._reallocate(self.buffers[0].shape[0], columns + width + _SPARE, left=columns)
        self._views()

    def add_row(self) -> None:
        """One more row at the end (its contents come from `put_row`)."""
        if self.rows == self.buffers[0].shape[0]:
            self._reallocate(2 * self.rows, self.buffers[0].shape[2])
        self.rows += 1
        self._views()

    def put_row(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one sequence's cache (`[1, heads, n, dim]`, n <= width) right-aligned into a row;
        the columns on its left are zeroed (masked anyway; zeros keep stale values out)."""
        split = self.end - keys.shape[2]
        for buf, states in zip(self.buffers, (keys, values), strict=True):
            buf[row, :, self.start : split] = 0
            buf[row, :, split : self.end] = states[0]

    def move_rows(self, sources: list[int], targets: list[int], rows: int) -> None:
        """Copy rows `sources` onto rows `targets`, then keep the first `rows` rows."""
        if sources:
            device = self.buffers[0].device
            src, dst = torch.tensor(sources, device=device), torch.tensor(targets, device=device)
            for buf in self.buffers:
                buf[dst, :, self.start : self.end] = buf[src, :, self.start : self.end]
        self.rows = rows
        self._views()

    def drop_left(self, columns: int) -> None:
        self.start += columns
        self._views()


def ragged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    rg_starts: list[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for a decode step, row by row over each row's own columns (`rg_starts[r]` on);
    anything else goes to transformers' SDPA attention.

    A padded batch would read every row's keys and values over the widest row's length; on a
    CPU that memory traffic, not arithmetic, is what a decode step costs. Row by row, a row
    reads only its own cache, and computes exactly what it computes alone.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if rg_starts is None or query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    out = query.new_empty((rows, heads, 1, dim))
    for r, start in enumerate(rg_starts):
        # The query heads sharing a key/value head are consecutive: fold them into the query
        # length ([1, kv heads, heads per kv head, dim]) so no key is copied per head.
        q = query[r : r + 1].reshape(1, kv_heads, heads // kv_heads, dim)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, key[r : r + 1, :, start:], value[r : r + 1, :, start:], scale=scaling
        )
        out[r] = o.reshape(heads, 1, dim)
    return out.transpose(1, 2).contiguous(), None


def use_ragged_attention(model: Any) -> bool:
    """Switch a model using SDPA attention to `ragged_attention` (for CPU decoding); return
    whether it is on. Prompt passes and scoring still run SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation not in ("sdpa", RAGGED):
        return False
    AttentionInterface.register(RAGGED, ragged_attention)
    AttentionMaskInterface.register(RAGGED, sdpa_mask)
    model.config._attn_implementation = RAGGED
    return True


def cache_of(layers: list[GrowingLayer]) -> DynamicCache:
    """A `DynamicCache` over the given layers (what a model's forward takes)."""
    cache = DynamicCache()
    cache.layers = layers  # type: ignore[assignment]
    return cache
