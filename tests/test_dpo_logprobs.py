"""Chunked per-token log-probs (train/dpo/logprobs.py) against the full log-softmax, on the tiny Llama.

The reference is what `dpo_loss.sequence_logps` computed before: the LM head on all labelled
positions at once, then `log_softmax(...).gather(target)`. Gradients are taken of a loss with a
different weight per position (as DPO's loss gives), w.r.t. the hidden states and the head
weight (the tiny Llama's head is tied to its input embedding, 128,257 x 64).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from reasonguard.format import INSTRUCTION, render_input, render_target
from reasonguard.models import load_tokenizer, resolve_model
from reasonguard.train.dpo.logprobs import chunked_token_logps, liger_problem, liger_token_logps
from reasonguard.train.dpo.loss import sequence_logps
from reasonguard.train.dpo.pairs import _encode_pairs, collate_pairs

N = 60  # labelled positions used by the unit tests


def labelled_hidden(model: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The decoder's last hidden states at the positions that predict a label (the reference)."""
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return hidden[:, :-1][keep], targets[keep], keep


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def batch() -> dict[str, Any]:
    """Two pairs, packed: the chosen and rejected outputs of two guard records."""
    tokenizer = load_tokenizer("llama3-tokenizer")
    records = []
    for i, (prompt, right, wrong) in enumerate(
        [("How do I bake bread?", "unharmful", "harmful"), ("Pick a lock?", "harmful", "unharmful")]
    ):
        reasoning = f"# Task 1\n\n## Reasoning Step 1\nThe user asks: {prompt}\n"
        record = {
            "instruction": INSTRUCTION,
            "input": render_input(prompt, None),
            "chosen": render_target(reasoning + f"It is {right}.", right, None, None),
            "rejected": render_target(reasoning + f"Surely {wrong}.", wrong, None, None),
            "sample_weight": 1.0,
        }
        records.append(("test", i, record))
    return collate_pairs(_encode_pairs(records, tokenizer, "chat", 1024), True, pad_token_id=0)


@pytest.fixture(scope="module")
def states(tiny_model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """N real last hidden states at labelled positions and their targets."""
    with torch.no_grad():
        hidden, targets, _ = labelled_hidden(tiny_model, batch)
    assert hidden.shape[0] > N
    return hidden[:N].clone(), targets[:N].clone()


def full_logps(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


def values_and_grads(fn, head, hidden, targets):
    """log-probs, and the gradients of sum(w_i * logp_i) w.r.t. the hidden states and weight."""
    head.zero_grad(set_to_none=True)
    leaf = hidden.clone().requires_grad_(True)
    logps = fn(head, leaf, targets)
    # A different weight per position, as DPO's loss gives.
    weights = torch.linspace(-1.0, 2.0, len(targets), device=logps.device)
    (weights * logps).sum().backward()
    return logps.detach(), leaf.grad, head.weight.grad.clone()


@pytest.mark.parametrize("chunk_size", [1, 15, 16, 60, 100])  # divides N or not; one chunk; > N
def test_chunked_logps_and_grads_equal_the_full_log_softmax(tiny_model, states, chunk_size):
    head = tiny_model.get_output_embeddings()
    hidden, targets = states
    expected = values_and_grads(full_logps, head, hidden, targets)

    def chunked(h, x, t):
        return chunked_token_logps(x, h.weight, h.bias, t, chunk_size=chunk_size)

    got = values_and_grads(chunked, head, hidden, targets)
    assert got[0].dtype == torch.float32 and got[0].shape == (N,)
    for actual, wanted in zip(got, expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)
    assert expected[2].abs().sum() > 0  # the head weight does get a gradient


def test_a_bias_gets_its_gradient_and_no_positions_still_reach_the_weight() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden, targets = torch.randn(9, 8), torch.randint(0, 50, (9,))
    expected = values_and_grads(full_logps, head, hidden, targets)
    expected_bias = head.bias.grad.clone()

    def chunked(h, x, t):
        return chunked_token_logps(x, h.weight, h.bias, t, chunk_size=4)

    got = values_and_grads(chunked, head, hidden, targets)
    for actual, wanted in zip((*got, head.bias.grad), (*expected, expected_bias), strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)

    # A rank whose micro-batch has no labelled position: an empty result, still part of the
    # graph, so the backward reaches the weight (with a zero gradient) as on the other ranks.
    head.zero_grad(set_to_none=True)
    empty = chunked_token_logps(hidden[:0], head.weight, head.bias, targets[:0])
    assert empty.shape == (0,) and empty.grad_fn is not None
    empty.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        chunked_token_logps(hidden, head.weight, head.bias, targets, chunk_size=0)


def test_no_labels_x_vocabulary_tensor_is_kept_for_backward(tiny_model, states) -> None:
    """Checkpointing each chunk: nothing of the chunks' [chunk, vocab] logits is saved for
    backward (the full log-softmax saves [N, vocab] tensors)."""
    head = tiny_model.get_output_embeddings()
    hidden, targets = states
    vocab = head.weight.shape[0]

    def largest_saved(fn) -> int:
        sizes = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(hidden.clone().requires_grad_(True))
        return max(sizes)

    assert largest_saved(lambda x: full_logps(head, x, targets)) >= N * vocab

    def chunked(x: torch.Tensor) -> torch.Tensor:
        return chunked_token_logps(x, head.weight, head.bias, targets, chunk_size=16)

    assert largest_saved(chunked) < vocab


def test_without_grad_the_chunks_give_the_same_values(tiny_model, states) -> None:
    head = tiny_model.get_output_embeddings()
    hidden, targets = states
    with torch.no_grad():
        torch.testing.assert_close(
            chunked_token_logps(hidden, head.weight, head.bias, targets, chunk_size=7),
            full_logps(head, hidden, targets),
            rtol=1e-5,
            atol=1e-5,
        )


def model_sums_and_grads(model: Any, sums: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (sums * torch.tensor([1.0, -0.5, 2.0, 0.25])).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def full_sequence_logps(tiny_model, batch) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The reference: per-sequence sums of the full log-softmax, the labelled token counts,
    and every parameter's gradient of a weighted sum of them."""
    hidden, targets, keep = labelled_hidden(tiny_model, batch)
    logps = full_logps(tiny_model.get_output_embeddings(), hidden, targets)
    owners = batch["sequence_ids"][:, 1:][keep]
    sums = torch.zeros(4).index_add(0, owners, logps)
    grads = model_sums_and_grads(tiny_model, sums)
    return sums.detach(), torch.bincount(owners, minlength=4).float(), grads


@pytest.mark.parametrize("pass_head", [False, True], ids=["default-head", "given-head"])
def test_sequence_logps_and_model_grads_equal_the_full_computation(
    tiny_model, batch, full_sequence_logps, pass_head
) -> None:
    """Through the whole model (the head runs inside its forward): the per-sequence sums, the
    token counts, and the gradient of every parameter."""
    expected, expected_counts, expected_grads = full_sequence_logps
    head = tiny_model.get_output_embeddings() if pass_head else None
    sums, counts = sequence_logps(tiny_model, batch, 4, head=head, chunk_size=37)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == expected_counts.tolist()
    for actual, wanted in zip(model_sums_and_grads(tiny_model, sums), expected_grads, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(tiny_model.get_output_embeddings())  # the head is restored


def test_use_liger_on_cpu_falls_back_to_the_chunks_and_says_why(
    tiny_model, batch, states, full_sequence_logps
) -> None:
    head = tiny_model.get_output_embeddings()
    hidden, _ = states
    assert liger_problem(hidden, head) == (
        "liger-kernel is a CUDA (Triton) kernel and the hidden states are not on CUDA"
    )
    expected, expected_counts, expected_grads = full_sequence_logps
    sums, counts = sequence_logps(tiny_model, batch, 4, use_liger=True)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == expected_counts.tolist()
    for actual, wanted in zip(model_sums_and_grads(tiny_model, sums), expected_grads, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)


def test_a_wrapped_head_is_not_given_to_liger(states) -> None:
    """liger reads `head.weight` itself, which is not the effective weight of a LoRA layer."""
    from peft import LoraConfig, get_peft_model

    hidden, _ = states
    holder = torch.nn.Module()
    holder.lm_head = torch.nn.Linear(64, 8, bias=False)
    get_peft_model(holder, LoraConfig(r=2, target_modules=["lm_head"]))
    assert liger_problem(hidden, holder.lm_head) == (
        "the LM head is a peft.tuners.lora.layer.Linear, not a plain torch.nn.Linear"
    )
    plain = torch.nn.Linear(64, 8, bias=False)
    assert liger_problem(hidden, plain).startswith("liger-kernel is a CUDA (Triton) kernel")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_logps_and_grads_equal_the_full_log_softmax_on_cuda(tiny_model, states) -> None:
    pytest.importorskip("liger_kernel")
    head = torch.nn.Linear(64, tiny_model.config.vocab_size, bias=False).cuda()
    with torch.no_grad():
        head.weight.copy_(tiny_model.get_output_embeddings().weight)
    hidden, targets = (t.cuda() for t in states)
    problem = liger_problem(hidden, head)
    if problem is not None:
        pytest.skip(problem)

    def liger(h, x, t):
        return liger_token_logps(x, h.weight, h.bias, t)

    expected = values_and_grads(full_logps, head, hidden, targets)
    got = values_and_grads(liger, head, hidden, targets)
    for actual, wanted in zip(got, expected, strict=True):
        torch.testing.assert_close(actual, wanted.to(actual.device), rtol=1e-4, atol=1e-4)


def test_a_lora_wrapped_head_counts_its_adapter(batch) -> None:
    """With lm_head among the LoRA targets, the log-probs are those of the model's own logits
    (base head plus adapter), and the head's adapter gets a gradient."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32)
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
    )
    model.eval()
    sums, _ = sequence_logps(model, batch, 4)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False
        ).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    full = torch.log_softmax(logits[keep].float(), -1).gather(1, targets[keep][:, None])[:, 0]
    expected = torch.zeros(4).index_add(0, batch["sequence_ids"][:, 1:][keep], full)
    torch.testing.assert_close(sums.detach(), expected, rtol=1e-5, atol=1e-4)
    sums.sum().backward()
    head_adapter = [p for n, p in model.named_parameters() if "lm_head" in n and "lora_" in n]
    assert head_adapter and all(p.grad is not None and p.grad.abs().max() > 0 for p in head_adapter)
