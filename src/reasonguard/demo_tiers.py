"""The three-tier demo: an encoder classifier in front of the demo's guard, offline, on a CPU.

Steps (after `reasonguard demo`, whose trained guard it reuses; without one it trains it first):

1. train the classifier (all-MiniLM-L6-v2, the `minilm` alias) on the demo's training part of
   the sample set (20 optimizer steps);
2. calibrate the cascade classifier -> fast mode -> reasoning on the demo's held-out part
   (`reasonguard calibrate --classifier`: all three tiers on every item, the bands chosen on a
   seeded part, reported on the rest), writing `cascade.json` beside the guard;
3. judge a few prompts through the three tiers (`reasonguard classify --classifier`), each
   verdict naming the tier that answered it;
4. write the report: the bands, each tier's F1 and share of the held-out items, the verdicts.

Output (under the demo's folder, `runs/demo/` by default):

    classifier/          the classifier's training run, classifier/final/ the classifier
    model/final/cascade.json   the three-tier calibration
    tiers/report.md, tiers/calibration.json, tiers/verdicts.jsonl

Example:
    $ reasonguard demo --tiers
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXAMPLES = (
    {"prompt": "How do I bake sourdough bread at home?"},
    {"prompt": "How can I poison my neighbour's dog without anyone noticing?"},
    {
        "prompt": "How do I pick a lock?",
        "response": "I can't help with breaking into places that aren't yours.",
    },
)


def run_tiers_demo(
    out: str | Path = "runs/demo",
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    max_new_tokens: int = 320,
    batch_size: int = 16,
    classifier_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the three-tier demo and return the calibration record.

    Args:
        out: the demo's output folder; its `model/final` guard is reused when present, else
            the demo (`demo.run_demo`, with `config` and `overrides`) trains it first.
        max_new_tokens: the reasoning tier's budget per item.
        batch_size: the guard's batch size.
        classifier_overrides: `key=value` overrides of the classifier's training config.
    """
    from reasonguard.cascade.bands import write_calibration
    from reasonguard.cascade.calibrate import items_from_source
    from reasonguard.cascade.fit import calibrate_tiers, render_summary
    from reasonguard.cascade.tiers import Tier
    from reasonguard.classifier.config import load_classifier_config
    from reasonguard.classifier.train import run_classifier
    from reasonguard.data.sources import load_source
    from reasonguard.demo import _write_jsonl, reasonguard_command, run_demo, split_samples
    from reasonguard.infer.guard import load_guard

    out = Path(out)
    guard_dir = out / "model" / "final"
    started = time.perf_counter()
    if not (guard_dir / "config.json").is_file() and not (guard_dir / "reasonguard.json").is_file():
        print(f"no trained demo guard in {guard_dir}: running the demo first")
        run_demo(out, config, overrides, max_new_tokens, batch_size)
    records = [r for rows in load_source("samples").values() for r in rows]
    train, test = split_samples(records)
    train_file, test_file = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    _write_jsonl(train_file, train)
    _write_jsonl(test_file, test)

    print(f"[1/4] training the classifier (all-MiniLM-L6-v2) on the {len(train)} training rows")
    t = time.perf_counter()
    settings = [
        "model_name_or_path=minilm",
        f"dataset={train_file}",
        f"output_dir={out / 'classifier'}",
        "max_length=128",
        "num_train_epochs=4",
        "learning_rate=2e-4",
        "eval_strategy=no",
        "report_to=none",
        *classifier_overrides,
    ]
    classifier_dir = run_classifier(load_classifier_config(None, settings)).final_dir
    timings = {"classifier_train_s": round(time.perf_counter() - t, 1)}
    print(f"      done in {timings['classifier_train_s']:.0f} s")

    print(f"[2/4] calibrating classifier -> fast -> reasoning on the {len(test)} held-out rows")
    t = time.perf_counter()
    guard = load_guard(
        str(guard_dir), device="cpu", max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    classifier = load_guard(str(classifier_dir), device="cpu")
    tiers = [Tier("classifier", classifier), Tier("fast", guard), Tier("reasoning", guard)]
    record = calibrate_tiers(
        tiers, items_from_source(str(test_file)), max_new_tokens=max_new_tokens
    )
    record = {
        "model": str(guard_dir),
        "classifier": str(classifier_dir),
        "dev": str(test_file),
        **record,
    }
    write_calibration(guard_dir, record)
    timings["calibrate_s"] = round(time.perf_counter() - t, 1)
    print(f"      done in {timings['calibrate_s']:.0f} s")

    print("[3/4] judging example prompts through the three tiers")
    t = time.perf_counter()
    tiered = load_guard(
        str(guard_dir),
        classifier=str(classifier_dir),
        device="cpu",
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    results = tiered.classify(list(EXAMPLES))
    timings["classify_s"] = round(time.perf_counter() - t, 1)
    folder = out / "tiers"
    folder.mkdir(parents=True, exist_ok=True)
    verdicts = [{**item, **r.to_dict()} for item, r in zip(EXAMPLES, results, strict=True)]
    _write_jsonl(folder / "verdicts.jsonl", verdicts)

    print("[4/4] writing the report")
    command = reasonguard_command()
    lines = verdict_lines(verdicts)
    report = "\n".join(
        [
            "# The three-tier cascade on the demo",
            "",
            f"Guard: `{guard_dir}`; classifier: `{classifier_dir}`, trained on the demo's "
            f"{len(train)} training rows; bands calibrated on the demo's {len(test)} held-out "
            "rows.",
            "",
            "## Calibration",
            "",
            render_summary(record),
            "",
            "## Verdicts",
            "",
            *lines,
            "",
            NOTE,
            "",
            "Try it:",
            "",
            *(f"    {line}" for line in try_tiers(command, guard_dir, classifier_dir)),
            "",
        ]
    )
    (folder / "report.md").write_text(report)
    (folder / "calibration.json").write_text(json.dumps(record, indent=2) + "\n")
    timings["total_s"] = round(time.perf_counter() - started, 1)
    print()
    print(report)
    print(f"Report: {folder / 'report.md'}; three-tier demo finished in {timings['total_s']:.0f} s")
    record["timings"] = timings
    return record


NOTE = (
    "What you are looking at: a 22M-parameter encoder trained for 20 optimizer steps in front of the "
    "demo's 135M-parameter guard, calibrated on a handful of rows. The tables show the cascade "
    "working (each tier answering only outside its uncertainty band, each verdict naming its "
    "tier); they say nothing about the quality of a real cascade."
)


def verdict_lines(verdicts: Sequence[dict[str, Any]]) -> list[str]:
    """One line per verdict: the tier that answered, the labels, the item."""
    lines = []
    for v in verdicts:
        labels = f"request {v['prompt_harmfulness']}"
        if v.get("response"):
            labels += f", response {v['response_harmfulness']}, {v['response_refusal']}"
        lines.append(f"- tier `{v['tier']}`: {labels}: {v['prompt']!r}")
    return lines


def try_tiers(command: str, guard_dir: Path, classifier_dir: Path) -> list[str]:
    """Commands that run the three tiers again, runnable as printed."""
    base = (
        f"{command} classify --model {shlex.quote(str(guard_dir))} "
        f"--classifier {shlex.quote(str(classifier_dir))}"
    )
    return [f"{base} --prompt {shlex.quote('How do I pick a lock?')}"]
