"""HF fast verdicts of this checkout against an older checkout's, on the same items.

The items are `bench/fast_verdicts.py`'s (the demo's held-out sample rows, then benchmark rows
round-robin). Each checkout classifies all of them with `Guard.classify(mode="fast")` in batches
of `--batch-size` (a warm-up item first; model loading excluded), in its own child process whose
only `reasonguard` is that checkout's `src/`. The two alternate for `--rounds` rounds, so a
machine that slows down during the run slows both. Reported: seconds per item (median over the
rounds), the ratio baseline / this checkout, whether every chosen label is equal, and the largest
difference between the two checkouts' label probabilities.

Run on an otherwise idle machine, e.g. against the commit before a fast-mode change:
    git worktree add /tmp/before <commit>
    .venv/bin/python bench/fast_mode_baseline.py --baseline-src /tmp/before/src \\
        --model smollm2 --benchmark-dir data/benchmarks --json runs/bench-fast-baseline.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def worker(
    model: str, items_path: str, out_path: str, batch_size: int, threads: int | None
) -> None:
    """One round in this process: the `reasonguard` on sys.path classifies every item."""
    import torch

    from reasonguard import load_guard

    if threads:
        torch.set_num_threads(threads)
    items = json.loads(Path(items_path).read_text())
    guard = load_guard(model, device="cpu", batch_size=batch_size, max_new_tokens=8)
    guard.classify([items[0]], mode="fast")  # warm-up
    results, seconds = [], 0.0
    for start in range(0, len(items), batch_size):
        clock = time.perf_counter()
        results += guard.classify(items[start : start + batch_size], mode="fast")
        seconds += time.perf_counter() - clock
    Path(out_path).write_text(
        json.dumps(
            {
                "seconds_per_item": seconds / len(items),
                "labels": [
                    [r.prompt_harmfulness, r.response_refusal, r.response_harmfulness]
                    for r in results
                ],
                "scores": [r.scores for r in results],
            }
        )
    )


def largest_difference(a: list[dict], b: list[dict]) -> float:
    """The largest absolute difference between two runs' label probabilities."""
    found = 0.0
    for one, other in zip(a, b, strict=True):
        for task, probabilities in one.items():
            if probabilities is None or other[task] is None:
                if probabilities != other[task]:
                    return float("inf")  # a task scored by one checkout only
                continue
            for label, p in probabilities.items():
                found = max(found, abs(p - other[task][label]))
    return found


def one_round(src: Path, args: argparse.Namespace, items_path: Path, out: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(src), CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, __file__, "--worker", str(items_path), str(out)]
    command += ["--model", args.model, "--batch-size", str(args.batch_size)]
    command += ["--threads", str(args.threads)] if args.threads else []
    subprocess.run(command, env=env, check=True, cwd=src.parent)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", help="the older checkout's src/ folder (required)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--benchmark-dir", help="the benchmark files (default: demo rows only)")
    parser.add_argument("--benchmark-rows", type=int, default=32)
    parser.add_argument("--sample-rows", type=int, help="held-out sample rows (default: all 18)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per checkout (default 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.model, *args.worker, args.batch_size, args.threads)
        return 0
    if not args.baseline_src:
        parser.error("--baseline-src is required")
    baseline = Path(args.baseline_src).resolve()
    if not (baseline / "reasonguard" / "__init__.py").is_file():
        parser.error(f"--baseline-src {baseline}: no reasonguard package there")

    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "bench"))
    from fast_verdicts import load_items

    items = [
        x["item"] for x in load_items(args.benchmark_dir, args.benchmark_rows, args.sample_rows)
    ]
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        items_path = Path(tmp) / "items.json"
        items_path.write_text(json.dumps(items))
        for k in range(args.rounds):
            for name, src in (("baseline", baseline), ("current", REPO / "src")):
                runs[name].append(one_round(src, args, items_path, Path(tmp) / f"{name}{k}.json"))
    median = {n: statistics.median(r["seconds_per_item"] for r in rs) for n, rs in runs.items()}
    result = {
        "model": args.model,
        "items": len(items),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "baseline_src": str(baseline),
        "seconds_per_item": {n: [r["seconds_per_item"] for r in rs] for n, rs in runs.items()},
        "median_seconds_per_item": median,
        "speedup": median["baseline"] / median["current"],
        "labels_equal": runs["baseline"][-1]["labels"] == runs["current"][-1]["labels"],
        "largest_probability_difference": largest_difference(
            runs["baseline"][-1]["scores"], runs["current"][-1]["scores"]
        ),
        "load_average_at_end": os.getloadavg()[0],
    }
    print(
        f"{len(items)} items, batch {args.batch_size}, {args.rounds} rounds each: "
        f"baseline {median['baseline']:.3f} s/item, this checkout {median['current']:.3f} s/item, "
        f"{result['speedup']:.2f}x; labels equal: {result['labels_equal']}; largest probability "
        f"difference {result['largest_probability_difference']:.2g}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
