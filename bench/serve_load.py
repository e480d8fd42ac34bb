"""A bounded load test of `reasonguard serve` on loopback: requests/s, p50 and p95 latency with
1, 8 and 32 concurrent clients, for the HF backend (dynamic batcher) and the vLLM backend
(async engine, continuous batching), same model, same prompts, same token budget.

Each backend gets its own real server process (`reasonguard serve` under uvicorn on
127.0.0.1), started once and warmed with a few requests. At each concurrency C, C clients each
send requests one after another (`/v1/classify`, one benchmark prompt per request, round robin
over the prompts) until `--requests-per-level` have been answered; a request's latency is from
sending to its answer. Every request must get a 200, or the run stops. The servers run one at
a time, so they never compete for the cores; prints a table and one JSON line for BENCHMARKS.md.

Example:
    .venv/bin/python bench/serve_load.py --model smollm2 --max-new-tokens 64 \\
        --concurrency 1 8 32 --requests-per-level 64 --benchmark-dir data/benchmarks
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchlib import cpu_model

KEY_ENV, KEY = "RG_LOAD_TEST_KEY", "load-test-key"
PROMPT_FILES = ("0_1_AegisSafetyTest.json", "0_0_SimpleSafetyTests.json")


def load_prompts(benchmark_dir: str, count: int) -> list[str]:
    """User prompts taken round robin from two prompt benchmarks."""
    from reasonguard.format import split_input

    files = [json.loads((Path(benchmark_dir) / name).read_text()) for name in PROMPT_FILES]
    rows = [files[i % len(files)][i // len(files)] for i in range(count)]
    return [split_input(r["input"])[0] for r in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(backend: str, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable, "-m", "reasonguard", "serve", "--model", args.model,
        "--backend", backend, "--port", str(port), "--api-key-env", KEY_ENV,
        "--max-new-tokens", str(args.max_new_tokens), "--log-level", "warning",
        "--timeout-s", "600", "--no-scores",
    ]  # fmt: skip
    if backend == "hf":
        # Room for every concurrent request in one batch; the batcher's default wait.
        command += ["--device", "cpu", "--max-batch-size", str(max(args.concurrency))]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, KEY_ENV: KEY}
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{backend} server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{backend} server not ready in 900 s")


async def run_level(url: str, prompts: list[str], clients: int, total: int) -> dict:
    """`clients` concurrent clients, `total` requests in all; latencies and throughput."""
    latencies: list[float] = []
    counter = iter(range(total))
    headers = {"Authorization": f"Bearer {KEY}"}

    async def client(session: httpx.AsyncClient) -> None:
        for i in counter:
            body = {"items": [{"prompt": prompts[i % len(prompts)]}], "reasoning": "always"}
            sent = time.perf_counter()
            r = await session.post("/v1/classify", json=body, timeout=600)
            if r.status_code != 200:
                raise SystemExit(f"request {i}: HTTP {r.status_code}: {r.text[:300]}")
            latencies.append(time.perf_counter() - sent)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(statistics.median(ordered), 3),
        "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=("hf", "vllm"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-level", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--benchmark-dir",
        default=os.environ.get("REASONGUARD_BENCHMARKS")
        or os.path.join(os.environ.get("REASONGUARD_SHARED", "shared"), "data", "benchmarks"),
    )
    args = parser.parse_args()
    prompts = load_prompts(args.benchmark_dir, 64)
    results: dict[str, list[dict]] = {}
    logs = Path(tempfile.mkdtemp(prefix="serve-load-"))
    for backend in args.backends:
        process, url = start_server(backend, args, logs / f"{backend}.log")
        try:
            asyncio.run(run_level(url, prompts, 2, 4))  # warm-up
            results[backend] = []
            for clients in args.concurrency:
                total = max(args.requests_per_level, clients)
                level = asyncio.run(run_level(url, prompts, clients, total))
                results[backend].append(level)
                print(
                    f"{backend:>5} {clients:>3} clients: {level['requests_per_s']:7.3f} req/s  "
                    f"p50 {level['p50_s']:7.2f} s  p95 {level['p95_s']:7.2f} s  "
                    f"({level['requests']} requests in {level['seconds']} s)",
                    flush=True,
                )
        finally:
            process.terminate()
            process.wait(timeout=60)
    if {"hf", "vllm"} <= set(results):
        for hf, vl in zip(results["hf"], results["vllm"], strict=True):
            ratio = vl["requests_per_s"] / hf["requests_per_s"]
            print(f"vllm/hf requests/s at {hf['clients']} clients: {ratio:.2f}x")
    print(
        json.dumps(
            {
                "model": args.model,
                "max_new_tokens": args.max_new_tokens,
                "cpu": cpu_model(),
                "cpus": os.cpu_count(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
