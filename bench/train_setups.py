"""The training setups the CPU and GPU training benches time (`train_throughput.py`,
`train_gpu.py`), each readable on its own:

- `step_a`: A, the padded SFT step (pairs in data order right-padded, the full LM head and
  Hugging Face's loss, gradient checkpointing on: through the config on CPU, `set_checkpointing`
  on the GPU), with `adamw`, the optimizer `Trainer` builds from the same config;
- `step_b`: B, a packed step (rows packed best-fit, the LM head and loss at labelled positions
  only, per-token normalisation): forward, backward and clipping, as reasonguard's engine runs it;
- `trl_trainer`: T, TRL's `SFTTrainer` with reasonguard's LoRA and optimisation settings, on the
  prompt/completion texts reasonguard tokenizes (`trl_records`), its gradient accumulation from
  TRL's own packing (`trl_accumulation`);
- `TokenCounter`, `step_clock` and `window`: the tokens and seconds of each optimizer step inside
  any `Trainer`, and their sums over the steps after a warm-up.
"""

from __future__ import annotations

import time
from typing import Any

from benchlib import read_jsonl

A_MICRO_BATCH = 2  # rows per micro-batch of A


# --------------------------------------------------------------------------------------------
# A's and B's steps (plain PyTorch loops)


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


def step_a(
    model,
    rows,
    pad: int,
    device: str | None = None,
    optimizer: Any = None,
    mask_prompt: bool = False,
) -> tuple[int, int]:
    """The padded step: pairs in data order, padded, the full head and Hugging Face's loss over
    every non-pad token (prompt included, or masked with `mask_prompt`), averaged per pair;
    gradients clipped at 1.0, then `optimizer` steps when given. Returns (real, computed)."""
    import torch

    from reasonguard.train.data import collate

    pairs = [rows[i : i + A_MICRO_BATCH] for i in range(0, len(rows), A_MICRO_BATCH)]
    real = computed = 0
    for pair in pairs:
        batch = on_device(collate(pair, pad), device)
        if mask_prompt:
            labels = batch["labels"]
        else:
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
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return real, computed


def step_b(model, rows, budget: int, device: str | None = None) -> tuple[int, int]:
    """A packed step: rows packed best-fit, labelled-only loss, per-token normalisation;
    forward + backward + clipping, no update (the GPU bench's B)."""
    import torch

    from reasonguard.train.data import collate_packed, pack
    from reasonguard.train.labelled_head import cross_entropy_sum, labelled_positions, run_head

    n_labels = sum(r.num_labels for r in rows)
    real = computed = 0
    for group in pack(rows, budget):
        batch = collate_packed(group)
        batch["positions"], batch["mask"], batch["targets"] = labelled_positions(batch["labels"])
        batch = on_device(batch, device)
        head_fn = cross_entropy_sum(batch["mask"], batch["targets"])
        with autocast(device):
            loss = run_head(model, model.get_output_embeddings(), batch, head_fn)
        (loss / n_labels).backward()
        real += sum(len(r) for r in group)
        computed += batch["input_ids"].numel()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    model.zero_grad(set_to_none=True)
    return real, computed


def adamw(model: Any, config: Any) -> Any:
    """torch AdamW over the trainable parameters, as `Trainer` builds it from the config (no
    weight decay on 1-D parameters)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
    )


# --------------------------------------------------------------------------------------------
# Counting and timing inside a Trainer


class TokenCounter:
    """Counts the tokens that enter the model's input embedding (every one is real in a packed,
    padding-free batch)."""

    def __init__(self, model: Any) -> None:
        self.total = 0
        model.get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: tuple) -> None:
        self.total += args[0].numel()


def step_clock(counter: TokenCounter) -> Any:
    """A `TrainerCallback` recording, per optimizer step, its seconds (from the end of the
    previous step, or the start of training) and its tokens."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self._last = 0.0
            self._tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            tokens = counter.total - self._tokens
            self.steps.append({"seconds": now - self._last, "tokens": tokens, "computed": tokens})
            self._last, self._tokens = now, counter.total

    return StepClock()


def window(steps: list[dict[str, float]], skip: int) -> dict[str, float | None]:
    """Tokens, seconds and tokens/s of the steps after the first `skip`."""
    kept = steps[skip:]
    seconds = sum(s["seconds"] for s in kept)
    tokens = sum(s["tokens"] for s in kept)
    return {
        "steps": len(kept),
        "tokens": tokens,
        "computed_tokens": sum(s["computed"] for s in kept),
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
    }


# --------------------------------------------------------------------------------------------
# T: TRL's SFTTrainer


def trl_records(records: list[dict[str, Any]], tokenizer: Any, prompt_format: str) -> list[dict]:
    """The same rows as TRL prompt/completion records, with reasonguard's prompt and completion
    texts (the two strings `encode_records` tokenizes)."""
    from reasonguard.format import INSTRUCTION, build_training_pair

    out = []
    for r in records:
        prompt, completion = build_training_pair(
            r["input"], r["output"], prompt_format, tokenizer, r.get("instruction") or INSTRUCTION
        )
        out.append({"prompt": prompt, "completion": completion})
    return out


def trl_accumulation(records: list[dict], tokenizer: Any, config: Any, steps: int) -> int:
    """T's gradient accumulation (packs per optimizer step): TRL's own packing of the rows'
    token ids, divided by the number of steps (rounded down, so T takes at least `steps`)."""
    from datasets import Dataset, disable_progress_bars
    from trl import pack_dataset

    from reasonguard.train.data import encode

    disable_progress_bars()

    rows = encode(
        [("bench", i, r) for i, r in enumerate(records)],
        tokenizer,
        config.prompt_format,
        config.max_length,
    )
    dataset = Dataset.from_dict({"input_ids": [e.input_ids.tolist() for e in rows]})
    packs = len(pack_dataset(dataset, config.max_length, "bfd"))
    return max(1, packs // steps)


def trl_trainer(spec: dict[str, Any], rows_file: str, accumulation: int, logs: int, out: str):
    """TRL's SFTTrainer on the prompt/completion rows, with R's LoRA and optimisation settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    h = spec["hyper"]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_path"])
    tokenizer.pad_token = spec["pad_token"]
    set_seed(h["seed"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_path"], dtype=torch.float32, attn_implementation="sdpa"
    )
    args = SFTConfig(
        output_dir=out,
        max_length=spec["max_length"],
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        completion_only_loss=True,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=1,
        learning_rate=h["learning_rate"],
        lr_scheduler_type=h["lr_scheduler_type"],
        warmup_steps=h["warmup_steps"],
        weight_decay=h["weight_decay"],
        adam_beta1=h["adam_beta1"],
        adam_beta2=h["adam_beta2"],
        adam_epsilon=h["adam_epsilon"],
        max_grad_norm=h["max_grad_norm"],
        optim=h["optim"],
        seed=h["seed"],
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=logs,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=h["lora_r"],
        lora_alpha=h["lora_alpha"],
        lora_dropout=h["lora_dropout"],
        target_modules=h["lora_target_modules"],
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(read_jsonl(rows_file)),
        processing_class=tokenizer,
        peft_config=lora,
    )
    return trainer, model
