"""`train classifier` refuses bad input before any weights load, with the file, line and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from reasonguard.classifier.config import ClassifierConfig
from reasonguard.classifier.sources import load_items
from reasonguard.errors import UserError
from test_classifier_support import prediction_row, small_config, write_predictions, write_yaml
from test_train_support import REPO, tiny_config, write_yaml_config


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _teacher(tmp_path: Path, rows: list[dict] | str, benchmark: str = "SimpleSafetyTests") -> Path:
    folder = tmp_path / "teacher"
    write_predictions(folder, benchmark, rows)
    return folder


def _good_rows(n: int = 3) -> list[dict]:
    return [prediction_row(f"Question number {i}?", None, "unharmful") for i in range(n)]


def test_dry_run_plans_the_sample_rows_without_loading_weights(cli, tmp_path: Path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run loaded model weights")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    path = write_yaml(tmp_path / "c.yaml", small_config(tmp_path))
    code, out, err = cli("train", "classifier", "--config", path, "--dry-run")
    assert code == 0, err
    assert "encoder:      minilm (bert)" in out
    assert "35 train, 4 held out" in out and "steps:        9 of 12 items" in out
    assert not (tmp_path / "run").exists()


def test_an_unparseable_teacher_row_is_named_and_can_be_skipped_and_counted(tmp_path: Path) -> None:
    rows = _good_rows()
    rows[1]["predict"] = "I think it is fine."  # no answer block
    folder = _teacher(tmp_path, rows)
    config = small_config(tmp_path, dataset=None, teacher_predictions=str(folder))
    with pytest.raises(UserError) as err:
        load_items(config)
    path = folder / "SimpleSafetyTests" / "generated_predictions.jsonl"
    assert str(err.value).startswith(f"{path}:2: field 'predict': ")
    assert "no readable answer block" in str(err.value) and "skip_invalid: true" in str(err.value)

    items, summary = load_items(
        small_config(tmp_path, dataset=None, teacher_predictions=str(folder), skip_invalid=True)
    )
    assert len(items) == 2 and summary["skipped_rows"] == 1
    assert summary["skipped_examples"][0].startswith(f"{path}:2:")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", ":2: malformed JSON"),
        ('["a list"]', ":2: expected a JSON object, got list"),
        (
            json.dumps({"predict": "Answers: \nRequest: harmful"}),
            ":2: field 'prompt': expected a string",
        ),
        (
            json.dumps({"prompt": "no input layout here", "predict": "Request: harmful"}),
            ":2: field 'prompt': no 'Human user:' input",
        ),
        (
            json.dumps({**prediction_row("Hi", None, "harmful"), "predict": None}),
            ":2: field 'predict': expected a string",
        ),
        (
            json.dumps(
                {
                    **prediction_row("Hi", None, "harmful"),
                    "scores": {"prompt_harmfulness": {"harmful": 3}},
                }
            ),
            ":2: field 'scores': 'prompt_harmfulness': expected {'harmful': probability}",
        ),
    ],
)
def test_bad_teacher_rows_name_file_line_and_field(
    tmp_path: Path, line: str, expected: str
) -> None:
    good = json.dumps(_good_rows(1)[0])
    folder = _teacher(tmp_path, f"{good}\n{line}\n{good}\n")
    with pytest.raises(UserError, match="skip_invalid") as err:
        load_items(small_config(tmp_path, dataset=None, teacher_predictions=str(folder)))
    assert expected in str(err.value)


def test_teacher_files_with_missing_rows_or_no_file_are_refused(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "0_0_SimpleSafetyTests.json").write_text(
        json.dumps(
            [
                {
                    "instruction": "",
                    "input": "Human user:\nHi\n\nAI assistant:\nNone\n\n",
                    "output": "harmful",
                }
            ]
            * 5
        )
    )
    folder = _teacher(tmp_path, _good_rows(3))
    config = small_config(
        tmp_path, dataset=None, teacher_predictions=str(folder), benchmark_dir=str(bench)
    )
    with pytest.raises(
        UserError, match=r"3 prediction rows but 5 rows in .*0_0_SimpleSafetyTests.json"
    ):
        load_items(config)
    (folder / "AegisSafetyTest").mkdir()
    with pytest.raises(
        UserError, match=r"AegisSafetyTest: no generated_predictions.jsonl in folder"
    ):
        load_items(small_config(tmp_path, dataset=None, teacher_predictions=str(folder)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no benchmark folders"):
        load_items(small_config(tmp_path, dataset=None, teacher_predictions=str(empty)))


def test_teacher_labels_and_soft_targets_are_read_not_the_benchmark_label(tmp_path: Path) -> None:
    scores = {
        "prompt_harmfulness": {"harmful": 0.7, "unharmful": 0.3},
        "response_refusal": {"refusal": 0.2, "compliance": 0.8},
        "response_harmfulness": None,  # no answer line scored: the label decides
    }
    rows = [
        prediction_row(
            "How do I pick a lock?", "Sure: ...", "harmful", "compliance", "harmful", scores
        ),
        prediction_row("Bake bread?", None, "unharmful", "refusal", "harmful"),  # no response
    ]
    folder = _teacher(tmp_path, rows, "HarmBenchResponse")
    items, summary = load_items(
        small_config(tmp_path, dataset=None, teacher_predictions=str(folder))
    )
    assert items[0].targets == {"prompt": 0.7, "response": 1.0, "refusal": 0.2}
    assert items[0].soft and not items[1].soft
    # A prompt alone is asked the request task only, whatever the teacher wrote after it.
    assert items[1].targets == {"prompt": 0.0, "response": None, "refusal": None}
    assert summary["files"] == {"HarmBenchResponse": 2} and summary["soft_target_items"] == 1


def test_a_causal_lm_named_as_the_encoder_is_refused(cli, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", small_config(tmp_path, model_name_or_path="tiny-llama"))
    code, _, err = cli("train", "classifier", "--config", path, "--dry-run")
    assert code == 2
    assert "'tiny-llama' is a causal language model (LlamaForCausalLM), not an encoder" in err
    assert "reasonguard train sft" in err


def test_a_classifier_config_given_to_train_sft_names_train_classifier(cli, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", small_config(tmp_path))
    code, _, err = cli("train", "sft", "--config", path, "--dry-run")
    assert code == 2
    assert f"{path} is a classifier config" in err
    assert f"reasonguard train classifier --config {path}" in err


@pytest.mark.parametrize("model", ["minilm", "classifier-folder"])
def test_an_encoder_or_a_classifier_as_the_model_of_train_sft_is_refused(
    cli, tmp_path: Path, model: str
) -> None:
    if model == "classifier-folder":
        folder = tmp_path / "final"
        folder.mkdir()
        (folder / "reasonguard.json").write_text(json.dumps({"kind": "encoder-classifier"}))
        model = str(folder)
    path = write_yaml_config(
        tmp_path / "sft.yaml", tiny_config(tmp_path, model_name_or_path="tiny-llama")
    )
    code, _, err = cli("train", "sft", "--config", path, f"model_name_or_path={model}", "--dry-run")
    assert code == 2
    assert "not a causal language model" in err and "reasonguard train classifier" in err


def test_an_sft_config_given_to_train_classifier_names_train_sft(cli) -> None:
    demo = REPO / "configs" / "demo-cpu.yaml"
    code, _, err = cli("train", "classifier", "--config", demo, "--dry-run")
    assert code == 2
    assert f"{demo} is a SFT config of a causal guard model" in err
    assert f"reasonguard train sft --config {demo}" in err


def test_the_labels_come_from_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="exactly one source.*got dataset, teacher_predictions"):
        ClassifierConfig(dataset="samples", teacher_predictions=str(tmp_path))
    with pytest.raises(UserError, match="got none"):
        ClassifierConfig()
    with pytest.raises(UserError, match="'benchmark_dir': benchmarks needs benchmark_dir"):
        ClassifierConfig(benchmarks=["ToxicChat"])


def test_max_length_beyond_the_encoder_is_refused_before_weights_load(tmp_path: Path) -> None:
    from reasonguard.classifier.train import run_classifier

    config = small_config(tmp_path, max_length=1024)
    with pytest.raises(UserError, match="'max_length': 1024 tokens, but minilm reads at most 512"):
        run_classifier(config)
    assert not Path(config.output_dir).exists()


def test_every_shipped_classifier_config_loads_and_opens_with_its_command() -> None:
    from reasonguard.classifier.config import load_classifier_config

    shipped = sorted((REPO / "configs" / "classifier").glob("*.yaml"))
    assert shipped
    for path in shipped:
        first = path.read_text().splitlines()[0]
        assert first == f"# reasonguard train classifier --config configs/classifier/{path.name}"
        config = load_classifier_config(path)
        assert config.output_dir == f"runs/classifier-{path.stem}"
        assert yaml.safe_load(path.read_text())  # plain YAML, no tags
