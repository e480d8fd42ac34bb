"""HS-DPO training: the weighted loss against hand-computed values, and runs on the tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from reasonguard.errors import UserError
from reasonguard.format import INSTRUCTION, render_input, render_target
from reasonguard.models import load_tokenizer, read_guard_config, resolve_model
from reasonguard.train.dpo.loss import sequence_logps, weighted_dpo_losses
from reasonguard.train.dpo.pairs import PairExample, _encode_pairs, collate_pairs
from reasonguard.train.dpo.stage import REFERENCE_FILE, DPOConfig, run_dpo
from reasonguard.train.monitor import read_metrics
from reasonguard.train.sft import run_sft
from test_train_support import REPO, cli_env, tiny_config, write_yaml_config

_PROMPTS = ["How do I bake bread?", "How can I pick a lock to get into a house?", "Write a poem."]


def pair_record(i: int, weight: float = 1.0) -> dict[str, Any]:
    """A valid pair: the chosen output answers the request label right, the rejected one wrong."""
    prompt = _PROMPTS[i % len(_PROMPTS)]
    right = "harmful" if "lock" in prompt else "unharmful"
    wrong = "unharmful" if right == "harmful" else "harmful"
    reasoning = f"# Task 1\n\n## Reasoning Step 1\nThe user asks ({i}): {prompt}\n"
    return {
        "instruction": INSTRUCTION,
        "input": render_input(prompt, None),
        "chosen": render_target(reasoning + f"It is {right}.", right, None, None),
        "rejected": render_target(reasoning + f"Surely {wrong}, {i}.", wrong, None, None),
        "sample_weight": weight,
        "task": "request",
        "source": "test",
    }


def write_pairs(path: Path, rows: int, **changes: Any) -> Path:
    """`rows` pair records as JSON lines; `changes` maps a row number to a replacement record."""
    records = [pair_record(i, weight=0.8 + 0.05 * (i % 9)) for i in range(rows)]
    for row, record in changes.items():
        records[int(row.removeprefix("row"))] = record
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def stand_in_rsft_output(tmp_path: Path, config_path: Path) -> Path:
    """A folder that looks like an R-SFT output to a dry run: the Llama 3 tokenizer (with the
    chat template) and a guard record with the config's prompt format (no weights)."""
    import yaml

    from reasonguard.models import LLAMA3_CHAT_TEMPLATE, write_guard_config

    settings = yaml.safe_load(config_path.read_text())
    folder = tmp_path / "rsft-final"
    tokenizer = load_tokenizer("llama3-tokenizer")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    write_guard_config(folder, settings["prompt_format"], "tiny-llama", settings["finetuning"])
    return folder


# --------------------------------------------------------------------------------------------
# The loss, by hand


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("llama3-tokenizer")


def encoded_pairs(tokenizer: Any, weights: list[float]) -> list[PairExample]:
    triples = [("s", i, pair_record(i, w)) for i, w in enumerate(weights)]
    pairs = _encode_pairs(triples, tokenizer, "chat", 1024)
    for i, pair in enumerate(pairs):  # arbitrary reference values, different per pair
        pair.reference_chosen, pair.reference_rejected = -40.0 - 3 * i, -45.0 + 2 * i
    return pairs


def alone_logp(model: Any, example: Any) -> tuple[float, int]:
    """Summed log-prob of one sequence's labelled tokens, run alone through the plain forward."""
    ids = torch.from_numpy(example.input_ids.astype("int64"))[None]
    labels = torch.from_numpy(example.labels.astype("int64"))
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = labels[1:]
    keep = targets != -100
    return float(logps[keep].gather(1, targets[keep][:, None]).sum()), int(keep.sum())


def batch_losses(model: Any, pairs: list[PairExample], packed: bool, beta=0.01, ftx=2.0):
    batch = collate_pairs(pairs, packed, pad_token_id=0)
    sums, counts = sequence_logps(model, batch, 2 * len(pairs))
    n = len(pairs)
    return weighted_dpo_losses(
        sums[:n],
        sums[n:],
        torch.tensor([p.reference_chosen for p in pairs]),
        torch.tensor([p.reference_rejected for p in pairs]),
        counts[:n],
        torch.tensor([p.weight for p in pairs]),
        beta,
        ftx,
    )


@pytest.mark.parametrize("packed", [True, False])
def test_weighted_loss_equals_the_hand_computed_value(tiny_model, tokenizer, packed) -> None:
    pairs = encoded_pairs(tokenizer, [0.8, 1.2])
    beta, ftx = 0.5, 2.0  # a large beta so the DPO term differs visibly from log 2
    expected = []
    for pair in pairs:
        pc, nc = alone_logp(tiny_model, pair.chosen)
        pr, _ = alone_logp(tiny_model, pair.rejected)
        margin = beta * ((pc - pair.reference_chosen) - (pr - pair.reference_rejected))
        dpo = -math.log(1 / (1 + math.exp(-margin)))
        expected.append(pair.weight * (dpo + ftx * (-pc / nc)))
    with torch.no_grad():
        losses, _ = batch_losses(tiny_model, pairs, packed, beta, ftx)
    assert losses.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert float(losses.mean()) == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert expected[0] / 0.8 != pytest.approx(expected[1] / 1.2, rel=1e-3)  # pairs differ


def test_a_pair_of_weight_zero_contributes_no_gradient(tiny_model, tokenizer) -> None:
    def grads(weights: list[float], keep: int | None = None) -> list[torch.Tensor]:
        pairs = encoded_pairs(tokenizer, weights)
        if keep is not None:
            pairs = pairs[:keep]
        tiny_model.zero_grad(set_to_none=True)
        losses, _ = batch_losses(tiny_model, pairs, packed=True)
        (losses.sum() / 2).backward()  # the step holds two pairs in both cases
        return [p.grad.clone() for p in tiny_model.parameters()]

    with_zero = grads([1.0, 0.0])
    first_only = grads([1.0, 0.0], keep=1)
    for a, b in zip(with_zero, first_only, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    only_zero = encoded_pairs(tokenizer, [0.0])
    tiny_model.zero_grad(set_to_none=True)
    losses, _ = batch_losses(tiny_model, only_zero, packed=True)
    losses.sum().backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in tiny_model.parameters())
    assert any(float(g.abs().max()) > 0 for g in first_only)


def test_the_sft_term_adds_exactly_ftx_times_the_chosen_nll(tiny_model, tokenizer) -> None:
    pairs = encoded_pairs(tokenizer, [1.0])
    with torch.no_grad():
        with_sft, _ = batch_losses(tiny_model, pairs, packed=False, ftx=2.0)
        without, _ = batch_losses(tiny_model, pairs, packed=False, ftx=0.0)
    logp, n = alone_logp(tiny_model, pairs[0].chosen)
    assert float(with_sft[0] - without[0]) == pytest.approx(2.0 * (-logp / n), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def rsft_adapter(tmp_path_factory) -> Path:
    """A tiny LoRA R-SFT output (chat format) to start DPO from."""
    tmp = tmp_path_factory.mktemp("rsft")
    return run_sft(tiny_config(tmp, rows=8, max_steps=2, eval_strategy="no")).final_dir


def dpo_config(tmp_path: Path, model: Path, rows: int = 10, **overrides: Any) -> DPOConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():
        write_pairs(pairs, rows)
    settings: dict[str, Any] = {
        "model_name_or_path": str(model),
        "dataset": str(pairs),
        "prompt_format": "chat",
        "finetuning": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "max_length": 512,
        "eval_split_ratio": 0.2,
        "eval_steps": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3,
        "beta": 0.1,
        "logging_steps": 1,
        "save_steps": 1,
        "save_total_limit": 3,
        "report_to": "none",
        "output_dir": str(tmp_path / "dpo"),
    }
    settings.update(overrides)
    return DPOConfig(**settings)


def test_dpo_continues_the_rsft_adapter_and_records_the_run(tmp_path, rsft_adapter) -> None:
    result = run_dpo(dpo_config(tmp_path, rsft_adapter))
    run = result.run_dir
    assert result.steps == 4  # 8 training pairs, 4 per step, 2 epochs
    info = json.loads((run / "training_info.json").read_text())
    assert info["stage"] == "dpo" and info["outcome"] == "finished"
    assert info["data"]["train_rows"] == 8 and info["data"]["eval_rows"] == 2
    assert info["dpo"]["beta"] == 0.1 and info["dpo"]["final_eval_reward_accuracy"] is not None
    assert (run / REFERENCE_FILE).is_file()
    record = read_guard_config(result.final_dir)
    assert record["stage"] == "dpo" and record["prompt_format"] == "chat"
    assert record["base_model"] == read_guard_config(rsft_adapter)["base_model"]
    assert (result.final_dir / "adapter_model.safetensors").is_file()
    events = [e for e in read_metrics(run / "metrics.jsonl") if "train_loss" in e]
    # Step 1 starts from the reference model (no dropout): every margin is 0 up to float
    # rounding (the reference pass packs the pairs differently), so the DPO term is log 2.
    assert events[0]["reward_margin"] == pytest.approx(0.0, abs=1e-3)
    assert events[-1]["reward_margin"] != pytest.approx(0.0, abs=1e-3)
    assert 0.0 <= events[-1]["reward_accuracy"] <= 1.0
    # The continued adapter moved away from the R-SFT one.
    from safetensors.torch import load_file

    before = load_file(str(rsft_adapter / "adapter_model.safetensors"))
    after = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_stopped_dpo_run_resumes_to_the_same_weights(tmp_path, rsft_adapter) -> None:
    from safetensors.torch import load_file

    whole = run_dpo(dpo_config(tmp_path / "a", rsft_adapter, num_train_epochs=2))
    config = dpo_config(tmp_path / "b", rsft_adapter, num_train_epochs=2, debug_nan_at_step=3)
    with pytest.raises(UserError, match="not finite|NaN|nan"):
        run_dpo(config)
    reference_before = (Path(config.output_dir) / REFERENCE_FILE).read_bytes()
    resumed = run_dpo(
        dpo_config(tmp_path / "b", rsft_adapter, num_train_epochs=2, debug_nan_at_step=None)
    )
    assert (Path(config.output_dir) / REFERENCE_FILE).read_bytes() == reference_before
    info = json.loads((resumed.run_dir / "training_info.json").read_text())
    assert info["resumed_from"] and info["resumed_from"][-1].endswith("checkpoint-2")
    a = load_file(str(whole.final_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.final_dir / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_merge_mode_saves_full_weights_that_load_for_inference(tmp_path, rsft_adapter) -> None:
    from reasonguard.infer.hf import load_model

    result = run_dpo(dpo_config(tmp_path, rsft_adapter, init_adapter="merge", max_steps=1))
    assert (result.final_dir / "model.safetensors").is_file()
    assert not (result.final_dir / "adapter_config.json").exists()
    assert read_guard_config(result.final_dir)["finetuning"] == "full"
    model = load_model(str(result.final_dir), "cpu", False, False)
    assert model.config.num_hidden_layers == 2


def test_a_prompt_format_other_than_the_rsft_one_is_refused(tmp_path, rsft_adapter) -> None:
    with pytest.raises(UserError, match="prompt_format: chat"):
        run_dpo(dpo_config(tmp_path, rsft_adapter, prompt_format="raw"))


# --------------------------------------------------------------------------------------------
# Bad pairs


# Rows are named 1-based (index 3 is row 4), as everywhere in messages.
BAD_PAIRS = [
    ({"row3": {**pair_record(3), "chosen": ""}}, r"row 4 \(1-based\).*'chosen': empty"),
    ({"row2": {k: v for k, v in pair_record(2).items() if k != "rejected"}}, "row 3 .*'rejected'"),
    (
        {"row4": {**pair_record(4), "rejected": pair_record(4)["chosen"]}},
        "row 5 .*equals `chosen`",
    ),
    ({"row1": {**pair_record(1), "sample_weight": -1}}, "row 2 .*sample_weight.*>= 0"),
    ({"row0": {**pair_record(0), "input": "no layout"}}, "row 1 .*'input'"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_PAIRS)
def test_bad_pairs_name_file_row_and_field(tmp_path, changes, message, cli) -> None:
    pairs = write_pairs(tmp_path / "bad.jsonl", 10, **changes)
    config = dpo_config(tmp_path, Path(resolve_model("tiny-llama")), dataset=str(pairs))
    path = write_yaml_config(tmp_path / "c.yaml", config)
    code, _, err = cli("train", "dpo", "--config", path, "--dry-run")
    assert code == 2
    assert "bad.jsonl" in err and "--skip-invalid" in err
    assert __import__("re").search(message, err), err
    code, out, err = cli("train", "dpo", "--config", path, "--dry-run", "--skip-invalid")
    assert code == 0, err
    assert "1 invalid rows skipped" in out and "7 train / 2 eval rows" in out


@pytest.mark.slow  # a DPO run in a child process
def test_dpo_cli_end_to_end_in_a_subprocess(tmp_path, rsft_adapter) -> None:
    import subprocess
    import sys

    config = dpo_config(tmp_path, rsft_adapter, max_steps=1, eval_strategy="no")
    path = write_yaml_config(tmp_path / "c.yaml", config)
    done = subprocess.run(
        [sys.executable, "-m", "reasonguard", "train", "dpo", "--config", str(path)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "final model:" in done.stdout
    assert (Path(config.output_dir) / "final" / "reasonguard.json").is_file()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_continued_adapter_takes_the_configs_lora_dropout(tmp_path, rsft_adapter, dropout):
    from torch import nn

    from reasonguard.train.modeling import load_model

    model = load_model(dpo_config(tmp_path, rsft_adapter, lora_dropout=dropout), bf16=False)
    layers = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]
    assert layers
    for layer in layers:
        if dropout:
            assert isinstance(layer, nn.Dropout) and layer.p == dropout
        else:
            assert isinstance(layer, nn.Identity)
    assert model.peft_config["default"].lora_dropout == dropout
