"""What the bench scripts share: machine facts, JSON files written whole, processes run under a
time limit, and the bench corpus.

- `machine_facts()` / `torch_facts()`: the Python, CPU, commit, torch build and GPU a number was
  measured on (torch is imported only by the second, so a driver can describe itself cheaply);
  `NvmlPeak`: the device's used memory as NVML reads it while a child process runs.
- `write_json()`: the file is replaced in one step, so a reader (or a run killed mid-write) never
  sees half a file; `read_jsonl()` skips a last line cut short by a killed writer.
- `run_limited()`: one command in its own process group with its output appended to a log; past
  its limit it gets SIGINT (a training run records itself and exits), then SIGKILL for the whole
  group. `subprocess.run(timeout=...)` kills only the direct child and sends no SIGINT first,
  which loses the run's own record and leaves grandchildren (engine workers) running.
- `corpus()` / `pick_rows()`: realistic R-SFT rows: the public benchmark inputs joined row by
  row with the released GuardReasoner-1B model's reasoning and answer for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KILL_GRACE = 10.0  # seconds between SIGINT and SIGKILL

# Prediction folder of the released GuardReasoner-1B -> its benchmark file (same rows, same order).
PREDICTED_BENCHMARKS = {
    "SimpleSafetyTests": "0_0_SimpleSafetyTests.json",
    "AegisSafetyTest": "0_1_AegisSafetyTest.json",
    "HarmBenchPrompt": "0_3_harmbench_prompt.json",
    "HarmBenchResponse": "0_5_harmbench_response.json",
    "XSTestReponseHarmful": "0_6_xstest_response_harmful.json",
    "XSTestResponseRefusal": "0_7_xstest_response_refusal.json",
}


# --------------------------------------------------------------------------------------------
# Machine facts


def git_commit(repo: Path = REPO) -> str | None:
    """The checkout's short commit, or None (no git, or not a checkout: a copied tree)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    """The machine and interpreter, without importing torch."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "git_commit": git_commit(),
    }


def torch_facts() -> dict[str, Any]:
    """torch's build and the first CUDA GPU it sees (None fields on a CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "gpu_capability": f"{props.major}.{props.minor}" if props else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
    }


class NvmlPeak:
    """The device's used memory as NVML reads it, sampled every 0.2 s while a row runs (None
    without NVML or a GPU)."""

    def __init__(self, index: int | None) -> None:
        self.handle = None
        self.peak = 0
        self._stop = threading.Event()
        if index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        except Exception:  # no NVML library, no driver, no such GPU: no reading
            self.handle = None

    def __enter__(self) -> NvmlPeak:
        if self.handle is not None:
            self.peak = self._read()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._read())

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self._stop.set()
            self._thread.join()

    def gib(self) -> float | None:
        return round(self.peak / 2**30, 3) if self.handle is not None else None


# --------------------------------------------------------------------------------------------
# Files


def write_json(path: Path, value: Any) -> Path:
    """Write `value` as indented JSON, replacing the file in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or not (yet) whole."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return Path(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One object per line; a missing file is empty and a torn line (a killed writer) skipped."""
    if not Path(path).is_file():
        return []
    rows = []
    # "\n" only: str.splitlines also cuts at characters JSON strings may hold (U+2028, U+0085).
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


# --------------------------------------------------------------------------------------------
# Processes


def run_limited(
    command: list[str],
    log: Path,
    env: dict[str, str],
    limit: float,
    cwd: Path = REPO,
    grace: float = KILL_GRACE,
) -> dict[str, Any]:
    """Run `command` in its own process group, its output appended to `log`; past `limit`
    seconds SIGINT, `grace` seconds later SIGKILL, and whatever it left in its group goes too.

    Returns `exit_code`, `seconds` and `timed_out`.
    """
    started = time.perf_counter()
    with Path(log).open("ab") as handle:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Run in the background (nohup, `&`), this process may hold SIGINT as ignored, and
            # its children would inherit that and never stop cleanly at their limit.
            preexec_fn=_default_sigint,
        )
        timed_out = False
        try:
            code = process.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(process.pid, signal.SIGINT)
            try:
                code = process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                code = process.wait()
        finally:
            # Its own session keeps a Ctrl-C at the terminal from reaching the group: when this
            # process is interrupted, the group goes too instead of running on unwatched.
            _signal_group(process.pid, signal.SIGKILL)
    return {
        "exit_code": code,
        "seconds": round(time.perf_counter() - started, 2),
        "timed_out": timed_out,
    }


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------------------------
# The bench corpus


def corpus(shared: Path) -> list[dict[str, str]]:
    """Benchmark inputs with the released GuardReasoner-1B outputs for them, row by row, from
    the shared data folder (`data/benchmarks`, `data/predictions/GuardReasoner-1B`).

    Raises:
        SystemExit: a prediction file whose length differs from its benchmark's.
    """
    rows = []
    for folder, bench_file in PREDICTED_BENCHMARKS.items():
        predictions = read_jsonl(
            shared / "data/predictions/GuardReasoner-1B" / folder / "generated_predictions.jsonl"
        )
        inputs = json.loads((shared / "data/benchmarks" / bench_file).read_text())
        if len(predictions) != len(inputs):
            raise SystemExit(
                f"{folder}: {len(predictions)} predictions but {len(inputs)} benchmark rows"
            )
        for prediction, row in zip(predictions, inputs, strict=True):
            rows.append(
                {
                    "instruction": row["instruction"],
                    "input": row["input"],
                    "output": prediction["predict"],
                }
            )
    return rows


def pick_rows(
    records: list[dict[str, Any]],
    count: int,
    tokenizer: Any,
    prompt_format: str,
    max_length: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """`count` records in a seeded order (`seed`) that `reasonguard train` keeps whole enough to
    learn from: valid, and with at least one label token within `max_length`.

    Raises:
        SystemExit: fewer usable records than `count`.
    """
    from reasonguard.data.validate import validate_records
    from reasonguard.train.data import encode

    valid, _ = validate_records({"bench": records}, skip_invalid=True, source="bench")
    order = list(valid["bench"])
    random.Random(seed).shuffle(order)
    picked: list[dict[str, Any]] = []
    for start in range(0, len(order), 64):
        chunk = order[start : start + 64]
        encoded = encode(
            [("bench", i, r) for i, r in enumerate(chunk)], tokenizer, prompt_format, max_length
        )
        picked += [r for r, e in zip(chunk, encoded, strict=True) if e.num_labels > 0]
        if len(picked) >= count:
            return picked[:count]
    raise SystemExit(f"only {len(picked)} usable rows, {count} needed")
