"""Cross-benchmark transfer of the encoder classifier, its latency, and a cascade over a guard.

1. **Train** the `minilm` classifier (all-MiniLM-L6-v2) through `reasonguard train classifier`'s
   own code (a YAML config in the work folder, then `run_classifier`) on the gold labels of
   ToxicChat and OpenAIModeration (request task) and BeaverTails and SafeRLHF (response task):
   `--train-rows` rows of each, picked at random (`--pick-seed`; the files are sorted in places:
   SafeRLHF's first thousand rows are all unharmful). No source has a refusal label, so the
   refusal head is never trained: it keeps its random initial weights.
2. **Transfer**: on the six benchmarks it never saw (SimpleSafetyTests, AegisSafetyTest,
   HarmBenchPrompt, HarmBenchResponse, XSTestReponseHarmful, XSTestResponseRefusal) the
   classifier's predictions (`generate`'s code, mode classifier) and GuardReasoner-1B's released
   ones (`--predictions`) are scored by `evaluate`'s evaluator (`--protocol`, default strict).
3. **Latency**: `load_guard` on the trained folder, one `classify` call per item for
   `--latency-items` items of the six files (p50, p95; warm-up calls excluded); batched items/s
   as `generate` recorded them in step 2 (batches of 32, model loading excluded).
4. **Cascade** "classifier, then GuardReasoner-1B's released verdicts", on the library's cascade
   of tiers with both tiers replayed (`cascade.replay.ReplayGuard` over the two predictions
   folders). The six files are split in halves (`calibrate.split_dev`, seeded, stratified on the
   labels and the file: `--split-seed`); `fit.choose_tier_bands` picks on the calibration halves
   the classifier's band per trained task, the one escalating fewest items with an F1 within
   `--max-f1-drop` of GuardReasoner-1B's; an untrained head's task (refusal) gets [0, 1], all its
   items go up. On the other halves (`tiers.answering_tiers`, each item asked its benchmark's
   task) an escalated item takes GuardReasoner-1B's output, any other keeps the classifier's, and
   the evaluator scores the cascade, GuardReasoner-1B alone and the classifier alone there.

The training files are benchmark test sets used as training data: these numbers measure
cross-benchmark transfer, not the GuardReasoner paper's protocol (training on GuardReasonerTrain).

Defaults (the full size): 700 rows per source (2,800 items, 5% held out for the eval loss),
3 epochs, `max_length` 256, 64 items per optimizer step (micro-batches of 16), learning rate
1e-4, `class_balance` on (ToxicChat's prompts are about 7% toxic; trained unweighted, the
request head learns that prior and calls most harmful prompts of the held-out files
unharmful): 126 optimizer steps over about 940,000 tokens. `--epochs 1 --no-class-balance` is
the smallest run. `--quick`
(40 rows per source, `max_length` 48, the first 30 rows of each held-out file) is a smoke test.

Run (on an otherwise idle machine):
    .venv/bin/python bench/classifier_transfer.py --benchmark-dir data/benchmarks \\
        --predictions data/predictions/GuardReasoner-1B --json runs/bench-classifier-transfer.json
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import PREDICTED_BENCHMARKS, machine_facts, read_jsonl, write_json, write_jsonl

TRAIN_SOURCES = {"ToxicChat": "prompt", "OpenAIModeration": "prompt",
                 "BeaverTails": "response", "SafeRLHF": "response"}  # fmt: skip
HELD_OUT = tuple(PREDICTED_BENCHMARKS)  # the six files with released GuardReasoner-1B outputs
PREDICTIONS = "generated_predictions.jsonl"
QUICK = {"train_rows": 40, "epochs": 1, "max_length": 48, "held_out_rows": 30, "latency_items": 10}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark-dir", default="data/benchmarks", help="the benchmark files")
    p.add_argument(
        "--predictions",
        default="data/predictions/GuardReasoner-1B",
        help="GuardReasoner-1B's released predictions",
    )
    p.add_argument(
        "--work-dir",
        default="runs/bench-classifier-transfer",
        help="the run folder (deleted and rebuilt)",
    )
    p.add_argument("--train-rows", type=int, default=700, help="rows per training source")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-length", type=int, default=256, help="tokens per item")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument(
        "--class-balance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train with class_balance (each task's rare class weighed up; default on)",
    )
    p.add_argument("--pick-seed", type=int, default=0, help="which training rows are picked")
    p.add_argument("--held-out-rows", type=int, help="only the first N rows of each held-out file")
    p.add_argument("--latency-items", type=int, default=200, help="items timed one at a time")
    p.add_argument("--protocol", choices=("strict", "official"), default="strict")
    p.add_argument("--max-f1-drop", type=float, default=0.5, help="the bands' F1 budget (points)")
    p.add_argument("--split-seed", type=int, default=0, help="which half calibrates")
    p.add_argument("--quick", action="store_true", help="smallest run: " + str(QUICK))
    p.add_argument("--json", help="write the results here")
    return p


# --------------------------------------------------------------------------------------------
# 1. Training


def pick_training_rows(benchmark_dir: Path, rows: int, seed: int, out: Path) -> dict[str, Any]:
    """Write `rows` randomly picked rows of each training source into `out`, in the benchmark
    layout (same file names), so the classifier config reads them as benchmarks."""
    import json

    from reasonguard.evaluate.registry import BENCHMARKS

    out.mkdir(parents=True)
    picked = {}
    for name in TRAIN_SOURCES:
        filename = BENCHMARKS[name].filename
        records = json.loads((benchmark_dir / filename).read_text(encoding="utf-8"))
        chosen = sorted(random.Random(f"{seed}:{name}").sample(range(len(records)), rows))
        (out / filename).write_text(json.dumps([records[i] for i in chosen]), encoding="utf-8")
        picked[name] = {"task": TRAIN_SOURCES[name], "rows": rows, "of": len(records)}
    return picked


def train(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train the classifier through its config and `run_classifier`; time the whole run."""
    import json

    import yaml

    from reasonguard.classifier.config import load_classifier_config
    from reasonguard.classifier.train import run_classifier

    picked = pick_training_rows(
        Path(args.benchmark_dir), args.train_rows, args.pick_seed, work / "train-rows"
    )
    config = {
        "model_name_or_path": "minilm",
        "max_length": args.max_length,
        "benchmarks": list(TRAIN_SOURCES),
        "benchmark_dir": str(work / "train-rows"),
        "eval_split_ratio": 0.05,
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 4,
        "learning_rate": args.learning_rate,
        "class_balance": args.class_balance,
        "warmup_steps": 0.1,
        "eval_strategy": "epoch",
        "save_strategy": "no",
        "report_to": ["none"],
        "logging_steps": 5,
        "output_dir": str(work / "classifier"),
        "resume": "never",
    }
    config_path = work / "classifier.yaml"
    header = "# reasonguard train classifier --config " + str(config_path) + "\n"
    config_path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    clock = time.perf_counter()
    result = run_classifier(load_classifier_config(config_path))
    seconds = time.perf_counter() - clock
    info = json.loads((result.run_dir / "training_info.json").read_text(encoding="utf-8"))
    record = json.loads((result.final_dir / "reasonguard.json").read_text(encoding="utf-8"))
    data = info["data"]
    return {"config": str(config_path), "sources": picked, "seconds": round(seconds, 1),
            "steps": result.steps, "train_items": data["train_items"],
            "train_tokens_per_epoch": data["train_tokens_per_epoch"], "labels": data["labels"],
            "train_loop_seconds": info["timings"]["train_seconds_all_sessions"],
            "final_train_loss": result.train_loss, "final_eval_loss": result.eval_loss,
            "heads": record["heads"], "final_dir": str(result.final_dir)}  # fmt: skip


def untrained(heads: dict[str, str]) -> set[str]:
    return {task for task, what in heads.items() if what.startswith("untrained")}


# --------------------------------------------------------------------------------------------
# 2. Transfer: the classifier's predictions and GuardReasoner-1B's, one evaluator


def predict(final_dir: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The classifier's predictions for the held-out files (`generate`'s code, mode classifier),
    and the rows and seconds `generate` recorded (batches of 32, model loading excluded)."""
    from reasonguard.generation.run import Decoding, benchmark_jobs, read_cost, run_jobs

    jobs = benchmark_jobs(HELD_OUT, args.benchmark_dir)
    mode = Decoding(mode="classifier")
    counts = run_jobs(final_dir, jobs, out, mode, limit=args.held_out_rows, progress=False,
                      scores=True, batch_size=32)  # fmt: skip
    costs = [read_cost(out, relpath) for relpath in counts]
    return {"rows": sum(c["rows"] for c in costs), "seconds": sum(c["seconds"] for c in costs)}


def by_benchmark(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["benchmark"]: r for r in metrics["benchmarks"]}


def transfer_rows(ours: dict, theirs: dict, heads: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for name in HELD_OUT:
        c, g = by_benchmark(ours)[name], by_benchmark(theirs)[name]
        head = "untrained" if c["task"] in untrained(heads) else "trained"
        rows.append({"benchmark": name, "task": c["task"], "rows": c["n"], "head": head,
                     "classifier_f1": round(c["f1"], 2), "gr1b_f1": round(g["f1"], 2),
                     "gr1b_parse_failures": g["parse_failures"]})  # fmt: skip
    return rows


def held_out(args: argparse.Namespace, pred_dir: Path) -> dict[str, dict[str, list]]:
    """Per held-out file (its first `--held-out-rows`): the records, the labelled items as
    `calibrate` reads them, the classifier's rows and GuardReasoner-1B's released rows."""
    import json

    from reasonguard.cascade.calibrate import items_from_benchmarks
    from reasonguard.evaluate.registry import BENCHMARKS

    held = {}
    for name in HELD_OUT:
        path = Path(args.benchmark_dir) / BENCHMARKS[name].filename
        records = json.loads(path.read_text(encoding="utf-8"))[: args.held_out_rows]
        released = read_jsonl(Path(args.predictions) / name / PREDICTIONS)[: len(records)]
        if len(released) != len(records):
            raise SystemExit(
                f"{args.predictions}: {name} has {len(released)} rows, not {len(records)}"
            )
        held[name] = {
            "records": records,
            "items": items_from_benchmarks([name], args.benchmark_dir)[: len(records)],
            "classifier": read_jsonl(pred_dir / name / PREDICTIONS),
            "gr1b": released,
        }
    return held


# --------------------------------------------------------------------------------------------
# 3. Latency


def latency(final_dir: str, args, held: dict, batched: dict[str, Any]) -> dict[str, Any]:
    """One-item `classify` calls on items drawn from the held-out files (3 warm-up calls not
    counted); batched items/s from the prediction run."""
    import torch

    from reasonguard import load_guard

    items = [item for name in HELD_OUT for item in held[name]["items"]]
    chosen = random.Random(args.pick_seed).sample(items, min(len(items), args.latency_items + 3))
    guard = load_guard(final_dir)
    times = []
    for k, item in enumerate(chosen):
        clock = time.perf_counter()
        guard.classify([{"prompt": item.prompt, "response": item.response}])
        if k >= 3:
            times.append(1000.0 * (time.perf_counter() - clock))
    p95 = statistics.quantiles(times, n=20, method="inclusive")[18]
    return {"items": len(times), "with_response": sum(i.response is not None for i in chosen[3:]),
            "p50_ms": round(statistics.median(times), 2), "p95_ms": round(p95, 2),
            "batched_items": batched["rows"], "batch_size": 32,
            "batched_items_per_s": round(batched["rows"] / batched["seconds"], 1),
            "threads": torch.get_num_threads()}  # fmt: skip


# --------------------------------------------------------------------------------------------
# 4. The cascade: bands chosen on one half of each file, scored on the other


def cascade(work: Path, args: argparse.Namespace, held: dict, heads: dict[str, str]) -> dict:
    """Choose the classifier's bands on one half of each file and score the cascade on the
    other, with the library's cascade of tiers over replayed predictions (both tiers' outputs
    exist already: `cascade.replay`)."""
    from reasonguard.cascade.bands import Bands
    from reasonguard.cascade.calibrate import split_dev
    from reasonguard.cascade.fit import choose_tier_bands
    from reasonguard.cascade.replay import ReplayGuard
    from reasonguard.cascade.tiers import answering_tiers
    from reasonguard.evaluate.evaluator import evaluate_predictions
    from reasonguard.evaluate.registry import BENCHMARKS
    from reasonguard.format import TASKS

    # Every item of the six files in one list: (file, row) of each, verdicts of both tiers.
    where = [(name, k) for name in HELD_OUT for k in range(len(held[name]["records"]))]
    items = [held[name]["items"][k] for name, k in where]
    replays = {"classifier": ReplayGuard(work / "classifier-predictions"),
               "reasoning": ReplayGuard(args.predictions, HELD_OUT, args.benchmark_dir)}  # fmt: skip
    results = {tier: {name: guard.benchmark_results(name) for name in HELD_OUT}
               for tier, guard in replays.items()}  # fmt: skip
    verdicts = {tier: [results[tier][name][k] for name, k in where] for tier in results}
    # Halves: seeded, stratified on the labels and the file (an item two files share stays on
    # one side). The classifier's bands: the library's choice for the trained heads' tasks,
    # [0, 1] (everything goes up) for an untrained head's.
    calibration, scored_positions = split_dev(items, 0.5, args.split_seed, per_source=True)
    trained = [task for task in TASKS if task not in untrained(heads)]
    chosen, choice = choose_tier_bands(items, verdicts, calibration, args.max_f1_drop, trained)
    bands = Bands({**chosen["classifier"].ranges, **dict.fromkeys(untrained(heads), (0.0, 1.0))})
    asked = [BENCHMARKS[name].tasks for name, _ in where]  # each item: its benchmark's task
    answered = answering_tiers([verdicts["classifier"], verdicts["reasoning"]], [bands], asked)
    up = {where[i]: answered[i] == 1 for i in range(len(where))}
    rows_of: dict[str, dict[str, list[int]]] = {"calibration": {}, "scored": {}}
    for side, positions in (("calibration", calibration), ("scored", scored_positions)):
        for i in positions:
            rows_of[side].setdefault(where[i][0], []).append(where[i][1])
    scored = rows_of["scored"]

    # The scored halves as benchmark files, and each predictor's rows for them; one evaluator.
    halves = work / "scored-halves"
    tiers = {
        "cascade": lambda name, k: held[name]["gr1b" if up[name, k] else "classifier"][k],
        "gr1b": lambda name, k: held[name]["gr1b"][k],
        "classifier": lambda name, k: held[name]["classifier"][k],
    }
    for name in HELD_OUT:
        rows = [held[name]["records"][k] for k in scored[name]]
        write_json(halves / "benchmarks" / BENCHMARKS[name].filename, rows)
        for tier, row in tiers.items():
            (halves / tier / name).mkdir(parents=True, exist_ok=True)
            write_jsonl(halves / tier / name / PREDICTIONS, [row(name, k) for k in scored[name]])
    metrics = {
        tier: evaluate_predictions(halves / tier, halves / "benchmarks", args.protocol)
        for tier in tiers
    }
    f1 = {tier: by_benchmark(m) for tier, m in metrics.items()}
    table = []
    for name in HELD_OUT:
        escalated = sum(up[name, k] for k in scored[name])
        table.append({
            "benchmark": name, "task": BENCHMARKS[name].tasks[0],
            "calibration_rows": rows_of["calibration"][name], "scored_rows": scored[name],
            "scored": f1["cascade"][name]["n"], "escalated": escalated,
            "escalated_share": round(escalated / len(scored[name]), 4),
            **{f"{tier}_f1": round(f1[tier][name]["f1"], 2) for tier in tiers},
        })  # fmt: skip
    total, escalated = len(scored_positions), sum(r["escalated"] for r in table)
    overall = {tier: round(m["overall_f1"], 2) for tier, m in metrics.items()}
    for task in untrained(heads):
        choice["classifier"][task] = {"band": [0.0, 1.0], "chosen_by": "none: untrained head"}
    split_rule = {"method": "seeded stratified split, per file", "seed": args.split_seed}
    return {"bands": bands.to_dict(), "band_choice": choice["classifier"],
            "max_f1_drop": args.max_f1_drop, "split": split_rule, "benchmarks": table,
            "scored_items": total, "escalated": escalated,
            "escalated_share": round(escalated / total, 4), "overall_f1": overall,
            "f1_below_gr1b": round(overall["gr1b"] - overall["cascade"], 2)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Report


def report(result: dict[str, Any]) -> str:
    t, lat, c = result["training"], result["latency"], result["cascade"]
    lines = [
        f"training: {t['train_items']} items, {t['steps']} steps, {t['seconds']:.0f} s",
        "",
        "| benchmark | task | rows | classifier F1 | GuardReasoner-1B F1 |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result["transfer"]:
        mark = "" if r["head"] == "trained" else " (untrained head)"
        lines.append(f"| {r['benchmark']} | {r['task']} | {r['rows']} | "
                     f"{r['classifier_f1']:.2f}{mark} | {r['gr1b_f1']:.2f} |")  # fmt: skip
    lines += [
        "",
        f"one item: p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms ({lat['items']} items);"
        f" batched: {lat['batched_items_per_s']:.1f} items/s",
        "",
        "| benchmark | scored rows | escalated | cascade F1 | GuardReasoner-1B F1 | classifier F1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in c["benchmarks"]:
        lines.append(f"| {r['benchmark']} | {r['scored']} | {r['escalated_share']:.1%} | "
                     f"{r['cascade_f1']:.2f} | {r['gr1b_f1']:.2f} | {r['classifier_f1']:.2f} |")  # fmt: skip
    f1 = c["overall_f1"]
    lines.append(f"| overall F1 | {c['scored_items']} | {c['escalated_share']:.1%} | "
                 f"{f1['cascade']:.2f} | {f1['gr1b']:.2f} | {f1['classifier']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    from reasonguard.evaluate.evaluator import evaluate_predictions

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.time()
    training = train(args, work)
    pred_dir = work / "classifier-predictions"
    batched = predict(training["final_dir"], args, pred_dir)
    limit = args.held_out_rows
    ours = evaluate_predictions(pred_dir, args.benchmark_dir, args.protocol, limit=limit)
    theirs = evaluate_predictions(args.predictions, args.benchmark_dir, args.protocol, limit=limit)
    held = held_out(args, pred_dir)
    result = {
        "machine": {**machine_facts(), "load_average": list(os.getloadavg())},
        "command": sys.argv,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "training": training,
        "transfer": transfer_rows(ours, theirs, training["heads"]),
        "transfer_overall_f1": {"classifier": ours["overall_f1"], "gr1b": theirs["overall_f1"]},
        "latency": latency(training["final_dir"], args, held, batched),
        "cascade": cascade(work, args, held, training["heads"]),
        "seconds": round(time.time() - started, 1),
    }
    print(report(result))
    if args.json:
        write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
