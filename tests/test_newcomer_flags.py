"""`classify`'s flags do what they say, and a wrong one fails before any model loads, with the
verb's own usage and a message that names the file and line.

"Before any model loads" is shown with an empty folder as `--model`: loading it would fail with a
different error, so the message asserted can only come from the check that runs first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-llama", "--max-new-tokens", "4", "--device", "cpu"]


def test_output_file_is_written_for_one_prompt_too(cli, tmp_path: Path) -> None:
    out = tmp_path / "verdict.jsonl"
    code, stdout, err = cli("classify", *TINY, "--prompt", "Hello", "--output", out)
    assert code == 0, err
    assert stdout == ""  # the verdict went to the file, not the terminal
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prompt"] == "Hello" and row["response"] is None
    assert "is_parsing_error" in row and "scores" in row
    assert f"wrote 1 verdict to {out}" in err


def test_unwritable_output_is_a_clear_error(cli, tmp_path: Path) -> None:
    out = tmp_path / "no-such-folder" / "verdict.jsonl"
    code, _, err = cli("classify", *TINY, "--prompt", "Hello", "--output", out)
    assert code == 2 and f"{out}: cannot write" in err


def test_bad_input_rows_name_the_file_and_line_and_no_missing_flag(cli, tmp_path: Path) -> None:
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    code, _, err = cli("classify", "--model", tmp_path, "--input", bad)
    assert code == 2
    assert f"error: {bad}:2: missing 'prompt'" in err  # the 1-based line, as `data validate`

    bad.write_text('{"prompt": "ok"}\n\n{"prompt": 3}\n')
    code, _, err = cli("classify", "--model", tmp_path, "--input", bad)
    assert code == 2 and f"{bad}:3: 'prompt' must be a string, got int" in err

    bad.write_text('{"prompt": "ok"}\nnot json\n')
    code, _, err = cli("classify", "--model", tmp_path, "--input", bad)
    assert code == 2 and f"{bad}:2: malformed JSON" in err
    assert "--skip-bad-rows" not in err  # classify has no such flag


def test_cascade_without_bands_fails_before_loading_and_names_no_option(
    cli, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{}")  # a model folder by its layout, with no weights
    code, _, err = cli("classify", "--model", tmp_path, "--prompt", "hi", "--mode", "cascade")
    assert code == 2
    assert f"{tmp_path}: no cascade.json; run `reasonguard calibrate --model {tmp_path}" in err
    assert "pass bands" not in err  # no command-line option passes bands


def test_cascade_without_bands_fails_before_loading_in_the_api(tmp_path: Path) -> None:
    from reasonguard import load_guard
    from reasonguard.errors import UserError

    (tmp_path / "config.json").write_text("{}")  # a model folder by its layout, with no weights
    with pytest.raises(UserError, match="no calibrated cascade"):
        load_guard(str(tmp_path), mode="cascade")


def test_no_scores_with_fast_mode_is_refused_before_loading(cli, tmp_path: Path) -> None:
    code, _, err = cli(
        "classify", "--model", tmp_path, "--prompt", "hi", "--mode", "fast", "--no-scores"
    )
    assert code == 2
    assert "--no-scores goes with --mode reasoning or cascade" in err


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--batch-size"])
def test_a_zero_budget_or_batch_is_refused_while_parsing(cli, tmp_path: Path, capsys, flag) -> None:
    with pytest.raises(SystemExit) as exc:
        cli("classify", "--model", tmp_path, "--prompt", "hi", flag, "0")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be at least 1, got 0" in err


def test_an_unknown_flag_shows_the_verbs_usage_and_the_nearest_option() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "reasonguard", "classify", "--model", "m", "--mod", "fast"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("usage: reasonguard classify ")
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "reasonguard classify: error: unrecognized arguments: --mod fast "
        "(did you mean --mode or --model?)"
    )


def test_an_unknown_flag_of_a_nested_verb_shows_that_verbs_usage(capsys) -> None:
    from reasonguard.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "sft", "--config", "c.yaml", "--dryrun"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: reasonguard train sft ")
    assert "unrecognized arguments: --dryrun (did you mean --dry-run?)" in err


def _verbs(parser, name: str = "reasonguard"):
    """Every (sub)command parser under `parser`, with its full name."""
    import argparse

    yield name, parser
    for action in parser._actions:  # argparse keeps its subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from _verbs(sub, f"{name} {verb}")


@pytest.mark.parametrize("verb", ["generate", "classify", "evaluate", "serve"])
def test_the_vllm_engine_settings_are_flags_of_every_verb_that_starts_one(verb, capsys) -> None:
    from reasonguard.cli import main

    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-model-len TOKENS", "--gpu-memory-utilization F", "--kv-cache-gib GIB"):
        assert flag in text


def test_every_flag_a_help_text_names_exists(monkeypatch) -> None:
    """A help text names only flags some verb has (`--kv-cache-gib` once named a
    `--gpu-memory-utilization` that no verb had); `mine` may name `generate`'s."""
    import re

    from reasonguard.cli import build_parser

    monkeypatch.setenv("COLUMNS", "2000")  # no flag broken at its hyphen by the line wrap
    verbs = dict(_verbs(build_parser()))
    known = {s for parser in verbs.values() for a in parser._actions for s in a.option_strings}
    for name, parser in verbs.items():
        named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*[a-z0-9]", parser.format_help()))
        named = {flag for flag in named if "_" not in flag}  # other tools' (accelerate's)
        assert named <= known, f"{name} --help names {sorted(named - known)}"
