"""`train sft --dry-run`: every shipped config plans offline, and nothing is loaded or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_train_support import REPO, tiny_config, write_yaml_config

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from reasonguard.models import resolve_model

    resolve_model("smollm2")  # a fresh machine converts the packaged GGUF once (a cache build)

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    # Offline, as on CI: the hub dataset and tokenizers of the recipe configs are unreachable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_passes_dry_run(path: Path, cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stage, extra = "sft", []
    if "hsdpo" in path.name:
        # A DPO config names an R-SFT output and mined pairs that only exist after stage 1:
        # stand-ins with the same prompt format.
        from test_train_dpo import stand_in_rsft_output, write_pairs

        stage = "dpo"
        model = stand_in_rsft_output(tmp_path, path)
        pairs = write_pairs(tmp_path / "pairs.jsonl", 20)
        extra = [f"model_name_or_path={model}", f"dataset={pairs}", "tokenizer_name_or_path=null"]
    code, out, err = cli(
        "train", stage, "--config", path, f"output_dir={run_dir}", *extra, "--dry-run"
    )
    assert code == 0, err
    for label in ("model", "data", "split", "max length", "batch", "steps", "run dir"):
        assert f"\n{label}" in "\n" + out, label
    assert f"{run_dir}: new run" in out
    assert not run_dir.exists()


def test_dry_run_of_the_hub_dataset_offline_uses_published_sizes(cli) -> None:
    code, out, _ = cli(
        "train", "sft", "--config", REPO / "configs/exp19-qlora-3b-instruct.yaml", "--dry-run"
    )
    assert code == 0
    assert "(ESTIMATED)" in out and "WildGuardTrainR 86,759" in out
    assert "126,269 train / 1,275 eval rows" in out
    assert "2 rows x 64 accumulation = 128 rows per optimizer step" in out
    assert "987 per epoch, 2,961 in all" in out  # the seed's "~1,000 steps per epoch"
    assert "max length     1024 (auto, estimated" in out


def test_dry_run_of_local_data_counts_rows_and_max_length(cli, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, rows=30, max_length="auto", eval_split_ratio=0.1)
    path = write_yaml_config(tmp_path / "c.yaml", config)
    code, out, err = cli("train", "sft", "--config", path, "--dry-run")
    assert code == 0, err
    assert "27 train / 3 eval rows" in out
    assert "max length     1024 (auto: p95" in out
    assert "2 rows x 2 accumulation = 4 rows per optimizer step" in out
    assert "7 per epoch, 7 in all" in out


def test_dry_run_reports_invalid_rows(cli, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, rows=10)
    data = Path(config.dataset)
    data.write_text(data.read_text() + '{"input": "no layout", "output": "x", "split": "train"}\n')
    path = write_yaml_config(tmp_path / "c.yaml", config)
    code, _, err = cli("train", "sft", "--config", path, "--dry-run")
    # The 11th line of the JSON-lines file (row index 10 of split 'train').
    assert code == 2 and f"{data}:11: split 'train'" in err and "field 'input'" in err
    code, out, err = cli("train", "sft", "--config", path, "--dry-run", "--skip-invalid")
    assert code == 0, err
    assert "1 invalid rows skipped" in out
