"""Sharded training (issue 7): FSDP2 and DeepSpeed ZeRO-2/3 on two CPU processes (gloo).

Each launch is the shipped accelerate config itself (`configs/accelerate/fsdp.yaml`,
`deepspeed-zero2.yaml`, `deepspeed-zero3.yaml`) with `--num_processes 2` and the GPUs hidden,
and its final weights are compared with a single process on the same config and effective
batch: equal within 1e-5. The steps are uneven on purpose (packing gives the ranks different
micro-batch counts, an epoch's last step leaves a rank without a row), so the idle passes that
keep the ranks' collectives in step are exercised.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from reasonguard.errors import UserError
from reasonguard.train.distributed import Processes
from reasonguard.train.dpo import run_dpo
from reasonguard.train.sft import run_sft
from reasonguard.train.sharding import FSDP, Replicated, make_sharding, strategy_name
from reasonguard.train.zero import DeepSpeedZeRO, deepspeed_config, zero_stage
from test_train_distributed import (
    _info,
    _max_difference,
    _run,
    _sft_config,
    _train_losses,
    kill_at_first_checkpoint,
)
from test_train_dpo import dpo_config
from test_train_support import REPO, tiny_config, write_yaml_config

ACCELERATE = REPO / "configs" / "accelerate"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread in process, as each launched process has (see test_train_distributed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _launch(accelerate_config: str, stage: str, config: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE / accelerate_config),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "-m",
        "reasonguard",
        "train",
        stage,
        "--config",
        str(config),
        *overrides,
    ]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_config.json").exists() else None
    return load_file(str(folder / (name or "model.safetensors")))


def _full_config(tmp_path: Path, **overrides: Any):
    # Full fine-tuning of the tiny Llama (its LM head is tied to the embedding).
    return _sft_config(tmp_path, finetuning="full", learning_rate=1e-4, **overrides)


# --------------------------------------------------------------------------------------------
# Two sharded processes against one (subprocesses)


@pytest.mark.slow
def test_fsdp_full_finetune_trains_the_weights_of_one_and_its_checkpoint_resumes_anywhere(
    tmp_path: Path,
) -> None:
    single = run_sft(_full_config(tmp_path, output_dir=str(tmp_path / "single"))).run_dir
    path = write_yaml_config(tmp_path / "sft.yaml", _full_config(tmp_path))
    two = tmp_path / "two"
    _run(_launch("fsdp.yaml", "sft", path, f"output_dir={two}"))

    info, one = _info(two), _info(single)
    assert info["outcome"] == "finished" and info["plan"]["processes"] == 2
    sharding = info["plan"]["sharding"]
    assert sharding["strategy"] == "fsdp" and sharding["unit_classes"] == ["LlamaDecoderLayer"]
    assert sharding["units"] == 3  # two decoder layers and the loss-running root
    assert info["model"]["parameters"] == one["model"]["parameters"]  # global, not a shard
    # Each rank holds half of the weights and of the Adam moments (exact halves: even sizes).
    held, whole = info["memory_per_rank"], one["memory_per_rank"]
    assert len(held["peak_rss_gib"]) == 2 and min(held["peak_rss_gib"]) > 0
    for key in ("weights_gib", "optimizer_state_gib"):
        assert sum(held[key]) == pytest.approx(whole[key][0], abs=2e-3)
        assert max(held[key]) < 0.6 * whole[key][0]
    final_one, final_two = _weights(single / "final"), _weights(two / "final")
    assert sorted(final_two) == sorted(final_one)  # the tied head stored once, as by one process
    assert _max_difference(final_one, final_two) <= 1e-5
    for (_, a), (_, b) in zip(_train_losses(single), _train_losses(two), strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    assert info["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-5)

    # Its checkpoints are the files of one process (weights by save_pretrained, optimizer
    # state by parameter name), so one process resumes one and ends with the same weights.
    state = json.loads((two / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["optimizer_format"] == "by_name"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(two / "config.yaml", resumed / "config.yaml")
    run_sft(_full_config(tmp_path, output_dir=str(resumed)))
    assert _info(resumed)["resumed_from"] == [str(resumed / "checkpoint-3")]
    assert _max_difference(final_one, _weights(resumed / "final")) <= 1e-5


@pytest.mark.slow
def test_zero3_killed_and_resumed_trains_the_weights_of_one(tmp_path: Path) -> None:

    single = run_sft(_full_config(tmp_path, output_dir=str(tmp_path / "single"))).run_dir
    path = write_yaml_config(tmp_path / "sft.yaml", _full_config(tmp_path))
    two = tmp_path / "two"
    command = _launch("deepspeed-zero3.yaml", "sft", path, f"output_dir={two}")

    # SIGKILL the launcher (and so its workers) once the first checkpoint is complete.
    returncode, _, _ = kill_at_first_checkpoint(command, two, 300)
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (two / "final").exists()
    checkpoint = sorted(two.glob("checkpoint-*"))[0]
    # DeepSpeed's partitions of both ranks, next to weights that load like any model's.
    zero_files = sorted(p.name for p in (checkpoint / "zero").rglob("*optim_states.pt"))
    assert len(zero_files) == 2
    assert (checkpoint / "model.safetensors").is_file()

    done = _run(command)
    assert done.stdout.count("resuming from") == 1
    info, one = _info(two), _info(single)
    assert info["outcome"] == "finished" and info["resumed_from"]
    assert info["plan"]["sharding"]["zero_stage"] == 3
    assert info["model"]["parameters"] == one["model"]["parameters"]
    assert info["steps_completed"] == one["steps_completed"] == 8
    assert _max_difference(_weights(single / "final"), _weights(two / "final")) <= 1e-5
    assert info["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-5)

    # A DeepSpeed checkpoint resumes only under DeepSpeed: one process says so.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(checkpoint, other / checkpoint.name)
    with pytest.raises(UserError, match="deepspeed optimizer state"):
        run_sft(_full_config(tmp_path, output_dir=str(other)))


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", ["fsdp.yaml", "deepspeed-zero2.yaml"])
def test_sharded_dpo_continuing_an_adapter_trains_the_weights_of_one(
    tmp_path: Path, accelerate_config: str
) -> None:
    (tmp_path / "rsft").mkdir()
    rsft = run_sft(
        tiny_config(tmp_path / "rsft", rows=8, max_steps=2, eval_strategy="no", lora_dropout=0.0)
    )
    # 11 pairs: 9 train / 2 eval; steps of 4, 4, 1 pairs (the last leaves rank 1 idle).
    settings = {"rows": 11, "effective_batch_size": 4, "num_train_epochs": 2, "save_steps": 4}
    single = run_dpo(dpo_config(tmp_path / "one", rsft.final_dir, **settings)).run_dir
    config = dpo_config(tmp_path / "two", rsft.final_dir, **settings)
    _run(_launch(accelerate_config, "dpo", write_yaml_config(tmp_path / "dpo.yaml", config)))
    two = Path(config.output_dir)

    info = _info(two)
    assert info["plan"]["sharding"]["strategy"] == accelerate_config.split("-")[0].split(".")[0]
    assert info["steps_completed"] == _info(single)["steps_completed"] == 6
    assert _max_difference(_weights(single / "final"), _weights(two / "final")) <= 1e-5
    for (_, a), (_, b) in zip(_train_losses(single), _train_losses(two), strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    one_accuracy = _info(single)["dpo"]["final_eval_reward_accuracy"]
    assert info["dpo"]["final_eval_reward_accuracy"] == one_accuracy


# --------------------------------------------------------------------------------------------
# Pieces (in process, fast)


def test_the_launcher_picks_the_strategy_and_one_process_stays_replicated() -> None:
    assert strategy_name({}) == "replicated"
    assert strategy_name({"ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    assert strategy_name({"ACCELERATE_USE_DEEPSPEED": "true"}) == "deepspeed"
    # `accelerate launch --config_file fsdp.yaml --num_processes 1`: nothing to shard over.
    sharding = make_sharding(Processes(), {"ACCELERATE_USE_FSDP": "true"})
    assert isinstance(sharding, Replicated)
    two = Processes(rank=0, world_size=2)
    assert isinstance(make_sharding(two, {"ACCELERATE_USE_FSDP": "true"}), FSDP)
    zero = make_sharding(
        two, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    )
    assert isinstance(zero, DeepSpeedZeRO) and zero.stage == 3


def test_sharded_strategies_refuse_what_they_cannot_train(tmp_path: Path) -> None:
    two = Processes(rank=0, world_size=2)
    qlora = tiny_config(tmp_path, finetuning="qlora")
    with pytest.raises(UserError, match="qlora cannot be trained under FSDP"):
        FSDP(two, {}).check(qlora, {})
    with pytest.raises(UserError, match="init_adapter: continue"):
        FSDP(two, {}).check(tiny_config(tmp_path), {"merges_adapter": True})
    zero3 = DeepSpeedZeRO(two, {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    with pytest.raises(UserError, match="qlora cannot be trained under DeepSpeed"):
        zero3.check(qlora, {})
    with pytest.raises(UserError, match="under ZeRO-3 use"):
        zero3.check(tiny_config(tmp_path), {"merges_adapter": True})
    DeepSpeedZeRO(two, {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}).check(
        tiny_config(tmp_path), {"merges_adapter": True}
    )  # ZeRO-2 keeps whole weights on every rank: merging works
    with pytest.raises(UserError, match="stage 2 or 3"):
        zero_stage({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})


def test_the_deepspeed_config_comes_from_the_training_config_and_the_launcher(
    tmp_path: Path,
) -> None:
    config = tiny_config(tmp_path, per_device_train_batch_size=3, max_grad_norm=0.5)
    env = {
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    }
    ds = deepspeed_config(config, bf16=True, world_size=4, environ=env)
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["train_batch_size"] == 12
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}

    # A JSON of the user's: its settings stay, "auto" and the loop-owned fields are replaced.
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "stage": 2,
                    "overlap_comm": True,
                    "reduce_bucket_size": "auto",
                },
                "train_batch_size": "auto",
                "optimizer": {"type": "Adam"},
            }
        )
    )
    ds = deepspeed_config(config, False, 2, {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(user)})
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["train_batch_size"] == 6 and "optimizer" not in ds
    user.write_text("{not json")
    with pytest.raises(UserError, match=r"ds\.json: cannot read it as JSON"):
        deepspeed_config(config, False, 2, {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(user)})
