"""Rows whose response labels disagree with their response: reported by `data validate` and
`data stats` with count and place, and trained as published or with those labels set to None
(`labels_without_response`), recorded in the run.

The expected rows are found here from the raw files (the input ends in `AI assistant:\\nNone`,
the answer block's last lines name a refusal label), not through the package's parser.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonguard.data.sources import samples_path
from reasonguard.format import INSTRUCTION, parse_output, render_input, render_target
from test_train_support import tiny_config

NO_RESPONSE_INPUT_END = "\n\nAI assistant:\nNone\n\n"


def labelled_without_response(rows: list[dict]) -> list[int]:
    """1-based positions of rows with no response whose answer block labels the response."""
    found = []
    for i, row in enumerate(rows, 1):
        answers = row["output"].rsplit("Answers:", 1)[-1]
        no_response = row["input"].endswith(NO_RESPONSE_INPUT_END)
        labelled = "Completion: refusal" in answers or "Completion: compliance" in answers
        if no_response and labelled:
            found.append(i)
    return found


def sample_lines() -> tuple[Path, list[int]]:
    path = samples_path()
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = {n: json.loads(line) for n, line in enumerate(lines, 1) if line.strip()}
    expected = labelled_without_response(list(rows.values()))
    return path, [list(rows)[i - 1] for i in expected]


def row(prompt: str, response: str | None, labels: tuple, split: str = "train") -> dict:
    reasoning = "# Task 1\n\n## Reasoning Step 1\nThe request is ordinary."
    return {
        "instruction": INSTRUCTION,
        "input": render_input(prompt, response),
        "output": render_target(reasoning, *labels),
        "split": split,
    }


# --------------------------------------------------------------------------------------------
# data validate / data stats


def test_validate_lists_the_shipped_rows_with_labels_but_no_response(cli) -> None:
    path, lines = sample_lines()
    assert len(lines) == 4  # the shipped WildGuardTrainR samples that carry the quirk
    code, out, err = cli("data", "validate", "samples")
    assert code == 0, err
    assert "all 90 rows valid" in out  # the data as published stays valid
    assert "4 rows have response labels but no response (AI assistant: None):" in out
    for line in lines:
        assert f"  {path}:{line}: split 'WildGuardTrainR': Completion: refusal" in out
    assert "labels_without_response: none sets them to None" in out


def test_validate_names_the_real_wildguard_rows_by_their_one_based_row(cli, shared_dir) -> None:
    path = shared_dir / "data" / "train_samples" / "WildGuardTrainR_sample.json"
    expected = labelled_without_response(json.loads(path.read_text(encoding="utf-8")))
    assert expected == [1, 2]
    code, out, _ = cli("data", "validate", path)
    assert code == 0
    assert "2 rows have response labels but no response" in out
    for n in expected:
        assert f"{path} row {n} (1-based): split 'WildGuardTrainR_sample': Completion: " in out


def test_validate_reports_a_response_with_none_labels(cli, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [
        row("How do I bake bread?", None, ("unharmful", None, None)),
        row("Write a poem.", "Roses are red.", ("unharmful", None, None)),
        row("Pick a lock?", "I can't help.", ("harmful", "refusal", None)),
    ]
    lines = [json.dumps(rows[0]), "", json.dumps(rows[1]), json.dumps(rows[2])]
    path.write_text("\n".join(lines) + "\n")
    code, out, _ = cli("data", "validate", path)
    assert code == 0 and "all 3 rows valid" in out
    assert "2 rows have a response but a None response label:" in out
    assert f"  {path}:3: split 'train': Completion: None, Response: None" in out
    assert f"  {path}:4: split 'train': Response: None" in out
    assert "response labels but no response" not in out


def test_validate_says_when_every_row_agrees(cli, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    good = [
        row("Hi", None, ("unharmful", None, None)),
        row("Hi", "Hello", ("unharmful", "compliance", "unharmful")),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    code, out, _ = cli("data", "validate", path)
    assert code == 0
    assert "response labels agree with the responses in every row" in out


def test_stats_counts_responses_and_response_labels_consistently(cli, tmp_path: Path) -> None:
    rows = [json.loads(x) for x in samples_path().read_text().splitlines() if x.strip()]
    with_response = sum(not r["input"].endswith(NO_RESPONSE_INPUT_END) for r in rows)
    quirky = len(labelled_without_response(rows))
    out_json = tmp_path / "stats.json"
    code, out, err = cli("data", "stats", "samples", "--tokenizer", "none", "--json", out_json)
    assert code == 0, err
    stats = json.loads(out_json.read_text())
    for task in ("refusal", "response"):
        counts = stats["response_labels"][task]
        assert counts["rows_with_response"] == with_response
        assert counts["labelled_without_response"] == quirky == 4
        assert counts["response_without_label"] == 0
        # The label table's non-None count is the same number, reconciled.
        labelled = sum(n for label, n in stats["labels"]["total"][task].items() if label != "None")
        assert counts["labelled"] == labelled == with_response + quirky
    assert stats["validation"]["response_labels"]["labels_without_response"]["rows"] == 4
    assert f"refusal   {with_response:>13}  {with_response + quirky:>8}" in out
    assert "4 rows have response labels but no response" in out
    assert f"{samples_path()}:6: split 'WildGuardTrainR'" in out


# --------------------------------------------------------------------------------------------
# training: labels_without_response


def quirky_dataset(tmp_path: Path) -> tuple[Path, int]:
    """The shipped WildGuardTrainR samples as one JSON-lines file, and how many are quirky."""
    rows = [json.loads(x) for x in samples_path().read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["split"] == "WildGuardTrainR"][:12]
    path = tmp_path / "wildguard.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, len(labelled_without_response(rows))


def test_a_training_dataset_built_with_none_has_those_labels_none(tmp_path: Path) -> None:
    from reasonguard.models import load_tokenizer
    from reasonguard.train.data import prepare

    path, quirky = quirky_dataset(tmp_path)
    assert quirky == 3  # rows 6, 8 and 11 of the first 12
    tokenizer = load_tokenizer("llama3-tokenizer")
    seen = {}
    for setting in ("keep", "none"):
        config = tiny_config(
            tmp_path,
            dataset=str(path),
            labels_without_response=setting,
            eval_split_ratio=0,
            eval_strategy="no",
            max_length=2048,
        )
        data = prepare(config, tokenizer)
        targets = {}
        for example in data.train:
            labelled = example.labels[example.labels != -100]
            targets[example.row] = parse_output(
                tokenizer.decode(labelled, skip_special_tokens=True)
            )
        seen[setting] = targets
        counts = data.stats["validation"]["labels_without_response"]
        assert counts["setting"] == setting and counts["rows"] == quirky
        assert counts["set_to_none"] == (quirky if setting == "none" else 0)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    quirky_rows = labelled_without_response(rows)
    for i in range(len(rows)):
        keep, none = seen["keep"][i], seen["none"][i]
        assert keep.prompt_harmfulness == none.prompt_harmfulness is not None
        if i + 1 in quirky_rows:
            assert keep.response_refusal == "refusal" and keep.response_harmfulness is not None
            assert none.response_refusal is None and none.response_harmfulness is None
            assert none.reason == keep.reason  # the reasoning is kept as written
        else:
            assert none == keep


@pytest.fixture(scope="module")
def none_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """One real tiny R-SFT run with labels_without_response: none."""
    from reasonguard.train.sft import run_sft

    tmp = tmp_path_factory.mktemp("none_run")
    path, quirky = quirky_dataset(tmp)
    config = tiny_config(
        tmp, dataset=str(path), labels_without_response="none", max_steps=1, save_strategy="no"
    )
    result = run_sft(config)
    return result.run_dir, quirky


def test_the_run_records_the_setting_in_its_decisions_and_model(none_run) -> None:
    run_dir, quirky = none_run
    info = json.loads((run_dir / "training_info.json").read_text())
    decision = info["model"]["decisions"]["labels_without_response"]
    assert decision["value"] == "none"
    assert f"labels of {quirky} rows with no response are None" in decision["reason"]
    counts = info["data"]["validation"]["labels_without_response"]
    assert counts == {
        "setting": "none",
        "rows": quirky,
        "set_to_none": quirky,
        "response_without_labels": 0,
    }
    record = json.loads((run_dir / "final" / "reasonguard.json").read_text())
    assert record["labels_without_response"] == "none"


def test_dry_run_shows_the_decision_and_a_bad_value_is_refused(cli, tmp_path: Path) -> None:
    from test_train_support import write_yaml_config

    path, _ = quirky_dataset(tmp_path)
    config = write_yaml_config(tmp_path / "c.yaml", tiny_config(tmp_path, dataset=str(path)))
    code, out, err = cli("train", "sft", "--config", config, "--dry-run")
    assert code == 0, err
    assert "labels_without_response: keep; 3 rows with no response keep their" in out
    code, _, err = cli("train", "sft", "--config", config, "labels_without_response=drop")
    assert code == 2
    assert "'labels_without_response': 'drop' is not allowed; allowed values: keep, none" in err


def test_dpo_refuses_the_setting() -> None:
    from reasonguard.errors import UserError
    from reasonguard.train.config import DPOConfig

    with pytest.raises(UserError, match="'labels_without_response': an R-SFT setting"):
        DPOConfig(dataset="pairs.jsonl", labels_without_response="none")
