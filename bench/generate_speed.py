"""Generation throughput of the HF backend: one prompt at a time vs batched, in one run.

Runs the same benchmark prompts through `HFBackend.generate` with each batch size (greedy,
fixed `max_new_tokens`) and prints rows/s and generated tokens/s, plus a JSON line for
BENCHMARKS.md. A warm-up call runs first so one-off costs are not timed.

Example:
    .venv/bin/python bench/generate_speed.py --model smollm2 --rows 16 --max-new-tokens 128 \\
        --batch-sizes 1 8 --benchmark-dir ../shared/data/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

# Four rows from each of four benchmarks: short prompt-only items and long response items.
BENCHMARKS = ("SimpleSafetyTests", "AegisSafetyTest", "HarmBenchResponse", "XSTestReponseHarmful")


def load_inputs(benchmark_dir: str, rows: int) -> list[tuple[str, str]]:
    """(instruction, input) pairs, taken round-robin from `BENCHMARKS`."""
    from reasonguard.evaluate.files import read_json_rows
    from reasonguard.evaluate.registry import BENCHMARKS as REGISTRY

    files = [read_json_rows(os.path.join(benchmark_dir, REGISTRY[b].filename)) for b in BENCHMARKS]
    picked = [files[i % len(files)][i // len(files)] for i in range(rows)]
    return [(r["instruction"], r["input"]) for r in picked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--benchmark-dir",
        default=os.environ.get("REASONGUARD_BENCHMARKS")
        or os.path.join(os.environ.get("REASONGUARD_SHARED", "../shared"), "data", "benchmarks"),
    )
    args = parser.parse_args()

    import torch

    from reasonguard.infer.backends import load_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = load_backend(args.model, "hf", device=args.device)
    prompts = [
        backend.build_prompt(inp, ins) for ins, inp in load_inputs(args.benchmark_dir, args.rows)
    ]
    prompt_tokens = sum(len(ids) for ids in backend.encode(prompts))
    backend.batch_size = max(args.batch_sizes)
    backend.generate(prompts[:2], max_new_tokens=4)  # warm-up
    results = {}
    for batch_size in args.batch_sizes:
        backend.batch_size = batch_size
        start = time.perf_counter()
        out = backend.generate(prompts, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - start
        tokens = sum(g.num_tokens for [g] in out)
        results[batch_size] = {
            "seconds": round(seconds, 2),
            "rows_per_s": round(len(prompts) / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "generated_tokens": tokens,
            "hit_limit": sum(g.hit_token_limit for [g] in out),
        }
        r = results[batch_size]
        print(
            f"batch {batch_size:>3}: {r['seconds']:7.2f} s  {r['rows_per_s']:6.3f} rows/s  "
            f"{r['tokens_per_s']:7.1f} tok/s  ({tokens} tokens, {r['hit_limit']} hit the limit)"
        )
    first, last = args.batch_sizes[0], args.batch_sizes[-1]
    speedup = results[last]["tokens_per_s"] / results[first]["tokens_per_s"]
    print(f"speed-up batch {last} vs {first}: {speedup:.2f}x")
    summary = {
        "model": args.model,
        "device": str(backend.device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "rows": len(prompts),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        "speedup": round(speedup, 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
