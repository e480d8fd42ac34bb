"""Crash-safe JSONL appends, partial-line recovery, the run manifest and the folder lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonguard.errors import UserError
from reasonguard.generation.resume import JsonlAppender, RunState, fingerprint


def test_append_then_reopen_counts_rows(tmp_path: Path) -> None:
    path = tmp_path / "a" / "out.jsonl"
    with JsonlAppender(path) as out:
        assert out.open() == 0 and out.last_row() is None
        out.append([{"i": 0}, {"i": 1}])
        out.append([])
    with JsonlAppender(path) as out:
        assert out.open() == 2
        assert out.last_row() == {"i": 1}


def test_a_partial_last_line_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"i": 0}\n{"i": 1}\n{"i": ')
    with JsonlAppender(path) as out:
        assert out.open() == 2
        out.append([{"i": 2}])
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_a_corrupt_complete_row_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("not json\n")
    with JsonlAppender(path) as out:
        out.open()
        with pytest.raises(UserError, match="not valid JSON"):
            out.last_row()


def test_manifest_refuses_other_settings_and_inputs(tmp_path: Path) -> None:
    params = {"model": "m", "temperature": 0.0}
    state = RunState(tmp_path, params)
    state.claim("x.jsonl", fingerprint(["a", "b"]))
    state.close()
    with pytest.raises(UserError, match=r"temperature: 0.0 -> 0.7"):
        RunState(tmp_path, {**params, "temperature": 0.7})
    state = RunState(tmp_path, params)
    state.claim("x.jsonl", fingerprint(["a", "b"]))  # same inputs: fine
    state.claim("y.jsonl", fingerprint(["c"]))  # a new output: fine
    with pytest.raises(UserError, match="different inputs"):
        state.claim("x.jsonl", fingerprint(["a", "z"]))
    state.close()


def test_two_runs_cannot_share_a_folder(tmp_path: Path) -> None:
    first = RunState(tmp_path, {})
    with pytest.raises(UserError, match="another `reasonguard generate`"):
        RunState(tmp_path, {})
    first.close()
    RunState(tmp_path, {}).close()
