"""Packing (issue 5): best-fit-decreasing bins, per-sample positions, no cross-sample attention."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from reasonguard.data.tokenize import IGNORE_INDEX
from reasonguard.train.data import Example, collate_packed, pack
from reasonguard.train.labelled_head import cross_entropy_sum, run_head
from reasonguard.train.sft import SFTRecipe, sft_batch
from test_train_support import tiny_config


def _example(n: int, row: int = 0) -> Example:
    ids = np.arange(1, n + 1, dtype=np.int32)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int32)
    labels[n // 2 :] = ids[n // 2 :]
    return Example(input_ids=ids, labels=labels, split="s", row=row)


def test_best_fit_decreasing_keeps_every_row_once_within_the_budget() -> None:
    rng = random.Random(0)
    rows = [_example(rng.randint(5, 300), row=i) for i in range(200)] + [_example(700, row=200)]
    bins = pack(rows, budget=512)
    packed = [e.row for b in bins for e in b]
    assert sorted(packed) == list(range(201))
    for b in bins:
        assert sum(len(e) for e in b) <= 512 or len(b) == 1  # an over-long row sits alone
    # Best fit is near-optimal: at most one bin more than the volume bound (plus the long row).
    volume = sum(len(e) for e in rows if len(e) <= 512)
    assert len(bins) <= -(-volume // 512) + 2
    assert pack(rows, 512) == bins  # deterministic: a resumed step packs the same way


def test_collate_packed_restarts_positions_and_ignores_row_starts() -> None:
    rows = [_example(6), _example(4)]
    batch = collate_packed(rows)
    assert batch["input_ids"].shape == (1, 10) and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert batch["labels"][0, 6] == IGNORE_INDEX  # row A's last token never predicts row B


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> SFTRecipe:
    tmp = tmp_path_factory.mktemp("packing")
    config = tiny_config(
        tmp, rows=10, lora_dropout=0.0, max_steps=1, eval_strategy="no", save_strategy="no"
    )
    r = SFTRecipe(config)
    r.setup()
    return r


def _loss(recipe: SFTRecipe, rows: list, packed: bool) -> torch.Tensor:
    """The summed loss of some rows through the training path (head at labelled positions)."""
    batch = sft_batch(rows, packed, recipe.tokenizer.pad_token_id)
    head_fn = cross_entropy_sum(batch["mask"], batch["targets"])
    return run_head(recipe.model, recipe.trainer.head, batch, head_fn)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_loss_and_gradients_equal_the_rows_run_one_by_one(recipe: SFTRecipe) -> None:
    model, rows = recipe.model, recipe.data.train[:4]
    n_labels = sum(r.num_labels for r in rows)

    model.zero_grad(set_to_none=True)
    packed = _loss(recipe, rows, packed=True)
    (packed / n_labels).backward()
    packed_grads = _grads(model)

    model.zero_grad(set_to_none=True)
    single = torch.zeros(())
    for r in rows:
        loss = _loss(recipe, [r], packed=False)
        (loss / n_labels).backward()
        single += loss.detach()
    single_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.testing.assert_close(packed.detach() / n_labels, single / n_labels, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == single_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, single_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_step_loss_is_the_per_token_mean_over_all_its_rows(recipe: SFTRecipe) -> None:
    rows = recipe.data.train[:4]
    trainer = recipe.trainer
    assert recipe.config.packing and len(trainer.micro_batches(rows, trainer.micro_batch)) < len(
        rows
    )
    with torch.no_grad():
        total = sum(float(_loss(recipe, [r], packed=False)) for r in rows)
    loss = trainer._passes(recipe.model, rows, step=1)
    recipe.model.zero_grad(set_to_none=True)
    assert trainer.step_count(rows) == sum(r.num_labels for r in rows)
    assert loss == pytest.approx(total / trainer.step_count(rows), rel=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "reasonguard_packed"])
def test_no_token_attends_across_a_sample_boundary(recipe: SFTRecipe, attn: str) -> None:
    model = recipe.model
    configured = model.base_model.model.config._attn_implementation
    assert configured == "reasonguard_packed"  # what a packed run trains with
    model.base_model.model.config._attn_implementation = attn
    a, b = recipe.data.train[0], recipe.data.train[1]
    batch = collate_packed([a, b])
    changed = batch["input_ids"].clone()
    changed[0, : len(a)] = torch.randint(
        10, 1000, (len(a),), generator=torch.Generator().manual_seed(0)
    )
    try:
        with torch.no_grad():
            kw = {"position_ids": batch["position_ids"], "use_cache": False}
            base = model(input_ids=batch["input_ids"], **kw).logits[0]
            perturbed = model(input_ids=changed, **kw).logits[0]
            alone = model(input_ids=batch["input_ids"][:, len(a) :], use_cache=False).logits[0]
    finally:
        model.base_model.model.config._attn_implementation = configured
    assert not torch.allclose(base[: len(a)], perturbed[: len(a)])  # A's logits did change
    torch.testing.assert_close(base[len(a) :], perturbed[len(a) :], rtol=0, atol=1e-5)
    torch.testing.assert_close(base[len(a) :], alone, rtol=1e-5, atol=1e-5)


def test_per_sample_attention_equals_the_block_diagonal_mask(recipe: SFTRecipe) -> None:
    """Packed attention run per sample gives the logits and gradients of SDPA with the
    block-diagonal mask transformers builds for a packed row."""
    model = recipe.model
    config = model.base_model.model.config
    results = {}
    for attn in ("sdpa", "reasonguard_packed"):
        config._attn_implementation = attn
        model.zero_grad(set_to_none=True)
        loss = _loss(recipe, recipe.data.train[:3], packed=True)
        loss.backward()
        results[attn] = (float(loss), _grads(model))
    model.zero_grad(set_to_none=True)
    assert config._attn_implementation == "reasonguard_packed"
    assert results["sdpa"][0] == pytest.approx(results["reasonguard_packed"][0], rel=1e-6)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(
            grad, results["reasonguard_packed"][1][name], rtol=1e-5, atol=1e-6, msg=name
        )
