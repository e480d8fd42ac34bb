"""`reasonguard classify`: one item as JSON on stdout, a JSONL file of items, and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonguard.cli import main

MODEL = ["--model", "tiny-llama", "--max-new-tokens", "4", "--device", "cpu"]


def test_single_prompt_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", *MODEL, "--prompt", "Hello", "--response", "Hi!"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["is_parsing_error"] is True and "scores" in result


def test_file_in_file_out(tmp_path: Path) -> None:
    src, dst = tmp_path / "items.jsonl", tmp_path / "out.jsonl"
    items = [{"id": 1, "prompt": "Hello"}, {"id": 2, "prompt": "Bye", "response": "ok"}]
    src.write_text("".join(json.dumps(i) + "\n" for i in items))
    args = ["classify", *MODEL, "--input", str(src), "--output", str(dst), "--no-scores"]
    assert main(args) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and rows[1]["response"] == "ok"
    assert all(r["scores"]["prompt_harmfulness"] is None for r in rows)


def test_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", *MODEL]) == 2
    assert "either --prompt" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert main(["classify", *MODEL, "--input", str(bad)]) == 2
    assert f"{bad}:2: missing 'prompt'" in capsys.readouterr().err


def test_option_prefixes_are_not_guessed(capsys: pytest.CaptureFixture[str]) -> None:
    # `--mod` once silently meant `--model` (argparse's prefix matching); now it is an error.
    from reasonguard.cli import main

    for argv, unknown in (
        (["classify", "--model", "tiny-llama", "--mod", "fast", "--prompt", "hi"], "--mod fast"),
        (["data", "stats", "samples", "--tok", "llama3-tokenizer"], "--tok"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert f"unrecognized arguments: {unknown}" in capsys.readouterr().err
