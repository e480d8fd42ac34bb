"""Which labelled items calibrate the cascade and which are held out to report it, and how an
item is recognised later.

`calibrate` chooses the bands on one part of the dev set and reports the cascade on the other,
so the reported F1 drop and escalation rate are not measured on the items that chose them.
The split is a seeded stratified split: items are grouped by their true labels (one stratum per
combination of the three tasks' labels), each stratum gives its share of held-out items
(largest-remainder rounding, so the total is `round(share * n)`), and within a stratum the
seed decides which. Identical items (same prompt and response) stay together on one side, so a
duplicate cannot leak a calibration item into the held-out part.

An item is known by `item_hash`: the first 16 hex digits of the SHA-256 of the JSON list
`[prompt, response]`. `cascade.json` records the hashes of both parts, and `generate`/`evaluate
--mode cascade` count how many of the items they score were calibrated on.

Our own small code: scikit-learn's `StratifiedShuffleSplit` does the same allocation but is not
a dependency here, and it knows nothing of duplicate items.

Example:
    >>> from reasonguard.cascade.holdout import item_hash, stratified_split
    >>> stratified_split(["a"] * 6 + ["b"] * 4, 0.3, seed=0, keys=[str(i) for i in range(10)])
    ([0, 2, 3, 5, 7, 8, 9], [1, 4, 6])
    >>> item_hash("How do I bake bread?", None)
    'e295063283f6949d'
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Hashable, Sequence

from reasonguard.errors import UserError
from reasonguard.format import split_input

DEFAULT_HELD_OUT_SHARE = 0.3
DEFAULT_SEED = 0
METHOD = "seeded stratified split"
HASH_METHOD = "sha256 of the JSON [prompt, response], first 16 hex digits"


def item_hash(prompt: str, response: str | None) -> str:
    """The identity of one item as the guard sees it (its prompt and response)."""
    text = json.dumps([prompt, response], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def stratified_split(
    strata: Sequence[Hashable], share: float, seed: int, keys: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Split item positions into (calibration, held-out), both sorted.

    Args:
        strata: each item's stratum (its true labels).
        share: the held-out share of the distinct items, strictly between 0 and 1.
        seed: decides which items of a stratum are held out.
        keys: each item's identity (`item_hash`); items with one key go to one side, in the
            stratum of the first of them.

    Raises:
        UserError: a share outside (0, 1), or fewer than two distinct items.
    """
    if not 0 < share < 1:
        raise UserError(f"--held-out-share must be between 0 and 1 (exclusive), got {share}")
    groups: dict[str, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    if len(groups) < 2:
        raise UserError(
            f"the dev set has {len(groups)} distinct item(s): at least 2 are needed to choose "
            "the bands on some and report them on others"
        )
    by_stratum: dict[Hashable, list[str]] = {}
    for key, positions in groups.items():
        by_stratum.setdefault(strata[positions[0]], []).append(key)
    total = len(groups)
    wanted = min(total - 1, max(1, round(share * total)))
    rng = random.Random(seed)
    # Strata in a seeded order (ties of the remainders below go by it), keys sorted first so the
    # split does not depend on the order the file lists the items in.
    order = sorted(by_stratum, key=repr)
    rng.shuffle(order)
    exact = {s: len(by_stratum[s]) * wanted / total for s in order}
    quota = {s: int(exact[s]) for s in order}
    for s in sorted(order, key=lambda s: exact[s] - quota[s], reverse=True)[
        : wanted - sum(quota.values())
    ]:
        quota[s] += 1
    held: list[int] = []
    for s in order:
        members = sorted(by_stratum[s])
        rng.shuffle(members)
        for key in members[: quota[s]]:
            held.extend(groups[key])
    held_set = set(held)
    return [p for p in range(len(keys)) if p not in held_set], sorted(held)


def calibrated_on(record: dict, inputs: Sequence[str]) -> int | None:
    """How many of `inputs` (records' `input` texts) the cascade of `record` (a `cascade.json`)
    chose its bands on, or None when the record does not list its items."""
    hashes = (record.get("item_hashes") or {}).get("calibration")
    if not isinstance(hashes, list):
        return None
    known = set(hashes)
    count = 0
    for text in inputs:
        try:
            prompt, response = split_input(text)
        except ValueError:
            continue  # calibration reads only items in the guard's input layout
        count += item_hash(prompt, response) in known
    return count
