"""`train sft --dry-run`: the data plan of a config, without loading model weights or writing.

It loads and validates the data and the tokenizer when it can reach them, and says plainly what it
estimated when it cannot: a hub dataset with no hub access is counted from its published sizes
(from the dataset card), a hub tokenizer that is not in the local cache leaves `max_length: auto`
undecided. The hub is probed with one short TCP connect first, so an offline machine answers in
a second instead of after the hub client's retries (~25 s per file).

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.plan.dryrun import format_plan, plan_sft
    >>> print(format_plan(plan_sft(load_config("configs/demo-cpu.yaml"))))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from reasonguard.data.sources import (
    PUBLISHED_P95_TOKENS,
    PUBLISHED_ROWS,
    SAMPLES,
    is_hub_dataset_id,
)
from reasonguard.errors import UserError
from reasonguard.hub import check_name, hub_reachable, looks_like_hub_id
from reasonguard.models import ALIASES
from reasonguard.train import checkpoint as ckpt
from reasonguard.train.data import (
    load_records,
    prepare,
    split_train_eval,
    steps_per_epoch,
    total_steps,
)
from reasonguard.train.dpo.pairs import check_sources
from reasonguard.train.modeling import environment_problems, load_training_tokenizer, warmup_steps


def _is_local(name: str) -> bool:
    return name in ALIASES or name == "samples" or Path(name).expanduser().exists()


def _check_local_model(config: Any) -> None:
    """A model or tokenizer named by a path that does not exist fails as training would ("no
    such folder"), before a hub cache lookup that would choke on a path."""
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        name = getattr(config, key, None)
        if name and not _is_local(name) and not looks_like_hub_id(name):
            try:
                check_name(name, kind="model", aliases=ALIASES)
            except UserError as exc:
                raise UserError(f"config key {key!r}: {exc}") from None


def _tokenizer(config: Any, online: bool) -> tuple[Any | None, str]:
    """The run's tokenizer if it can be had without a download the machine cannot make."""
    name = config.tokenizer_name_or_path or config.model_name_or_path
    if _is_local(name) or online:
        return load_training_tokenizer(config), name
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "tokenizer_config.json")
    if isinstance(cached, str):
        local = dataclasses.replace(config, tokenizer_name_or_path=str(Path(cached).parent))
        return load_training_tokenizer(local), f"{name} (local hub cache)"
    return None, f"{name} (not reachable: no hub access and not in the local cache)"


def plan_sft(
    config: Any,
    prepare_fn: Any = prepare,
    records_fn: Any = load_records,
    world_size: int = 1,
    stage: str = "sft",
) -> dict[str, Any]:
    """The data plan of a config: rows, split, max length, batch and step counts, run-dir action.

    Args:
        config: the run config.
        prepare_fn, records_fn: how the stage loads its rows (`train.data.prepare` /
            `load_records` for SFT; `train.dpo.pairs.prepare_pairs` / `load_pairs` for DPO).
        world_size: the number of training processes to plan for.
        stage: `sft` or `dpo` (DPO packs pairs and does not use the fused liger loss).

    Returns:
        A JSON-ready dict; `estimated` is True when rows come from published sizes.

    Raises:
        UserError: unreadable local data, invalid rows (without `skip_invalid`), or a tokenizer
            without the chat template the prompt format needs.
    """
    c = config
    if stage == "dpo":
        check_sources(c)  # a missing R-SFT model or pair file, with the command that makes it
    _check_local_model(c)
    if not _is_local(c.dataset) and not is_hub_dataset_id(c.dataset):
        # A file that is not there: "no such file", not the hub's reachability.
        check_name(c.dataset, kind="dataset", aliases=(SAMPLES,), hub_id=False)
    data = None
    online = None  # probed lazily: a fully local config never touches the network
    plan: dict[str, Any] = {"config": c.to_dict(), "problems": environment_problems(c), "notes": []}
    if not _is_local(c.dataset):
        online = hub_reachable()
    if online is False and c.dataset in PUBLISHED_ROWS:
        rows = {k: v for k, v in PUBLISHED_ROWS[c.dataset].items() if not c.splits or k in c.splits}
        if c.splits and set(c.splits) - set(rows):
            raise UserError(
                f"config key 'splits': unknown split(s) {sorted(set(c.splits) - set(rows))} of "
                f"{c.dataset}; available: {', '.join(PUBLISHED_ROWS[c.dataset])}"
            )
        if c.max_samples is not None:
            rows = {k: min(v, c.max_samples) for k, v in rows.items()}
        plan["notes"].append(f"no hub access: rows of {c.dataset} are its published sizes")
        plan.update(rows=rows, estimated=True)
        n = sum(rows.values())
        n_eval = 0 if c.eval_split_ratio == 0 else min(n - 1, max(1, round(n * c.eval_split_ratio)))
        train_rows, eval_rows = n - n_eval, n_eval
        tokenizer, tokenizer_note = None, "not loaded (rows estimated)"
    elif online is False:
        raise UserError(
            f"cannot plan: {c.dataset!r} is not a local file or folder and the hub is not reachable"
        )
    else:
        if online is None and not _is_local(c.tokenizer_name_or_path or c.model_name_or_path):
            online = hub_reachable()
        tokenizer, tokenizer_note = _tokenizer(c, bool(online))
        if tokenizer is not None:
            data = prepare_fn(c, tokenizer)
            plan.update(
                rows=data.stats["validation"]["used_rows"], estimated=False, data=data.stats
            )
            train_rows, eval_rows = data.stats["train_rows"], data.stats["eval_rows"]
        else:
            triples, validation = records_fn(c)
            train, held = split_train_eval(triples, c.eval_split_ratio, c.eval_split_seed)
            plan.update(
                rows=validation["used_rows"], estimated=False, data={"validation": validation}
            )
            train_rows, eval_rows = len(train), len(held)
    plan["tokenizer"] = tokenizer_note
    plan.update(train_rows=train_rows, eval_rows=eval_rows)
    plan["max_length"], plan["max_length_source"] = _max_length(c, plan)
    per_step = c.rows_per_step(world_size)
    plan.update(
        processes=world_size,
        micro_batch_size=c.per_device_train_batch_size,
        gradient_accumulation_steps=c.accumulation_for(world_size),
        samples_per_step=per_step,
        steps_per_epoch=steps_per_epoch(train_rows, per_step),
        total_steps=total_steps(train_rows, per_step, c.num_train_epochs, c.max_steps),
    )
    plan["warmup_steps"] = warmup_steps(c, plan["total_steps"])
    plan["run_dir"] = _run_dir_action(c)
    # Decided from the config and this machine, before any weights load: shown even when the
    # machine cannot run the config (its problems are listed beside them).
    plan["decisions"] = _decisions(c, data, plan["max_length"], stage)
    labels = plan.get("data", {}).get("validation", {}).get("labels_without_response")
    if stage == "sft" and labels:  # what the run does with rows that label a missing response
        from reasonguard.plan.decisions import labels_without_response_decision

        decided = labels_without_response_decision(labels["setting"], labels["rows"])
        plan["decisions"]["labels_without_response"] = decided.to_dict()
    return plan


def _decisions(c: Any, data: Any, max_length: int | None, stage: str) -> dict[str, Any]:
    """The run's decisions on this machine (`plan.decisions`), as far as they can be made
    without weights: the memory estimate needs the tokenized rows (on CUDA only)."""
    from reasonguard.plan.decisions import resolve
    from reasonguard.train.modeling import use_bf16

    lengths = labels = None
    if data is not None:
        lengths = [len(r) for r in data.train]
        labels = [r.num_labels for r in data.train]
    budget = (c.pack_tokens or data.max_length) if data is not None else None
    if budget is not None and stage == "dpo":
        budget *= 2  # a pair is two sequences
    decided = resolve(c, use_bf16(c), lengths, labels, budget, stage_supports_liger=True)
    return {name: d.to_dict() for name, d in decided.items()}


def _max_length(c: Any, plan: dict[str, Any]) -> tuple[int | None, str]:
    data = plan.get("data") or {}
    if "max_length" in data:
        return data["max_length"], data["max_length_source"]
    if c.max_length != "auto":
        return c.max_length, "given"
    if c.dataset in PUBLISHED_P95_TOKENS:
        from reasonguard.data.stats import auto_max_length

        p95 = PUBLISHED_P95_TOKENS[c.dataset]
        return auto_max_length(
            p95
        ), f"auto, estimated: published p95 ~{p95} tokens (Llama 3 tokenizer)"
    return None, "auto: decided when the tokenizer loads"


def _run_dir_action(c: Any) -> str:
    from reasonguard.train.sft import FINAL_DIR, INFO_FILE

    run_dir = Path(c.output_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if c.resume == "never":
        if latest or (run_dir / FINAL_DIR).exists():
            return f"{run_dir}: refuses to start (it holds a run and resume is 'never')"
        return f"{run_dir}: new run"
    if c.resume != "auto":
        return f"{run_dir}: continues from {c.resume}"
    if (run_dir / FINAL_DIR).is_dir() and (run_dir / INFO_FILE).is_file():
        return f"{run_dir}: holds a finished run (nothing to do if the config is the same)"
    if latest:
        return f"{run_dir}: resumes from {latest.name}"
    return f"{run_dir}: new run"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines `--dry-run` prints."""
    c = plan["config"]
    rows = ", ".join(f"{k} {v:,}" for k, v in plan["rows"].items())
    invalid = (plan.get("data") or {}).get("validation", {}).get("num_invalid")
    method = c["finetuning"]
    if method != "full":
        method += (
            f" (r={c['lora_r']}, alpha={c['lora_alpha']}, dropout={c['lora_dropout']}, "
            f"on {','.join(c['lora_target_modules'])})"
        )
    eval_when = {
        "steps": f"eval loss every {c['eval_steps']} steps and at the end",
        "epoch": "eval loss at each epoch end",
        "no": "no eval",
    }[c["eval_strategy"]]
    save_when = {
        "steps": f"every {c['save_steps']} steps",
        "epoch": "at each epoch end",
        "both": f"every {c['save_steps']} steps and at each epoch end",
        "no": "never",
    }[c["save_strategy"]]
    keep = c["save_total_limit"]
    n_epochs = c["num_train_epochs"]
    epochs = f"{n_epochs} epoch" + "s" * (n_epochs != 1)
    if c["max_steps"] > 0:
        epochs = f"max_steps {c['max_steps']}"
    lines = [
        "dry run: nothing loaded beyond data and tokenizer, nothing written",
        f"model          {c['model_name_or_path']}  [{method}]",
        f"prompt format  {c['prompt_format']}   tokenizer: {plan['tokenizer']}",
        f"data           {c['dataset']}: {rows}"
        + (" (ESTIMATED)" if plan["estimated"] else "")
        + (f"; {invalid} invalid rows skipped" if invalid else ""),
        f"split          {plan['train_rows']:,} train / {plan['eval_rows']:,} eval rows "
        f"(eval_split_ratio {c['eval_split_ratio']}, seed {c['eval_split_seed']})",
        f"max length     {plan['max_length'] if plan['max_length'] else '?'} ({plan['max_length_source']})",
        f"batch          {plan['micro_batch_size']} rows x {plan['gradient_accumulation_steps']} "
        f"accumulation"
        + (f" x {plan['processes']} processes" if plan.get("processes", 1) > 1 else "")
        + f" = {plan['samples_per_step']} rows per optimizer step"
        + (
            f"; packed into {c['pack_tokens'] or plan['max_length'] or 'max_length'}-token "
            "micro-batches"
            if c.get("packing")
            else "; padded micro-batches (no packing)"
        ),
        f"steps          {plan['steps_per_epoch']:,} per epoch, {plan['total_steps']:,} in all "
        f"({epochs}); warmup {plan['warmup_steps']}, {c['lr_scheduler_type']} lr {c['learning_rate']}",
        f"eval / save    {eval_when}; checkpoints {save_when}" + (f", keep {keep}" if keep else ""),
        f"run dir        {plan['run_dir']}",
    ]
    for name, d in (plan.get("decisions") or {}).items():
        if name == "cpu_allocator":  # a process set-up, not a training choice: not shown
            continue
        value = ("on" if d["value"] else "off") if isinstance(d["value"], bool) else d["value"]
        lines.append(f"decision       {name}: {value}; {d['reason']}")
    for note in plan["notes"]:
        lines.append(f"note           {note}")
    for problem in plan["problems"]:
        lines.append(f"this machine   cannot run it: {problem}")
    return "\n".join(lines)
