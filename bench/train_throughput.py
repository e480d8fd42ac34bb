"""Training throughput on CPU: three SFT setups on the same rows, as a training step and as a command.

The setups, all LoRA r 16 on every linear layer (the settings of `configs/demo-cpu.yaml`: alpha
32, dropout 0.05, AdamW, lr 1e-3 cosine, gradient clipping at 1.0), fp32, max length 2048 by
default, optimizer steps of `--rows-per-step` rows:

- **A**, a padded SFT step with no packing (the GuardReasoner R-SFT recipe trains unpacked, with
  the loss on the output only): each step's rows in data order, micro-batches of 2 right-padded
  to the longer row, gradient checkpointing on, the full LM head and Hugging Face's loss over
  every position (prompt tokens masked with -100), the loss averaged per micro-batch; a plain
  PyTorch loop (`step_a`).
- **T**, TRL's `SFTTrainer` (`packing=True, packing_strategy="bfd", padding_free=True,
  completion_only_loss=True`, sdpa attention, no gradient checkpointing), fed prompt/completion
  records whose texts are reasonguard's (`format.build_training_pair`, the strings
  `data.tokenize.encode_records` tokenizes). TRL packs the whole dataset best-fit-decreasing into
  `max_length`-token rows, so its optimizer steps hold the same rows in total, not step by step;
  its gradient accumulation is set so it takes about as many steps (`packs // steps`, one pack
  per micro-batch).
- **R**, reasonguard's default through its real engine (`train.sft.SFTRecipe` /
  `SFTTrainer` on transformers' `Trainer`): each step's rows packed best-fit into `max_length`
  tokens with per-sample attention (`train.packed_attention`), the LM head only at labelled
  positions (`train.labelled_head`), the loss normalised over the step's labelled tokens.

Two measurements:

1. **The training step alone.** Each setup runs in a fresh worker process: `--warmup-steps`
   untimed optimizer steps, then `--steps` timed ones. Real (non-pad) tokens per second over the
   timed steps, each step timed from the end of the previous one to the end of its optimizer
   update (data collation included; model loading and start-up are not). A and R train the same
   rows in every step (R's own step plan, `data.step_plan`), so their timed real tokens are equal.
2. **The whole command**: R and T each as a subprocess training `--command-steps` optimizer
   steps, timed from its start to its exit (interpreter start, imports, data, model load,
   training, saving):
   R is `reasonguard train sft --config configs/demo-cpu.yaml packing=true
   model_name_or_path=MODEL max_steps=K dataset=ROWS ...` (its tokens and timings read from the
   run's `training_info.json` and `metrics.jsonl`); T is a plain TRL script on the same rows with
   the same LoRA, learning rate, schedule and max length (this file with `--worker trl-command`),
   ending with `trainer.save_model()`. Reported for each: the command's wall time, the time from
   just before building the data, model and trainer to the end of `train()`, and real tokens/s
   over `train()` with every step counted and with the first step left out. With
   `--baseline-src DIR` (the `src` folder of another reasonguard checkout, e.g. an earlier
   release's) that revision's `reasonguard train sft` runs the same command on the same rows as
   setup **L**, so a change of engine is compared on equal terms in the same run. Every command
   runs `--command-rounds` times (default 2), the order reversed every other round (the first
   process on a fresh machine also pays for cold file caches), and the rounds are averaged.

Both commands run with the glibc allocator settings of `reasonguard train` (R sets them itself by
re-executing; T's process inherits them from this script, which re-executes itself with them
once). CUDA is hidden: this is the CPU benchmark (`bench/train_gpu.py` is the GPU one).

Rows: by default the six benchmarks of `$REASONGUARD_SHARED/data/predictions/GuardReasoner-1B`
joined row by row with their inputs in `data/benchmarks` (benchmark input as `input`, the
released 1B model's reasoning and answer as `output`: realistic R-SFT rows), a seeded sample of
the valid ones; `--dataset samples` (or any source `reasonguard train` accepts) instead.

Output: two tables on stdout and, with `--json`, every number, the ratios R/T and R/A, and the
machine.

Run (the full measurement, SmolLM2-135M, on an otherwise idle machine):
    .venv/bin/python bench/train_throughput.py --json runs/bench-train-throughput.json
The whole command against an earlier revision of reasonguard (a second checkout of it):
    git worktree add ../rg-earlier <commit>
    .venv/bin/python bench/train_throughput.py --skip-step --baseline-src ../rg-earlier/src \\
        --json runs/bench-train-command.json
A smoke run (tiny random Llama, seconds per step):
    .venv/bin/python bench/train_throughput.py --model tiny-llama --dataset samples \\
        --rows-per-step 2 --warmup-steps 1 --steps 1 --command-steps 2 --max-length 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (
    corpus,
    machine_facts,
    pick_rows,
    read_jsonl,
    run_limited,
    torch_facts,
    write_json,
    write_jsonl,
)
from train_setups import (
    A_MICRO_BATCH,
    TokenCounter,
    adamw,
    step_a,
    step_clock,
    trl_accumulation,
    trl_records,
    trl_trainer,
    window,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
DEMO_CONFIG = "configs/demo-cpu.yaml"
SETUPS = ("A", "T", "R")
NO_LOGGING = 1_000_000  # logging_steps for the step measurement: no log event in the timed steps
PROCESS_LIMIT_S = 4 * 3600  # a worker or command still running then is stopped (a hang)


# --------------------------------------------------------------------------------------------
# The setups' configs


def r_overrides(spec: dict[str, Any], rows_file: str, steps: int, out: str, logs: int) -> list[str]:
    """The `key=value` overrides of `configs/demo-cpu.yaml` that make R's run (and A's config).

    Once the spec holds the training settings, they are passed explicitly too, so a baseline
    checkout (`--baseline-src`, with its own copy of the demo config) trains with the same LoRA
    and optimisation settings as R and T."""
    hyper = spec.get("hyper", {})
    same = [
        f"{key}={hyper[key]}"
        for key in ("lora_r", "lora_alpha", "lora_dropout", "learning_rate", "lr_scheduler_type")
        if key in hyper
    ]
    return [
        *same,
        "packing=true",
        f"model_name_or_path={spec['model']}",
        f"max_steps={steps}",
        f"dataset={rows_file}",
        f"max_length={spec['max_length']}",
        "per_device_train_batch_size=1",
        f"gradient_accumulation_steps={spec['rows_per_step']}",
        "eval_split_ratio=0",
        "eval_strategy=no",
        "save_strategy=no",
        "report_to=none",
        f"logging_steps={logs}",
        f"output_dir={out}",
        "resume=never",
    ]


# --------------------------------------------------------------------------------------------
# Workers (one fresh process each)


def worker_a(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """A's timed steps, on the rows R's step plan gives each step."""
    import torch
    from transformers import set_seed

    from reasonguard.train.config import load_config
    from reasonguard.train.data import prepare, step_plan
    from reasonguard.train.modeling import load_model, load_training_tokenizer

    total = spec["warmup_steps"] + spec["steps"]
    overrides = r_overrides(spec, spec["step_rows"], total, str(work / "a"), NO_LOGGING)
    config = load_config(
        REPO / DEMO_CONFIG, [*overrides, "packing=false", "gradient_checkpointing=true"]
    )
    tokenizer = load_training_tokenizer(config)
    rows = prepare(config, tokenizer).train
    plan = step_plan(len(rows), spec["rows_per_step"], config.seed, 0)
    set_seed(config.seed)
    model = load_model(config, bf16=False)
    model.train()
    optimizer = adamw(model, config)
    steps = []
    for k in range(total):
        t0 = time.perf_counter()
        real, computed = step_a(
            model, [rows[i] for i in plan[k]], tokenizer.pad_token_id, None, optimizer, True
        )
        steps.append({"seconds": time.perf_counter() - t0, "tokens": real, "computed": computed})
    return {
        "steps": steps,
        "attention": model.config._attn_implementation,
        "gradient_checkpointing": True,
        "torch_threads": torch.get_num_threads(),
    }


def worker_t(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """T's steps (TRL packs all the rows of the run)."""
    trainer, model = trl_trainer(
        spec, spec["trl_step_rows"], spec["trl_step_accumulation"], NO_LOGGING, str(work / "t")
    )
    counter = TokenCounter(model)
    clock = step_clock(counter)
    trainer.add_callback(clock)
    trainer.train()
    if len(clock.steps) <= spec["warmup_steps"]:
        sys.exit(f"T took {len(clock.steps)} steps: none left after the warm-up (add rows)")
    return {
        "steps": clock.steps,
        "attention": model.config._attn_implementation,
        "gradient_accumulation_steps": spec["trl_step_accumulation"],
        "packs": len(trainer.train_dataset),
        "gradient_checkpointing": False,
    }


def worker_r(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """R's steps through reasonguard's SFT engine (`SFTRecipe` -> `SFTTrainer`)."""
    from reasonguard.train.config import load_config
    from reasonguard.train.sft import SFTRecipe

    total = spec["warmup_steps"] + spec["steps"]
    overrides = r_overrides(spec, spec["step_rows"], total, str(work / "r"), NO_LOGGING)
    recipe = SFTRecipe(load_config(REPO / DEMO_CONFIG, overrides))
    recipe.setup()
    counter = TokenCounter(recipe.model)
    clock = step_clock(counter)
    recipe.trainer.add_callback(clock)
    recipe.train()
    return {
        "steps": clock.steps,
        "attention": recipe.model.config._attn_implementation,
        "gradient_checkpointing": recipe.run_config.gradient_checkpointing,
    }


def worker_trl_command(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """T's whole command: a plain TRL script (build, train, save), timing its parts. The
    libraries are imported first: the setup time starts where R's does, after the imports."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    t_setup = time.perf_counter()
    out = work / "t-command"
    trainer, model = trl_trainer(
        spec, spec["trl_command_rows"], spec["trl_command_accumulation"], 1, str(out)
    )
    counter = TokenCounter(model)
    clock = step_clock(counter)
    trainer.add_callback(clock)
    t_train = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    trainer.save_model(str(out / "final"))
    return {
        "steps": clock.steps,
        "setup_seconds": t_train - t_setup,
        "train_seconds": t_end - t_train,
        "gradient_accumulation_steps": spec["trl_command_accumulation"],
        "packs": len(trainer.train_dataset),
    }


WORKERS = {
    "A": worker_a,
    "T": worker_t,
    "R": worker_r,
    "trl-command": worker_trl_command,
}


def run_worker(name: str, spec_path: Path, work: Path) -> tuple[dict[str, Any], float]:
    """Run one worker in a fresh process; (its result, the process's wall seconds)."""
    result = work / f"{name}.result.json"
    log = work / f"{name}.log"
    command = [sys.executable, str(SCRIPT), "--worker", name, "--spec", str(spec_path)]
    command += ["--result", str(result)]
    return _timed(command, log, dict(os.environ), name), result


def _timed(command: list[str], log: Path, env: dict[str, str], name: str) -> float:
    """Run one process (`benchlib.run_limited`); its wall seconds, or exit with its log's end."""
    print(f"{name}: running ({log})", flush=True)
    log.unlink(missing_ok=True)  # run_limited appends: the log holds this run only
    done = run_limited(command, log, env, PROCESS_LIMIT_S)
    if done["exit_code"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        why = "stopped at the time limit" if done["timed_out"] else f"exit {done['exit_code']}"
        sys.exit(f"{name} failed ({why}); the end of {log}:\n{tail}")
    return done["seconds"]


# --------------------------------------------------------------------------------------------
# Measurement 2: the commands


def command_r(
    spec: dict[str, Any], work: Path, name: str = "R", src: str | None = None, round_: int = 0
) -> dict[str, Any]:
    """`reasonguard train sft ...` as a user runs it; timings from its training_info.json.

    With `src` (another checkout's `src` folder) that revision's package runs instead, with its
    own copy of the demo config."""
    from reasonguard.launch.allocenv import GUARD, MALLOC_ENV

    out = work / f"{name.lower()}-command-{round_}"
    env = dict(os.environ)
    if env.get(GUARD) == "1":  # set by this script's re-exec: let the command set its own
        for key in (*MALLOC_ENV, GUARD):
            env.pop(key, None)
    if src is None:
        exe = Path(sys.executable).parent / "reasonguard"
        cli = [str(exe)] if exe.is_file() else [sys.executable, "-m", "reasonguard"]
        config = DEMO_CONFIG
    else:
        cli = [sys.executable, "-m", "reasonguard"]
        env["PYTHONPATH"] = str(Path(src).resolve())
        config = str(Path(src).resolve().parent / DEMO_CONFIG)
    k = spec["command_steps"]
    command = [*cli, "train", "sft", "--config", config]
    command += r_overrides(spec, spec["command_rows"], k, str(out), 1)
    log = work / f"{name.lower()}-command-{round_}.log"
    seconds = _timed(command, log, env, f"{name} command, round {round_ + 1}")
    info = json.loads((out / "training_info.json").read_text())
    events = [e for e in read_jsonl(out / "metrics.jsonl") if "train_loss" in e]
    steps, last_time, last_tokens = [], 0.0, 0
    for e in events:
        steps.append(
            {
                "seconds": e["elapsed_seconds"] - last_time,
                "tokens": e["tokens_seen"] - last_tokens,
                "computed": e["tokens_seen"] - last_tokens,
            }
        )
        last_time, last_tokens = e["elapsed_seconds"], e["tokens_seen"]
    timings = info["timings"]
    return {
        "command": " ".join(["reasonguard", *command[len(cli) :]]),
        "command_seconds": seconds,
        "setup_seconds": timings["setup_seconds"],
        "train_seconds": timings["train_seconds_all_sessions"],
        "tokens": info["tokens_seen"]["total"],
        "label_tokens": info["tokens_seen"]["labelled"],
        "steps_completed": info["steps_completed"],
        "allocator": info["model"]["cpu_allocator"]["action"],
        "steps": steps,
    }


def command_t(spec_path: Path, work: Path) -> dict[str, Any]:
    seconds, result = run_worker("trl-command", spec_path, work)
    got = json.loads(result.read_text())
    got["command_seconds"] = seconds
    got["tokens"] = sum(s["tokens"] for s in got["steps"])
    got["steps_completed"] = len(got["steps"])
    return got


def measure_commands(
    args: argparse.Namespace, spec: dict[str, Any], spec_path: Path, work: Path
) -> dict[str, Any]:
    """Measurement 2: every command `--command-rounds` times, the order reversed on every other
    round (the first command of a fresh machine also pays for cold file caches), averaged."""
    runners = {
        "T": lambda k: command_t(spec_path, work),
        "R": lambda k: command_r(spec, work, round_=k),
    }
    if args.baseline_src:
        runners["L"] = lambda k: command_r(spec, work, "L", args.baseline_src, k)
    order = [n for n in ("T", "L", "R") if n in runners and (n in args.command_setups or n == "R")]
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    for k in range(args.command_rounds):
        for name in order if k % 2 == 0 else order[::-1]:
            rounds[name].append(command_summary(runners[name](k)))
    got: dict[str, Any] = {name: averaged(rounds[name]) for name in order}
    for name in order:
        if name == "R":
            continue
        other, r = got[name], got["R"]
        got[f"ratio_R_{name}_every_step"] = _ratio(
            r["tokens_per_second_every_step"], other["tokens_per_second_every_step"]
        )
        got[f"ratio_R_{name}_first_step_left_out"] = _ratio(
            r["tokens_per_second_first_step_left_out"],
            other["tokens_per_second_first_step_left_out"],
        )
        got[f"command_seconds_{name}_over_R"] = _ratio(
            other["command_seconds"], r["command_seconds"]
        )
    return got


def averaged(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of every number over the rounds; each round kept under `rounds`."""
    first = rounds[0]
    mean = {
        key: value
        if all(r[key] == value for r in rounds)
        else sum(r[key] for r in rounds) / len(rounds)
        for key, value in first.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and all(isinstance(r.get(key), (int, float)) for r in rounds)
    }
    kept = {k: v for k, v in first.items() if k not in mean and k != "per_step"}
    return {**kept, **mean, "rounds": rounds}


def command_summary(got: dict[str, Any]) -> dict[str, Any]:
    """The command's numbers: wall times and tokens/s over train(), every step or all but the
    first."""
    after_first = window(got["steps"], 1)
    return {
        **{k: v for k, v in got.items() if k != "steps"},
        "setup_and_train_seconds": got["setup_seconds"] + got["train_seconds"],
        "tokens_per_second_every_step": got["tokens"] / got["train_seconds"],
        "tokens_per_second_first_step_left_out": after_first["tokens_per_second"],
        "per_step": got["steps"],
    }


# --------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
    """The machine and libraries (`benchlib`), the torch threads, and the commit, hardware and
    allocator decision as reasonguard records them in training_info.json."""
    import torch
    import transformers
    import trl

    from reasonguard.launch.allocenv import decision
    from reasonguard.launch.runinfo import environment_info

    env = environment_info()
    return {
        **machine_facts(),
        **torch_facts(),
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "torch_threads": torch.get_num_threads(),
        "git_commit": env.get("git_commit"),  # the full commit, marked +dirty with changes
        "hardware": env.get("hardware"),
        "allocator": decision()["action"],
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def print_tables(result: dict[str, Any]) -> None:
    step = result["step"]
    print(f"\n(1) training step: {result['settings']['steps']} timed steps after warm-up")
    print("| setup | steps | real tokens | seconds | real tok/s | padding eff. |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in SETUPS:
        if name in step:
            s = step[name]
            eff = s["tokens"] / s["computed_tokens"] if s["computed_tokens"] else None
            print(
                f"| {name} | {s['steps']} | {s['tokens']:,} | {_fmt(s['seconds'])} | "
                f"{_fmt(s['tokens_per_second'])} | {_fmt(eff, 3)} |"
            )
    print(f"R/T {_fmt(step.get('ratio_R_T'), 2)}x, R/A {_fmt(step.get('ratio_R_A'), 2)}x")
    command = result.get("command")
    if not command:
        return
    print(
        f"\n(2) whole command: {result['settings']['command_steps']} optimizer steps, mean of "
        f"{result['settings']['command_rounds']} rounds"
    )
    print(
        "| setup | steps | real tokens | command s | setup+train s | train() s | "
        "tok/s every step | tok/s first step left out |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("T", "L", "R"):
        if name not in command:
            continue
        c = command[name]
        print(
            f"| {name} | {c['steps_completed']} | {c['tokens']:,} | {_fmt(c['command_seconds'])} | "
            f"{_fmt(c['setup_and_train_seconds'])} | {_fmt(c['train_seconds'])} | "
            f"{_fmt(c['tokens_per_second_every_step'])} | "
            f"{_fmt(c['tokens_per_second_first_step_left_out'])} |"
        )
    if "T" in command:
        print(
            f"R/T tok/s: every step {_fmt(command['ratio_R_T_every_step'], 2)}x, first step left out "
            f"{_fmt(command['ratio_R_T_first_step_left_out'], 2)}x; command time T/R "
            f"{_fmt(command['command_seconds_T_over_R'], 2)}x"
        )
    if "L" in command:
        print(
            f"R/L tok/s: every step {_fmt(command['ratio_R_L_every_step'], 2)}x, first step left "
            f"out {_fmt(command['ratio_R_L_first_step_left_out'], 2)}x; command time L/R "
            f"{_fmt(command['command_seconds_L_over_R'], 2)}x"
        )


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="alias, hub id or folder")
    parser.add_argument(
        "--dataset",
        default="bench",
        help="`bench` (the benchmark inputs with the 1B model's outputs) or a training source",
    )
    parser.add_argument("--rows-per-step", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps (1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of measurement 1")
    parser.add_argument("--command-steps", type=int, default=3, help="steps of measurement 2")
    parser.add_argument(
        "--command-setups",
        nargs="+",
        choices=("T", "L", "R"),
        default=["T", "L", "R"],
        help="the commands of measurement 2 (R always runs; L needs --baseline-src)",
    )
    parser.add_argument(
        "--command-rounds",
        type=int,
        default=2,
        help="runs of each command in measurement 2, the order reversed every other round (2)",
    )
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0, help="the row sample's seed")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--skip-command", action="store_true", help="measurement 1 only")
    parser.add_argument("--skip-step", action="store_true", help="measurement 2 only")
    parser.add_argument(
        "--baseline-src",
        help="the src folder of another reasonguard checkout: its train sft command joins "
        "measurement 2 as setup L",
    )
    parser.add_argument("--work-dir", help="keep run folders and logs here (default: a temp dir)")
    parser.add_argument(
        "--shared", default=os.environ.get("REASONGUARD_SHARED") or REPO.parent / "shared"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command_steps < 2 and not args.skip_command:
        parser.error("--command-steps must be at least 2 (the first step is left out once)")
    if args.command_rounds < 1:
        parser.error("--command-rounds must be at least 1")
    if args.skip_command and args.skip_step:
        parser.error("--skip-command and --skip-step leave nothing to measure")
    if args.baseline_src and not (Path(args.baseline_src) / "reasonguard").is_dir():
        parser.error(f"--baseline-src {args.baseline_src}: no reasonguard package in that folder")
    if min(args.rows_per_step, args.steps) < 1 or args.warmup_steps < 0:
        parser.error("--rows-per-step and --steps must be positive, --warmup-steps >= 0")
    return args


def write_spec(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], Path]:
    """Pick the rows, write them (guard records for R and A, prompt/completion for T) and the
    settings every worker reads."""
    from reasonguard.data.sources import load_source
    from reasonguard.models import resolve_model
    from reasonguard.train.config import load_config
    from reasonguard.train.modeling import load_training_tokenizer

    base = {
        "model": args.model,
        "max_length": args.max_length,
        "rows_per_step": args.rows_per_step,
    }
    config = load_config(REPO / DEMO_CONFIG, r_overrides(base, "samples", 1, str(work), 1))
    tokenizer = load_training_tokenizer(config)
    if args.dataset == "bench":
        records = corpus(Path(args.shared))
    else:
        records = [r for rows in load_source(args.dataset).values() for r in rows]
    step_count = args.rows_per_step * (args.warmup_steps + args.steps)
    command_count = 0 if args.skip_command else args.rows_per_step * args.command_steps
    count = max(step_count, command_count)
    picked = pick_rows(
        records, count, tokenizer, config.prompt_format, config.max_length, seed=args.seed
    )
    step_rows, command_rows = picked[:step_count], picked[:command_count]
    spec: dict[str, Any] = {
        **base,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "command_steps": args.command_steps,
        "model_path": resolve_model(args.model),
        "tokenizer_path": resolve_model(config.tokenizer_name_or_path or args.model),
        "pad_token": tokenizer.pad_token,
        "step_rows": str(write_jsonl(work / "step_rows.jsonl", step_rows)),
        "trl_step_rows": str(
            write_jsonl(
                work / "trl_step_rows.jsonl",
                trl_records(step_rows, tokenizer, config.prompt_format),
            )
        ),
        "trl_step_accumulation": trl_accumulation(
            step_rows, tokenizer, config, args.warmup_steps + args.steps
        ),
        "hyper": {
            k: getattr(config, k)
            for k in (
                "learning_rate",
                "lr_scheduler_type",
                "warmup_steps",
                "weight_decay",
                "adam_beta1",
                "adam_beta2",
                "adam_epsilon",
                "max_grad_norm",
                "optim",
                "seed",
                "lora_r",
                "lora_alpha",
                "lora_dropout",
                "lora_target_modules",
                "prompt_format",
            )
        },
    }
    if command_rows:
        spec["command_rows"] = str(write_jsonl(work / "command_rows.jsonl", command_rows))
        spec["trl_command_rows"] = str(
            write_jsonl(
                work / "trl_command_rows.jsonl",
                trl_records(command_rows, tokenizer, config.prompt_format),
            )
        )
        spec["trl_command_accumulation"] = trl_accumulation(
            command_rows, tokenizer, config, args.command_steps
        )
    return spec, write_json(work / "spec.json", spec)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    spec, spec_path = write_spec(args, work)
    step: dict[str, Any] = {}
    for name in [] if args.skip_step else args.setups:
        _, result = run_worker(name, spec_path, work)
        got = json.loads(result.read_text())
        step[name] = {
            **window(got["steps"], args.warmup_steps),
            **{k: v for k, v in got.items() if k != "steps"},
            "per_step": got["steps"],
        }
    rate = {n: s["tokens_per_second"] for n, s in step.items()}
    step["ratio_R_T"] = _ratio(rate.get("R"), rate.get("T"))
    step["ratio_R_A"] = _ratio(rate.get("R"), rate.get("A"))
    result: dict[str, Any] = {
        "settings": {
            k: spec[k] for k in ("model", "max_length", "rows_per_step", "warmup_steps", "steps")
        }
        | {
            "command_steps": None if args.skip_command else args.command_steps,
            "command_rounds": None if args.skip_command else args.command_rounds,
            "dataset": args.dataset,
            "row_sample_seed": args.seed,
            "a_micro_batch": A_MICRO_BATCH,
            "training": spec["hyper"],
            "trl_gradient_accumulation_steps": spec["trl_step_accumulation"],
        },
        "step": step,
    }
    if not args.skip_command:
        result["command"] = measure_commands(args, spec, spec_path, work)
    result["machine"] = machine_info() | {
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg()[0],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU benchmark, in this process and its children
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO / "src"))
    if args.worker:
        got = WORKERS[args.worker](json.loads(Path(args.spec).read_text()), Path(args.spec).parent)
        write_json(Path(args.result), got)
        return 0

    from reasonguard.launch.allocenv import GUARD, MALLOC_ENV, decision

    if decision()["re_exec"]:
        env = {**os.environ, **MALLOC_ENV, GUARD: "1"}
        os.execvpe(sys.executable, [sys.executable, str(SCRIPT), *sys.argv[1:]], env)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(args, work.resolve())
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(result)
    if args.json:
        write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
