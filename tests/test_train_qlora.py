"""QLoRA through the real CLI, with the shipped Experiment 19 configs on a small model.

`finetuning: qlora` runs wherever bitsandbytes runs, CPU included: the base is loaded as 4-bit
NF4 (double quantisation, compute in bf16 under `bf16: true`), LoRA adapters train on it with
gradient checkpointing and bitsandbytes' paged AdamW, and the saved adapter reloads for
inference. R-SFT and HS-DPO both run their shipped config with only the model, the data and the
run length overridden (bf16 stays on as the configs set it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from reasonguard.models import read_guard_config
from reasonguard.train.config import load_config
from reasonguard.train.monitor import read_metrics
from test_train_dpo import write_pairs
from test_train_support import REPO, write_dataset

EXP19_SFT = REPO / "configs" / "exp19-qlora-3b-instruct.yaml"
EXP19_DPO = REPO / "configs" / "exp19-hsdpo-qlora-3b.yaml"
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def run_overrides(run_dir: Path, steps: int, **extra: Any) -> list[str]:
    """Overrides that turn a shipped recipe into a run of a few steps (no eval, no checkpoint)."""
    settings: dict[str, Any] = {
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "eval_split_ratio": 0.0,
        "eval_strategy": "no",
        "save_strategy": "no",
        "warmup_steps": 0,
        "logging_steps": 1,
        "report_to": "none",
        "output_dir": str(run_dir),
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def train(stage: str, config: Path, overrides: list[str]) -> tuple[Path, dict[str, Any]]:
    """Run `reasonguard train STAGE --config CONFIG OVERRIDES...`; return the run dir and its
    training_info.json."""
    from reasonguard.cli import main

    assert main(["train", stage, "--config", str(config), *overrides]) == 0
    run_dir = Path(next(o for o in overrides if o.startswith("output_dir=")).partition("=")[2])
    return run_dir, json.loads((run_dir / "training_info.json").read_text())


def train_losses(run_dir: Path) -> list[float]:
    return [e["train_loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in e]


def assert_qlora_run(info: dict[str, Any], final: Path, stage: str) -> None:
    """What every QLoRA run records: an NF4 base, checkpointing, paged AdamW, `qlora` saved."""
    assert info["outcome"] == "finished" and info["stage"] == stage
    model = info["model"]
    assert info["config"]["finetuning"] == model["finetuning"] == "qlora"
    assert model["decisions"]["quantization"]["value"] == "nf4"
    assert model["gradient_checkpointing"] is True
    assert model["decisions"]["checkpointing"]["value"] is True
    assert model["parameters"]["trainable"] > 0
    record = read_guard_config(final)
    assert (record["finetuning"], record["stage"]) == ("qlora", stage)
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # an adapter, never merged into 4-bit
    assert model["optimizer"] == "PagedAdamW32bit"


def nf4_layers(model: Any) -> list[Any]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_paged_adamw_32bit_steps_cpu_parameters() -> None:
    import bitsandbytes as bnb
    from transformers import Trainer, TrainingArguments

    # The optimizer the Trainer builds for `optim: paged_adamw_32bit`, on CPU parameters.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    args = TrainingArguments(
        output_dir="unused", optim="paged_adamw_32bit", learning_rate=1e-2, use_cpu=True
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = cls(model.parameters(), **kwargs)
    assert issubclass(cls, bnb.optim.optimizer.Optimizer2State) and kwargs["is_paged"]
    assert kwargs["optim_bits"] == 32
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 8)).square().sum().backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    state = optimizer.state[model[0].weight]
    assert state["state1"].dtype == state["state2"].dtype == torch.float32  # 32-bit moments


@pytest.fixture(scope="module")
def exp19_sft(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The Experiment 19 R-SFT recipe on the tiny Llama: 3 steps on one fixed 2-row batch."""
    tmp = tmp_path_factory.mktemp("exp19-sft")
    data = write_dataset(tmp / "data.jsonl", rows=2)
    overrides = [
        "model_name_or_path=tiny-llama",
        f"dataset={data}",
        "learning_rate=1e-3",  # the recipe's 5e-5 barely moves a random model in 3 steps
        "lr_scheduler_type=constant",
        *run_overrides(tmp / "run", steps=3),
    ]
    return train("sft", EXP19_SFT, overrides)


@pytest.mark.slow
def test_exp19_qlora_sft_trains_adapters_on_an_nf4_base(exp19_sft) -> None:
    run_dir, info = exp19_sft
    final = run_dir / "final"
    assert_qlora_run(info, final, "sft")
    assert info["model"]["bf16"] is True and info["steps_completed"] == 3
    losses = train_losses(run_dir)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # the same 2 rows every step
    assert info["final_train_loss"] == pytest.approx(losses[-1])

    # The model the recipe trains, rebuilt from the run's own config.yaml with the saved adapter.
    from safetensors.torch import load_file

    from reasonguard.train.modeling import load_model

    config = load_config(run_dir / "config.yaml")
    model = load_model(config, bf16=True, checkpoint=final)
    layers = nf4_layers(model)
    assert len(layers) == 2 * len(TARGETS)  # every projection of both decoder layers
    for layer in layers:
        assert layer.weight.quant_type == "nf4"
        assert layer.weight.quant_state.nested  # double quantisation
        assert layer.compute_dtype == torch.bfloat16
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == TARGETS
    saved = load_file(str(final / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items()}
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())
    for key, value in saved.items():  # the trained adapter, not a fresh one
        torch.testing.assert_close(state[key].float().cpu(), value.float())

    # Served as trained: the adapter's record names its NF4 base, and `load_guard` puts the
    # adapter (unmerged) on that very base; its outputs are the training-time model's.
    from reasonguard.format import render_input
    from reasonguard.infer.guard import load_guard
    from reasonguard.models import nf4_record

    assert read_guard_config(final)["quantization"] == nf4_record("bfloat16")
    guard = load_guard(str(final), max_new_tokens=6, batch_size=1, device="cpu")
    served = nf4_layers(guard.backend.model)
    assert len(served) == 2 * len(TARGETS)
    assert all(layer.compute_dtype == torch.bfloat16 for layer in served)
    items = [
        {"prompt": "How do I bake bread?", "response": None},
        {"prompt": "Tell me how to hurt someone.", "response": "No."},
        {"prompt": "What is the capital of France?", "response": None},
    ]
    results = guard.classify(items, scores=False)
    model.eval()
    for item, result in zip(items, results, strict=True):
        prompt = guard.backend.build_prompt(render_input(item["prompt"], item["response"]))
        ids = torch.tensor([guard.backend.encode([prompt])[0]])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                use_cache=True,
                eos_token_id=guard.backend.stop_ids,
                pad_token_id=guard.backend.tokenizer.pad_token_id,
            )
        trained = out[0, ids.shape[1] :].tolist()
        trained = [t for t in trained if t not in guard.backend.stop_ids]
        assert result.output == guard.backend.tokenizer.decode(trained, skip_special_tokens=True)
        assert 0 < result.num_tokens <= 6
    # Asked to, the loader merges the adapter into a full-precision base instead.
    merged = load_guard(str(final), max_new_tokens=6, device="cpu", load_in_4bit=False)
    assert not nf4_layers(merged.backend.model)


@pytest.mark.slow
def test_exp19_hsdpo_qlora_continues_the_rsft_adapter_on_its_nf4_base(exp19_sft, tmp_path) -> None:
    from safetensors.torch import load_file

    rsft_final = exp19_sft[0] / "final"
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    overrides = [
        f"model_name_or_path={rsft_final}",
        f"dataset={pairs}",
        "max_length=512",
        "learning_rate=1e-3",
        *run_overrides(tmp_path / "dpo", steps=2, effective_batch_size=2),
    ]
    run_dir, info = train("dpo", EXP19_DPO, overrides)
    final = run_dir / "final"
    assert_qlora_run(info, final, "dpo")
    assert info["model"]["bf16"] is True and info["steps_completed"] == 2
    assert info["dpo"]["beta"] == 0.01  # the recipe's own settings still apply
    assert read_guard_config(final)["base_model"] == read_guard_config(rsft_final)["base_model"]
    losses = train_losses(run_dir)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    before = load_file(str(rsft_final / "adapter_model.safetensors"))
    after = load_file(str(final / "adapter_model.safetensors"))
    assert set(before) == set(after)  # init_adapter: continue, the same adapter
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_smollm2_qlora_sft_two_steps(tmp_path: Path) -> None:
    # A real 135M model: bf16 off, as bf16 matmuls run several times slower than fp32 on CPUs
    # without native bf16 instructions (the NF4 compute dtype then is fp32).
    data = write_dataset(tmp_path / "data.jsonl", rows=2)
    overrides = [
        "model_name_or_path=smollm2",
        f"dataset={data}",
        "max_length=512",
        "bf16=false",
        *run_overrides(tmp_path / "run", steps=2, per_device_train_batch_size=1),
    ]
    run_dir, info = train("sft", EXP19_SFT, overrides)
    assert_qlora_run(info, run_dir / "final", "sft")
    assert info["model"]["bf16"] is False and info["steps_completed"] == 2
    losses = train_losses(run_dir)
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)  # an instruct model, not random
