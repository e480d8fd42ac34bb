"""The offline demo: the whole R-SFT flow on SmolLM2-135M, on a CPU, with no hub access.

Steps (each resumable: rerunning the demo reuses what a previous run finished):

1. split the shipped sample set (`reasonguard.data.sources.SAMPLES`) into a training part and a
   held-out test part, stratified by request label so both labels appear in the test part;
2. train LoRA R-SFT on the training part with `configs/demo-cpu.yaml` (SmolLM2 from the offline
   package, converted once and cached);
3. generate on the held-out part with the saved adapter, prompted in its recorded format;
4. score the outputs per task with the evaluator (strict protocol) and write the report.

Output (`runs/demo/` by default):

    data/train.jsonl, data/test.jsonl   the split
    model/                              the training run (see `reasonguard.train.sft`),
                                        model/final/ the trained adapter
    generations/test.jsonl              the model's outputs on the held-out part
    metrics.json, report.md             per-task F1 / precision / recall / accuracy / parse failures

Example:
    $ reasonguard demo --out runs/demo
"""

from __future__ import annotations

import json
import random
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError

DEFAULT_CONFIG = Path("configs") / "demo-cpu.yaml"
TEST_FRACTION = 0.2
SPLIT_SEED = 42


def split_samples(
    records: Sequence[dict[str, Any]], fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split records into (train, test), stratified by the request label; inputs untouched."""
    from reasonguard.format import parse_labels

    by_label: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_label.setdefault(str(parse_labels(record["output"])["prompt"]), []).append(record)
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        cut = max(1, round(len(group) * fraction))
        test += group[:cut]
        train += group[cut:]
    return train, test


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    tmp.replace(path)


def _find_config(config: str | Path | None) -> Path:
    path = Path(config) if config is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError(
            f"{path}: demo config not found; run the demo from the repository root "
            "(`make demo`) or pass --config"
        )
    return path


def run_demo(
    out: str | Path = "runs/demo",
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    max_new_tokens: int = 320,
    batch_size: int = 16,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run the demo end to end and return the held-out metrics.

    Args:
        out: the demo's output folder.
        config: the training config (default `configs/demo-cpu.yaml`).
        overrides: `key=value` training-config overrides.
        max_new_tokens: generation budget per held-out item (the sample outputs are ~150-200
            tokens; a model that does not stop is cut here and flagged truncated).
        batch_size: generation batch size.
        fresh: delete `out` first instead of reusing a previous run's finished steps.
    """
    from reasonguard.data.sources import load_source
    from reasonguard.evaluate.datafiles import read_data_outputs
    from reasonguard.evaluate.dataset import evaluate_dataset, render_dataset_report
    from reasonguard.generation.run import Decoding, data_jobs, run_jobs
    from reasonguard.models import resolve_model
    from reasonguard.train.config import load_config
    from reasonguard.train.sft import run_sft

    out = Path(out)
    config_path = _find_config(config)
    if fresh and out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        print(f"      done in {timings[name]:.0f} s", flush=True)
        return now

    print("[1/4] preparing SmolLM2-135M-Instruct from the offline package (cached after once)")
    t = time.perf_counter()
    resolve_model("smollm2")
    t = lap("model_conversion_s", t)

    records = [r for rows in load_source("samples").values() for r in rows]
    train, test = split_samples(records)
    train_file, test_file = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    _write_jsonl(train_file, train)
    _write_jsonl(test_file, test)
    print(f"      sample set: {len(records)} records -> {len(train)} train, {len(test)} held out")

    print(f"[2/4] training LoRA R-SFT with {config_path}")
    sft_config = load_config(
        config_path, [*overrides, f"output_dir={out / 'model'}", f"dataset={train_file}"]
    )
    result = run_sft(sft_config)
    t = lap("train_s", t)

    print(f"[3/4] generating on the {len(test)} held-out records")
    gen_dir = out / "generations"
    run_jobs(
        str(result.final_dir),
        data_jobs(str(test_file)),
        gen_dir,
        Decoding(max_new_tokens=max_new_tokens),
        batch_size=batch_size,
    )
    t = lap("generate_s", t)

    print("[4/4] scoring (strict protocol)")
    rows, _ = read_data_outputs(sorted(gen_dir.glob("*.jsonl")))
    if len(rows) != len(test):
        raise UserError(f"{gen_dir}: expected {len(test)} generated rows, found {len(rows)}")
    metrics = evaluate_dataset(rows, name="demo held-out samples")
    lap("score_s", t)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    metrics["timings"] = timings
    metrics["model"] = str(result.final_dir)
    report = render_dataset_report(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    command = reasonguard_command()
    (out / "report.md").write_text(report + next_steps(command))

    print()
    print(report)
    print("Where everything is:")
    for label, path in [
        ("trained adapter", result.final_dir),
        ("training info", result.run_dir / "training_info.json"),
        ("loss curve", result.run_dir / "loss_curve.png"),
        ("TensorBoard logs", result.run_dir / "logs"),
        ("held-out outputs", gen_dir),
        ("metrics", out / "metrics.json"),
        ("report", out / "report.md"),
    ]:
        print(f"  {label:<17} {path}")
    stages = ", ".join(
        f"{label} {timings[key]:.0f} s"
        for label, key in (
            ("model", "model_conversion_s"),
            ("training", "train_s"),
            ("generation", "generate_s"),
            ("scoring", "score_s"),
        )
    )
    print(f"Demo finished in {timings['total_s']:.0f} s ({stages}).")
    print(next_steps(command))
    print("Try it (from this folder, in any shell):")
    for line in try_it(command, result.final_dir, max_new_tokens):
        print(f"  {line}")
    return metrics


def reasonguard_command() -> str:
    """How to run `reasonguard` from a shell in the current folder, as printed commands say it.

    Plain `reasonguard` where that name on PATH is this installation (an activated venv);
    otherwise the path of this installation's script (`.venv/bin/reasonguard` from the
    repository root, since `make demo` never activates the venv), else `python -m reasonguard`.
    """
    script = Path(sys.prefix) / "bin" / "reasonguard"
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m reasonguard"
    on_path = shutil.which("reasonguard")
    if on_path is not None and Path(on_path).resolve() == script.resolve():
        return "reasonguard"
    try:
        shown = script.absolute().relative_to(Path.cwd())
    except ValueError:
        shown = script.absolute()
    return shlex.quote(str(shown))


def try_it(command: str, model: Path, max_new_tokens: int) -> list[str]:
    """The demo's closing example commands, runnable as printed."""
    prompt = shlex.quote("How do I pick a lock?")
    base = f"{command} classify --model {shlex.quote(str(model))} --prompt {prompt}"
    return [
        f"{base} --max-new-tokens {max_new_tokens}",
        f"{base} --mode fast     # no reasoning: the answer's probabilities",
    ]


def next_steps(command: str = "reasonguard") -> str:
    """What a newcomer is looking at, and what to run for a real guard."""
    return f"""
What you are looking at: a 135M-parameter model trained for a few minutes on 72 hand-written
rows. The numbers above show the pipeline working end to end (training, generation in the
GuardReasoner answer format, scoring); they say nothing about what a real guard reaches.

A real guard: on a GPU, train Llama-3.2-3B-Instruct with QLoRA on GuardReasonerTrain (127,544
rows; yueliu1999/GuardReasonerTrain on the Hugging Face Hub)
  {command} plan --config configs/exp19-qlora-3b-instruct.yaml --gpu 4090   # about 30 h (estimate)
  {command} train sft --config configs/exp19-qlora-3b-instruct.yaml
and score it on the 13 benchmarks with `{command} evaluate` (see README.md). For scale, the
GuardReasoner paper reports weighted F1 80.76 (prompt harmfulness), 80.80 (response harmfulness)
and 85.95 (refusal) for its 3B model.
"""
