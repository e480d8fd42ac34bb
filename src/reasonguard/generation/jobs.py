"""What `reasonguard generate` generates and how: its jobs (one output file each, from a
benchmark or a training split), the decoding settings a run folder keeps, the rows it writes and
the timing file beside each output.

Example:
    >>> from reasonguard.generation.jobs import benchmark_jobs
    >>> [job.relpath for job in benchmark_jobs(["AegisSafetyTest"], "data/benchmarks")]
    ['AegisSafetyTest/generated_predictions.jsonl']
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.evaluate.registry import BENCHMARKS, PREDICTIONS_FILE
from reasonguard.format import INSTRUCTION, TASKS, split_input
from reasonguard.generation.resume import STATE_DIR
from reasonguard.infer.backends import Generation


@dataclass(frozen=True)
class Decoding:
    """How to decode; these settings are part of a run and fixed across restarts.

    Attributes:
        samples: continuations per input (k of hard-sample mining; 1 for benchmarks).
        temperature: 0 for greedy, else sampling (the paper samples at 0.7).
        top_p: nucleus mass for sampling (the paper: 0.95).
        max_new_tokens: the token budget per continuation (the official 2048).
        seed: base sampling seed.
        mode: `reasoning` (generate, the paper's way), `fast` (the forced answer block's label
            probabilities, no generation), `cascade` (fast, then reasoning for the items
            inside `bands`) or `classifier` (an encoder classifier's verdicts); all but
            reasoning are for benchmarks, greedy, one sample.
        bands: the cascade's uncertainty bands (`cascade.Bands.to_dict()`).
        classifier: a classifier folder in front of the guard: the cascade's first tier
            (`--classifier`; with mode cascade only).
        classifier_bands: that tier's bands (`Bands.to_dict()`).
    """

    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 2048
    seed: int = 0
    mode: str = "reasoning"
    bands: dict[str, Any] | None = None
    classifier: str | None = None
    classifier_bands: dict[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        """The settings a run folder records; mode, bands and the classifier tier only when
        used, so folders written before they existed still resume."""
        values = asdict(self)
        if self.mode == "reasoning":
            values.pop("mode")
        for key in ("bands", "classifier", "classifier_bands"):
            if values[key] is None:
                values.pop(key)
        return values


@dataclass(frozen=True)
class Job:
    """One output file and the records it is generated from.

    Attributes:
        name: the benchmark or split name (progress bars, logs).
        relpath: the output path under the output folder.
        records: `{instruction, input, output, ...}` rows in output order.
        kind: `benchmark` (official prediction rows) or `data` (mining rows).
    """

    name: str
    relpath: str
    records: tuple[Mapping[str, Any], ...]
    kind: str


# --------------------------------------------------------------------------------------------
# Jobs


def benchmark_jobs(names: Sequence[str], benchmark_dir: str | os.PathLike[str]) -> list[Job]:
    """Jobs for benchmarks by result name (`all`: every benchmark whose file is present).

    Raises:
        UserError: an unknown name, or a named benchmark whose file is missing.
    """
    from reasonguard.evaluate.files import read_json_rows

    folder = Path(benchmark_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: benchmark folder not found")
    wanted = list(dict.fromkeys(names))
    if not wanted:
        raise UserError("no benchmark named; use --benchmarks all or benchmark names")
    if "all" in wanted:
        wanted = [name for name, b in BENCHMARKS.items() if (folder / b.filename).is_file()]
        if not wanted:
            raise UserError(f"{folder}: none of the benchmark files is there")
    jobs = []
    for name in wanted:
        if name not in BENCHMARKS:
            close = difflib.get_close_matches(name, list(BENCHMARKS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(
                f"unknown benchmark {name!r}{hint}; known: {', '.join(BENCHMARKS)}, all"
            )
        path = folder / BENCHMARKS[name].filename
        if not path.is_file():
            raise UserError(
                f"{path}: benchmark file not found (see `reasonguard benchmarks download`)"
            )
        rows = read_json_rows(path)
        for i, row in enumerate(rows):
            check_record(row, f"{path} row {i}")
        jobs.append(Job(name, f"{name}/{PREDICTIONS_FILE}", tuple(rows), "benchmark"))
    return jobs


def data_jobs(source: str, splits: Sequence[str] | None = None) -> list[Job]:
    """Jobs for the splits of a training-data source (see `reasonguard.data.sources.load_source`).

    Raises:
        UserError: the source cannot be loaded, or a record has no string `input`.
    """
    from reasonguard.data.sources import load_source

    jobs = []
    for split, records in load_source(source, splits).items():
        for i, record in enumerate(records):
            check_record(record, f"{source}: split {split!r} row {i}")
        jobs.append(Job(split, f"{split}.jsonl", tuple(records), "data"))
    return jobs


def check_record(record: Any, place: str) -> None:
    if not isinstance(record, Mapping):
        raise UserError(f"{place}: expected a JSON object with instruction/input/output")
    if not isinstance(record.get("input"), str):
        raise UserError(f"{place}: field 'input': missing or not a string")
    instruction = record.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise UserError(f"{place}: field 'instruction': not a string")


def instruction_of(record: Mapping[str, Any]) -> str:
    return record.get("instruction") or INSTRUCTION


def record_key(job: Job, record: Mapping[str, Any]) -> tuple[str, str]:
    """The row field that identifies an input, and its value (checked when resuming)."""
    if job.kind == "benchmark":
        return "prompt", f"{instruction_of(record)}\n{record['input']}"
    return "input", record["input"]


def score_tasks(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The tasks to score an input on: the response tasks only when there is a response."""
    try:
        _, response = split_input(record["input"])
    except ValueError:
        return TASKS  # not in the `Human user: ... AI assistant:` layout: score what is there
    return ("prompt",) if response is None else TASKS


def output_row(
    job: Job,
    record: Mapping[str, Any],
    generations: list[Generation],
    scores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    texts = [g.text for g in generations]
    flags = [g.truncated for g in generations]
    if job.kind == "benchmark":
        first = generations[0]
        row = {
            "prompt": record_key(job, record)[1],
            "label": record.get("output"),
            "predict": first.text,
            "truncated": first.truncated,
            "num_tokens": first.num_tokens,
        }
        if len(generations) > 1:
            row.update(samples=texts, samples_truncated=flags)
        if scores is not None:
            row["scores"] = scores
        return row
    return {
        "instruction": instruction_of(record),
        "input": record["input"],
        "output": record.get("output"),
        "source": record.get("source") or job.name,
        "samples": texts,
        "samples_truncated": flags,
    }


def check_mode_decoding(decoding: Decoding, jobs: Sequence[Job]) -> None:
    """Reject a fast or cascade run that cannot work, naming the option."""
    from reasonguard.cascade.bands import MODES

    if decoding.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {decoding.mode!r}")
    if decoding.mode == "reasoning":
        return
    if any(job.kind != "benchmark" for job in jobs):
        raise UserError(f"--mode {decoding.mode} goes with benchmarks, not training data")
    if decoding.samples != 1 or decoding.temperature > 0:
        raise UserError(f"--mode {decoding.mode} is greedy with one sample")
    if decoding.mode == "cascade" and decoding.bands is None:
        raise UserError("--mode cascade needs calibrated bands (run `reasonguard calibrate`)")
    if decoding.classifier is not None and decoding.mode != "cascade":
        raise UserError(
            f"--classifier is the first tier of --mode cascade, not of --mode {decoding.mode} "
            "(the classifier alone: --model CLASSIFIER)"
        )
    if decoding.classifier is not None and decoding.classifier_bands is None:
        raise UserError("--classifier needs the classifier tier's calibrated bands")


def cost_path(out_dir: str | os.PathLike[str], relpath: str) -> Path:
    """The timing file of one output file of a run folder (under its state folder, which data
    loading and the evaluator skip)."""
    return Path(out_dir) / STATE_DIR / "cost" / f"{relpath}.json"


def read_cost(out_dir: str | os.PathLike[str], relpath: str) -> dict[str, Any]:
    """The timing of one output file: `{"seconds", "rows"}` (zeros when none is kept)."""
    try:
        cost = json.loads(cost_path(out_dir, relpath).read_text())
        return {"seconds": float(cost["seconds"]), "rows": int(cost["rows"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"seconds": 0.0, "rows": 0}


def add_cost(out_dir: str | os.PathLike[str], relpath: str, seconds: float, rows: int) -> None:
    """Add generation seconds and rows written to an output's timing file (atomically; a window
    redone after a restart counts its time and its new rows)."""
    cost = read_cost(out_dir, relpath)
    cost = {"seconds": round(cost["seconds"] + seconds, 3), "rows": cost["rows"] + rows}
    path = cost_path(out_dir, relpath)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _cost_tmp(path)
    tmp.write_text(json.dumps(cost) + "\n")
    tmp.replace(path)


def remove_cost(out_dir: str | os.PathLike[str], relpath: str) -> None:
    """Delete an output's timing file and the half-written one a process killed inside
    `add_cost` leaves beside it."""
    path = cost_path(out_dir, relpath)
    path.unlink(missing_ok=True)
    _cost_tmp(path).unlink(missing_ok=True)


def _cost_tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")
