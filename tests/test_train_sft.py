"""R-SFT mechanics on the tiny random Llama with the real Llama 3 tokenizer (CPU, seconds each)."""

from __future__ import annotations

import json
import re
import resource
from pathlib import Path

import pytest
import torch

from reasonguard.data.tokenize import IGNORE_INDEX
from reasonguard.format import build_prompt
from reasonguard.models import EOT_TOKEN, load_tokenizer, read_guard_config
from reasonguard.train import sft
from reasonguard.train.checkpoint import list_checkpoints
from reasonguard.train.data import encode, split_train_eval, step_plan
from reasonguard.train.monitor import NonFiniteLossError, PlateauWatch, read_metrics
from reasonguard.train.sft import SFTRecipe, run_sft
from test_train_support import guard_record, tiny_config

# The documented run-directory listing (see the `sft` module docstring) of a finished LoRA run.
RUN_DIR_LISTING = {
    "config.yaml",
    "status.json",
    "metrics.jsonl",
    "logs",
    "training_info.json",
    "loss_curve.png",
    "final",
}
CHECKPOINT_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "optimizer.pt",
    "reasonguard.json",
    "rng_state.pth",
    "scheduler.pt",
    "tokenizer.json",
    "tokenizer_config.json",
    "trainer_state.json",
    "training_args.bin",
}
FINAL_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "reasonguard.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("llama3-tokenizer")


@pytest.mark.parametrize("prompt_format", ["chat", "chat-user", "raw"])
def test_labels_cover_exactly_the_output_and_its_end_token(tokenizer, prompt_format: str) -> None:
    records = [guard_record(i) for i in range(4)]
    examples = encode([("s", i, r) for i, r in enumerate(records)], tokenizer, prompt_format, 1024)
    end = tokenizer.eos_token if prompt_format == "raw" else EOT_TOKEN
    for record, example in zip(records, examples, strict=True):
        prompt = build_prompt(record["input"], prompt_format, tokenizer)
        n_prompt = len(tokenizer(prompt, add_special_tokens=prompt_format == "raw")["input_ids"])
        labels, ids = example.labels.tolist(), example.input_ids.tolist()
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # every prompt token masked
        assert labels[n_prompt:] == ids[n_prompt:]  # every output token learned
        assert IGNORE_INDEX not in labels[n_prompt:]
        assert tokenizer.decode(labels[n_prompt:]) == record["output"] + end
        assert labels[-1] == tokenizer.convert_tokens_to_ids(end)  # the model learns to stop


def test_held_out_split_and_data_order_are_fixed_by_their_seeds() -> None:
    train, held = split_train_eval(list(range(90)), 0.01, 42)
    assert len(held) == 1 and len(train) == 89 and sorted(train + held) == list(range(90))
    assert split_train_eval(list(range(90)), 0.01, 42) == (train, held)
    assert len(split_train_eval(list(range(1000)), 0.01, 42)[1]) == 10
    plan = step_plan(10, 4, seed=3, epoch=1)
    assert plan == step_plan(10, 4, seed=3, epoch=1) != step_plan(10, 4, seed=3, epoch=2)
    assert [len(s) for s in plan] == [4, 4, 2] and sorted(sum(plan, [])) == list(range(10))


def test_loss_falls_over_30_steps_on_a_fixed_batch(tmp_path: Path) -> None:
    # Two rows, no eval split, one 2-row step per epoch: every step sees the same batch. Full
    # fine-tuning: LoRA on a 2-layer, 64-wide random model has too little capacity to memorise.
    config = tiny_config(
        tmp_path,
        rows=2,
        finetuning="full",
        eval_split_ratio=0.0,
        eval_strategy="no",
        save_strategy="no",
        num_train_epochs=30,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
    )
    result = run_sft(config)
    losses = [
        e["train_loss"] for e in read_metrics(result.run_dir / "metrics.jsonl") if "train_loss" in e
    ]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))


def test_lora_changes_adapters_and_leaves_the_base_untouched(tmp_path: Path) -> None:
    recipe = SFTRecipe(tiny_config(tmp_path, max_steps=3, eval_strategy="no", save_strategy="no"))
    recipe.setup()
    before = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    recipe.train()
    events = read_metrics(recipe.run_dir / "metrics.jsonl")
    losses = [e["train_loss"] for e in events if "train_loss" in e]
    assert len(losses) == 3 and losses[-1] < losses[0]
    after = dict(recipe.model.named_parameters())
    trainable = [n for n, p in after.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in after.items():
        changed = not torch.equal(before[name], param.detach())
        assert changed == param.requires_grad, name


def test_full_finetuning_changes_every_weight_and_saves_a_full_model(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path, finetuning="full", max_steps=2, eval_strategy="no", save_strategy="no"
    )
    recipe = SFTRecipe(config)
    recipe.setup()
    before = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    recipe.train()
    final = recipe.save()
    recipe.cleanup()
    for name, param in recipe.model.named_parameters():
        assert param.requires_grad and not torch.equal(before[name], param.detach()), name
    assert {"config.json", "model.safetensors", "reasonguard.json"} <= {
        p.name for p in final.iterdir()
    }
    generation = json.loads((final / "generation_config.json").read_text())
    assert 128009 in generation["eos_token_id"]  # <|eot_id|>: generation stops where training did


def test_run_directory_listing_is_exactly_as_documented(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path, rows=12, report_to="tensorboard", save_steps=1, save_total_limit=2
    )
    result = run_sft(config)
    run_dir = result.run_dir
    checkpoints = {p.name for p in run_dir.glob("checkpoint-*")}
    assert {p.name for p in run_dir.iterdir()} == RUN_DIR_LISTING | checkpoints
    total = json.loads((run_dir / "training_info.json").read_text())["plan"]["total_steps"]
    assert checkpoints == {f"checkpoint-{total - 1}", f"checkpoint-{total}"}  # keep the last 2
    for checkpoint in checkpoints:
        assert {p.name for p in (run_dir / checkpoint).iterdir()} == CHECKPOINT_FILES
    assert {p.name for p in (run_dir / "final").iterdir()} == FINAL_FILES
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    for name in RUN_DIR_LISTING | CHECKPOINT_FILES | FINAL_FILES | {"checkpoint-<step>"}:
        assert name in sft.__doc__, f"{name} is not documented in the sft module docstring"

    guard = read_guard_config(run_dir / "final")
    assert guard["prompt_format"] == "chat" and guard["finetuning"] == "lora"
    assert guard["base_model"] == "tiny-llama"
    info = json.loads((run_dir / "training_info.json").read_text())
    assert info["outcome"] == "finished" and info["config"]["lora_r"] == 4
    assert {"git_commit", "packages", "hardware", "timings", "tokens_seen", "data"} <= set(info)
    assert info["tokens_seen"]["total"] > info["tokens_seen"]["labelled"] > 0
    assert info["final_train_loss"] > 0 and info["final_eval_loss"] > 0
    assert info["data"]["eval_rows"] == 2 and info["data"]["validation"]["num_invalid"] == 0
    # Peak memory on a CPU: the process's resident set (this process: training ran in it),
    # said so in words; no GPU readings.
    memory = info["memory_per_rank"]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    assert 0.1 < memory["peak_rss_gib"][0] <= peak_rss + 0.001, memory
    for gpu_reading in ("peak_cuda_allocated_gib", "peak_cuda_reserved_gib", "peak_nvml_gib"):
        assert memory[gpu_reading] is None, memory
    assert "ru_maxrss" in memory["measured"] and "no CUDA device" in memory["measured"]
    assert memory["weights_gib"][0] > 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == status["total_steps"] == total
    # train_loss is the mean of the last logged losses (one log can be a one-row step's spike)
    logged = [
        e["train_loss"]
        for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if e.get("train_loss") is not None
    ][-10:]
    assert status["train_loss_logs_averaged"] == len(logged) > 1
    assert abs(status["train_loss"] - sum(logged) / len(logged)) < 1e-9
    assert status["last_logged_train_loss"] == logged[-1]
    assert (run_dir / "config.yaml").read_text().startswith("# Resolved config")

    # Rerunning the same command finds the finished run and does nothing.
    again = run_sft(config)
    assert again.steps == total and again.final_dir == run_dir / "final"


def test_gradient_checkpointing_gives_the_same_weights(tmp_path: Path) -> None:
    common = {"max_steps": 2, "eval_strategy": "no", "save_strategy": "no", "lora_dropout": 0.1}
    plain = run_sft(tiny_config(tmp_path, output_dir=str(tmp_path / "plain"), **common))
    checkpointed = run_sft(
        tiny_config(
            tmp_path, output_dir=str(tmp_path / "gc"), gradient_checkpointing=True, **common
        )
    )
    expected, got = _final_adapter(plain.run_dir), _final_adapter(checkpointed.run_dir)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-6


def test_skipped_invalid_rows_are_counted_in_training_info(tmp_path: Path) -> None:
    from reasonguard.errors import UserError

    config = tiny_config(tmp_path, rows=8, max_steps=1, eval_strategy="no", save_strategy="no")
    data = Path(config.dataset)
    data.write_text(data.read_text() + '{"input": "bad", "output": "bad", "split": "train"}\n')
    # The bad record is the 9th line of the JSON-lines file (row index 8 of split 'train').
    with pytest.raises(UserError, match=re.escape(f"{data}:9: split 'train'")):
        run_sft(config)
    result = run_sft(
        tiny_config(
            tmp_path, max_steps=1, eval_strategy="no", save_strategy="no", skip_invalid=True
        )
    )
    validation = json.loads((result.run_dir / "training_info.json").read_text())["data"][
        "validation"
    ]
    assert validation["num_invalid"] == 1 and validation["invalid_examples"][0]["row"] == 8
    assert validation["invalid_examples"][0]["location"] == f"{data}:9"


def test_resume_never_refuses_a_run_dir_with_checkpoints(tmp_path: Path) -> None:
    from reasonguard.errors import UserError

    config = tiny_config(tmp_path, max_steps=2, eval_strategy="no", save_steps=1)
    run_sft(config)
    with pytest.raises(UserError, match="resume is 'never'"):
        run_sft(tiny_config(tmp_path, max_steps=2, eval_strategy="no", resume="never"))


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, cli) -> None:
    from test_train_support import write_yaml_config

    config = tiny_config(tmp_path, rows=20, eval_strategy="no", save_steps=2, debug_nan_at_step=3)
    path = write_yaml_config(tmp_path / "nan.yaml", config)
    code, out, err = cli("train", "sft", "--config", path)
    assert code == 2
    assert "the training loss became nan at step 3" in err
    assert "checkpoint-2 (untouched)" in err and "Traceback" not in err
    run_dir = Path(config.output_dir)
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-2"]
    assert not (run_dir / "final").exists()
    info = json.loads((run_dir / "training_info.json").read_text())
    assert info["outcome"] == "failed" and info["steps_completed"] == 2
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    state = json.loads((run_dir / "checkpoint-2/trainer_state.json").read_text())
    assert state["global_step"] == 2

    # The kept checkpoint is good: the same run without the injected NaN resumes from it.
    code, out, err = cli("train", "sft", "--config", path, "debug_nan_at_step=null")
    assert code == 0, err
    assert "resuming from" in out and "checkpoint-2" in out
    assert (run_dir / "final/adapter_model.safetensors").is_file()


def test_nan_guard_raises_non_finite_loss_error(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, eval_strategy="no", save_strategy="no", debug_nan_at_step=1)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written before it"):
        run_sft(config)


def _final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final/adapter_model.safetensors")


def test_oom_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path: Path) -> None:
    """An OOM on a 4-row micro-batch retries the step with 2-row micro-batches: the loss is
    normalised over the whole step, so the weights match a run made with 2-row micro-batches."""
    common = {
        "rows": 12,
        "eval_strategy": "no",
        "save_strategy": "no",
        "lora_dropout": 0.0,
        "packing": False,  # padded micro-batches: the OOM retry halves the rows per micro-batch
    }
    reference = run_sft(
        tiny_config(
            tmp_path,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            output_dir=str(tmp_path / "ref"),
            **common,
        )
    )
    config = tiny_config(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        auto_micro_batch=True,
        output_dir=str(tmp_path / "oom"),
        **common,
    )
    recipe = SFTRecipe(config)
    recipe.setup()
    real_loss = recipe.trainer.batch_loss

    def loss_that_ooms_on_big_batches(model, rows, train):
        if train and len(rows) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_loss(model, rows, train)

    recipe.trainer.batch_loss = loss_that_ooms_on_big_batches
    recipe.train()
    recipe.save()
    recipe.cleanup()
    assert recipe.trainer.micro_batch == 2 and recipe.samples_per_step == 4
    assert any("retrying the step with micro-batch 2" in w for w in recipe.warnings)
    expected, got = _final_adapter(reference.run_dir), _final_adapter(Path(config.output_dir))
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-6


def test_oom_without_auto_micro_batch_names_the_settings_that_fit(tmp_path: Path) -> None:
    from reasonguard.errors import UserError

    recipe = SFTRecipe(tiny_config(tmp_path, eval_strategy="no", save_strategy="no"))

    def oom(model, rows, train):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    recipe.setup()
    recipe.trainer.batch_loss = oom
    with pytest.raises(UserError) as info:
        recipe.train()
    message = str(info.value)
    for setting in (
        "per_device_train_batch_size=1",
        "auto_micro_batch=true",
        "gradient_checkpointing=true",
        "max_length=256",
    ):
        assert setting in message


def test_plateau_warning_after_patience_evaluations() -> None:
    watch = PlateauWatch(patience=2)
    assert watch.update(1.0) is None and watch.update(0.9) is None
    assert watch.update(0.95) is None
    warning = watch.update(0.91)
    assert warning and "not improved for 2 evaluations" in warning and "best 0.9000" in warning
    assert PlateauWatch(patience=0).update(1.0) is None


def test_a_lora_adapter_on_the_lm_head_is_trained_through_the_labelled_head(tmp_path: Path) -> None:
    """The head runs only at labelled positions through its own forward, so a LoRA-wrapped
    head (lm_head in lora_target_modules) learns: its adapter weights leave their zero init."""
    config = tiny_config(
        tmp_path,
        max_steps=2,
        eval_strategy="no",
        save_strategy="no",
        lora_target_modules=["q_proj", "lm_head"],
    )
    result = run_sft(config)
    adapter = _final_adapter(result.run_dir)
    head_b = [v for k, v in adapter.items() if "lm_head" in k and "lora_B" in k]
    assert head_b and all(float(v.abs().max()) > 0 for v in head_b)
