"""Cost of a verdict in each mode: reasoning, fast and cascade, on the same items in one run.

Items: the demo's held-out sample rows (the 18 that `reasonguard demo` holds out) plus
`--benchmark-rows` rows taken round-robin from four benchmark files (short prompt-only items and
long response items). Each mode classifies every item through `Guard.classify` in batches of
`--batch-size`; the bench reports generated tokens per item, wall seconds per item (model loading
excluded, a warm-up batch first) and, for the cascade, the share of items escalated to reasoning.
It also prints each mode's agreement with the true labels (F1 of the request task on the items
that have one), with the caveat that only a trained guard (a GPU-trained one, not the demo's
135M model) makes those F1 numbers mean anything.

Cascade bands: the model folder's `cascade.json` (from `reasonguard calibrate`) when there is
one, else `--band LOW HIGH` for every task (default 0.2 0.8).

Run (after `make demo`, on an otherwise idle machine):
    .venv/bin/python bench/fast_verdicts.py --model runs/demo/model/final \\
        --benchmark-dir data/benchmarks --json runs/bench-fast-verdicts.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("SimpleSafetyTests", "AegisSafetyTest", "HarmBenchResponse", "XSTestReponseHarmful")


def load_items(benchmark_dir: str | None, rows: int) -> list[dict[str, Any]]:
    """The demo's held-out rows, then `rows` benchmark rows; each with its true labels."""
    from reasonguard.cascade.calibrate import DevItem, items_from_benchmarks
    from reasonguard.data.sources import load_source
    from reasonguard.demo import split_samples
    from reasonguard.evaluate.labels import read_label
    from reasonguard.format import TASKS, split_input

    records = [r for rows_ in load_source("samples").values() for r in rows_]
    _, held_out = split_samples(records)
    items: list[DevItem] = []
    for k, record in enumerate(held_out):
        prompt, response = split_input(record["input"])
        truth = {t: read_label(record["output"], t, bare=False) for t in TASKS}
        items.append(DevItem(prompt, response, truth, f"samples held-out {k}"))
    if rows and benchmark_dir:
        per = [items_from_benchmarks([name], benchmark_dir) for name in BENCHMARKS]
        items += [per[i % len(per)][i // len(per)] for i in range(rows)]
    return [{"item": {"prompt": i.prompt, "response": i.response}, "truth": i.truth} for i in items]


def f1(truth: list[bool], predicted: list[bool]) -> float | None:
    from reasonguard.cascade.bands import f1_score

    return f1_score(truth, predicted) if any(truth) else None


def run_mode(guard, items, mode: str, batch_size: int, bands) -> dict[str, Any]:
    results, seconds = [], 0.0
    for start in range(0, len(items), batch_size):
        batch = [x["item"] for x in items[start : start + batch_size]]
        clock = time.perf_counter()
        results += guard.classify(batch, mode=mode, bands=bands, scores=False)
        seconds += time.perf_counter() - clock
    labelled = [(x, r) for x, r in zip(items, results, strict=True) if x["truth"]["prompt"]]
    return {
        "items": len(items),
        "generated_tokens": sum(r.num_tokens for r in results),
        "tokens_per_item": sum(r.num_tokens for r in results) / len(items),
        "seconds": seconds,
        "seconds_per_item": seconds / len(items),
        "escalated": sum(r.mode == "reasoning" for r in results) if mode == "cascade" else None,
        "parse_failures": sum(r.is_parsing_error for r in results),
        "request_f1": f1(
            [x["truth"]["prompt"] == "harmful" for x, _ in labelled],
            [r.prompt_harmfulness == "harmful" for _, r in labelled],
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/demo/model/final")
    parser.add_argument(
        "--benchmark-dir", help="the benchmark files (default: none, demo rows only)"
    )
    parser.add_argument("--benchmark-rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=320, help="the demo's budget (320)")
    parser.add_argument("--band", nargs=2, type=float, default=(0.2, 0.8), metavar=("LOW", "HIGH"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

    from reasonguard import load_guard
    from reasonguard.cascade.bands import Bands, read_bands
    from reasonguard.format import TASKS

    items = load_items(args.benchmark_dir, args.benchmark_rows)
    guard = load_guard(
        args.model,
        device="cpu",
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
    )
    calibrated = read_bands(guard.backend.path) if Path(guard.backend.path).is_dir() else None
    bands = calibrated or Bands({task: tuple(args.band) for task in TASKS})
    guard.classify([items[0]["item"]], mode="fast")  # warm-up: first-call costs untimed
    guard.classify([items[0]["item"]], mode="reasoning", max_new_tokens=8, scores=False)
    modes = {
        mode: run_mode(guard, items, mode, args.batch_size, bands)
        for mode in ("reasoning", "fast", "cascade")
    }
    reasoning = modes["reasoning"]
    result = {
        "model": args.model,
        "items": len(items),
        "benchmark_rows": args.benchmark_rows if args.benchmark_dir else 0,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "bands": bands.to_dict(),
        "bands_from": "cascade.json" if calibrated else f"--band {args.band[0]} {args.band[1]}",
        "modes": modes,
        "tokens_ratio_reasoning_over_fast": (
            None
            if modes["fast"]["tokens_per_item"] == 0
            else reasoning["tokens_per_item"] / modes["fast"]["tokens_per_item"]
        ),
        "seconds_ratio_reasoning_over_fast": reasoning["seconds"] / modes["fast"]["seconds"],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg()[0],
        },
    }
    print(f"{len(items)} items, batch {args.batch_size}, bands {result['bands_from']}")
    print(
        "| mode | generated tokens / item | seconds / item | escalated | parse failures | request F1 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for mode, m in modes.items():
        escalated = "-" if m["escalated"] is None else f"{m['escalated']}/{m['items']}"
        request_f1 = "-" if m["request_f1"] is None else f"{m['request_f1']:.1f}"
        print(
            f"| {mode} | {m['tokens_per_item']:.1f} | {m['seconds_per_item']:.3f} | {escalated} | "
            f"{m['parse_failures']} | {request_f1} |"
        )
    print(
        f"reasoning / fast: seconds {result['seconds_ratio_reasoning_over_fast']:.1f}x; fast mode "
        "generates no tokens"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
