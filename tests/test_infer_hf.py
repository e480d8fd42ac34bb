"""The Hugging Face backend: exact batching, stopping and truncation flags, sampling, prompt
formats from the guard record, and LoRA folders (tiny random Llama; SmolLM2 for real weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from reasonguard.errors import UserError
from reasonguard.format import INSTRUCTION, render_input
from reasonguard.infer.hf import left_pad
from reasonguard.infer.loading import load_backend
from reasonguard.models import resolve_model, write_guard_config

PROMPTS = [
    render_input("How do I bake bread?"),
    render_input("Tell me how to pick a lock on my neighbour's door tonight, step by step."),
    render_input("hi"),
    render_input("Write a poem.", "Roses are red, violets are blue."),
]


@pytest.fixture(scope="module")
def tiny():
    return load_backend("tiny-llama", "hf", batch_size=3, device="cpu")


def test_padded_rows_give_the_logits_of_the_row_alone(tiny) -> None:
    rows = tiny.encode([tiny.build_prompt(p) for p in PROMPTS])
    ids, mask = left_pad(rows, tiny.tokenizer.pad_token_id)
    assert len({len(r) for r in rows}) > 1  # the batch really is padded
    options = {"max_new_tokens": 4, "do_sample": False, "output_logits": True}
    options.update(return_dict_in_generate=True, eos_token_id=[], pad_token_id=0)
    with torch.inference_mode():
        batch = tiny.model.generate(input_ids=ids, attention_mask=mask, **options)
        for i, row in enumerate(rows):
            alone = tiny.model.generate(input_ids=torch.tensor([row]), **options)
            for step in range(4):  # prefill, then three cached decode steps
                torch.testing.assert_close(
                    batch.logits[step][i], alone.logits[step][0], atol=1e-4, rtol=0
                )


def test_token_limit_is_honoured_and_flagged(tiny) -> None:
    prompts = [tiny.build_prompt(p) for p in PROMPTS]
    results = tiny.generate(prompts, max_new_tokens=5)
    assert len(results) == len(prompts)
    for [g] in results:
        assert g.num_tokens <= 5
        # A random model rarely emits an end token: an output that stopped early must not be flagged.
        assert g.hit_token_limit == (g.num_tokens == 5)
    assert any(g.hit_token_limit for [g] in results)


def test_stop_on_end_of_turn(tiny) -> None:
    # Force the end-of-turn token: with its logit boosted, every row stops at once, unflagged.
    eot = tiny.stop_ids[-1]
    bias = torch.zeros(tiny.model.config.vocab_size)
    bias[eot] = 1e4
    handle = tiny.model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        results = tiny.generate([tiny.build_prompt(PROMPTS[0])], max_new_tokens=8)
    finally:
        handle.remove()
    assert results[0][0].num_tokens == 0 and not results[0][0].hit_token_limit
    assert results[0][0].text == ""


def test_sampling_gives_k_samples_reproducibly(tiny) -> None:
    prompts = [tiny.build_prompt(p) for p in PROMPTS[:2]]
    first = tiny.generate(prompts, max_new_tokens=6, temperature=1.0, num_samples=3, seed=7)
    again = tiny.generate(prompts, max_new_tokens=6, temperature=1.0, num_samples=3, seed=7)
    assert [len(s) for s in first] == [3, 3]
    assert first == again
    assert len({g.text for g in first[0]}) > 1  # really sampled
    with pytest.raises(UserError, match="--temperature > 0"):
        tiny.generate(prompts, num_samples=2)


def test_batch_callback_reports_every_prompt_once(tiny) -> None:
    seen: list[int] = []
    prompts = [tiny.build_prompt(p) for p in PROMPTS]
    results = tiny.generate(prompts, max_new_tokens=2, on_batch=lambda idx, out: seen.extend(idx))
    assert sorted(seen) == list(range(len(prompts))) and len(results) == len(prompts)


@pytest.fixture
def chat_model(tmp_path: Path) -> Path:
    """A copy of the tiny model (symlinked files) whose guard record says `chat`."""
    folder = tmp_path / "chat-model"
    folder.mkdir()
    for item in Path(resolve_model("tiny-llama")).iterdir():
        os.symlink(item, folder / item.name)
    write_guard_config(folder, "chat", base_model="tiny-llama", finetuning="full")
    return folder


def test_prompt_format_comes_from_the_guard_record(chat_model: Path) -> None:
    backend = load_backend(str(chat_model), "hf", device="cpu")
    assert backend.prompt_format == "chat"
    prompt = backend.build_prompt(PROMPTS[0])
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # The template writes BOS itself: encoding must not add a second one.
    assert backend.encode([prompt])[0].count(backend.tokenizer.bos_token_id) == 1
    with pytest.raises(UserError, match="trained with prompt format 'chat'"):
        load_backend(str(chat_model), "hf", prompt_format="raw", device="cpu")


def test_hub_ids_and_aliases_default_to_raw(tiny) -> None:
    assert tiny.prompt_format == "raw"
    prompt = tiny.build_prompt(PROMPTS[0])
    assert prompt == f"{INSTRUCTION}\n{PROMPTS[0]}"
    assert tiny.encode([prompt])[0][0] == tiny.tokenizer.bos_token_id


def test_lora_folder_is_loaded_on_its_base_and_merged(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter do something
            param.data.normal_(0, 0.5)
    folder = tmp_path / "lora"
    peft_model.save_pretrained(folder)
    write_guard_config(folder, "raw", base_model="tiny-llama", finetuning="lora")
    # No tokenizer saved: the base's is used.
    backend = load_backend(str(folder), "hf", device="cpu")
    assert not hasattr(backend.model, "peft_config")  # merged into plain weights
    ids = torch.tensor(backend.encode([backend.build_prompt(PROMPTS[0])]))
    with torch.inference_mode():
        torch.testing.assert_close(
            backend.model(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4
        )
    assert json.loads((folder / "reasonguard.json").read_text())["finetuning"] == "lora"


def test_unknown_backend_and_missing_vllm() -> None:
    with pytest.raises(UserError, match="unknown backend"):
        load_backend("tiny-llama", "onnx")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs the `vllm` package"):
            load_backend("tiny-llama", "vllm")


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_one_at_a_time() -> None:
    batched = load_backend("smollm2", "hf", batch_size=4, device="cpu")
    prompts = [batched.build_prompt(p) for p in PROMPTS[:3]]
    together = batched.generate(prompts, max_new_tokens=16)
    batched.batch_size = 1
    alone = batched.generate(prompts, max_new_tokens=16)
    assert together == alone
