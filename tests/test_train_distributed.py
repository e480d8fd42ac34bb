"""Several training processes: two CPU processes (gloo) train exactly like one, under DDP, FSDP
and DeepSpeed ZeRO-2 / ZeRO-3, through transformers' Trainer under `accelerate launch`.

The multi-process tests run the real CLI in subprocesses (the shipped accelerate configs, or the
`--num-processes 2 --cpu --sharding S` shortcut that builds the same launch) and compare the final
weights with a single-process run of the same config (same rows per step): equal within 1e-5.
`accelerate launch --cpu` starts ONE process whatever `--num_processes` says (accelerate's
multi-CPU mode is mpirun), so these launches use the multi-GPU launcher with the GPUs hidden.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from reasonguard.errors import UserError
from reasonguard.launch.command import (
    accelerate_config,
    launch_command,
    precision_problem,
    several_gpus_problem,
    unsupported_launch,
)
from reasonguard.train.config import SFTConfig
from reasonguard.train.dpo.stage import REFERENCE_FILE, run_dpo
from reasonguard.train.engine import shard_rows
from reasonguard.train.sft import run_sft
from test_train_dpo import dpo_config
from test_train_support import REPO, cli_env, tiny_config, write_yaml_config

ACCELERATE = REPO / "configs" / "accelerate"


def _env(sharding: str = "ddp") -> dict[str, str]:
    env = {**cli_env(), "CUDA_VISIBLE_DEVICES": ""}
    if not sharding.startswith("zero"):  # DeepSpeed finds the CPU itself (see launch.command)
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def _shortcut(stage: str, config: Path, sharding: str, *overrides: str) -> list[str]:
    """`reasonguard train STAGE --num-processes 2 --cpu --sharding S`."""
    return [
        sys.executable,
        "-m",
        "reasonguard",
        "train",
        stage,
        "--config",
        str(config),
        *overrides,
        "--num-processes",
        "2",
        "--cpu",
        "--sharding",
        sharding,
    ]


def _shipped(accelerate_config: str, stage: str, config: Path, *overrides: str) -> list[str]:
    """`accelerate launch --config_file configs/accelerate/X.yaml -m reasonguard train ...`."""
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


def _run(command: list[str], sharding: str = "ddp") -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, env=_env(sharding), cwd=REPO, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    return done


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").exists() else None
    return load_file(str(final / (name or "model.safetensors")))


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _info(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "training_info.json").read_text())


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    events = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(e["step"], e["train_loss"]) for e in events if "train_loss" in e]


def kill_at_first_checkpoint(
    command: list[str], run_dir: Path, timeout: float, sharding: str = "ddp"
) -> tuple[int, list[Any], list[Any]]:
    """Start a launch, SIGKILL its launcher's process group once `run_dir` holds a complete
    checkpoint; (the launcher's return code, its workers, the workers still alive 30 s later)."""
    import psutil

    proc = subprocess.Popen(
        command,
        env=_env(sharding),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher leads its own process group
    )
    workers: list[Any] = []
    alive: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while not list(run_dir.glob("checkpoint-*/trainer_state.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's process group, by its id
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for worker in workers:
            if worker.is_running():
                worker.kill()
    return proc.returncode, workers, alive


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs with one torch thread, as each launched process has (torchrun sets
    OMP_NUM_THREADS=1): on a small shared machine several spinning threads per process are
    many times slower, and one thread keeps the comparison like for like."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sft_config(tmp_path: Path, **overrides: Any) -> SFTConfig:
    # 19 rows: 15 train / 4 eval; 4 rows per step whatever the number of processes, so an
    # epoch is steps of 4, 4, 4, 3 rows (the last one splits 2 + 1). Packing on (the ranks
    # pack different micro-batches), dropout off so one and two processes can match.
    settings: dict[str, Any] = {
        "rows": 19,
        "lora_dropout": 0.0,
        "effective_batch_size": 4,
        "num_train_epochs": 2,
        "save_steps": 3,
        "eval_steps": 4,
        "logging_steps": 1,
    }
    settings.update(overrides)
    return tiny_config(tmp_path, **settings)


_FULL = {"finetuning": "full", "learning_rate": 1e-4}  # the tiny Llama's head is tied

# accelerate 1.15 turns FSDP on only for GPU-like distributed types (MULTI_GPU, MULTI_NPU,
# MULTI_XPU, ...; `AcceleratorState.__init__`), never for MULTI_CPU: on CPU processes an FSDP
# launch trains as DDP, which `test_an_fsdp_launch_on_cpu_trains_as_ddp_and_says_so` covers.
FSDP_ON_CPU = (
    "accelerate enables FSDP only on GPU process groups (not MULTI_CPU / gloo); two processes "
    "need two GPUs"
)
needs_gpu_for_fsdp = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason=FSDP_ON_CPU
)

# A pack budget below every row's length: each row is a micro-batch of its own, so a step of 4
# rows is 2 micro-batches per rank on 2 processes (4 in one), their gradients accumulated (DDP's
# no_sync, DeepSpeed's accumulation boundary, FSDP's unsynchronised backward) before the update.
_ACCUMULATING = {"pack_tokens": 16}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Path]:
    """One-process runs to compare with (LoRA, full fine-tuning, and each with one row per
    micro-batch), each trained the first time a test asks for it."""
    tmp = tmp_path_factory.mktemp("single")
    settings = {
        "lora": {},
        "full": _FULL,
        "lora-accumulating": _ACCUMULATING,
        "full-accumulating": {**_FULL, **_ACCUMULATING},
    }

    class Runs(dict):
        def __missing__(self, kind: str) -> Path:
            config = _sft_config(tmp, output_dir=str(tmp / kind), **settings[kind])
            self[kind] = run_sft(config).run_dir
            return self[kind]

    return Runs()


def _same_run(two: Path, one: Path) -> None:
    info, reference = _info(two), _info(one)
    assert info["outcome"] == "finished" and info["plan"]["processes"] == 2
    assert info["plan"]["samples_per_step"] == reference["plan"]["samples_per_step"] == 4
    assert info["steps_completed"] == reference["steps_completed"] == 8
    assert _max_difference(_weights(one), _weights(two)) <= 1e-5
    # Each step's loss is the whole step's (normalised by the global label count).
    one_curve, two_curve = _train_losses(one), _train_losses(two)
    assert [s for s, _ in two_curve] == [s for s, _ in one_curve] == list(range(1, 9))
    for (_, a), (_, b) in zip(one_curve, two_curve, strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    assert info["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], rel=1e-5)
    assert info["tokens_seen"] == reference["tokens_seen"]


def _accumulated(two: Path, one: Path) -> None:
    """Every step of `two` ran 2 micro-batches per rank (`one`: one per row): the weights that
    `_same_run` compares were accumulated over them."""
    info, reference = _info(two), _info(one)
    assert info["micro_batches_per_rank"] == 2 * info["steps_completed"] == 16
    epochs = reference["config"]["num_train_epochs"]
    assert reference["micro_batches_per_rank"] == reference["data"]["train_rows"] * epochs


# --------------------------------------------------------------------------------------------
# Two processes against one (subprocesses)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sharding", "finetuning"),
    [("ddp", "lora"), ("zero3", "full")],
)
def test_two_processes_killed_and_resumed_train_the_weights_of_one(
    tmp_path: Path, single, sharding: str, finetuning: str
) -> None:
    extra = _FULL if finetuning == "full" else {}
    path = write_yaml_config(tmp_path / "sft.yaml", _sft_config(tmp_path, **extra))
    two = tmp_path / "two"
    accelerate_config = {"ddp": "ddp.yaml", "zero3": "deepspeed-zero3.yaml"}[sharding]

    # Two processes under `accelerate launch` with the shipped config, SIGKILLed once the first
    # checkpoint is complete.
    returncode, workers, alive = kill_at_first_checkpoint(
        _shipped(accelerate_config, "sft", path, f"output_dir={two}"), two, 300, sharding
    )
    assert not alive, f"workers outlived their launcher: {alive}"
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(workers) >= 2
    assert not (two / "final").exists()

    # Rerun through the `--num-processes 2 --cpu` shortcut: it resumes from that checkpoint.
    resumed = _run(_shortcut("sft", path, sharding, f"output_dir={two}"), sharding)
    assert resumed.stdout.count("resuming from") == 1  # printed by rank 0 only
    info = _info(two)
    resumed_step = int(Path(info["resumed_from"][0]).name.split("-")[1])
    assert 0 < resumed_step < info["plan"]["total_steps"] == 8
    assert info["plan"]["distributed"] == {"ddp": "MULTI_CPU", "zero3": "DEEPSPEED"}[sharding]
    _same_run(two, single[finetuning])
    # Only rank 0 wrote the run directory's files: those of one process.
    assert sorted(p.name for p in two.iterdir()) == sorted(
        p.name for p in single[finetuning].iterdir()
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sharding", "finetuning"),
    [
        pytest.param("fsdp", "full", marks=needs_gpu_for_fsdp),
        pytest.param("fsdp", "lora", marks=needs_gpu_for_fsdp),
        ("zero2", "full"),  # LoRA under DeepSpeed: the ZeRO-3 DPO test below
        ("zero3", "full"),
    ],
)
def test_sharded_processes_accumulating_micro_batches_train_the_weights_of_one(
    tmp_path: Path, single, sharding: str, finetuning: str
) -> None:
    extra = {**(_FULL if finetuning == "full" else {}), **_ACCUMULATING}
    path = write_yaml_config(tmp_path / "sft.yaml", _sft_config(tmp_path, **extra))
    two = tmp_path / "two"
    _run(_shortcut("sft", path, sharding, f"output_dir={two}"), sharding)
    assert _info(two)["plan"]["distributed"] == {"fsdp": "FSDP"}.get(sharding, "DEEPSPEED")
    one = single[f"{finetuning}-accumulating"]
    _same_run(two, one)
    _accumulated(two, one)


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU machine FSDP runs (test_sharded_processes_*)"
)
def test_an_fsdp_launch_on_cpu_trains_as_ddp_and_says_so(tmp_path: Path, single) -> None:
    config = _sft_config(tmp_path, **_FULL, **_ACCUMULATING)
    path = write_yaml_config(tmp_path / "sft.yaml", config)
    two = tmp_path / "two"
    done = _run(_shipped("fsdp.yaml", "sft", path, f"output_dir={two}"), "fsdp")
    assert "accelerate enables on GPUs only" in done.stderr
    assert _info(two)["plan"]["distributed"] == "MULTI_CPU"
    _same_run(two, single["full-accumulating"])
    _accumulated(two, single["full-accumulating"])


def test_the_accelerate_floor_passes_the_accumulation_boundary_to_deepspeed() -> None:
    # accelerate 1.8.0 (huggingface/accelerate#3630) is the first release whose DeepSpeed
    # backward takes `sync_gradients`; earlier ones stepped DeepSpeed after every micro-batch.
    import inspect
    import tomllib

    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper
    from packaging.version import Version

    assert "sync_gradients" in inspect.signature(DeepSpeedEngineWrapper.backward).parameters
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(d for d in dependencies if d.startswith("accelerate>="))
    assert Version(floor.removeprefix("accelerate>=")) >= Version("1.8.0")


@pytest.fixture(scope="module")
def rsft(tmp_path_factory) -> Path:
    # A tiny R-SFT adapter to start from; its dropout must be 0 too (a continued adapter keeps
    # the LoRA dropout it was created with).
    tmp = tmp_path_factory.mktemp("rsft")
    return run_sft(
        tiny_config(tmp, rows=8, max_steps=2, eval_strategy="no", lora_dropout=0.0)
    ).final_dir


# 11 pairs: 9 train / 2 eval; steps of 4, 4, 1 pairs (the last leaves rank 1 without a pair);
# padded micro-batches (no packing), the reference log-probs split over the ranks.
_DPO = {"rows": 11, "effective_batch_size": 4, "num_train_epochs": 2, "packing": False}


@pytest.fixture(scope="module")
def single_dpo(tmp_path_factory, rsft: Path) -> Path:
    """The one-process DPO run every sharding's two processes are compared with."""
    return run_dpo(dpo_config(tmp_path_factory.mktemp("dpo-one"), rsft, **_DPO)).run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "sharding", ["ddp", pytest.param("fsdp", marks=needs_gpu_for_fsdp), "zero3"]
)
def test_two_process_dpo_trains_the_weights_of_one(
    tmp_path: Path, rsft: Path, single_dpo: Path, sharding: str
) -> None:
    one = single_dpo
    config = dpo_config(tmp_path / "two", rsft, **_DPO)
    path = write_yaml_config(tmp_path / "dpo.yaml", config)
    _run(_shortcut("dpo", path, sharding), sharding)
    two = Path(config.output_dir)

    info = _info(two)
    assert info["outcome"] == "finished" and info["plan"]["processes"] == 2
    assert info["steps_completed"] == _info(one)["steps_completed"] == 6
    reference_one = load_file(str(one / REFERENCE_FILE))
    reference_two = load_file(str(two / REFERENCE_FILE))
    assert _max_difference(reference_one, reference_two) <= 1e-4  # summed log-probs, ~-100
    assert _max_difference(_weights(one), _weights(two)) <= 1e-5
    for (_, a), (_, b) in zip(_train_losses(one), _train_losses(two), strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    accuracy = info["dpo"]["final_eval_reward_accuracy"]
    assert accuracy == _info(one)["dpo"]["final_eval_reward_accuracy"]


# --------------------------------------------------------------------------------------------
# Pieces (in process, fast)


def test_the_rows_per_step_do_not_depend_on_the_number_of_processes() -> None:
    paper = SFTConfig(per_device_train_batch_size=6, effective_batch_size=384)
    assert [paper.rows_per_step(n) for n in (1, 4, 8)] == [384, 384, 384]
    assert [paper.accumulation_for(n) for n in (1, 4, 8)] == [64, 16, 8]
    assert paper.accumulation_for(5) == 13  # 384 rows over 5 x 6: the last pass is partial
    # Without effective_batch_size, Hugging Face's rule: per device x accumulation x processes.
    plain = SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=3)
    assert [plain.rows_per_step(n) for n in (1, 2)] == [6, 12]
    assert plain.samples_per_step == 6


def test_each_rank_takes_every_other_row_by_length() -> None:
    rows = ["aaaa", "b", "ccc", "dd", "eeeee"]
    assert shard_rows(rows, 0, 1) == sorted(rows, key=len, reverse=True)
    ranks = [shard_rows(rows, r, 2) for r in (0, 1)]
    assert ranks == [["eeeee", "ccc", "b"], ["aaaa", "dd"]]
    assert shard_rows(["x", "y"], 2, 3) == []  # a rank can get no row


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            # what `accelerate launch --cpu --num_processes 2` hands its single process
            {
                "ACCELERATE_USE_CPU": "True",
                "MASTER_ADDR": "127.0.0.1",
                "ACCELERATE_DYNAMO_BACKEND": "NO",
            },
            "starts ONE process",
        ),
    ],
)
def test_launches_that_cannot_train_are_refused_before_loading(
    tmp_path, monkeypatch, env, message
) -> None:
    assert message in (unsupported_launch(env) or "")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = tiny_config(tmp_path)
    with pytest.raises(UserError, match=message):
        run_sft(config)
    assert not Path(config.output_dir).exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("gpus", "env", "refused"),
    [
        (4, {}, True),  # `reasonguard train sft` on a 4-GPU machine: DataParallel
        (2, {"CUDA_VISIBLE_DEVICES": "0,1"}, True),
        (1, {}, False),
        (0, {}, False),
        (4, {"WORLD_SIZE": "4", "RANK": "0"}, False),  # one process per GPU (a launcher)
        (4, {"ACCELERATE_USE_CPU": "true"}, False),  # --cpu: no GPU is used
    ],
)
def test_one_process_on_several_gpus_is_refused(gpus, env, refused) -> None:
    problem = several_gpus_problem(gpus, env, stage="dpo")
    assert (problem is not None) == refused
    if refused:
        assert f"sees {gpus} GPUs" in problem and "DataParallel" in problem
        assert f"reasonguard train dpo --config C.yaml --num-processes {gpus}" in problem
        assert "CUDA_VISIBLE_DEVICES=0 reasonguard train dpo" in problem


@pytest.mark.parametrize(
    ("asked", "bf16", "refused"),
    [
        (None, False, False),  # outside a launcher
        ("no", False, False),  # the shipped configs, --num-processes
        ("no", True, False),
        ("bf16", True, False),  # says what the config says
        ("bf16", False, True),  # would autocast a run that loads and records fp32
        ("fp16", True, True),
        ("fp16", False, True),
        ("fp8", True, True),
    ],
)
def test_the_training_config_decides_the_precision(asked, bf16, refused) -> None:
    env = {} if asked is None else {"ACCELERATE_MIXED_PRECISION": asked}
    problem = precision_problem(bf16, env)
    assert (problem is not None) == refused
    if refused:
        assert f"mixed_precision {asked}" in problem and "--mixed_precision no" in problem


def test_a_launcher_precision_the_config_does_not_train_is_refused_before_loading(
    tmp_path, monkeypatch
) -> None:
    # `accelerate launch --mixed_precision bf16` on this CPU machine, where bf16: auto is off.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = tiny_config(tmp_path)
    with pytest.raises(UserError, match="bf16: auto is on only on a CUDA GPU"):
        run_sft(config)
    assert not Path(config.output_dir).exists()


def test_every_shipped_accelerate_config_leaves_precision_to_the_training_config() -> None:
    import yaml

    for path in SHIPPED_ACCELERATE:
        assert yaml.safe_load(path.read_text())["mixed_precision"] == "no", path.name


def test_accelerate_cpu_with_one_process_is_not_refused() -> None:
    env = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_DYNAMO_BACKEND": "NO"}  # --num_processes 1
    assert unsupported_launch(env) is None
    assert unsupported_launch({**env, "MASTER_ADDR": "h", "WORLD_SIZE": "2", "RANK": "0"}) is None


def test_num_processes_builds_a_two_process_accelerate_launch() -> None:
    command, env = launch_command(["train", "sft", "--config", "c.yaml", "lr=1"], 2, cpu=True)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[3:5] == ["--config_file", str(accelerate_config("ddp"))]
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[-7:] == ["-m", "reasonguard", "train", "sft", "--config", "c.yaml", "lr=1"]
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["ACCELERATE_USE_CPU"] == "true"
    _, gpu_env = launch_command(["train", "sft"], 4, cpu=False, environ={"PATH": "/bin"})
    assert gpu_env == {"PATH": "/bin"}
    zero3, zero_env = launch_command(["train", "sft"], 4, cpu=True, sharding="zero3")
    assert zero3[3:5] == ["--config_file", str(accelerate_config("zero3"))]
    assert "ACCELERATE_USE_CPU" not in zero_env  # accelerate would drop DeepSpeed on CPU


def _process_env(launcher_args: list[str]) -> dict[str, str]:
    """The environment accelerate's launcher gives each process for `accelerate launch ARGS`
    (its own argument parsing and environment building, without starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(launcher_args))
    if args.use_deepspeed:  # what accelerate's launch_command does before the DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "zero2", "zero3"])
def test_sharding_launches_exactly_the_shipped_accelerate_config(sharding: str) -> None:
    import yaml

    command, _ = launch_command(["train", "sft"], 2, cpu=False, environ={}, sharding=sharding)
    shipped = ACCELERATE / accelerate_config(sharding).name
    assert accelerate_config(sharding).read_bytes() == shipped.read_bytes()  # the same file
    by_hand = ["--config_file", str(shipped), "--num_processes", "2", "-m", "reasonguard"]
    shortcut = _process_env(command[3:])
    assert shortcut == _process_env([*by_hand, "train", "sft"])
    # Every setting of the file reaches the processes (FSDP's wrap policy, state-dict type...).
    settings = yaml.safe_load(shipped.read_text())
    for key, value in settings.get("fsdp_config", {}).items():
        assert shortcut[key.upper()] == _as_env(value), key
    for key, value in settings.get("deepspeed_config", {}).items():
        assert shortcut[_DEEPSPEED_ENV[key]].lower() == _as_env(value), key
    assert shortcut["ACCELERATE_MIXED_PRECISION"] == "no"  # the training config decides
    if sharding == "fsdp":
        assert shortcut["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        assert shortcut["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
        assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in shortcut  # the model's own layer class


# The variable accelerate's DeepSpeed launcher sets for each `deepspeed_config` key of a file.
_DEEPSPEED_ENV = {
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
}


def _as_env(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_sharding_without_num_processes_is_refused(tmp_path, cli) -> None:
    path = write_yaml_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    code, _, err = cli("train", "sft", "--config", path, "--sharding", "fsdp")
    assert code == 2 and "--sharding fsdp needs --num-processes N" in err


def test_dry_run_plans_for_the_number_of_processes(tmp_path, cli) -> None:
    config = tiny_config(tmp_path, rows=12, effective_batch_size=4)
    path = write_yaml_config(tmp_path / "c.yaml", config)
    code, out, err = cli("train", "sft", "--config", path, "--dry-run", "--num-processes", "2")
    assert code == 0, err
    assert "2 rows x 1 accumulation x 2 processes = 4 rows per optimizer step" in out


SHIPPED_ACCELERATE = sorted(ACCELERATE.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_ACCELERATE, ids=[p.name for p in SHIPPED_ACCELERATE])
def test_every_shipped_accelerate_config_loads_and_opens_with_its_command(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    expected = {
        "ddp.yaml": "MULTI_GPU",
        "deepspeed-zero2.yaml": "DEEPSPEED",
        "deepspeed-zero3.yaml": "DEEPSPEED",
        "fsdp.yaml": "FSDP",
    }[path.name]
    assert str(config.distributed_type).endswith(expected)
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file configs/accelerate/{path.name} ")
    if "zero3" in path.name:
        assert config.deepspeed_config["zero_stage"] == 3
        assert config.deepspeed_config["zero3_init_flag"] is True  # weights load partitioned
    if path.name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
