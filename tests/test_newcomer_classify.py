"""`reasonguard classify` tells the user what is happening: a line before it generates, a warning
when an output has no verdict (cut off by the token budget, or no answer block), and no
library deprecation notices on the terminal.

A random model (`tiny-llama`) with a tiny budget writes no answer block: exactly the case of
an output cut off before its verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--model", "tiny-llama", "--max-new-tokens", "4", "--device", "cpu"]


def test_truncated_output_warns_on_stderr_and_still_prints_the_verdict(cli) -> None:
    code, out, err = cli("classify", *MODEL, "--prompt", "Hello", "--no-scores")
    assert code == 0
    verdict = json.loads(out)  # stdout stays pure JSON
    assert verdict["truncated"] is True and verdict["is_parsing_error"] is True
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert "4-token budget" in warning and "--max-new-tokens" in warning


def test_file_of_items_warns_once_with_the_count(cli, tmp_path: Path) -> None:
    src, dst = tmp_path / "items.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "Hello"}\n{"prompt": "Bye", "response": "ok"}\n')
    code, out, err = cli(
        "classify", *MODEL, "--input", src, "--output", dst, "--no-scores", "--batch-size", "2"
    )
    assert code == 0 and out == ""
    assert len(dst.read_text().splitlines()) == 2
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "2 of 2 outputs" in warnings[0] and "--max-new-tokens" in warnings[0]
    assert "items 0, 1" in warnings[0]


def test_says_what_it_generates_before_it_starts(cli) -> None:
    code, _, err = cli("classify", *MODEL, "--prompt", "Hello", "--no-scores")
    assert code == 0
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("generating with"))
    assert lines[start] == "generating with tiny-llama (up to 4 new tokens, reasoning mode)..."
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning:"))
    assert start < warning


def test_fast_mode_says_it_does_not_reason(cli) -> None:
    code, out, err = cli("classify", *MODEL, "--prompt", "Hello", "--mode", "fast")
    assert code == 0 and json.loads(out)["mode"] == "fast"
    assert "judging with tiny-llama (fast mode: no reasoning)..." in err.splitlines()


@pytest.mark.slow  # the CLI in a child process
def test_library_deprecation_warnings_stay_off_the_terminal() -> None:
    # A real command line, as the user runs it: warnings reach stderr only outside pytest.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, "-m", "reasonguard", "classify", *MODEL, "--prompt", "Hello"],
        env={**env, "HF_HUB_OFFLINE": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["is_parsing_error"] is True
    assert "FutureWarning" not in done.stderr, done.stderr
    assert "past_key_values" not in done.stderr and "is_gradient_checkpointing" not in done.stderr


def test_load_guard_shows_its_real_signature_and_docstring() -> None:
    import inspect
    import pydoc

    import reasonguard
    from reasonguard.infer.guard import load_guard

    assert reasonguard.load_guard is load_guard
    assert "path_or_hub_id" in inspect.signature(reasonguard.load_guard).parameters
    text = pydoc.render_doc(reasonguard.load_guard, renderer=pydoc.plaintext)
    assert "load_guard(path_or_hub_id" in text and "max_new_tokens" in text
    assert "Load a guard model." in text and "*args" not in text
    assert "load_guard" in dir(reasonguard)


def test_import_and_help_of_load_guard_stay_light() -> None:
    code = (
        "import sys, pydoc, reasonguard\n"
        "pydoc.render_doc(reasonguard.load_guard)\n"
        "from reasonguard import load_guard\n"
        "print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == "[]"
