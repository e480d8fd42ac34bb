"""Tuned training defaults (issue 5, deliverable 3): each `auto` decided by a pure rule, logged.

The rules are checked with numbers (no GPU needed); a tiny CPU run checks that the decisions
reach training_info.json, and the CUDA-only paths (liger, NF4 fallback) are `gpu` tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reasonguard.errors import UserError
from reasonguard.plan.decisions import (
    GIB,
    QLORA_FALLBACK_HEADROOM,
    attention_decision,
    checkpointing_decision,
    compile_decision,
    effective_config,
    liger_decision,
    quantization_decision,
    resolve,
)
from reasonguard.train.config import SFTConfig, load_config
from test_train_support import tiny_config

DECISIONS = {
    "checkpointing",
    "quantization",
    "liger",
    "compile",
    "attention",
    "bf16",
    "cpu_allocator",
}


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_checkpointing_is_off_on_cpu_and_says_why() -> None:
    decided = checkpointing_decision("auto", estimate_bytes=500 * GIB, device_bytes=None)
    assert decided.value is False
    assert "CPU" in decided.reason and "30%" in decided.reason


def test_auto_checkpointing_turns_on_only_when_the_estimate_exceeds_the_device() -> None:
    on = checkpointing_decision("auto", estimate_bytes=30 * GIB, device_bytes=24 * GIB)
    off = checkpointing_decision("auto", estimate_bytes=18.3 * GIB, device_bytes=23.6 * GIB)
    assert on.value is True and off.value is False
    assert (
        on.reason == "auto: 30.0 GiB estimated without checkpointing > 24.0 GiB device? yes -> on"
    )
    assert (
        off.reason == "auto: 18.3 GiB estimated without checkpointing > 23.6 GiB device? no -> off"
    )
    # No estimate on a GPU (unknown architecture): the safe choice.
    assert checkpointing_decision("auto", None, 24 * GIB).value is True


def test_explicit_checkpointing_is_kept_whatever_the_memory() -> None:
    assert checkpointing_decision(True, 1 * GIB, 80 * GIB).value is True
    assert checkpointing_decision(False, 100 * GIB, 24 * GIB).value is False
    assert SFTConfig().gradient_checkpointing is False  # the default did not change


def test_qlora_fallback_decision() -> None:
    device = 80 * GIB
    fits = quantization_decision("qlora", "auto", lora_bytes=20 * GIB, device_bytes=device)
    assert fits.value == "bf16" and "faster" in fits.reason
    too_big = quantization_decision("qlora", "auto", lora_bytes=70 * GIB, device_bytes=device)
    assert too_big.value == "nf4" and "no -> NF4" in too_big.reason
    edge = QLORA_FALLBACK_HEADROOM * device
    assert quantization_decision("qlora", "auto", edge, device).value == "bf16"
    assert quantization_decision("qlora", "auto", edge + 1, device).value == "nf4"
    never = quantization_decision("qlora", "never", lora_bytes=1 * GIB, device_bytes=device)
    assert never.value == "nf4" and "never" in never.reason
    # Without bf16 a LoRA base would be fp32: keep NF4.
    assert quantization_decision("qlora", "auto", 1 * GIB, device, bf16=False).value == "nf4"
    assert quantization_decision("lora", "auto", None, None, bf16=False).value == "fp32"
    assert quantization_decision("full", "auto", None, None).value == "none"


def test_qlora_fallback_loads_a_lora_model() -> None:
    config = SFTConfig(finetuning="qlora", gradient_checkpointing="auto")
    decisions = {
        "checkpointing": checkpointing_decision("auto", 10 * GIB, 80 * GIB),
        "quantization": quantization_decision("qlora", "auto", 10 * GIB, 80 * GIB),
    }
    run = effective_config(config, decisions)
    assert (run.finetuning, run.gradient_checkpointing) == ("lora", False)
    assert (config.finetuning, config.gradient_checkpointing) == ("qlora", "auto")  # untouched
    decisions["quantization"] = quantization_decision("qlora", "never", 10 * GIB, 80 * GIB)
    assert effective_config(config, decisions).finetuning == "qlora"


def test_liger_decision() -> None:
    assert liger_decision("auto", cuda=True, installed=True).value is True
    assert liger_decision("auto", cuda=False, installed=True).value is False
    assert liger_decision("auto", cuda=True, installed=False).value is False
    assert liger_decision(False, cuda=True, installed=True).value is False
    dpo = liger_decision("auto", cuda=True, installed=True, stage_supports=False)
    assert dpo.value is False and "this stage" in dpo.reason


def test_use_liger_kernel_true_on_cpu_fails_before_the_model_loads(
    tmp_path: Path, no_cuda: None
) -> None:
    from reasonguard.train.sft import run_sft

    config = tiny_config(tmp_path, use_liger_kernel=True)
    with pytest.raises(UserError, match="use_liger_kernel: true needs a CUDA GPU"):
        run_sft(config)
    assert not Path(config.output_dir).exists()


def test_qlora_asked_for_is_qlora_by_default_and_on_cpu(tmp_path: Path, no_cuda: None) -> None:
    from reasonguard.train.modeling import environment_problems

    assert SFTConfig().qlora_fallback_to_lora == "never"  # QLoRA when asked for, not bf16 LoRA
    default = tiny_config(tmp_path, finetuning="qlora", optim="paged_adamw_32bit")
    assert environment_problems(default) == []  # bitsandbytes runs NF4 and its optimizers on CPU
    decided = resolve(default, bf16=False, lengths=[100], label_counts=[50], budget=512)
    assert decided["quantization"].value == "nf4" and "never" in decided["quantization"].reason
    assert effective_config(default, decided).finetuning == "qlora"
    # `auto` has no CUDA device to weigh a bf16 LoRA base against: NF4 too.
    auto = tiny_config(tmp_path, finetuning="qlora", qlora_fallback_to_lora="auto")
    decided = resolve(auto, bf16=True, lengths=[100], label_counts=[50], budget=512)
    assert decided["quantization"].value == "nf4" and "no CUDA" in decided["quantization"].reason


def test_torch_compile_is_off_by_default() -> None:
    assert SFTConfig().torch_compile is False
    assert compile_decision(False).value is False and "opt in" in compile_decision(False).reason
    assert compile_decision(True).value is True


def test_attention_decision_names_per_sample_attention_for_packed_sdpa() -> None:
    packed = attention_decision("sdpa", packing=True)
    assert "per sample" in packed.value and "packed_attention" in packed.reason
    assert attention_decision("sdpa", packing=False).value == "sdpa"


def test_new_keys_validate_and_name_the_allowed_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("gradient_checkpointing: auto\nuse_liger_kernel: false\n")
    config = load_config(path, ["qlora_fallback_to_lora=never", "torch_compile=true"])
    assert config.gradient_checkpointing == "auto" and config.use_liger_kernel is False
    assert config.qlora_fallback_to_lora == "never" and config.torch_compile is True
    with pytest.raises(UserError, match=r"'gradient_checkpointing'.*true/false, auto"):
        load_config(path, ["gradient_checkpointing=sometimes"])
    with pytest.raises(UserError, match=r"'qlora_fallback_to_lora'.*auto, never"):
        load_config(path, ["qlora_fallback_to_lora=always"])


def test_resolve_on_cpu_decides_everything_without_weights(tmp_path: Path, no_cuda: None) -> None:
    config = tiny_config(tmp_path, gradient_checkpointing="auto")
    decided = resolve(config, bf16=False, lengths=[100, 200], label_counts=[50, 90], budget=512)
    assert set(decided) == DECISIONS
    assert decided["checkpointing"].value is False
    assert decided["liger"].value is False and "no CUDA" in decided["liger"].reason
    assert decided["quantization"].value == "fp32" and decided["bf16"].value is False


def test_training_info_of_a_tiny_run_records_every_decision(
    tmp_path: Path, no_cuda: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from reasonguard.train.sft import INFO_FILE, run_sft

    config = tiny_config(
        tmp_path,
        rows=8,
        max_steps=1,
        eval_strategy="no",
        save_strategy="no",
        gradient_checkpointing="auto",
    )
    run_sft(config)
    info = json.loads((Path(config.output_dir) / INFO_FILE).read_text())
    decisions = info["model"]["decisions"]
    # The machine's decisions, and R-SFT's own about rows that label a missing response.
    assert set(decisions) == DECISIONS | {"labels_without_response"}
    for d in decisions.values():
        assert set(d) == {"value", "reason"} and d["reason"]
    assert decisions["checkpointing"]["value"] is False
    assert "CPU" in decisions["checkpointing"]["reason"]
    assert decisions["compile"]["value"] is False
    assert info["model"]["gradient_checkpointing"] is False  # resolved
    assert info["config"]["gradient_checkpointing"] == "auto"  # as configured
    out = capsys.readouterr().out
    assert out.count("decisions:") == 1 and "checkpointing  off" in out


def test_dry_run_shows_the_decisions(tmp_path: Path, no_cuda: None) -> None:
    from reasonguard.plan.dryrun import format_plan, plan_sft

    text = format_plan(plan_sft(tiny_config(tmp_path, gradient_checkpointing="auto")))
    assert "decision       checkpointing: off; auto: off on CPU" in text
    assert "decision       liger: off" in text and "decision       compile: off" in text
    assert "decision       attention: sdpa, per sample in packed rows;" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_loss_matches_the_plain_loss_on_cuda(tmp_path: Path) -> None:
    pytest.importorskip("liger_kernel")
    from reasonguard.train.data import prepare
    from reasonguard.train.labelled_head import (
        cross_entropy_sum,
        liger_cross_entropy_sum,
        run_head,
    )
    from reasonguard.train.modeling import load_model, load_training_tokenizer
    from reasonguard.train.sft import sft_batch

    config = tiny_config(tmp_path)
    tokenizer = load_training_tokenizer(config)
    rows = prepare(config, tokenizer).train[:4]
    model = load_model(config, bf16=False)
    batch = {k: v.cuda() for k, v in sft_batch(rows, True, 0).items()}
    head = model.get_output_embeddings()
    plain = run_head(model, head, batch, cross_entropy_sum(batch["mask"], batch["targets"]))
    fused = run_head(model, head, batch, liger_cross_entropy_sum(batch["mask"], batch["targets"]))
    assert torch.allclose(plain, fused, rtol=1e-4)


def test_the_saved_model_records_the_finetuning_trained_not_the_configured(
    tmp_path: Path, no_cuda: None
) -> None:
    """After `qlora_fallback_to_lora` switched a run to bf16 LoRA, reasonguard.json must say
    lora (the adapter sits on a full-precision base). Simulated on CPU: the configured value is
    set to qlora after setup, while the run config (what was trained) says lora."""
    import dataclasses

    from reasonguard.models import read_guard_config
    from reasonguard.train.sft import SFTRecipe

    recipe = SFTRecipe(tiny_config(tmp_path, max_steps=1, eval_strategy="no"))
    recipe.setup()
    assert recipe.run_config.finetuning == "lora"
    recipe.config = dataclasses.replace(recipe.config, finetuning="qlora", bf16=True)
    final = recipe.save()
    assert read_guard_config(final)["finetuning"] == "lora"
