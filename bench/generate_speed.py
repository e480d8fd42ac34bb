"""Generation throughput of the HF backend: one prompt at a time vs batched, in one run; with
`--vllm`, the vLLM backend on the same prompts too.

Runs the same benchmark prompts through `HFBackend.generate` (continuous batching) with each
batch size (greedy, fixed `max_new_tokens`) and prints rows/s and generated tokens/s, each batch
size's speed-up over the first, and a JSON line for BENCHMARKS.md. With `--static` it also runs
transformers' own `generate` on static, length-sorted batches of the largest size (what the
backend did before continuous batching), for comparison. With `--vllm` the vLLM backend (its CPU
build on a CPU: float32, as the HF backend) then generates the same prompts in one call, and the
share of prompts whose greedy text equals the HF backend's is reported. A warm-up call runs
before each backend's timed runs so one-off
costs are not timed. `--quiet-load L` waits (up to `--quiet-wait-s`) until the 1-minute load
average is below L, so other jobs on a shared machine do not skew the numbers.

Example:
    .venv/bin/python bench/generate_speed.py --model smollm2 --rows 32 --max-new-tokens 128 \\
        --batch-sizes 1 8 16 --static --vllm --quiet-load 0.7 --benchmark-dir data/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchlib import cpu_model

# Rows round-robin from four benchmarks: short prompt-only items and long response items.
BENCHMARKS = ("SimpleSafetyTests", "AegisSafetyTest", "HarmBenchResponse", "XSTestReponseHarmful")


def load_inputs(benchmark_dir: str, rows: int) -> list[tuple[str, str]]:
    """(instruction, input) pairs, taken round-robin from `BENCHMARKS`."""
    from reasonguard.evaluate.files import read_json_rows
    from reasonguard.evaluate.registry import BENCHMARKS as REGISTRY

    files = [read_json_rows(os.path.join(benchmark_dir, REGISTRY[b].filename)) for b in BENCHMARKS]
    picked = [files[i % len(files)][i // len(files)] for i in range(rows)]
    return [(r["instruction"], r["input"]) for r in picked]


def wait_until_quiet(limit: float, wait_s: float) -> float:
    """Poll the 1-minute load average until it is below `limit` (or `wait_s` passed)."""
    deadline = time.monotonic() + wait_s
    load = os.getloadavg()[0]
    while load >= limit and time.monotonic() < deadline:
        print(f"load {load:.2f} >= {limit}; waiting", file=sys.stderr)
        time.sleep(15)
        load = os.getloadavg()[0]
    return load


def static_generate(backend, prompts: list[str], batch_size: int, max_new_tokens: int) -> list:
    """transformers `generate` on static batches of length-sorted, left-padded prompts; returns
    the generated token counts."""
    import torch
    from transformers import GenerationConfig

    from reasonguard.infer.hf import left_pad

    encoded = backend.encode(prompts)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = backend.tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=backend.stop_ids
    )
    config.pad_token_id = pad
    counts = []
    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start : start + batch_size]]
        ids, mask = left_pad(rows, pad)
        with torch.inference_mode():
            out = backend.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config
            )
        for tokens in out[:, ids.shape[1] :].tolist():
            stop = next((i for i, t in enumerate(tokens) if t in backend.stop_ids), len(tokens))
            counts.append(stop)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--static", action="store_true", help="also time static HF generate")
    parser.add_argument("--vllm", action="store_true", help="also time the vLLM backend")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet-load", type=float, help="wait for a 1-min load below this")
    parser.add_argument("--quiet-wait-s", type=float, default=600)
    parser.add_argument(
        "--benchmark-dir",
        default=os.environ.get("REASONGUARD_BENCHMARKS")
        or os.path.join(os.environ.get("REASONGUARD_SHARED", "shared"), "data", "benchmarks"),
    )
    args = parser.parse_args()

    import torch

    from reasonguard.infer.loading import load_backend

    backend = load_backend(args.model, "hf", device=args.device, threads=args.threads)
    prompts = [
        backend.build_prompt(inp, ins) for ins, inp in load_inputs(args.benchmark_dir, args.rows)
    ]
    prompt_tokens = sum(len(ids) for ids in backend.encode(prompts))
    backend.batch_size = max(args.batch_sizes)
    backend.generate(prompts[:2], max_new_tokens=4)  # warm-up
    load_before = wait_until_quiet(args.quiet_load, args.quiet_wait_s) if args.quiet_load else None
    load_before = os.getloadavg()[0] if load_before is None else load_before
    runs = [(f"continuous, batch {b}", b) for b in args.batch_sizes]
    if args.static:
        runs.append((f"static HF generate, batch {max(args.batch_sizes)}", None))
    results = {}
    for name, batch_size in runs:
        start = time.perf_counter()
        if batch_size is None:
            counts = static_generate(backend, prompts, max(args.batch_sizes), args.max_new_tokens)
            limit = sum(c >= args.max_new_tokens for c in counts)
        else:
            backend.batch_size = batch_size
            out = backend.generate(prompts, max_new_tokens=args.max_new_tokens)
            counts = [g.num_tokens for [g] in out]
            limit = sum(g.hit_token_limit for [g] in out)
        seconds = time.perf_counter() - start
        tokens = sum(counts)
        results[name] = r = {
            "seconds": round(seconds, 2),
            "rows_per_s": round(len(prompts) / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "generated_tokens": tokens,
            "hit_limit": limit,
        }
        print(
            f"{name:>32}: {r['seconds']:7.2f} s  {r['rows_per_s']:6.3f} rows/s  "
            f"{r['tokens_per_s']:7.1f} tok/s  ({tokens} tokens, {limit} hit the limit)",
            flush=True,
        )
    hf_texts = [g.text for [g] in out] if args.batch_sizes else []
    vllm_agreement = None
    if args.vllm:
        del backend.model  # the HF model's memory, before vLLM reserves its own
        vllm_backend = load_backend(args.model, "vllm", batch_size=len(prompts))
        vllm_backend.generate(prompts[:2], max_new_tokens=4)  # warm-up
        name = f"vllm, {len(prompts)} prompts in one call"
        start = time.perf_counter()
        out = vllm_backend.generate(prompts, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - start
        tokens = sum(g.num_tokens for [g] in out)
        results[name] = r = {
            "seconds": round(seconds, 2),
            "rows_per_s": round(len(prompts) / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "generated_tokens": tokens,
            "hit_limit": sum(g.hit_token_limit for [g] in out),
        }
        vllm_agreement = sum(a == g.text for a, [g] in zip(hf_texts, out, strict=False)) / max(
            len(hf_texts), 1
        )
        print(
            f"{name:>32}: {r['seconds']:7.2f} s  {r['rows_per_s']:6.3f} rows/s  "
            f"{r['tokens_per_s']:7.1f} tok/s  ({tokens} tokens); greedy text equal to the HF "
            f"backend's on {vllm_agreement:.0%} of the prompts",
            flush=True,
        )
        vllm_backend.close()
        runs.append((name, None))
    base = results[runs[0][0]]["tokens_per_s"]
    speedups = {name: round(r["tokens_per_s"] / base, 2) for name, r in results.items()}
    for name, ratio in speedups.items():
        print(f"speed-up of {name} over {runs[0][0]}: {ratio:.2f}x")
    summary = {
        "model": args.model,
        "device": str(getattr(backend, "device", "cpu")),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "rows": len(prompts),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        "speedups": speedups,
        "vllm_greedy_agreement": vllm_agreement,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
