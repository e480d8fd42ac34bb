"""Crash-safe JSONL output: append rows durably, and pick up exactly where a killed run stopped.

Rows are appended with flush + fsync after every batch, so a row on disk that ends in a newline is
complete. On restart `JsonlAppender.open` counts those complete rows and cuts off a partial last
line (a kill during a write); the caller skips that many inputs. A small manifest beside the
outputs records the run parameters, and a restart with different ones is refused (mixing two
settings in one file would make it silently wrong). A lock file keeps two runs off one folder.

Example:
    >>> from reasonguard.generation.resume import JsonlAppender
    >>> out = JsonlAppender("preds/AegisSafetyTest/generated_predictions.jsonl")
    >>> done = out.open()          # complete rows already there (0 for a new file)
    >>> out.append([{"prompt": "...", "label": "unharmful", "predict": "..."}])
    >>> out.close()
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError

STATE_DIR = "_generate"  # skipped by the evaluator (leading "_") and by data loading (a folder)
MANIFEST = "manifest.json"
LOCK = "lock"
MANIFEST_VERSION = 1


class JsonlAppender:
    """An append-only JSONL file that survives being killed at any moment."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: Any = None
        self._last_line: bytes | None = None

    def open(self) -> int:
        """Open for appending; return the number of complete rows already present.

        A partial last line (no trailing newline) is truncated away first.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        complete = 0
        if self.path.exists():
            complete, end, last_start = _scan_lines(self.path)
            if end != self.path.stat().st_size:
                os.truncate(self.path, end)  # a line cut short by a kill mid-write
            if last_start is not None:
                with self.path.open("rb") as f:
                    f.seek(last_start)
                    self._last_line = f.read(end - last_start)
        self._file = self.path.open("ab")
        return complete

    def last_row(self) -> dict[str, Any] | None:
        """The last complete row found by `open`, or None for an empty file.

        Raises:
            UserError: that row is not JSON (the file was edited or corrupted).
        """
        if self._last_line is None:
            return None
        try:
            return json.loads(self._last_line)
        except json.JSONDecodeError:
            raise UserError(
                f"{self.path}: the last complete row is not valid JSON; remove the file to start over"
            ) from None

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Write rows and make them durable before returning."""
        data = b"".join(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n" for row in rows)
        if not data:
            return
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scan_lines(path: Path) -> tuple[int, int, int | None]:
    """(complete lines, byte offset after the last one, byte offset where the last one starts)."""
    complete, end, last_start, offset = 0, 0, None, 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            start = 0
            while (nl := chunk.find(b"\n", start)) != -1:
                last_start, end = end, offset + nl + 1
                complete += 1
                start = nl + 1
            offset += len(chunk)
    return complete, end, last_start


def fingerprint(values: Iterable[Any]) -> str:
    """A short stable hash of a sequence of JSON-serialisable values (the inputs of an output)."""
    digest = hashlib.sha256()
    for value in values:
        digest.update(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]


class RunState:
    """The manifest and lock of one output folder.

    Args:
        out_dir: the output folder (created if needed).
        params: what decides the content of the outputs (model, format, decoding settings).

    Raises:
        UserError: another run holds the folder, or the manifest's parameters differ.
    """

    def __init__(self, out_dir: str | os.PathLike[str], params: Mapping[str, Any]) -> None:
        import fcntl

        self.dir = Path(out_dir) / STATE_DIR
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"{out_dir}: cannot create the output folder ({exc.strerror})"
            ) from None
        self._lock = (self.dir / LOCK).open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise UserError(f"{out_dir}: another `reasonguard generate` is writing here") from None
        self.params = dict(params)
        self.outputs: dict[str, str] = {}
        manifest = self.dir / MANIFEST
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            changed = sorted(
                key
                for key in set(saved.get("params", {})) | set(self.params)
                if saved.get("params", {}).get(key) != self.params.get(key)
            )
            if changed:
                detail = ", ".join(
                    f"{k}: {saved.get('params', {}).get(k)!r} -> {self.params.get(k)!r}"
                    for k in changed
                )
                self.close()
                raise UserError(
                    f"{out_dir} holds outputs of a run with other settings ({detail}); rerun with "
                    "the same settings to resume, or choose another --out"
                )
            self.outputs = dict(saved.get("outputs", {}))

    def claim(self, relpath: str, inputs_fingerprint: str) -> None:
        """Record that `relpath` holds outputs for these inputs; refuse different inputs."""
        known = self.outputs.get(relpath)
        if known is not None and known != inputs_fingerprint:
            raise UserError(
                f"{self.dir.parent / relpath} was generated from different inputs; "
                "remove it or choose another --out"
            )
        if known is None:
            self.outputs[relpath] = inputs_fingerprint
            self._save()

    def _save(self) -> None:
        record = {"version": MANIFEST_VERSION, "params": self.params, "outputs": self.outputs}
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.dir / MANIFEST)  # atomic: a kill leaves the old or the new manifest

    def close(self) -> None:
        self._lock.close()  # releases the flock
