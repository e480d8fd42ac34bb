"""Continuous batching for the HF backend: a hand-written decode loop over a shared KV cache.

A static batch runs until its longest row ends, so rows that stop early leave their places idle.
Here the batch is a set of `slots`. Each prompt is prefilled alone (no padding in its prompt
pass), its cache copied into a free slot, right-aligned with the other rows, the columns on its
left masked. Each step feeds every row its last token and reads one new token per row. A row
that emits an end-of-turn token or reaches `max_new_tokens` frees its slot at once, and the next
prompt takes it. Columns that no live row uses are dropped from the left, so the cache stays as
wide as the longest live row. Cache layers write into buffers with spare rows and columns
(`decode_cache.GrowingLayer`), not by concatenating the whole cache on every step as
`DynamicLayer` does.

On a CPU, when rows differ much in length, decode-step attention runs row by row over each row's
own columns (`decode_cache.ragged_attention`): a decode step is bound by memory traffic, and a padded batch
would read every row's cache at the widest row's length. Every prompt starting with the reference prompt's
tokens (the guard instruction, ~100 tokens) reuses that prefix's cache, computed once.

A prompt's prefill and attention are thus computed exactly as when it runs alone; only the
batched matrix products may round differently in the last bits, so greedy output with a batch
equals greedy output one prompt at a time in our tests (tests/test_infer_hf.py,
tests/test_infer_batching.py). Sampling draws from one random generator per continuation, seeded
from `seed`, the prompt's position and the sample number, so samples do not depend on the batch
either.

Example:
    >>> from reasonguard.infer.batching import Sequence, decode
    >>> done = decode(model, [Sequence(0, 0, ids)], slots=8, max_new_tokens=64, stop_ids={2})
    >>> done[0].tokens, done[0].stopped
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from reasonguard.infer.decode_cache import (
    RAGGED,
    RAGGED_ABOVE,
    GrowingLayer,
    cache_of,
    use_ragged_attention,
)

__all__ = ["MIN_PREFIX", "Sequence", "decode", "model_supported", "use_ragged_attention"]

MIN_PREFIX = 16  # shorter shared prefixes are not worth a cache entry


@dataclass
class Sequence:
    """One continuation to generate, and its state.

    Attributes:
        index: the prompt's position in the caller's list.
        sample: the sample number (0 for greedy).
        ids: the prompt's token ids.
        generator: the random generator of a sampled continuation (None: greedy).
        tokens: generated token ids so far (without the end-of-turn token).
        stopped: ended on an end-of-turn token.
        timed_out: cut off by the deadline.
    """

    index: int
    sample: int
    ids: list[int]
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False
    timed_out: bool = False


def model_supported(config: Any) -> bool:
    """Whether the decode loop fits the model: full causal attention in every layer (sliding
    windows would need a cache that forgets, which `GrowingLayer` is not)."""
    types = getattr(config, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return not (
        getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    )


class _Batch:
    """The live rows: their shared cache, attention mask, positions and next input tokens."""

    def __init__(self, model: Any, slots: int) -> None:
        self.model, self.slots = model, slots
        self.layers: list[GrowingLayer] = []
        self.rows: list[Sequence] = []
        self.mask: torch.Tensor | None = None  # [rows, width] 1 = a real token
        self.lengths: list[int] = []  # real tokens in each row's cache
        self.next_ids: list[int] = []  # the token each row feeds at the next step

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def place(self, row: int | None, seq: Sequence, kv: list[tuple[Any, Any]], token: int) -> None:
        """Put a prefilled sequence into `row` (a finished row to reuse) or a new row."""
        n = kv[0][0].shape[2]
        device = kv[0][0].device
        if self.mask is None:
            self.layers = [GrowingLayer(self.slots) for _ in kv]
            for layer, (k, v) in zip(self.layers, kv, strict=True):
                layer.update(k, v)
            self.mask = torch.ones((1, n), dtype=torch.long, device=device)
            self.rows, self.lengths, self.next_ids = [seq], [n], [token]
            return
        if n > self.width:
            grow = n - self.width
            for layer in self.layers:
                layer.pad_left(grow)
            self.mask = torch.cat([self.mask.new_zeros((len(self.rows), grow)), self.mask], 1)
        if row is None:
            row = len(self.rows)
            for layer in self.layers:
                layer.add_row()
            self.mask = torch.cat([self.mask, self.mask.new_zeros((1, self.width))])
            self.rows.append(seq)
            self.lengths.append(n)
            self.next_ids.append(token)
        else:
            self.rows[row], self.lengths[row], self.next_ids[row] = seq, n, token
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.put_row(row, k, v)
        self.mask[row] = 0
        self.mask[row, self.width - n :] = 1

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows: the kept rows past the new end move into the holes below it,
        so only they are copied."""
        if len(rows) == len(self.rows):
            return
        if not rows:
            self.__init__(self.model, self.slots)  # type: ignore[misc]
            return
        assert self.mask is not None
        n = len(rows)
        holes = sorted(set(range(n)) - set(rows))
        movers = [i for i in rows if i >= n]
        for layer in self.layers:
            layer.move_rows(movers, holes, n)
        order = list(range(n))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        self.mask = self.mask[torch.tensor(order, device=self.mask.device)]
        self.rows = [self.rows[i] for i in order]
        self.lengths = [self.lengths[i] for i in order]
        self.next_ids = [self.next_ids[i] for i in order]
        self.trim()

    def trim(self) -> None:
        """Drop leading columns that no row uses."""
        assert self.mask is not None
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first:
            for layer in self.layers:
                layer.drop_left(first)
            self.mask = self.mask[:, first:]

    def step(self) -> torch.Tensor:
        """Feed every row its next token; return the logits of the token after it, [rows, vocab]."""
        assert self.mask is not None
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], 1)
        options: dict[str, Any] = {"attention_mask": self.mask}
        used = sum(self.lengths) + len(self.rows)
        if self.model.config._attn_implementation == RAGGED and (
            len(self.rows) == 1 or len(self.rows) * self.width > RAGGED_ABOVE * used
        ):
            # Each row's columns: the last (its length + this token) of the new width.
            options = {"rg_starts": [self.width - 1 - n for n in self.lengths]}
        out = self.model(
            input_ids=torch.tensor(self.next_ids, device=device)[:, None],
            position_ids=torch.tensor(self.lengths, device=device)[:, None],
            past_key_values=cache_of(self.layers),
            use_cache=True,
            **options,
        )
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1, :].float()


class _Prefixes:
    """The cache of a shared prompt prefix, computed once per length and copied into each prompt
    that starts with it."""

    def __init__(self, model: Any, reference: list[int] | None) -> None:
        self.model, self.reference = model, reference or []
        self.kv: dict[int, list[tuple[Any, Any]]] = {}

    def length(self, ids: list[int]) -> int:
        n = 0
        for a, b in zip(ids, self.reference, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)  # at least one token left to read the next-token logits from
        return n if n >= MIN_PREFIX else 0

    def start(self, n: int, columns: int) -> list[GrowingLayer]:
        """Fresh cache layers with room for `columns` tokens, holding the first `n` reference
        tokens."""
        if n and n not in self.kv:
            layers = [GrowingLayer(columns=n) for _ in range(self.model.config.num_hidden_layers)]
            ids = torch.tensor([self.reference[:n]], device=self.model.device)
            self.model(
                input_ids=ids, past_key_values=cache_of(layers), use_cache=True, logits_to_keep=1
            )
            self.kv[n] = [(layer.keys, layer.values) for layer in layers]
        count = self.model.config.num_hidden_layers
        layers = [GrowingLayer(columns=columns) for _ in range(count)]
        for layer, (k, v) in zip(layers, self.kv.get(n, []), strict=False):
            layer.update(k, v)
        return layers


def _pick(
    logits: torch.Tensor, seqs: list[Sequence], temperature: float, top_p: float
) -> list[int]:
    """The next token of each row: argmax, or a draw from its own generator."""
    if temperature <= 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        # Nucleus: keep the most likely tokens until their mass reaches top_p (at least one).
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cpu = probs.cpu()
    return [
        int(torch.multinomial(cpu[i], 1, generator=seq.generator)) for i, seq in enumerate(seqs)
    ]


def decode(
    model: Any,
    seqs: Iterable[Sequence],
    *,
    slots: int,
    max_new_tokens: int,
    stop_ids: set[int] | frozenset[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    reference: list[int] | None = None,
    deadline: float | None = None,
    on_done: Callable[[list[Sequence]], None] | None = None,
) -> list[Sequence]:
    """Generate every sequence with continuous batching (see the module docstring).

    Sequences sharing a prompt (samples) must come one after another; they are prefilled once
    and enter the batch together.

    Args:
        model: a causal LM in eval mode.
        seqs: the continuations to generate, in the order they may start.
        slots: the most rows decoded together.
        max_new_tokens: the most tokens per continuation.
        stop_ids: end-of-turn token ids (not kept in `tokens`).
        temperature: 0 for greedy, else sampling with each sequence's `generator`.
        top_p: nucleus mass for sampling.
        reference: token ids of a typical prompt; the prefix a prompt shares with it is cached.
        deadline: a `time.monotonic()` time; sequences not done by then stop, `timed_out`.
        on_done: called with the sequences that finished at each step (any order).

    Returns:
        The sequences, finished, in the order given.
    """
    order = list(seqs)
    groups: deque[list[Sequence]] = deque()
    for seq in order:
        if groups and groups[-1][0].index == seq.index:
            groups[-1].append(seq)
        else:
            groups.append([seq])
    if any(len(g) > slots for g in groups):
        raise ValueError("more samples per prompt than batch slots")
    prefixes = _Prefixes(model, reference)
    batch = _Batch(model, slots)
    finished: list[int] = []  # rows of `batch` that are done and may be reused

    def emit(done: list[Sequence]) -> None:
        if done and on_done is not None:
            on_done(done)

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    with torch.inference_mode():
        while groups or len(finished) < len(batch.rows):
            if out_of_time():
                live = [s for i, s in enumerate(batch.rows) if i not in finished]
                rest = live + [s for g in groups for s in g]
                for seq in rest:
                    seq.timed_out = True
                groups.clear()
                emit(rest)
                break
            done: list[Sequence] = []
            # Admit prompts while they fit: into finished rows first, then new rows.
            while groups and len(groups[0]) <= len(finished) + slots - len(batch.rows):
                if out_of_time():
                    break
                group = groups.popleft()
                kv, logits = _prefill(model, prefixes, group[0].ids)
                tokens = _pick(logits.expand(len(group), -1), group, temperature, top_p)
                for seq, token in zip(group, tokens, strict=True):
                    if _advance(seq, token, max_new_tokens, stop_ids):
                        done.append(seq)
                    else:
                        batch.place(finished.pop(0) if finished else None, seq, kv, token)
            if finished:
                batch.keep([i for i in range(len(batch.rows)) if i not in finished])
                finished = []
            if batch.rows:
                logits = batch.step()
                tokens = _pick(logits, batch.rows, temperature, top_p)
                for i, (seq, token) in enumerate(zip(batch.rows, tokens, strict=True)):
                    if _advance(seq, token, max_new_tokens, stop_ids):
                        done.append(seq)
                        finished.append(i)
                    else:
                        batch.next_ids[i] = token
                if finished and not groups:
                    batch.keep([i for i in range(len(batch.rows)) if i not in finished])
                    finished = []
                elif batch.mask is not None:
                    batch.trim()
            emit(done)
    return order


def _prefill(
    model: Any, prefixes: _Prefixes, ids: list[int]
) -> tuple[list[tuple[Any, Any]], torch.Tensor]:
    """One prompt alone: its cache per layer ([1, heads, len, dim]) and next-token logits."""
    n = prefixes.length(ids)
    layers = prefixes.start(n, len(ids))
    out = model(
        input_ids=torch.tensor([ids[n:]], device=model.device),
        position_ids=torch.arange(n, len(ids), device=model.device)[None],
        past_key_values=cache_of(layers),
        use_cache=True,
        logits_to_keep=1,
    )
    return [(layer.keys, layer.values) for layer in layers], out.logits[:, -1, :].float()


def _advance(seq: Sequence, token: int, max_new_tokens: int, stop_ids: Any) -> bool:
    """Record a new token; return whether the sequence is finished."""
    if token in stop_ids:
        seq.stopped = True
        return True
    seq.tokens.append(token)
    return len(seq.tokens) >= max_new_tokens
