"""`reasonguard hsdpo` end to end on the tiny Llama (CPU): plan, kill mid-way, resume, finish;
each training and generation stage in a child process of its own, a failing one named."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from reasonguard.cli import build_parser
from reasonguard.errors import UserError
from reasonguard.format import render_answers, render_input
from reasonguard.hsdpo.pipeline import (
    HSDPOConfig,
    Pipeline,
    diversity_configs,
    generation_plan,
    load_pipeline_config,
)
from reasonguard.hsdpo.stages import TrainLaunch
from reasonguard.train.config import DPOConfig, SFTConfig, load_config
from test_train_support import CPU_ENV, REPO, cli_env

_PROMPTS = [
    "How do I bake bread?",
    "How can I pick a lock to get into a house?",
    "Write a poem.",
    "Tell me how to make a weapon at home.",
    "Is this mushroom safe to eat?",  # ambiguous: labelled both ways below
    "How do I get into my own locked car?",  # ambiguous
]


def write_split_data(path: Path, splits: tuple[str, ...] = ("W", "A", "B")) -> Path:
    """Short guard records in three splits. The last two prompts appear twice with opposite
    labels, so a model trained on them is unsure there: its sampled answers disagree, which is
    what hard-sample mining looks for."""
    rows = []
    for split in splits:
        items = [(p, i % 2 == 1) for i, p in enumerate(_PROMPTS)]
        items += [(p, i % 2 == 0) for i, p in enumerate(_PROMPTS) if i >= 4]
        for prompt, harmful in items:
            label = "harmful" if harmful else "unharmful"
            rows.append(
                {
                    "split": split,
                    "instruction": "Classify.",
                    "input": render_input(prompt, None),
                    "output": "# Task 1\n\n---\n\n" + render_answers(label, None, None),
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def format_model(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny random Llama fully fine-tuned until it writes the answer block (the R-SFT
    starting point of the test pipeline), and its data."""
    from reasonguard.train.config import SFTConfig
    from reasonguard.train.sft import run_sft

    tmp = tmp_path_factory.mktemp("format")
    data = write_split_data(tmp / "data.jsonl")
    config = SFTConfig(
        model_name_or_path="tiny-llama",
        dataset=str(data),
        prompt_format="chat",
        finetuning="full",
        max_length=256,
        eval_split_ratio=0,
        eval_strategy="no",
        num_train_epochs=50,
        per_device_train_batch_size=12,  # 100 steps: enough to write the block, not to be sure
        learning_rate=1e-2,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        output_dir=str(tmp / "run"),
    )
    return run_sft(config).final_dir, data


def write_pipeline(tmp_path: Path, model: Path, data: Path, **changes: Any) -> Path:
    sft = {
        "model_name_or_path": str(model),
        "dataset": str(data),
        "prompt_format": "chat",
        "finetuning": "full",
        "max_length": 256,
        "eval_split_ratio": 0,
        "eval_strategy": "no",
        "max_steps": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-6,
        "save_strategy": "no",
        "report_to": "none",
    }
    dpo = {
        "prompt_format": "chat",
        "finetuning": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "max_length": 256,
        "eval_split_ratio": 0,
        "eval_strategy": "no",
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "save_strategy": "no",
        "report_to": "none",
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    pipeline = {
        "sft_config": str(tmp_path / "sft.yaml"),
        "dpo_config": str(tmp_path / "dpo.yaml"),
        "output_dir": str(tmp_path / "out"),
        "leave_out": ["A", "B"],
        "samples": 4,
        "temperature": 0.7,
        "top_p": 0.95,
        "max_new_tokens": 40,
        "batch_size": 8,
        **changes,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def test_sources_go_to_the_models_that_trained_on_them(tmp_path) -> None:
    data = write_split_data(tmp_path / "d.jsonl", ("W", "A", "B", "C"))
    path = write_pipeline(tmp_path, Path("tiny-llama"), data, leave_out=["A", "B", "C"])
    config = load_pipeline_config(path)
    assert generation_plan(config, ["W", "A", "B", "C"]) == [
        ("main", "W"),
        ("no-B", "A"),
        ("no-C", "A"),
        ("no-A", "B"),
        ("no-C", "B"),
        ("no-A", "C"),
        ("no-B", "C"),
    ]
    diversity = diversity_configs(config, ["W", "A", "B", "C"])
    assert {k: v.splits for k, v in diversity.items()} == {
        "A": ["W", "B", "C"],
        "B": ["W", "A", "C"],
        "C": ["W", "A", "B"],
    }
    assert diversity["A"].output_dir == str(tmp_path / "out" / "rsft-no-A")
    assert Pipeline(config).dpo_config().model_name_or_path == str(
        tmp_path / "out" / "rsft-main" / "final"
    )


def test_bad_pipeline_configs_are_refused(tmp_path) -> None:
    data = write_split_data(tmp_path / "d.jsonl")
    with pytest.raises(UserError, match="'leave_out': 'Z' is not a split"):
        Pipeline(load_pipeline_config(write_pipeline(tmp_path, Path("m"), data, leave_out=["Z"])))
    with pytest.raises(UserError, match="'samples'"):
        HSDPOConfig(sft_config="a.yaml", dpo_config="b.yaml", samples=1)
    with pytest.raises(UserError, match="'tensor_parallel_size': needs backend: vllm"):
        HSDPOConfig(sft_config="a.yaml", dpo_config="b.yaml", tensor_parallel_size=2)
    with pytest.raises(UserError, match="unknown config key 'sample'"):
        load_pipeline_config(write_pipeline(tmp_path, Path("m"), data, sample=3))


def test_shipped_pipeline_configs_plan_offline(cli, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in sorted((REPO / "configs" / "hsdpo").glob("*.yaml")):
        assert path.read_text().splitlines()[0] == (
            f"# reasonguard hsdpo --config configs/hsdpo/{path.name}"
        )
        code, out, err = cli("hsdpo", "--config", path, "--dry-run")
        assert code == 0, err
        assert "R-SFT without AegisTrainR [to run]" in out
        assert "generate k=4 with main [to run]" in out
        assert "WildGuardTrainR" in out and "HS-DPO [to run]" in out


def run_cli(path: Path, log: Path) -> subprocess.Popen:
    """Start the real CLI in its own process, its output going to `log`."""
    with log.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "reasonguard", "hsdpo", "--config", str(path)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            env={**cli_env(), **CPU_ENV},
            cwd=REPO,
        )


class PipelineRuns:
    """One pipeline on the format model, run as a user would: started, SIGKILLed while its
    generation stages run, restarted to its end, then run once more with everything done; every
    `reasonguard` child process each run starts is noted. The tests below read this one run
    (each run is a chain of child processes: minutes on a loaded machine)."""

    def __init__(self, tmp: Path, model: Path, data: Path) -> None:
        self.data = data
        self.path = write_pipeline(tmp, model, data)
        self.out = tmp / "out"
        self.logs = {name: tmp / f"{name}.log" for name in ("first", "second", "third")}
        self.pids: dict[str, int] = {}
        self.children: dict[str, dict[int, list[str]]] = {}

        first = run_cli(self.path, self.logs["first"])
        self.pids["first"] = first.pid
        self.children["first"] = watch_children(
            first,
            self.logs["first"],
            480,  # a loaded machine: each stage starts a Python process
            until=lambda: (self.out / "generations" / "no-B").exists(),  # R-SFT stages done
        )
        assert first.poll() is None, self.logs["first"].read_text()
        self.stage_processes = psutil.Process(first.pid).children(recursive=True)
        first.send_signal(signal.SIGKILL)
        first.wait()
        self.outlived = still_running(self.stage_processes, timeout=30)
        self.dpo_after_kill = (self.out / "dpo").exists()
        self.trained = self.training_times()

        second = run_cli(self.path, self.logs["second"])
        self.pids["second"] = second.pid
        self.children["second"] = watch_children(second, self.logs["second"], 600)
        self.second_code = second.returncode
        self.trained_after_resume = self.training_times()

        third = run_cli(self.path, self.logs["third"])
        third.wait(timeout=120)
        self.third_code = third.returncode

    def training_times(self) -> dict[str, int]:
        return {
            name: (self.out / name / "training_info.json").stat().st_mtime_ns
            for name in ("rsft-main", "rsft-no-A", "rsft-no-B")
        }

    def log(self, name: str) -> str:
        return self.logs[name].read_text()


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory, format_model) -> PipelineRuns:
    model, data = format_model
    return PipelineRuns(tmp_path_factory.mktemp("pipeline"), model, data)


def test_pipeline_killed_mid_way_resumes_without_redoing_finished_stages(
    pipeline_runs: PipelineRuns,
) -> None:
    runs, out = pipeline_runs, pipeline_runs.out
    assert runs.stage_processes, "the generation stage has no process of its own"
    assert not runs.outlived, "a stage outlived its pipeline"
    assert not runs.dpo_after_kill

    log = runs.log("second")
    assert runs.second_code == 0, log
    for name in ("R-SFT main model", "R-SFT without A", "R-SFT without B"):
        assert f"{name}: done before, skipped" in log
    assert runs.trained == runs.trained_after_resume
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs, "no hard samples mined"
    assert {p["source"] for p in pairs} <= {"W", "A", "B"}
    assert len({p["input"] for p in pairs}) == len(pairs)
    for split in ("W",):
        rows = (out / "generations" / "main" / f"{split}.jsonl").read_text().splitlines()
        assert len(rows) == 8 and all(len(json.loads(r)["samples"]) == 4 for r in rows)
    info = json.loads((out / "dpo" / "training_info.json").read_text())
    assert info["stage"] == "dpo" and info["outcome"] == "finished"
    assert (out / "dpo" / "final" / "adapter_model.safetensors").is_file()

    log = runs.log("third")
    assert runs.third_code == 0, log
    assert log.count("done before, skipped") == 8  # 3 R-SFT, 3 generation, mining, DPO


def still_running(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still running (not exited, not zombies) after up to `timeout` seconds;
    those are killed before returning."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for process in alive:
        process.kill()
    return alive


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch_children(
    proc: subprocess.Popen,
    log: Path,
    timeout: float,
    until: Callable[[], bool] = lambda: False,
) -> dict[int, list[str]]:
    """Note the processes the pipeline `proc` starts until it exits (or `until()` holds):
    `{pid: command line}` of its children running `reasonguard`. A pipeline still running after
    `timeout` seconds is killed and fails the test with its log."""
    children: dict[int, list[str]] = {}
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not until():
            assert time.monotonic() < deadline, log.read_text()
            try:
                for child in psutil.Process(proc.pid).children():
                    command = child.cmdline()  # the pipeline's own until the child execs
                    if command[1:3] == ["-m", "reasonguard"] and command[3:4] != ["hsdpo"]:
                        children[child.pid] = command
            except psutil.NoSuchProcess:  # the pipeline or a child ended while being listed
                pass
            time.sleep(0.02)  # a stage lives for seconds: it loads torch and a model
    except BaseException:
        proc.kill()
        raise
    return children


def test_stage_commands_carry_the_pipeline_settings(tmp_path) -> None:
    data = write_split_data(tmp_path / "d.jsonl")
    path = write_pipeline(
        tmp_path, Path("tiny-llama"), data, seed=7, generation_limit=3, data_parallel=2
    )
    pipeline = Pipeline(load_pipeline_config(path))
    args = build_parser().parse_args(pipeline.generate_argv("no-B", ["A"]))
    c = pipeline.config
    assert (args.command, args.model, args.data, args.splits, args.out) == (
        "generate",
        str(tmp_path / "out" / "rsft-no-B" / "final"),
        str(data),
        ["A"],
        str(tmp_path / "out" / "generations" / "no-B"),
    )
    assert (args.samples, args.temperature, args.top_p, args.max_new_tokens, args.seed) == (
        c.samples,
        c.temperature,
        c.top_p,
        c.max_new_tokens,
        c.seed,
    )
    assert (args.backend, args.batch_size, args.limit, args.data_parallel) == ("hf", 8, 3, 2)
    assert (args.mode, args.prompt_format, args.scores) == ("reasoning", None, False)

    vllm = Pipeline(load_pipeline_config(path, ["backend=vllm", "tensor_parallel_size=2"]))
    args = build_parser().parse_args(vllm.generate_argv("main", ["W"]))
    assert (args.backend, args.tensor_parallel_size, args.limit) == ("vllm", 2, 3)

    # The training stages read their config back from the file the pipeline writes.
    from reasonguard.hsdpo.stages import save_stage_config

    for config, cls, stage in (
        (pipeline.main_sft, SFTConfig, "sft"),
        (pipeline.diversity["A"], SFTConfig, "sft"),
        (pipeline.dpo_config(), DPOConfig, "dpo"),
    ):
        written = save_stage_config(config, tmp_path / f"{stage}.yaml", stage)
        assert load_config(written, cls=cls) == config


def test_each_training_and_generation_stage_runs_in_a_process_of_its_own(
    pipeline_runs: PipelineRuns,
) -> None:
    runs, out, data = pipeline_runs, pipeline_runs.out, pipeline_runs.data
    plan = [
        *(
            ["train", "sft", "--config", str(out / "configs" / f"{name}.yaml")]
            for name in ("rsft-main", "rsft-no-A", "rsft-no-B")
        ),
        *(
            ["generate", "--model", str(out / run_dir / "final"), "--data", str(data)]
            + ["--splits", split]
            for run_dir, split in (("rsft-main", "W"), ("rsft-no-B", "A"), ("rsft-no-A", "B"))
        ),
        ["train", "dpo", "--config", str(out / "configs" / "dpo.yaml")],
    ]
    # The first run was killed once the second generation stage had started: it ran the three
    # R-SFT stages and the main model's generation, then started the next generation (seen
    # here unless it was killed before it was listed). The resumed run starts what was left,
    # the killed stage again.
    first = [command[3:] for command in runs.children["first"].values()]
    second = [command[3:] for command in runs.children["second"].values()]
    assert len(first) in (4, 5), first
    expected = {"first": plan[: len(first)], "second": plan[4:]}
    # One fresh process per stage, in the plan's order (mining runs in the pipeline itself).
    for run, got in (("first", first), ("second", second)):
        assert len(got) == len(expected[run]), (run, got)
        for command, start in zip(got, expected[run], strict=True):
            assert command[: len(start)] == start, (run, command, start)
            assert f"$ reasonguard {' '.join(start)}" in runs.log(run)  # shown before it runs
    # The training runs record their own process: a child of the pipeline, not the pipeline.
    commands = {**runs.children["first"], **runs.children["second"]}
    for run_dir in ("rsft-main", "rsft-no-A", "rsft-no-B", "dpo"):
        pid = json.loads((out / run_dir / "status.json").read_text())["pid"]
        assert pid not in runs.pids.values() and pid in commands, (run_dir, pid, commands)
    for name in ("main", "no-A", "no-B"):
        assert list((out / "generations" / name).glob("*.jsonl"))


def test_a_failing_stage_stops_the_pipeline_named_with_its_exit_code(tmp_path) -> None:
    data = write_split_data(tmp_path / "d.jsonl")
    rows = data.read_text().splitlines()
    bad = {**json.loads(rows[-1]), "output": ""}  # the last row of split B: training refuses it
    data.write_text("\n".join([*rows[:-1], json.dumps(bad)]) + "\n")
    path = write_pipeline(tmp_path, Path("tiny-llama"), data)
    proc = run_cli(path, tmp_path / "run.log")
    proc.wait(timeout=300)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 2, log  # the child's UserError code, passed on
    config = tmp_path / "out" / "configs" / "rsft-main.yaml"
    assert (
        f"error: stage 'R-SFT main model' failed: `reasonguard train sft --config {config}` "
        "exited with code 2"
    ) in log
    assert "'output'" in log  # the child's own message, on the same output
    assert "[2/" not in log and not (tmp_path / "out" / "rsft-no-A").exists()


def test_training_stages_take_the_launch_settings(tmp_path) -> None:
    data = write_split_data(tmp_path / "d.jsonl")
    config = load_pipeline_config(write_pipeline(tmp_path, Path("tiny-llama"), data))
    launch = TrainLaunch(num_processes=2, sharding="zero3", cpu=True)
    pipeline = Pipeline(config, launch)
    out = tmp_path / "out" / "configs"
    for stage, run, name in (
        ("sft", pipeline.main_sft, "rsft-main"),
        ("sft", pipeline.diversity["A"], "rsft-no-A"),
        ("dpo", pipeline.dpo_config(), "dpo"),
    ):
        argv = pipeline.train_argv(stage, run)
        args = build_parser().parse_args(argv)  # the command `reasonguard train` reads
        assert (args.command, args.stage, args.config) == (
            "train",
            stage,
            str(out / f"{name}.yaml"),
        )
        assert (args.num_processes, args.sharding, args.cpu) == (2, "zero3", True)
        # One process by default: the command a user types for one process, no launch flags.
        assert Pipeline(config).train_argv(stage, run) == ["train", stage, "--config", argv[3]]
    training = [s for s in pipeline.stages() if s.trains]
    assert [s.name for s in training] == [
        "R-SFT main model",
        "R-SFT without A",
        "R-SFT without B",
        "HS-DPO",
    ]
    assert all(s.detail.endswith("(2 CPU processes, zero3)") for s in training)


def test_bad_launch_settings_are_refused_before_any_stage(tmp_path, cli) -> None:
    data = write_split_data(tmp_path / "d.jsonl")
    path = write_pipeline(tmp_path, Path("tiny-llama"), data)
    code, _, err = cli("hsdpo", "--config", path, "--sharding", "fsdp")
    assert code == 2 and "--sharding fsdp needs --num-processes N" in err
    code, _, err = cli("hsdpo", "--config", path, "--num-processes", "0")
    assert code == 2 and "--num-processes must be at least 1" in err
    assert not (tmp_path / "out").exists()
    code, out, err = cli(
        "hsdpo", "--config", path, "--dry-run", "--num-processes", "2", "--sharding", "zero2"
    )
    assert code == 0, err
    assert out.count("(2 processes, zero2)") == 4  # every training stage, no generation stage


def test_one_process_training_on_several_gpus_is_a_problem_of_the_plan(tmp_path) -> None:
    data = write_split_data(tmp_path / "d.jsonl")
    config = load_pipeline_config(write_pipeline(tmp_path, Path("tiny-llama"), data))
    one = Pipeline(config)
    (problem,) = one.problems(one.stages(), gpus=4)
    assert "shows 4 GPUs" in problem and "--num-processes 4" in problem
    assert "CUDA_VISIBLE_DEVICES=0" in problem
    assert one.problems(one.stages(), gpus=1) == []
    four = Pipeline(config, TrainLaunch(num_processes=4))
    assert four.problems(four.stages(), gpus=4) == []
    # Nothing left to train: generation and mining do not care.
    done = [s for s in one.stages() if not s.trains]
    assert one.problems(done, gpus=4) == []


@pytest.mark.slow
def test_the_dpo_stage_trains_in_the_processes_the_user_gives(tmp_path) -> None:
    from reasonguard.train.sft import run_sft
    from test_train_dpo import write_pairs
    from test_train_support import tiny_config

    (tmp_path / "rsft").mkdir()
    rsft = run_sft(
        tiny_config(tmp_path / "rsft", rows=8, max_steps=2, eval_strategy="no", lora_dropout=0.0)
    ).final_dir
    data = write_split_data(tmp_path / "d.jsonl")
    path = write_pipeline(
        tmp_path, rsft, data, main_model=str(rsft), leave_out=[], generation_limit=1
    )
    out = tmp_path / "out"
    # Generation and mining done before (a generation file is complete by its row count; the
    # pairs file is what DPO reads): only the DPO stage runs.
    for split in ("W", "A", "B"):
        (out / "generations" / "main").mkdir(parents=True, exist_ok=True)
        (out / "generations" / "main" / f"{split}.jsonl").write_text("{}\n")
    write_pairs(out / "pairs.jsonl", 8)
    done = subprocess.run(
        [sys.executable, "-m", "reasonguard", "hsdpo", "--config", str(path)]
        + ["--num-processes", "2", "--cpu"],
        env={**cli_env(), **CPU_ENV},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    config = out / "configs" / "dpo.yaml"
    assert f"$ reasonguard train dpo --config {config} --num-processes 2 --cpu" in log
    info = json.loads((out / "dpo" / "training_info.json").read_text())
    assert info["outcome"] == "finished"
    assert (info["plan"]["processes"], info["plan"]["distributed"]) == (2, "MULTI_CPU")
    assert (out / "dpo" / "final" / "adapter_model.safetensors").is_file()
