"""The three-tier demo (`reasonguard demo --tiers`) on a guard already in the demo's folder:
the classifier trains on the demo's rows, the cascade is calibrated on its held-out part, and
the report and verdicts name the tier of each verdict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from reasonguard.cascade.bands import CASCADE_FILE
from reasonguard.cascade.tiers import TIER_NAMES
from reasonguard.data.sources import load_source
from reasonguard.demo import split_samples
from reasonguard.demo_tiers import EXAMPLES, run_tiers_demo
from reasonguard.models import resolve_model


def test_tiers_demo_reuses_the_guard_and_reports_each_tier(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    guard = out / "model" / "final"
    shutil.copytree(resolve_model("tiny-llama"), guard)  # stands in for the demo's trained guard
    record = run_tiers_demo(
        out, max_new_tokens=4, classifier_overrides=["num_train_epochs=1", "max_length=48"]
    )
    printed = capsys.readouterr().out
    assert "running the demo first" not in printed  # the guard in the folder was reused
    _, test = split_samples([r for rows in load_source("samples").values() for r in rows])
    assert record["items"] == len(test)
    assert record["tiers"] == list(TIER_NAMES)
    saved = json.loads((guard / CASCADE_FILE).read_text())
    assert (
        saved["tier_bands"] == record["tier_bands"] and saved["classifier"] == record["classifier"]
    )
    assert (out / "classifier" / "final" / "reasonguard.json").is_file()
    verdicts = [json.loads(line) for line in (out / "tiers" / "verdicts.jsonl").open()]
    assert [v["prompt"] for v in verdicts] == [e["prompt"] for e in EXAMPLES]
    assert all(v["tier"] in TIER_NAMES for v in verdicts)
    report = (out / "tiers" / "report.md").read_text()
    assert "3-tier cascade (classifier, then fast, then reasoning)" in report
    assert "held-out items answered by each tier" in report
    for v in verdicts:
        assert f"- tier `{v['tier']}`" in report
    assert "--classifier" in report.split("Try it:")[1]
    assert printed.count("      done in ") == 2
