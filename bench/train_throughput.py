"""Training throughput: the seed's SFT setup (A) against reasonguard's default (B), one process.

A (TRL SFTTrainer-style, the seed's Exp 19): micro-batch 2 in data order, padded to the longest
row of the pair, no packing, gradient checkpointing on, the full LM head and the loss over every
non-pad token (prompt included), loss averaged per micro-batch.
B (reasonguard's default): the step's rows packed best-fit-decreasing into `max_length`-token rows
(`data.pack` / `collate_packed`, position_ids restarting per sample), the LM head and loss only at
labelled positions (`modeling.labelled_loss_sum`), per-token normalisation over the step, no
gradient checkpointing.

Both run the same LoRA model (r 16 on all linear layers, fp32 on CPU), the same samples, the same
number of samples per optimizer step, forward + backward per step (no optimizer update, so both
see the same weights). The phases alternate A B A B ... (`--rounds`), and each phase's wall time
is summed. Reported: real (non-pad) tokens/s of each, the ratio B/A, padding efficiency (real /
computed tokens) and peak RSS of each phase (sampled every 10 ms).

Corpus: the six benchmarks of `$REASONGUARD_SHARED/data/predictions/GuardReasoner-1B` joined row by
row with their inputs in `data/benchmarks` (benchmark input as `input`, the released 1B model's
reasoning and answer `predict` as `output`): realistic R-SFT rows. The sample is seeded.

The glibc allocator settings of `reasonguard train` (reasonguard.train.allocenv) are applied by
re-executing this script once, so both phases run as a CPU training run would.

Run:
    .venv/bin/python bench/train_throughput.py --model tiny --json runs/bench-train-tiny.json
    .venv/bin/python bench/train_throughput.py --model smollm2 --samples 16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Prediction folder -> benchmark file (same rows, same order).
BENCHMARKS = {
    "SimpleSafetyTests": "0_0_SimpleSafetyTests.json",
    "AegisSafetyTest": "0_1_AegisSafetyTest.json",
    "HarmBenchPrompt": "0_3_harmbench_prompt.json",
    "HarmBenchResponse": "0_5_harmbench_response.json",
    "XSTestReponseHarmful": "0_6_xstest_response_harmful.json",
    "XSTestResponseRefusal": "0_7_xstest_response_refusal.json",
}
MODELS = {"tiny": "tiny-llama", "smollm2": "smollm2"}


def corpus(shared: Path) -> list[dict[str, str]]:
    """Benchmark inputs with the released 1B model's outputs, joined row by row."""
    rows = []
    for folder, bench_file in BENCHMARKS.items():
        preds_path = shared / "data/predictions/GuardReasoner-1B" / folder
        preds = [json.loads(line) for line in (preds_path / "generated_predictions.jsonl").open()]
        inputs = json.loads((shared / "data/benchmarks" / bench_file).read_text())
        if len(preds) != len(inputs):
            sys.exit(f"{folder}: {len(preds)} predictions but {len(inputs)} benchmark rows")
        for pred, row in zip(preds, inputs, strict=True):
            rows.append(
                {
                    "instruction": row["instruction"],
                    "input": row["input"],
                    "output": pred["predict"],
                }
            )
    return rows


class PeakRSS:
    """The peak resident set size (bytes) of this process while the context is open."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def set_checkpointing(model, on: bool) -> None:
    base = model.get_base_model()
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def on_device(batch: dict, device: str | None) -> dict:
    """The batch's tensors on `device` (unchanged for None: the CPU bench)."""
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def autocast(device: str | None):
    """bf16 autocast on CUDA (the GPU bench); nothing on CPU (fp32, as `train` runs there)."""
    import contextlib

    import torch

    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_a(model, rows, pad: int, device: str | None = None) -> tuple[int, int]:
    """The seed's step: pairs in data order, padded, loss over all tokens; (real, computed)."""
    import torch

    from reasonguard.train.data import collate

    pairs = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    real = computed = 0
    for pair in pairs:
        batch = on_device(collate(pair, pad), device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with autocast(device):
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=labels,
                use_cache=False,
            )
        (out.loss / len(pairs)).backward()
        real += int(batch["attention_mask"].sum())
        computed += batch["input_ids"].numel()
    del out
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    model.zero_grad(set_to_none=True)
    return real, computed


def step_b(model, rows, budget: int, device: str | None = None) -> tuple[int, int]:
    """reasonguard's step: packed rows, labelled-only loss, per-token normalisation."""
    import torch

    from reasonguard.train.data import collate_packed, pack
    from reasonguard.train.modeling import labelled_loss_sum

    n_labels = sum(r.num_labels for r in rows)
    real = computed = 0
    for group in pack(rows, budget):
        batch = on_device(collate_packed(group), device)
        with autocast(device):
            loss = labelled_loss_sum(model, batch)
        (loss / n_labels).backward()
        real += sum(len(r) for r in group)
        computed += batch["input_ids"].numel()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    model.zero_grad(set_to_none=True)
    return real, computed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--samples", type=int, default=64, help="samples per phase")
    parser.add_argument("--samples-per-step", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (timed; plus a warm-up)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shared", default=os.environ.get("REASONGUARD_SHARED") or REPO.parent / "shared"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from reasonguard.train.allocenv import GUARD, MALLOC_ENV, decision

    if decision()["re_exec"]:
        env = {**os.environ, **MALLOC_ENV, GUARD: "1"}
        os.execvpe(sys.executable, [sys.executable, *sys.argv], env)

    import torch

    from reasonguard.train.config import SFTConfig
    from reasonguard.train.data import encode
    from reasonguard.train.modeling import load_model, load_training_tokenizer, parameter_counts

    config = SFTConfig(
        model_name_or_path=MODELS[args.model],
        prompt_format="chat",
        finetuning="lora",
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        max_length=args.max_length,
        report_to="none",
    )
    torch.manual_seed(args.seed)
    tokenizer = load_training_tokenizer(config)
    records = corpus(Path(args.shared))
    picked = random.Random(args.seed).sample(records, args.samples)
    rows = encode(
        [("bench", i, r) for i, r in enumerate(picked)], tokenizer, "chat", args.max_length
    )
    model = load_model(config, bf16=False)
    model.train()
    pad = tokenizer.pad_token_id
    steps = [
        rows[i : i + args.samples_per_step] for i in range(0, len(rows), args.samples_per_step)
    ]

    def phase(name: str) -> dict[str, float]:
        set_checkpointing(model, name == "a")
        real = computed = 0
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            for step in steps:
                r, c = (
                    step_a(model, step, pad)
                    if name == "a"
                    else step_b(model, step, args.max_length)
                )
                real, computed = real + r, computed + c
            seconds = time.perf_counter() - t0
        return {"seconds": seconds, "real": real, "computed": computed, "rss": rss.peak}

    # Warm-up (one step of each, untimed), then A B A B ...
    for name in "ab":
        set_checkpointing(model, name == "a")
        (step_a(model, steps[0], pad) if name == "a" else step_b(model, steps[0], args.max_length))
    totals = {n: {"seconds": 0.0, "real": 0, "computed": 0, "rss": 0} for n in "ab"}
    for round_ in range(args.rounds):
        for name in "ab":
            got = phase(name)
            t = totals[name]
            t["seconds"] += got["seconds"]
            t["real"] += got["real"]
            t["computed"] += got["computed"]
            t["rss"] = max(t["rss"], got["rss"])
            print(
                f"round {round_ + 1} {name.upper()}: {got['real'] / got['seconds']:,.0f} real tok/s "
                f"({got['seconds']:.1f} s)",
                flush=True,
            )
    tps = {n: totals[n]["real"] / totals[n]["seconds"] for n in "ab"}
    result = {
        "model": MODELS[args.model],
        "parameters": parameter_counts(model),
        "samples": args.samples,
        "samples_per_step": args.samples_per_step,
        "rounds": args.rounds,
        "max_length": args.max_length,
        "real_tokens_per_phase": totals["a"]["real"] // args.rounds,
        "label_tokens_per_phase": sum(r.num_labels for r in rows),
        "tokens_per_second_a": tps["a"],
        "tokens_per_second_b": tps["b"],
        "ratio": tps["b"] / tps["a"],
        "padding_efficiency_a": totals["a"]["real"] / totals["a"]["computed"],
        "padding_efficiency_b": totals["b"]["real"] / totals["b"]["computed"],
        "peak_rss_gib_a": totals["a"]["rss"] / 2**30,
        "peak_rss_gib_b": totals["b"]["rss"] / 2**30,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "load_average_at_start": os.getloadavg()[0],
        "allocator": decision()["action"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
