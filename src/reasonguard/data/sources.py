"""Load guard training records from the hub, a folder of split files, one file, or the shipped samples.

A source is any of:

- a hub dataset id (default `yueliu1999/GuardReasonerTrain`), loaded with `datasets.load_dataset`
  (without a reachable hub: from the local Hugging Face cache under `HF_HUB_OFFLINE=1`);
- a local folder of split files `<split>.json`, `<split>.jsonl` or `<split>.parquet` (the split
  is the file stem), which is what a downloaded snapshot of the hub dataset looks like;
- one `.json` / `.jsonl` / `.parquet` file: each record's split is its `split` field when it has
  one, else the file stem; a `.json` file may also hold `{split: [records]}`;
- the alias `samples`: the project's own sample set shipped with the package.

Example:
    >>> from reasonguard.data.sources import load_source
    >>> data = load_source("samples")  # or a hub id, a folder, one file
    >>> sorted(data)  # split names, e.g. from each record's `split` field  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.format import INSTRUCTION
from reasonguard.hub import check_name, looks_like_hub_id

DEFAULT_DATASET = "yueliu1999/GuardReasonerTrain"
SPLITS = ("WildGuardTrainR", "AegisTrainR", "BeaverTailsTrainR", "ToxicChatTrainR")
SAMPLES = "samples"
SAMPLES_FILE = "samples/guard_samples.jsonl"

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")

# Published facts about GuardReasonerTrain (its dataset card and the paper's Table 7), used by
# `--dry-run` when the hub cannot be reached: rows per split, and the p95 token length with the
# Llama 3 tokenizer.
PUBLISHED_ROWS = {
    "yueliu1999/GuardReasonerTrain": {
        "WildGuardTrainR": 86_759,
        "AegisTrainR": 10_798,
        "BeaverTailsTrainR": 27_186,
        "ToxicChatTrainR": 2_801,
    }
}
PUBLISHED_P95_TOKENS = {"yueliu1999/GuardReasonerTrain": 930}


def samples_path() -> Path:
    """Where the shipped sample file lives inside the installed package."""
    return Path(str(resources.files("reasonguard").joinpath(SAMPLES_FILE)))


def load_source(
    source: str = DEFAULT_DATASET, splits: Sequence[str] | None = None
) -> dict[str, list[dict]]:
    """Load guard records by split.

    Args:
        source: a hub dataset id, a folder of split files, one json/jsonl/parquet file, or
            `"samples"` for the shipped sample set.
        splits: the splits to keep, in this order; all of them when None or empty.

    Returns:
        `{split: [record, ...]}`. Each record is a new plain dict with at least `instruction`
        (filled with the GuardReasoner instruction when absent), plus whatever the source had
        (`input`, `output`, extra keys). Field contents are checked by `validate_records`.

    Raises:
        UserError: the file or folder is missing or unreadable, the hub dataset cannot be
            loaded (no hub access, unknown id), or a requested split does not exist.
    """
    source = str(source)
    path = samples_path() if source == SAMPLES else Path(source).expanduser()
    if source == SAMPLES and not path.is_file():
        raise UserError(f"the shipped sample file is missing: {path}")
    if path.is_dir():
        by_split = _load_folder(path)
    elif path.is_file():
        by_split = _load_file(path)
    else:
        # A missing path or a misspelt alias fails here; so does a hub id that cannot be had
        # (no hub reachable, or offline mode without a cached copy), in seconds, not retries.
        check_name(source, kind="dataset", aliases=(SAMPLES,), hub_id=is_hub_dataset_id(source))
        by_split = _load_hub(source)
    return _select(by_split, splits, source)


def is_hub_dataset_id(source: str) -> bool:
    """Whether a data source that is not here names a hub dataset (`owner/name`), not a file:
    a name ending in a data file's suffix (`pairs.jsonl`) is a file, whatever its shape."""
    return looks_like_hub_id(source) and Path(source).suffix.lower() not in FILE_SUFFIXES


def _select(
    by_split: dict[str, list[dict]], splits: Sequence[str] | None, source: str
) -> dict[str, list[dict]]:
    if not splits:
        return by_split
    unknown = [name for name in splits if name not in by_split]
    if unknown:
        raise UserError(
            f"unknown split {unknown[0]!r} in {source}; available splits: "
            f"{', '.join(by_split) or '(none)'}"
        )
    return {name: by_split[name] for name in dict.fromkeys(splits)}


def _record(row: Any, where: str) -> dict:
    """A new plain dict for one row; the instruction defaults to the GuardReasoner one."""
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: expected a JSON object with instruction/input/output")
    record = dict(row)
    if record.get("instruction") is None:
        record["instruction"] = INSTRUCTION
    return record


def split_files(folder: Path) -> list[Path]:
    """The split files of a data folder (`<split>.json|jsonl|parquet`), sorted.

    Raises:
        UserError: no split file, or two files for one split.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise UserError(
            f"{folder}: no split files found (expected <split>.json, <split>.jsonl or "
            "<split>.parquet)"
        )
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise UserError(f"split {path.stem!r} appears twice: {seen[path.stem]} and {path}")
        seen[path.stem] = path
    return files


def _load_folder(folder: Path) -> dict[str, list[dict]]:
    by_split: dict[str, list[dict]] = {}
    for path in split_files(folder):
        rows = _read_rows(path)
        if isinstance(rows, dict):
            raise UserError(f"{path}: a split file must hold a list of records, not {{split: ...}}")
        by_split[path.stem] = _records(rows, str(path))
    return by_split


def _load_file(path: Path) -> dict[str, list[dict]]:
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"{path}: unsupported file type (expected {', '.join(FILE_SUFFIXES)})")
    by_split: dict[str, list[dict]] = {}
    rows = _read_rows(path)
    if isinstance(rows, dict):  # a `{split: [records]}` json file
        return {split: _records(items, f"{path}: split {split!r}") for split, items in rows.items()}
    for record in _records(rows, str(path)):
        split = record.get("split")
        split = split if isinstance(split, str) and split else path.stem
        by_split.setdefault(split, []).append(record)
    if not by_split:
        raise UserError(f"{path}: no records")
    return by_split


def _read_rows(path: Path) -> list[Any] | dict[str, list[Any]]:
    """Rows of a json / jsonl / parquet file (a json file may map split names to row lists)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from exc
    if suffix == ".jsonl":
        return _json_lines(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # `datasets` writes JSON lines under a .json name by default: accept that too.
        try:
            return _json_lines(text, path)
        except UserError:
            raise UserError(f"{path}: invalid JSON: {exc}") from exc
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        return data
    raise UserError(f"{path}: expected a JSON list of records or an object {{split: [records]}}")


def _json_lines(text: str, path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: invalid JSON line: {exc}") from exc
    return rows


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"{path}: cannot read parquet: {exc}") from exc


def _load_hub(dataset_id: str) -> dict[str, list[dict]]:
    try:
        import datasets

        loaded = datasets.load_dataset(dataset_id)
        # to_list() converts a whole split at once, far faster than iterating row by row.
        by_split = {name: _records(split.to_list(), dataset_id) for name, split in loaded.items()}
    except UserError:
        raise
    except Exception as exc:  # network, auth, missing repo, cache: all mean "cannot load"
        raise UserError(
            f"cannot load {dataset_id!r}: it is not a local file or folder, and loading it from "
            f"the Hugging Face Hub failed ({type(exc).__name__}: {exc}). Without hub access, "
            "download the split files (<split>.json/.jsonl/.parquet) elsewhere and pass their "
            "folder or one file instead"
        ) from exc
    return by_split


def _records(rows: Iterable[Any], where: str) -> list[dict]:
    """New plain dicts for the rows (never the caller's or the reader's objects)."""
    return [_record(row, f"{where}: row {i}") for i, row in enumerate(rows)]
