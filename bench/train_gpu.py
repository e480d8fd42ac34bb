"""Training throughput on a CUDA GPU: a random-init Llama-3.2-3B, bf16 LoRA and QLoRA, with MFU.

The GPU mode of `bench/train_throughput.py`. No weights are needed: the model is built
from Llama-3.2-3B's public config numbers (`reasonguard.plan.estimate.KNOWN_ARCHITECTURES`) with
random weights, which computes exactly as fast as the real one. For each mode in `--modes`
(`lora`: bf16 base + LoRA r 16 on all linear layers; `qlora`: the same on an NF4 double-quantised
base via bitsandbytes), it times, alternating A B A B like the CPU bench on the same corpus:

- A, Experiment 19's original step: micro-batches of 2 rows in data order padded to the longest, loss
  over every token, gradient checkpointing on;
- B, reasonguard's default: the step's rows packed best-fit into `--max-length` rows with
  per-sample attention, LM head and loss only at label positions, no checkpointing;

both under bf16 autocast (the step functions are the CPU bench's, `train_setups.step_a/b`).

It reports real tokens/s of each, B/A, peak GPU memory per phase, and MFU: model FLOPs
(`plan.flops_per_token` for the computed tokens + `plan.lm_head_flops` for the label tokens, the
same model `reasonguard plan` uses) per second over the GPU's peak dense bf16 TFLOPS (`--peak-tflops`,
or the `plan.GPUS` entry whose name matches the device).

Run (on a machine with a CUDA GPU, bitsandbytes for qlora):
    .venv/bin/python bench/train_gpu.py --modes lora qlora --samples 256 --json runs/bench-gpu.json

Its results, when measured, are in BENCHMARKS.md (until then the GPU rows there say unmeasured).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = "meta-llama/Llama-3.2-3B"


def build_model(mode: str, workdir: Path):
    """Random-init Llama-3.2-3B (bf16, CUDA) with LoRA adapters; NF4 base for `qlora`."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    from reasonguard.plan.estimate import KNOWN_ARCHITECTURES
    from reasonguard.train.config import LLAMA_TARGET_MODULES
    from reasonguard.train.packed_attention import use_packed_attention

    a = KNOWN_ARCHITECTURES[ARCHITECTURE]
    config = LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        vocab_size=a.vocab,
        tie_word_embeddings=a.tied_embeddings,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    if mode == "lora":
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
    else:
        # bitsandbytes quantises while loading: save the random bf16 weights once, reload in NF4.
        folder = workdir / "llama-3.2-3b-random"
        if not (folder / "config.json").is_file():
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
        nf4 = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=nf4, dtype=torch.bfloat16, device_map={"": 0}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=list(LLAMA_TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    use_packed_attention(model)
    return model, a


def peak_tflops(device_name: str, override: float | None) -> tuple[float | None, str]:
    from reasonguard.plan.estimate import GPUS

    if override:
        return override, "--peak-tflops"
    for key, gpu in GPUS.items():
        if key.replace("-", " ").split()[0].lower() in device_name.lower():
            return gpu.bf16_tflops, gpu.label
    return None, "unknown GPU: pass --peak-tflops for MFU"


def model_flops(arch, mode: str, trainable: int, checkpointing: bool, tokens, labels, keys):
    """FLOPs of a phase from the plan's model: computed tokens x per-token FLOPs + label tokens
    x LM head FLOPs; `keys` = attention keys per token on average."""
    from reasonguard.plan.estimate import flops_per_token, lm_head_flops

    per_token = sum(flops_per_token(arch, mode, trainable, checkpointing, keys).values())
    return tokens * per_token + labels * lm_head_flops(arch, mode)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=["lora", "qlora"], default=["lora", "qlora"])
    parser.add_argument("--samples", type=int, default=256, help="samples per phase")
    parser.add_argument("--samples-per-step", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shared", default=os.environ.get("REASONGUARD_SHARED") or REPO.parent / "shared"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench/train_gpu.py needs a CUDA GPU (use bench/train_throughput.py on CPU)")
        return 2
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "bench"))
    from benchlib import corpus, write_json
    from reasonguard.models import LLAMA3_CHAT_TEMPLATE, load_tokenizer
    from reasonguard.train.data import encode
    from train_setups import set_checkpointing, step_a, step_b

    tokenizer = load_tokenizer("llama3-tokenizer")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    records = corpus(Path(args.shared))
    picked = random.Random(args.seed).sample(records, min(args.samples, len(records)))
    rows = encode(
        [("bench", i, r) for i, r in enumerate(picked)], tokenizer, "chat", args.max_length
    )
    steps = [
        rows[i : i + args.samples_per_step] for i in range(0, len(rows), args.samples_per_step)
    ]
    labels = sum(r.num_labels for r in rows)
    # Causal attention keys per computed token: B attends within each sample (n^2 / 2 per
    # sample), A within each padded row of its pairs (width^2 / 2 per row).
    widths = [max(len(r) for r in rows[i : i + 2]) for i in range(0, len(rows), 2)]
    keys = {
        "a": sum(w * w for w in widths) / sum(2 * w for w in widths),
        "b": sum(len(r) ** 2 for r in rows) / (2 * sum(len(r) for r in rows)),
    }
    device = torch.cuda.get_device_name(0)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            model, arch = build_model(mode, Path(tmp))
            model.train()
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            totals = {n: {"seconds": 0.0, "real": 0, "computed": 0, "memory": 0} for n in "ab"}
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for name in "ab":
                    set_checkpointing(model, name == "a")
                    torch.cuda.reset_peak_memory_stats()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    real = computed = 0
                    for step in steps[:1] if round_ == 0 else steps:
                        r, c = (
                            step_a(model, step, tokenizer.pad_token_id, "cuda")
                            if name == "a"
                            else step_b(model, step, args.max_length, "cuda")
                        )
                        real, computed = real + r, computed + c
                    torch.cuda.synchronize()
                    if round_ == 0:
                        continue
                    t = totals[name]
                    t["seconds"] += time.perf_counter() - t0
                    t["real"] += real
                    t["computed"] += computed
                    t["memory"] = max(t["memory"], torch.cuda.max_memory_allocated())
            out = {}
            for name in "ab":
                t = totals[name]
                # A computes the LM head over every computed token, B over the labels only.
                head_tokens = t["computed"] if name == "a" else labels * args.rounds
                flops = model_flops(
                    arch, mode, trainable, name == "a", t["computed"], head_tokens, keys[name]
                )
                out[name] = {
                    "tokens_per_second": t["real"] / t["seconds"],
                    "padding_efficiency": t["real"] / t["computed"],
                    "peak_memory_gib": t["memory"] / 2**30,
                    "mfu": flops / t["seconds"] / (peak * 1e12) if peak else None,
                }
            out["ratio"] = out["b"]["tokens_per_second"] / out["a"]["tokens_per_second"]
            results[mode] = out
            print(mode, json.dumps(out, indent=2), flush=True)
            del model
            torch.cuda.empty_cache()
    report = {
        "device": device,
        "peak_bf16_tflops": peak,
        "peak_source": peak_source,
        "samples": len(rows),
        "samples_per_step": args.samples_per_step,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(Path(args.json), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
