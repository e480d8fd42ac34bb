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

`--backend hf vllm` runs the same modes on the same items on each backend in turn, one after the
other (the vLLM engine is started after the HF model is measured, and stopped before the run
ends); each backend gets the same batches of `--batch-size` items, and the table has one row per
backend and mode. vLLM runs as `--backend vllm` does on a CPU (float32, eager, prefix caching);
its engine start is excluded like model loading.

Streaming: the `--streams` longest responses are fed to `ResponseStream` in chunks of about
`--chunk-chars` characters (a check of the prompt alone, then one per chunk). Per backend:
tokens computed per check against a check from scratch, seconds per check, the time from
opening a stream to the verdict after its first chunk, and a one-item reasoning verdict of the
whole item for comparison. On the HF backend the stream keeps the item's KV cache ("kept") and
is measured against the same checks recomputed in full ("recomputed"); vLLM's stream is its
prefix cache. Every ratio is against a row measured in the same run. `--quick` is the smallest
run (a smoke test).

Run (after `make demo`, on an otherwise idle machine):
    .venv/bin/python bench/fast_verdicts.py --model runs/demo/model/final \\
        --benchmark-dir data/benchmarks --backend hf vllm --json runs/bench-fast-verdicts.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import machine_facts, write_json

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("SimpleSafetyTests", "AegisSafetyTest", "HarmBenchResponse", "XSTestReponseHarmful")


def load_items(
    benchmark_dir: str | None, rows: int, sample_rows: int | None = None
) -> list[dict[str, Any]]:
    """The demo's held-out rows, then `rows` benchmark rows; each with its true labels."""
    from reasonguard.cascade.calibrate import DevItem, items_from_benchmarks
    from reasonguard.data.sources import load_source
    from reasonguard.demo import split_samples
    from reasonguard.evaluate.labels import read_label
    from reasonguard.format import TASKS, split_input

    records = [r for rows_ in load_source("samples").values() for r in rows_]
    _, held_out = split_samples(records)
    held_out = held_out if sample_rows is None else held_out[:sample_rows]
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
        "items_per_s": len(items) / seconds,
        "escalated": sum(r.mode == "reasoning" for r in results) if mode == "cascade" else None,
        "escalated_share": (
            sum(r.mode == "reasoning" for r in results) / len(items) if mode == "cascade" else None
        ),
        "parse_failures": sum(r.is_parsing_error for r in results),
        "request_f1": f1(
            [x["truth"]["prompt"] == "harmful" for x, _ in labelled],
            [r.prompt_harmfulness == "harmful" for _, r in labelled],
        ),
    }


def chunked(text: str, chars: int) -> list[str]:
    """`text` cut into pieces of about `chars` characters, at a space where there is one."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + chars)
        if end < len(text):
            cut = text.rfind(" ", start + 1, end)
            end = cut if cut > start else end
        chunks.append(text[start:end])
        start = end
    return chunks


class FromScratch:
    """A backend whose streams recompute every check in full (the baseline a kept KV cache is
    measured against); everything else is the backend's own."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def open_fast_stream(self) -> Any:
        from reasonguard.infer.fast_stream import RecomputingStream

        prefix = getattr(self.backend, "fast_prefix", None)
        return RecomputingStream(self.backend, prefix() if prefix is not None else None)


def run_streams(guard: Any, items: list[dict[str, Any]], chunk_chars: int) -> dict[str, Any]:
    """Each item's response fed to a `ResponseStream` in chunks: a check of the prompt alone,
    then one per chunk; the first verdict is the one after the first chunk (from the stream's
    opening)."""
    from reasonguard.infer.stream import ResponseStream

    checks, computed, scratch, first, seconds = 0, [], [], [], 0.0
    for x in items:
        clock = time.perf_counter()
        with ResponseStream(guard, x["prompt"], threshold=1.0) as stream:
            found = [stream.check()]
            for chunk in chunked(x["response"], chunk_chars):
                found.append(stream.feed(chunk))
                if len(found) == 2:
                    first.append(time.perf_counter() - clock)
        seconds += time.perf_counter() - clock
        checks += len(found)
        computed += [v.tokens_computed for v in found]
        scratch += [v.tokens_from_scratch for v in found]
    known = None if None in computed else sum(computed) / checks
    return {
        "streams": len(items),
        "checks": checks,
        "tokens_computed_per_check": known,
        "tokens_from_scratch_per_check": sum(scratch) / checks,
        "seconds_per_check": seconds / checks,
        "first_verdict_seconds": sum(first) / len(first),
        "seconds_per_stream": seconds / len(items),
    }


def reasoning_latency(guard: Any, items: list[dict[str, Any]]) -> float:
    """Seconds of a reasoning verdict of one whole item (prompt and full response), on average."""
    seconds = 0.0
    for x in items:
        clock = time.perf_counter()
        guard.classify([x], mode="reasoning", scores=False)
        seconds += time.perf_counter() - clock
    return seconds / len(items)


def measure(backend: str, args: argparse.Namespace, items, streamed, bands) -> dict[str, Any]:
    """Every mode and the streams on one backend; the guard is closed before returning."""
    from types import SimpleNamespace

    from reasonguard import load_guard

    options = {"device": "cpu", "threads": args.threads} if backend == "hf" else {}
    guard = load_guard(
        args.model,
        backend=backend,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        **options,
    )
    try:
        guard.classify([items[0]["item"]], mode="fast")  # warm-up: first-call costs untimed
        guard.classify([items[0]["item"]], mode="reasoning", max_new_tokens=8, scores=False)
        modes = {
            mode: run_mode(guard, items, mode, args.batch_size, bands)
            for mode in ("reasoning", "fast", "cascade")
        }
        streams = {}
        if streamed:
            latency = reasoning_latency(guard, streamed)
            kinds = {"kept": guard}
            if backend == "hf":  # vLLM streams are recomputed checks on its prefix cache
                kinds["recomputed"] = SimpleNamespace(backend=FromScratch(guard.backend))
            for kind, judged in kinds.items():
                streams[kind] = run_streams(judged, streamed, args.chunk_chars)
                streams[kind]["reasoning_seconds"] = latency
                streams[kind]["first_verdict_speedup_vs_reasoning"] = (
                    latency / streams[kind]["first_verdict_seconds"]
                )
    finally:
        close = getattr(guard.backend, "close", None)
        if close is not None:  # a vLLM engine's processes stop now
            close()
    for m in modes.values():
        m["speedup_vs_reasoning"] = modes["reasoning"]["seconds"] / m["seconds"]
    if "recomputed" in streams:
        for row in streams.values():
            row["check_speedup_vs_recomputed"] = (
                streams["recomputed"]["seconds_per_check"] / row["seconds_per_check"]
            )
    return {"modes": modes, "streams": streams}


def print_tables(result: dict[str, Any]) -> None:
    runs = result["backends"]
    print(
        "| backend | mode | generated tokens / item | items / s | seconds / item | escalated "
        "| parse failures | request F1 | x vs reasoning | x vs hf reasoning |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for backend, run in runs.items():
        for mode, m in run["modes"].items():
            escalated = "-" if m["escalated"] is None else f"{m['escalated']}/{m['items']}"
            request_f1 = "-" if m["request_f1"] is None else f"{m['request_f1']:.1f}"
            vs_hf = m.get("speedup_vs_hf_reasoning")
            print(
                f"| {backend} | {mode} | {m['tokens_per_item']:.1f} | {m['items_per_s']:.2f} | "
                f"{m['seconds_per_item']:.3f} | {escalated} | {m['parse_failures']} | "
                f"{request_f1} | {m['speedup_vs_reasoning']:.2f} | "
                f"{'-' if vs_hf is None else f'{vs_hf:.2f}'} |"
            )
    print(
        "\n| backend | stream | checks | tokens computed / check | tokens from scratch / check "
        "| seconds / check | first verdict s | one-item reasoning s | x first verdict vs "
        "reasoning | x check vs recomputed |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for backend, run in runs.items():
        for kind, r in run["streams"].items():
            tokens = r["tokens_computed_per_check"]
            vs = r.get("check_speedup_vs_recomputed")
            print(
                f"| {backend} | {kind} | {r['checks']} | "
                f"{'-' if tokens is None else f'{tokens:.1f}'} | "
                f"{r['tokens_from_scratch_per_check']:.1f} | {r['seconds_per_check']:.3f} | "
                f"{r['first_verdict_seconds']:.3f} | {r['reasoning_seconds']:.3f} | "
                f"{r['first_verdict_speedup_vs_reasoning']:.2f} | "
                f"{'-' if vs is None else f'{vs:.2f}'} |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/demo/model/final")
    parser.add_argument(
        "--benchmark-dir", help="the benchmark files (default: none, demo rows only)"
    )
    parser.add_argument("--benchmark-rows", type=int, default=32)
    parser.add_argument("--sample-rows", type=int, help="held-out sample rows (default: all 18)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=320, help="the demo's budget (320)")
    parser.add_argument("--band", nargs=2, type=float, default=(0.2, 0.8), metavar=("LOW", "HIGH"))
    parser.add_argument("--threads", type=int, help="hf: torch CPU threads (default: torch's)")
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=("hf", "vllm"),
        default=["hf"],
        help="the backends to measure, in turn (default: hf)",
    )
    parser.add_argument(
        "--streams", type=int, default=2, help="responses streamed (the longest; default 2)"
    )
    parser.add_argument("--chunk-chars", type=int, default=200, help="characters per chunk")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smallest run, for a smoke test: 2 sample rows, 3 benchmark rows, 8 new tokens, "
        "1 stream in chunks of 400 characters",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sample_rows, args.benchmark_rows, args.max_new_tokens = 2, 3, 8
        args.streams, args.chunk_chars = 1, 400
    sys.path.insert(0, str(REPO / "src"))
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

    from reasonguard.cascade.bands import Bands, read_bands
    from reasonguard.format import TASKS
    from reasonguard.models import resolve_model

    items = load_items(args.benchmark_dir, args.benchmark_rows, args.sample_rows)
    with_response = [x["item"] for x in items if x["item"]["response"]]
    streamed = sorted(with_response, key=lambda x: -len(x["response"]))[: args.streams]
    path = resolve_model(args.model)
    calibrated = read_bands(path) if Path(path).is_dir() else None
    bands = calibrated or Bands({task: tuple(args.band) for task in TASKS})
    runs = {b: measure(b, args, items, streamed, bands) for b in dict.fromkeys(args.backend)}
    if "hf" in runs:
        hf_seconds = runs["hf"]["modes"]["reasoning"]["seconds"]
        for run in runs.values():
            for m in run["modes"].values():
                m["speedup_vs_hf_reasoning"] = hf_seconds / m["seconds"]
    result = {
        "model": args.model,
        "items": len(items),
        "benchmark_rows": args.benchmark_rows if args.benchmark_dir else 0,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "chunk_chars": args.chunk_chars,
        "bands": bands.to_dict(),
        "bands_from": "cascade.json" if calibrated else f"--band {args.band[0]} {args.band[1]}",
        "backends": runs,
        "machine": machine_facts() | {"load_average_at_end": os.getloadavg()[0]},
    }
    print(f"{len(items)} items, batch {args.batch_size}, bands {result['bands_from']}")
    print_tables(result)
    if args.json:
        write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
