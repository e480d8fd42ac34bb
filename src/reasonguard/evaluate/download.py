"""Getting the benchmark files: download the public ones, convert the gated WildGuardTest.

The ten public files come from the GuardReasoner repository (`data/benchmark/` of
github.com/yueliu1999/GuardReasoner). WildGuardTest lives in the gated hub dataset
`allenai/wildguardmix` (config `wildguardtest`); `convert_wildguardtest` turns an export of it
into the file the evaluator expects.

Example:
    >>> from reasonguard.evaluate.download import download_benchmarks
    >>> download_benchmarks("benchmarks/")  # needs network; skips files already there
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.evaluate.files import BadRows, read_json_rows, read_jsonl
from reasonguard.evaluate.labels import read_label
from reasonguard.evaluate.registry import BENCHMARKS
from reasonguard.format import INSTRUCTION, render_answers, render_input

SOURCE_REPO = "https://github.com/yueliu1999/GuardReasoner"
BASE_URL = "https://raw.githubusercontent.com/yueliu1999/GuardReasoner/main/data/benchmark"
WILDGUARD = BENCHMARKS["WildGuardTest"]

WILDGUARD_HELP = f"""\
WildGuardTest ({WILDGUARD.filename}) is not in the GuardReasoner repository: it is the gated hub
dataset allenai/wildguardmix, config wildguardtest ({WILDGUARD.rows:,} rows). To add it:
  1. accept the terms at https://huggingface.co/datasets/allenai/wildguardmix, then `hf auth login`;
  2. export it:
       python -c "from datasets import load_dataset; load_dataset('allenai/wildguardmix', \\
         'wildguardtest', split='test').to_json('wildguardtest.jsonl')"
  3. convert it (offline):
       reasonguard benchmarks download {{dest}} --wildguardtest-from wildguardtest.jsonl
     (a .parquet export works too when pyarrow is installed).
Until then WildGuardTest is reported as missing; the other averages cover the benchmarks present."""


def _fetch(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(
            f"could not download {url}: {reason}. No network here? Get the files elsewhere "
            f"(git clone {SOURCE_REPO}, folder data/benchmark/) and copy them into the folder."
        ) from None


def download_benchmarks(
    dest: str | os.PathLike[str],
    base_url: str = BASE_URL,
    timeout: float = 60.0,
    force: bool = False,
    log: Callable[[str], Any] = print,
) -> list[Path]:
    """Download every public benchmark file into `dest`; return the files written.

    Files already present are kept unless `force`. Each download is checked (a JSON array with
    the registry's row count) and written atomically, so an interrupted run leaves no half file.

    Raises:
        UserError: a download fails (no network, HTTP error) or returns unexpected content.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for bench in BENCHMARKS.values():
        target = dest / bench.filename
        if bench.gated:
            continue
        if target.exists() and not force:
            log(f"{bench.name}: {target} exists, kept")
            continue
        url = f"{base_url.rstrip('/')}/{bench.filename}"
        data = _fetch(url, timeout)
        try:
            rows = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{url}: not a JSON file (wrong --base-url?)") from None
        if not isinstance(rows, list) or len(rows) != bench.rows:
            got = len(rows) if isinstance(rows, list) else type(rows).__name__
            raise UserError(f"{url}: expected a JSON array of {bench.rows} rows, got {got}")
        tmp = target.with_suffix(".json.part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        written.append(target)
        log(f"{bench.name}: {len(rows)} rows -> {target}")
    return written


def _read_export(path: Path) -> list[Any]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading parquet needs pyarrow; or export as .jsonl") from None
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [row for _, row in read_jsonl(path, BadRows(skip=False))]
    return read_json_rows(path)


def convert_wildguardtest(
    source: str | os.PathLike[str], dest: str | os.PathLike[str], log: Callable[[str], Any] = print
) -> Path:
    """Convert an export of allenai/wildguardmix `wildguardtest` into `dest/0_4_wild_guard_test.json`.

    Each row becomes a guard record (`instruction`, `input`, `output` = the answer block) that
    keeps the three label columns the evaluator reads (`prompt_harm_label`,
    `response_harm_label`, `response_refusal_label`).

    Raises:
        UserError: unreadable export, a row without `prompt` or a label column, an unknown label.
    """
    source, dest = Path(source), Path(dest)
    rows = _read_export(source)
    records = []
    for i, row in enumerate(rows, start=1):
        place = f"{source} row {i}"
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{place}: field 'prompt': missing or not a string")
        labels = {}
        for task, column in WILDGUARD.label_columns.items():
            if column not in row:
                raise UserError(f"{place}: missing key {column!r}")
            value = row[column]
            # Exports write a missing label as null, or NaN from pandas; both mean "no label".
            value = None if isinstance(value, float) and value != value else value
            try:
                labels[task] = read_label(value, task)
            except ValueError as exc:
                raise UserError(f"{place}: field {column!r}: {exc}") from None
        response = row.get("response") or None
        records.append(
            {
                "instruction": INSTRUCTION,
                "input": render_input(row["prompt"], response),
                "output": render_answers(labels["prompt"], labels["refusal"], labels["response"]),
                **{column: labels[task] for task, column in WILDGUARD.label_columns.items()},
            }
        )
    if not records:
        raise UserError(f"{source}: no rows")
    if len(records) != WILDGUARD.rows:
        log(f"warning: {len(records)} rows, the official wildguardtest has {WILDGUARD.rows}")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / WILDGUARD.filename
    target.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    log(f"WildGuardTest: {len(records)} rows -> {target}")
    return target
