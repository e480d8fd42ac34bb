"""`reasonguard plan`: the shipped configs plan offline, and the estimates move the right way.

The plan is a model, so these tests pin its shape, not its numbers: memory falls from full to
LoRA to QLoRA and with checkpointing, time falls with a faster GPU and scales as 1 / the given
tokens/s; on several GPUs, sharding divides what each strategy shards and time falls with N.
The architecture arithmetic is checked against the public parameter counts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from reasonguard.plan.batch_profile import per_sample_attention
from reasonguard.plan.estimate import (
    GPUS,
    KNOWN_ARCHITECTURES,
    SCALING_EFFICIENCY,
    SHARDINGS,
    TARGETS,
    flops_per_token,
    memory_estimate,
    model_architecture,
    parameter_memory,
    plan_training,
    token_profile,
)
from reasonguard.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo-cpu.yaml"
EXP19 = REPO / "configs" / "exp19-qlora-3b-instruct.yaml"
RSFT_8B = REPO / "configs" / "guardreasoner-rsft-8b.yaml"  # full fine-tuning, 384-row steps
LLAMA_8B = KNOWN_ARCHITECTURES["meta-llama/Llama-3.1-8B"]
CPU_FLOPS = 50e9  # a fixed CPU matmul rate, so tests other than the CLI one time nothing


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on CI: the hub dataset and the gated Llama tokenizer are unreachable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _plan(path: Path, overrides: list[str] = (), **kwargs):
    return plan_training(load_config(path, list(overrides)), **kwargs)


def test_exp19_plans_offline_on_4090(cli) -> None:
    code, out, err = cli("plan", "--config", EXP19, "--gpu", "4090")
    assert code == 0, err
    assert "about " in out and " hours" in out
    assert "ESTIMATED" in out  # rows and lengths from published statistics
    assert "NVIDIA GeForce RTX 4090" in out
    assert "987 per epoch, 2,961 in all" in out  # the same steps as `train sft --dry-run`
    assert "WARNING" not in out  # QLoRA with checkpointing fits 24 GB


def test_demo_plans_on_cpu_with_a_timed_matmul(cli, tmp_path: Path) -> None:
    out_file = tmp_path / "plan.json"
    code, out, err = cli("plan", "--config", DEMO, "--gpu", "cpu", "--json", out_file)
    assert code == 0, err
    assert "about " in out and "minutes" in out
    assert "matmul measured at" in out
    plan = json.loads(out_file.read_text())
    assert plan["target"] == "cpu" and not plan["data"]["estimated"]
    assert plan["throughput"]["matmul_flops"] > 1e8
    # 81 rows in 8-row steps: 11 per epoch, times the config's epochs.
    assert plan["data"]["train_rows"] == 81 and plan["steps"]["total"] == 11 * 2
    # Real token lengths of the 81 sample rows (300-400 tokens each, SmolLM2 tokenizer).
    assert 81 * 250 < plan["data"]["tokens_per_epoch"] < 81 * 450
    assert 0 < plan["time"]["total_seconds"] < 3600


def test_memory_falls_from_full_to_lora_to_qlora() -> None:
    totals = {}
    for mode in ("full", "lora", "qlora"):
        plan = _plan(EXP19, [f"finetuning={mode}"], gpu="h100")
        totals[mode] = plan["memory"]["with_checkpointing"]
        assert (
            plan["memory"]["with_checkpointing"]["activations"]
            < (plan["memory"]["without_checkpointing"]["activations"])
        )
    assert totals["qlora"]["weights"] < totals["lora"]["weights"] < totals["full"]["weights"]
    assert totals["qlora"]["total"] < totals["lora"]["total"] < totals["full"]["total"]


def test_checkpointing_and_micro_batch_lower_activations() -> None:
    arch = KNOWN_ARCHITECTURES["meta-llama/Llama-3.2-3B"]
    config = load_config(EXP19)

    def activations(tokens: int, ckpt: bool) -> float:
        return memory_estimate(arch, config, True, tokens, tokens // 2, ckpt, True)["activations"]

    assert activations(2048, True) < activations(2048, False) / 5
    assert activations(1024, False) == pytest.approx(activations(2048, False) / 2)


def test_time_scales_inversely_with_tokens_per_second() -> None:
    slow = _plan(DEMO, gpu="cpu", tokens_per_second=100.0)
    fast = _plan(DEMO, gpu="cpu", tokens_per_second=400.0)
    assert slow["time"]["total_seconds"] == pytest.approx(4 * fast["time"]["total_seconds"])
    assert slow["throughput"]["source"] == "given"


def test_more_tflops_means_less_time() -> None:
    by_gpu = {gpu: _plan(EXP19, gpu=gpu)["time"]["total_seconds"] for gpu in GPUS}
    order = sorted(GPUS, key=lambda g: GPUS[g].bf16_tflops)  # slowest first
    assert [by_gpu[g] for g in order] == sorted(by_gpu.values(), reverse=True)
    cpu = _plan(DEMO, gpu="cpu", cpu_flops=CPU_FLOPS)["time"]["total_seconds"]
    assert _plan(DEMO, gpu="cpu", cpu_flops=4 * CPU_FLOPS)["time"]["total_seconds"] == (
        pytest.approx(cpu / 4)
    )


def test_too_big_for_the_gpu_warns_and_names_what_fits(cli) -> None:
    too_big = ["finetuning=full", "gradient_checkpointing=false", "optim=adamw_torch"]
    code, out, _ = cli("plan", "--config", EXP19, "--gpu", "4070ti-super", *too_big)
    assert code == 0
    warning = next(line for line in out.splitlines() if line.startswith("WARNING"))
    assert "exceeds the 16.0 GiB" in warning
    assert "gradient_checkpointing=true finetuning=lora" in warning
    # The first suggestion, applied, fits and keeps the 128 rows per optimizer step.
    first = _plan(EXP19, too_big, gpu="4070ti-super")["memory"]["would_fit"][0]["overrides"]
    fixed = _plan(EXP19, [*too_big, *first], gpu="4070ti-super")
    assert fixed["memory"]["fits"] and "would_fit" not in fixed["memory"]
    assert fixed["config"]["samples_per_step"] == 128


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "v100"], "--gpu 'v100' is not known; choose one of: h100, a100"),
        (["--gpu", "4090", "--tokens-per-second", "0"], "must be a positive number"),
        (["--gpu", "h100", "--sharding", "zero3"], "--sharding zero3 shards over several GPUs"),
        (["--gpu", "h100", "--num-processes", "0"], "--num-processes must be at least 1"),
        (["--gpu", "h100", "--num-processes", "2", "--sharding", "zero1"], "choose one of: ddp"),
        (["--gpu", "cpu", "--num-processes", "2"], "--num-processes N > 1 plans N GPUs"),
        # exp19 is QLoRA: train refuses it under FSDP / DeepSpeed, so the plan does too.
        (["--gpu", "h100", "--num-processes", "2", "--sharding", "fsdp"], "qlora cannot be"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(cli, args: list[str], message: str) -> None:
    code, out, err = cli("plan", "--config", EXP19, *args)
    assert code == 2 and out == ""
    assert message in err


def test_cli_choices_match_the_library() -> None:
    from reasonguard.commands.plan import GPU_CHOICES, SHARDING_CHOICES

    assert tuple(GPU_CHOICES) == TARGETS
    assert tuple(SHARDING_CHOICES) == SHARDINGS


def test_architectures_match_public_parameter_counts() -> None:
    """Llama-3.2-3B: 3.21B params, 24.3M LoRA r=16 params on all seven projections (peft's
    count); Llama-3.1-8B: 8.03B; SmolLM2-135M: 134.5M, as its config.json from the offline alias
    gives it too."""
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    llama3b = model_architecture("meta-llama/Llama-3.2-3B-Instruct")
    assert llama3b.total_params == pytest.approx(3.2128e9, rel=1e-3)
    assert llama3b.lora_params(16, modules) == 24_313_856
    assert model_architecture("meta-llama/Llama-3.1-8B").total_params == pytest.approx(
        8.0301e9, rel=1e-3
    )
    smol = model_architecture("smollm2")  # the cached folder's config.json
    assert smol.total_params == pytest.approx(134.5e6, rel=1e-3)
    assert smol.total_params == KNOWN_ARCHITECTURES["HuggingFaceTB/SmolLM2-135M"].total_params


def test_unknown_hub_model_offline_is_a_user_error(cli) -> None:
    code, _, err = cli("plan", "--config", EXP19, "--gpu", "h100", "model_name_or_path=acme/x-7b")
    assert code == 2
    assert "no local config.json and no hub access" in err


# --------------------------------------------------------------------------------------------
# Several GPUs


def _state(memory: dict[str, float]) -> float:
    """Per-GPU bytes of weights, trainable weights and optimizer state."""
    return memory["weights"] + memory["trainable_and_optimizer"]


def test_zero3_on_4_gpus_holds_about_a_quarter_of_a_replica(cli, tmp_path: Path) -> None:
    out_file = tmp_path / "plan.json"
    args = ["--gpu", "h100", "--num-processes", 4, "--sharding", "zero3", "--json", out_file]
    code, out, err = cli("plan", "--config", RSFT_8B, *args)
    assert code == 0, err
    assert "on 4 x NVIDIA H100 SXM 80GB (zero3)" in out
    assert "0.85 zero3 scaling efficiency (ASSUMED, not measured)" in out
    assert "GiB per GPU = weights" in out and "WARNING" not in out  # fits 80 GB per GPU
    sharded = json.loads(out_file.read_text())
    assert sharded["parallel"]["num_processes"] == 4 and sharded["parallel"]["sharding"] == "zero3"
    assert sharded["parallel"]["scaling_efficiency"] == SCALING_EFFICIENCY["zero3"] == 0.85
    assert sharded["memory"]["per_gpu_of"] == 4 and sharded["memory"]["fits"]
    assert sharded["throughput"]["processes"] == 4

    replica = _plan(RSFT_8B, gpu="h100")
    assert not replica["memory"]["fits"]
    zero3, ddp = sharded["memory"]["with_checkpointing"], replica["memory"]["with_checkpointing"]
    # 18 bytes a parameter / 4 (bf16 module, fp32 master, gradient, moments) against the
    # replica's 22: about a quarter, a little under it.
    assert 0.75 * _state(ddp) / 4 < _state(zero3) <= _state(ddp) / 4
    assert zero3["sharding_transient"] > 0  # one block and the embeddings / LM head gathered
    # Each GPU runs its own micro-batches: activations are one GPU's, as on one GPU.
    assert zero3["activations"] == pytest.approx(ddp["activations"])
    assert zero3["total"] < ddp["total"] / 2


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp_and_zero3_divide_by_n_and_zero2_keeps_weights_whole(mode: str) -> None:
    config = load_config(RSFT_8B, [f"finetuning={mode}"])
    ddp = parameter_memory(LLAMA_8B, config, True)
    for sharding in ("fsdp", "zero3"):
        two, four = (parameter_memory(LLAMA_8B, config, True, sharding, n) for n in (2, 4))
        assert _state(four) == pytest.approx(_state(two) / 2)
        assert two["sharding_transient"] == four["sharding_transient"] > 0
    zero2 = {n: parameter_memory(LLAMA_8B, config, True, "zero2", n) for n in (2, 4)}
    # ZeRO-2: the bf16 module stays whole on every GPU, whatever N; the fp32 master weights,
    # gradients and moments are divided.
    assert zero2[2]["weights"] == zero2[4]["weights"] >= 2 * LLAMA_8B.total_params
    assert zero2[4]["trainable_and_optimizer"] == pytest.approx(ddp["trainable_and_optimizer"] / 4)


def test_more_gpus_take_less_time_for_the_same_steps() -> None:
    one = _plan(RSFT_8B, gpu="h100")
    four = _plan(RSFT_8B, gpu="h100", num_processes=4, sharding="zero3")
    # effective_batch_size is fixed: the same optimizer steps on any number of GPUs.
    assert four["steps"] == one["steps"]
    t1, t4 = one["time"]["total_seconds"], four["time"]["total_seconds"]
    # / (4 x 0.85), a little more padding: each GPU batches its own share of a step's rows.
    assert t1 / 4 < t4 < t1 / 3
    ddp4 = _plan(RSFT_8B, gpu="h100", num_processes=4, sharding="ddp")
    assert ddp4["time"]["total_seconds"] < t4  # the assumed efficiency: 0.90 against 0.85


def test_steps_follow_the_trainer_without_an_effective_batch_size() -> None:
    """Hugging Face's rule (per device x accumulation x processes): 2 processes take steps of
    twice the rows, as `train sft --dry-run --num-processes 2` plans them."""
    from reasonguard.plan.dryrun import plan_sft

    config = load_config(EXP19)
    plan = plan_training(config, gpu="h100", num_processes=2)
    dry = plan_sft(config, world_size=2)
    assert plan["config"]["samples_per_step"] == dry["samples_per_step"] == 256
    assert plan["steps"]["total"] == dry["total_steps"]
    assert plan["steps"]["total"] < _plan(EXP19, gpu="h100")["steps"]["total"]


def test_too_big_for_one_gpu_names_the_processes_that_fit(cli) -> None:
    code, out, _ = cli("plan", "--config", RSFT_8B, "--gpu", "h100")
    assert code == 0
    assert "per GPU" not in out.split("WARNING")[0]  # the one-GPU plan reads as before
    warning = next(line for line in out.splitlines() if line.startswith("WARNING"))
    assert "would fit: finetuning=lora" in warning
    named = re.search(r"fits with --num-processes (\d) --sharding (fsdp|zero3)", warning)
    assert named, warning
    # The advice, applied, fits; the next smaller count of (2, 4, 8), if any, does not.
    n, sharding = int(named[1]), named[2]
    assert _plan(RSFT_8B, gpu="h100", num_processes=n, sharding=sharding)["memory"]["fits"]
    if n > 2:
        smaller = _plan(RSFT_8B, gpu="h100", num_processes=n // 2, sharding=sharding)
        assert not smaller["memory"]["fits"]


def test_too_big_even_sharded_says_so(cli) -> None:
    # Full fine-tuning of 3B without checkpointing on 16 GB: the activations alone do not fit.
    too_big = ["finetuning=full", "gradient_checkpointing=false", "optim=adamw_torch"]
    code, out, _ = cli("plan", "--config", EXP19, "--gpu", "4070ti-super", *too_big)
    assert code == 0
    assert "none of --num-processes 2, 4, 8 with --sharding fsdp or zero3 fits" in out


# --------------------------------------------------------------------------------------------
# Attention cost: what the run's kernel computes


def test_packed_attention_flops_are_the_sum_over_samples() -> None:
    """A packed row under SDPA runs causal attention per sample (`train.packed_attention`), as
    flash-attention's variable-length kernel does on a GPU: its attention FLOPs are those of its
    samples run alone, not of the whole pack; eager attention computes the whole pack square."""
    from reasonguard.train.data import prepare
    from reasonguard.train.modeling import load_training_tokenizer

    packed = ["packing=true", "pack_tokens=1024"]
    config = load_config(DEMO, packed)
    lengths = [len(e) for e in prepare(config, load_training_tokenizer(config)).train]
    plan = _plan(DEMO, packed, gpu="cpu", cpu_flops=CPU_FLOPS)
    data, compute = plan["data"], plan["compute"]
    assert plan["config"]["packing"] and plan["config"]["attn_implementation"] in ("auto", "sdpa")
    # 11 steps of epoch 0, all simulated: the counts are the epoch's, not scaled.
    assert data["batching_simulated_steps"] == plan["steps"]["per_epoch"] == 11
    assert data["tokens_per_epoch"] == data["computed_tokens_per_epoch"] == sum(lengths)

    arch = KNOWN_ARCHITECTURES["HuggingFaceTB/SmolLM2-135M"]
    trainable = plan["model"]["trainable_params"]

    def attention(tokens: int, keys_per_token: float) -> float:
        parts = flops_per_token(arch, "lora", trainable, False, keys_per_token)
        return tokens * parts["attention"]

    # Each sample alone: n causal queries against (n + 1) / 2 keys on average.
    samples = sum(attention(n, (n + 1) / 2) for n in lengths)
    run = data["computed_tokens_per_epoch"] * compute["flops_per_computed_token"]["attention"]
    assert run == pytest.approx(samples, rel=1e-9)

    # Eager attention gets the block-diagonal mask over the whole row: every pack's square.
    eager = _plan(DEMO, [*packed, "attn_implementation=eager"], gpu="cpu", cpu_flops=CPU_FLOPS)
    keys = eager["data"]["mean_attention_keys_per_token"]
    assert keys > 2 * data["mean_attention_keys_per_token"]
    assert keys <= 1024  # no pack is longer than pack_tokens
    assert eager["time"]["train_seconds"] > plan["time"]["train_seconds"]


def test_padded_rows_cost_the_padded_square_unless_flash_unpads_them() -> None:
    config = load_config(DEMO, ["per_device_train_batch_size=2", "packing=false"])
    lengths, labels = [100, 300, 200, 200], [50, 150, 100, 100]
    # One 4-row step; sdpa on padded rows gets an explicit mask: width^2 per row.
    padded = token_profile(lengths, labels, config, 1024, per_sample_attention("sdpa", False, True))
    widths = [300, 300, 200, 200]  # longest first, two rows a micro-batch, padded to the longest
    assert padded["computed_tokens"] == sum(widths)
    assert padded["attention_keys"] == sum(w * w for w in widths)
    # flash-attention on a GPU unpads them: each row's own causal triangle.
    flash = token_profile(
        lengths, labels, config, 1024, per_sample_attention("flash_attention_2", False, True)
    )
    assert flash["attention_keys"] == sum(n * (n + 1) // 2 for n in lengths)
    # Packed rows: per sample on CPU (our per-sample SDPA); on a GPU SDPA gets transformers'
    # block-diagonal mask over the whole row, and only flash-attention runs per sample.
    assert per_sample_attention("sdpa", True, False) and not per_sample_attention(
        "sdpa", True, True
    )
    assert per_sample_attention("flash_attention_2", True, True)
    assert not per_sample_attention("eager", True, True)
