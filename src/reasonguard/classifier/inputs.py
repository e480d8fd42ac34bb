"""How an item becomes encoder input: one sequence per item, padded into batches.

The request alone for an item without a response; the request and the response as a text pair
otherwise (the tokenizer's own pair layout: `[CLS] request [SEP] response [SEP]` for BERT, with
its segment ids), cut to `max_length` tokens, the longer text first. Training (`train.py`) and
the classifier guard (`infer/classifier.py`) encode through this one function, so a model is
served exactly as it was trained.

Example:
    >>> from reasonguard.classifier.inputs import encode_texts
    >>> rows = encode_texts(tokenizer, [("Hi", None), ("Hi", "Hello!")], max_length=32)
    >>> [len(r) for r in rows]  # doctest: +SKIP
    [3, 6]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reasonguard.format import TASKS

ENCODE_CHUNK = 512  # items per tokenizer call


@dataclass
class Encoded:
    """One tokenized item and its targets (int32 / float32 arrays; NaN = no label).

    Attributes:
        index: the item's position in what was encoded (for eval rows and messages).
        truncated: the item was cut to max_length.
    """

    input_ids: Any
    token_type_ids: Any | None
    targets: Any
    index: int
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_labels(self) -> int:
        """Tasks the loss is computed on."""
        import numpy as np

        return int((~np.isnan(self.targets)).sum())


def encode_texts(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str | None]],
    max_length: int,
    targets: Sequence[dict[str, float | None]] | None = None,
    count_truncated: bool = False,
) -> list[Encoded]:
    """Tokenize (request, response or None) pairs, each as one sequence (module docstring).

    Args:
        targets: per pair, P(positive) per task or None (the rows' `targets`; NaN without).
        count_truncated: tokenize uncut too, to mark the rows `max_length` cut (training's
            statistics; serving skips the second pass).
    """
    import numpy as np

    out: list[Encoded | None] = [None] * len(pairs)
    for with_response in (False, True):
        positions = [i for i, (_, r) in enumerate(pairs) if (r is not None) == with_response]
        for start in range(0, len(positions), ENCODE_CHUNK):
            chunk = positions[start : start + ENCODE_CHUNK]
            firsts = [pairs[i][0] for i in chunk]
            seconds = [pairs[i][1] for i in chunk] if with_response else None
            full = tokenizer(firsts, seconds)["input_ids"] if count_truncated else None
            cut = tokenizer(firsts, seconds, truncation="longest_first", max_length=max_length)
            types = cut.get("token_type_ids")
            for k, i in enumerate(chunk):
                wanted = targets[i] if targets is not None else {}
                out[i] = Encoded(
                    input_ids=np.asarray(cut["input_ids"][k], dtype=np.int32),
                    token_type_ids=None if types is None else np.asarray(types[k], dtype=np.int32),
                    targets=np.asarray(
                        [np.nan if wanted.get(t) is None else wanted[t] for t in TASKS],
                        dtype=np.float32,
                    ),
                    index=i,
                    truncated=full is not None and len(full[k]) > max_length,
                )
    return [e for e in out if e is not None]


def collate(rows: Sequence[Encoded], pad_token_id: int) -> dict[str, Any]:
    """Right-pad rows into `input_ids`, `attention_mask` (and `token_type_ids`) tensors, with
    `targets` (rows x tasks, 0 where unlabelled) and `label_mask` (True where labelled)."""
    import numpy as np
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    with_types = rows[0].token_type_ids is not None
    token_type_ids = torch.zeros((len(rows), width), dtype=torch.long) if with_types else None
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, :n] = torch.from_numpy(row.input_ids.astype("int64"))
        attention_mask[i, :n] = 1
        if token_type_ids is not None:
            token_type_ids[i, :n] = torch.from_numpy(row.token_type_ids.astype("int64"))
    targets = torch.from_numpy(np.stack([r.targets for r in rows]))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": torch.nan_to_num(targets, nan=0.0),
        "label_mask": ~torch.isnan(targets),
    }
    if token_type_ids is not None:
        batch["token_type_ids"] = token_type_ids
    return batch
