"""Peak memory of DPO's log-prob step: the full log-softmax against chunked log-probs.

The step: the LM head on every position of one packed row, log p(target) at each, and the
backward of a loss that weighs each position differently (as DPO's does), w.r.t. the hidden
states and, unless `--frozen-head` (LoRA), the head weight. Modes:

- `full`: the direct computation, `log_softmax(head(h).float()).gather(target)` on all positions
  at once (what `dpo_loss.sequence_logps` did before `train.dpo.logprobs`);
- `chunked:<size>`: `train.dpo.logprobs.chunked_token_logps` with that many positions per chunk;
- `liger` (CUDA only): liger-kernel's fused linear cross-entropy, `reduction="none"`.

Each mode runs in its own process on a random head weight (no model). On CPU the number is the
process's peak resident memory during the step minus its resident memory just before it (the
kernel's high-water mark, reset with /proc/self/clear_refs; `ru_maxrss` where that is not
allowed), under glibc's default allocator settings: large blocks go back to the system when
freed, so the resident memory follows the live tensors. `--training-allocator` uses the settings
of `reasonguard train` on CPU instead (reasonguard.launch.allocenv): freed memory stays in the
heap, and its fragmentation adds to the peak. On CUDA it is `torch.cuda.max_memory_allocated`
minus the memory allocated before the step. The head weight, hidden states and targets are allocated before the
step and not counted; the gradients are. Every mode also reports the sum of its log-probs and the
norm of the hidden states' gradient, which must agree across modes.

The [positions, vocabulary] tensors dominate the full mode, and they do not depend on the hidden
size; the hidden size sets the matmul time (on 2 CPU cores, hidden 3072 takes minutes per mode,
hence the default of 256) and the size of the gradients, which all modes share.

Run:
    .venv/bin/python bench/dpo_logprob_memory.py                          # CPU, fp32, < 2 min
    .venv/bin/python bench/dpo_logprob_memory.py --device cuda --hidden 3072 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import write_json

REPO = Path(__file__).resolve().parents[1]
LLAMA3_VOCAB = 128_256


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=4096, help="labelled positions (one pack)")
    parser.add_argument("--vocab", type=int, default=LLAMA3_VOCAB, help="vocabulary (Llama 3's)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (Llama-3.2-3B: 3072)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--chunk-sizes", default="512", help="comma-separated positions per chunk")
    parser.add_argument(
        "--training-allocator",
        action="store_true",
        help="CPU: the glibc settings of `reasonguard train` instead of glibc's defaults",
    )
    parser.add_argument("--frozen-head", action="store_true", help="no head-weight gradient")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one mode in this process
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args, args.child)))
        return
    modes = ["full"] + [f"chunked:{int(s)}" for s in args.chunk_sizes.split(",")]
    if args.device == "cuda":
        modes.append("liger")
    results = [child(args, mode) for mode in modes]
    report = {
        "positions": args.positions,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "dtype": args.dtype,
        "device": args.device,
        "head_gradient": not args.frozen_head,
        "allocator": "reasonguard train" if args.training_allocator else "glibc defaults",
        "torch_threads": results[0]["torch_threads"],
        "results": results,
    }
    print(table(report))
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)


def child(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Run one mode in a fresh process (its own peak memory) and read its JSON line."""
    from reasonguard.launch.allocenv import MALLOC_ENV

    argv = [sys.executable, __file__, "--child", mode] + [
        *("--positions", str(args.positions), "--vocab", str(args.vocab)),
        *("--hidden", str(args.hidden), "--dtype", args.dtype, "--device", args.device),
        *(["--frozen-head"] if args.frozen_head else []),
    ]
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if args.training_allocator and args.device == "cpu":
        env.update(MALLOC_ENV)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        sys.exit(f"mode {mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    import torch

    from reasonguard.train.dpo.logprobs import chunked_token_logps

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    n, vocab, size = args.positions, args.vocab, args.hidden
    head = torch.nn.Linear(size, vocab, bias=False, device=device, dtype=dtype)
    head.weight.requires_grad_(not args.frozen_head)
    hidden = torch.randn(n, size, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), device=device)
    weights = torch.linspace(-1.0, 2.0, n, device=device)  # a different weight per position

    if mode == "full":

        def logps_of(head: Any, hidden: Any, targets: Any) -> Any:
            logits = head(hidden).float()
            return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    elif mode.startswith("chunked:"):
        chunk = int(mode.split(":")[1])

        def logps_of(head: Any, hidden: Any, targets: Any) -> Any:
            return chunked_token_logps(hidden, head.weight, head.bias, targets, chunk_size=chunk)
    elif mode == "liger":
        from reasonguard.train.dpo.logprobs import liger_problem, liger_token_logps

        problem = liger_problem(hidden, head)
        if problem is not None:
            sys.exit(f"liger: {problem}")

        def logps_of(head: Any, hidden: Any, targets: Any) -> Any:
            return liger_token_logps(hidden, head.weight, head.bias, targets)
    else:
        sys.exit(f"unknown mode {mode}")

    # Warm-up on a small head: the code paths' imports and kernels are loaded before measuring.
    small = torch.nn.Linear(size, 64, bias=False, device=device, dtype=dtype)
    small_hidden = torch.randn(8, size, device=device, dtype=dtype, requires_grad=True)
    logps_of(small, small_hidden, targets[:8] % 64).sum().backward()
    del small, small_hidden

    meter = Meter(device)
    start = time.perf_counter()
    logps = logps_of(head, hidden, targets)
    (weights * logps).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = meter.peak()
    return {
        "mode": mode,
        "peak_mib": round(peak / 2**20, 1),
        "meter": meter.kind,
        "seconds": round(seconds, 2),
        "sum_logps": float(logps.detach().double().sum()),
        "hidden_grad_norm": float(hidden.grad.double().norm()),
        "torch_threads": torch.get_num_threads(),
    }


class Meter:
    """Peak memory above the current use, from construction to `peak()`."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.kind = "torch.cuda.max_memory_allocated"
            self.base = torch.cuda.memory_allocated()
            return
        try:  # reset the kernel's peak-RSS mark (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "VmHWM after clear_refs"
        except OSError:
            self.kind = "ru_maxrss"
        self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        if self.kind == "ru_maxrss":
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def table(report: dict[str, Any]) -> str:
    full = report["results"][0]["peak_mib"]
    lines = [
        f"log-prob step (forward + backward): {report['positions']} positions, vocab "
        f"{report['vocab']}, hidden {report['hidden']}, {report['dtype']} on {report['device']}, "
        f"head gradient {'yes' if report['head_gradient'] else 'no'}, {report['allocator']}",
        f"{'mode':<14}{'peak MiB':>10}{'vs full':>9}{'seconds':>9}  sum log-probs / |grad h|",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['mode']:<14}{r['peak_mib']:>10.1f}{r['peak_mib'] / full:>8.2f}x"
            f"{r['seconds']:>9.2f}  {r['sum_logps']:.6g} / {r['hidden_grad_norm']:.6g}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
