"""Sharded training on CPU processes: memory per rank and time, one process against two.

Full fine-tuning of SmolLM2-135M (the offline package) on the project's sample rows, a few
optimizer steps of `--rows-per-step` rows, run five ways with the real CLI:

    one   reasonguard train sft --config C.yaml
    ddp   ... --num-processes 2 --cpu                  (a full replica per process)
    fsdp  ... --num-processes 2 --cpu --sharding fsdp  (PyTorch FSDP2)
    zero2 ... --num-processes 2 --cpu --sharding zero2 (DeepSpeed ZeRO-2)
    zero3 ... --num-processes 2 --cpu --sharding zero3 (DeepSpeed ZeRO-3)

Reported per run, from its training_info.json: each rank's peak resident memory (the whole
process: Python, torch, the weights as loaded before sharding, the optimizer state, the
activations), the training seconds (setup excluded) and the largest difference of the final
weights from the one-process run. The processes of a 2-rank run share this machine's cores
(torchrun gives each OMP_NUM_THREADS = cores / 2), so on a 2-core VM the 2-rank runs are not
faster; the point on CPU is the memory per rank and that every strategy trains the same model.
GPU speed of these strategies is not measured here.

Run (about 10 minutes on 2 cores):
    .venv/bin/python bench/sharded_training.py --json runs/bench-sharded.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchlib import write_json

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "one": [],
    "ddp": ["--num-processes", "2", "--cpu"],
    "fsdp": ["--num-processes", "2", "--cpu", "--sharding", "fsdp"],
    "zero2": ["--num-processes", "2", "--cpu", "--sharding", "zero2"],
    "zero3": ["--num-processes", "2", "--cpu", "--sharding", "zero3"],
}


def write_config(path: Path, out: Path, steps: int, rows_per_step: int) -> None:
    path.write_text(
        "\n".join(
            [
                "model_name_or_path: smollm2",
                "prompt_format: chat",
                "finetuning: full",
                "dataset: samples",
                "max_length: 1024",
                "eval_split_ratio: 0.1",
                "eval_strategy: 'no'",
                f"max_steps: {steps}",
                "per_device_train_batch_size: 2",
                f"effective_batch_size: {rows_per_step}",
                "learning_rate: 1.0e-5",
                "warmup_steps: 0",
                "optim: adamw_torch",
                "max_grad_norm: 1.0",
                "bf16: false",
                "gradient_checkpointing: false",
                "packing: true",
                "seed: 42",
                f"output_dir: {out}",
                "logging_steps: 1",
                "save_strategy: 'no'",
                "report_to: none",
                "resume: never",
                "",
            ]
        )
    )


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows-per-step", type=int, default=8)
    parser.add_argument("--workdir", default="runs/bench-sharded")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="a subset of the runs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = (REPO / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    reference = None
    for name, extra in RUNS.items():
        if args.only and name not in args.only and name != "one":
            continue
        run_dir = work / name
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        config = work / f"{name}.yaml"
        write_config(config, run_dir, args.steps, args.rows_per_step)
        command = [sys.executable, "-m", "reasonguard", "train", "sft", "--config", str(config)]
        t0 = time.perf_counter()
        done = subprocess.run(
            command + extra, cwd=REPO, capture_output=True, text=True, env=dict(os.environ)
        )
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{name}: training failed")
        info = json.loads((run_dir / "training_info.json").read_text())
        weights = final_weights(run_dir)
        if reference is None:
            reference = weights
        diff = max(float((weights[k] - reference[k]).abs().max()) for k in reference)
        results[name] = {
            "processes": info["plan"]["processes"],
            "strategy": info["plan"].get("distributed"),
            "peak_rss_gib_per_rank": info["memory_per_rank"]["peak_rss_gib"],
            "weights_gib_per_rank": info["memory_per_rank"]["weights_gib"],
            "optimizer_state_gib_per_rank": info["memory_per_rank"]["optimizer_state_gib"],
            "train_seconds": info["timings"]["train_seconds_all_sessions"],
            "setup_seconds": info["timings"]["setup_seconds"],
            "wall_seconds": round(wall, 1),
            "tokens": info["tokens_seen"]["total"],
            "final_train_loss": info["final_train_loss"],
            "max_weight_difference_from_one": diff,
        }
        r = results[name]
        print(
            f"{name:6s} ranks {r['processes']} | weights + optimizer state per rank "
            f"{', '.join(f'{w:.2f} + {o:.2f}' for w, o in zip(r['weights_gib_per_rank'], r['optimizer_state_gib_per_rank'], strict=True))} GiB"
            f" | peak RSS per rank {', '.join(f'{v:.2f}' for v in r['peak_rss_gib_per_rank'])} GiB | train "
            f"{r['train_seconds']:.1f} s | wall {r['wall_seconds']:.1f} s | loss "
            f"{r['final_train_loss']:.4f} | max |w - w_one| {diff:.1e}",
            flush=True,
        )
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "model": "smollm2 (SmolLM2-135M), full fine-tuning, fp32",
        "steps": args.steps,
        "rows_per_step": args.rows_per_step,
        "runs": results,
    }
    if args.json:
        write_json(Path(args.json), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
