"""What a new user meets first with training data, runs and mining: `data validate` locations and
`--skip-invalid`, `runs status` on the demo folder, and `mine` on one sample per prompt."""

from __future__ import annotations

import json
from pathlib import Path

from reasonguard.format import INSTRUCTION, render_input, render_target
from reasonguard.train.monitor import base_status, write_status


def record(i: int, labels=("unharmful", None, None), split: str | None = "train") -> dict:
    row = {
        "instruction": INSTRUCTION,
        "input": render_input(f"Question {i}: how do plants grow?"),
        "output": render_target("# Task 1\n\n## Reasoning Step 1\nA biology question.", *labels),
    }
    return row if split is None else {**row, "split": split}


NO_ANSWERS = {**record(1), "output": "no answers here"}


def write_lines(path: Path, lines: list) -> Path:
    """A str item is written as a raw line; anything else as JSON."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# --------------------------------------------------------------------------------------------
# data validate: one location convention, and --skip-invalid skips malformed lines too


def test_record_errors_name_the_one_based_file_line(cli, tmp_path: Path) -> None:
    # Line 1 valid, line 2 blank, line 3 the bad record: the second row of split 'train'.
    path = write_lines(tmp_path / "data.jsonl", [record(0), "", NO_ANSWERS, record(2)])
    code, _, err = cli("data", "validate", path)
    assert code == 2
    assert err.startswith(f"error: invalid record: {path}:3: split 'train': field 'output'")
    assert "0-based" not in err


def test_json_and_record_errors_use_the_same_line_numbers(cli, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.jsonl", [record(0), '{"input": ', NO_ANSWERS])
    code, _, err = cli("data", "validate", path)
    assert code == 2 and f"{path}:2: " in err and "invalid JSON" in err
    code, out, err = cli("data", "validate", path, "--skip-invalid")
    assert code == 2 and "1 of 3 rows" not in err and "2 of 3 rows invalid" in err
    assert f"{path}:2: field 'record': invalid JSON" in out  # not blamed on a split
    assert f"{path}:3: split 'train': field 'output'" in out


def test_skip_invalid_skips_and_counts_a_malformed_json_line(cli, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    path = write_lines(
        folder / "AegisTrainR.jsonl",
        [record(0, split=None), "not json", [1, 2], NO_ANSWERS, record(4, split=None)],
    )
    code, out, err = cli("data", "validate", folder, "--skip-invalid")
    assert code == 2 and "3 of 5 rows invalid" in err
    assert "3 invalid rows:" in out
    assert f"{path}:2: field 'record': invalid JSON" in out
    assert f"{path}:3: field 'record': expected an object" in out
    assert f"{path}:4: split 'AegisTrainR': field 'output': no answer block" in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert total.split() == ["total", "5", "2", "3"]
    # stats stops at the first bad line, or with --skip-invalid leaves them out and says so.
    code, _, err = cli("data", "stats", folder, "--tokenizer", "none")
    assert code == 2 and f"{path}:2: field 'record': invalid JSON" in err
    code, _, err = cli("data", "stats", folder, "--tokenizer", "none", "--skip-invalid")
    assert code == 0 and "warning: 3 invalid rows left out" in err


def test_a_line_that_is_not_json_is_not_blamed_on_a_split(cli, tmp_path: Path) -> None:
    """One file with per-row splits: the bad line sits between rows of two splits."""
    path = write_lines(
        tmp_path / "data.jsonl", [record(0, split="a"), "not json", record(2, split="b")]
    )
    code, _, err = cli("data", "validate", path)
    assert code == 2 and "Traceback" not in err
    assert f"invalid record: {path}:2: field 'record': invalid JSON" in err
    assert "split 'a'" not in err and "split 'b'" not in err


def test_an_empty_config_is_refused(cli, tmp_path: Path) -> None:
    """An empty (or comments-only) file would plan the whole hub dataset on every default."""
    config = tmp_path / "empty.yaml"
    for text in ("", "# nothing here\n", "{}\n"):
        config.write_text(text)
        for command in (["plan", "--config", config], ["train", "sft", "--config", config]):
            code, out, err = cli(*command, "--dry-run") if command[0] == "train" else cli(*command)
            assert code == 2, (text, command, out, err)
            assert f"{config}: the config sets nothing" in err and "Traceback" not in err


def test_other_formats_give_a_one_based_row_and_say_so(cli, tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record(0), NO_ANSWERS, record(2)]))
    code, _, err = cli("data", "validate", path)
    assert code == 2
    assert f"invalid record: {path} row 2 (1-based): split 'train': field 'output'" in err
    # A hub-style {split: [records]} file has no file rows: the row within the split, 1-based.
    path.write_text(json.dumps({"train": [record(0, split=None), NO_ANSWERS]}))
    code, _, err = cli("data", "validate", path)
    assert code == 2
    assert f"{path}: invalid record: split 'train' row 2 (1-based): field 'output'" in err


# --------------------------------------------------------------------------------------------
# runs status: point to the run inside a folder


def test_runs_status_names_the_run_inside_the_folder(cli, tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    (demo / "model").mkdir(parents=True)
    (demo / "data").mkdir()
    write_status(demo / "model", {**base_status(demo / "model", "sft"), "state": "finished"})
    code, _, err = cli("runs", "status", demo)
    assert code == 2
    assert f"{demo}: no status.json; did you mean {demo / 'model'}?" in err
    code, out, err = cli("runs", "status", demo / "model")
    assert code == 0 and "state        finished" in out


def test_runs_status_without_any_run_below_keeps_the_plain_message(cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = cli("runs", "status", tmp_path)
    assert code == 2 and "no status.json" in err and "did you mean" not in err


# --------------------------------------------------------------------------------------------
# mine: one sample per prompt cannot disagree


def _generation(i: int, samples: list[str]) -> dict:
    answer = render_target("# Task 1\n\n## Reasoning Step 1\nThinking.", "harmful", None, None)
    return {
        "instruction": INSTRUCTION,
        "input": render_input(f"Prompt {i}"),
        "output": answer,
        "source": "WildGuardTrainR",
        "samples": samples,
        "samples_truncated": [False] * len(samples),
    }


def test_mine_on_one_sample_per_prompt_says_why_and_exits_2(cli, tmp_path: Path) -> None:
    wrong = render_target("Thinking.", "unharmful", None, None)
    right = render_target("Thinking.", "harmful", None, None)
    gen = write_lines(tmp_path / "gen.jsonl", [_generation(0, [wrong]), _generation(1, [right])])
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = cli("mine", gen, "--out", out)
    assert code == 2
    assert f"{gen}: every row has 1 sampled output (k = 1)" in err
    assert "at least 2 samples per prompt" in err
    assert "--samples 4 --temperature 0.7" in err
    assert "agreed" not in stdout + err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# A reader that stops early (`reasonguard data stats F | head`) ends the command quietly


def test_a_closed_pipe_ends_a_command_without_a_traceback(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    path = write_lines(tmp_path / "data.jsonl", [record(i) for i in range(40)])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    child = subprocess.Popen(
        [sys.executable, "-m", "reasonguard", "data", "stats", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    child.stdout.close()  # the reader is gone before the command writes its first line
    err = child.stderr.read().decode()
    code = child.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert code == 141
