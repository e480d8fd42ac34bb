"""`reasonguard generate`: resumable generation over benchmarks or training data.

Example:
    reasonguard generate --model runs/sft/final --benchmarks all \\
        --benchmark-dir data/benchmarks --out runs/preds --batch-size 16
    reasonguard generate --model runs/sft/final --data yueliu1999/GuardReasonerTrain \\
        --samples 4 --temperature 0.7 --top-p 0.95 --out runs/samples --backend vllm \\
        --data-parallel 4
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (rejected while parsing, before any model
    loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def memory_fraction(text: str) -> float:
    """An argparse type: a fraction in (0, 1] (rejected while parsing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {value:g}")
    return value


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Options that load a model (shared with `classify`, `serve` and `evaluate --model`)."""
    p.add_argument(
        "--model", required=required, help="model folder, hub id or alias (smollm2, tiny-llama)"
    )
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="default hf")
    p.add_argument(
        "--prompt-format",
        choices=("raw", "chat", "chat-user"),
        help="for models without a reasonguard.json record (hub ids); default raw, the official "
        "inference. A trained model's recorded format is always used.",
    )
    p.add_argument(
        "--batch-size", type=positive_int, help="prompts per batch (hf default 8, vllm 256)"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=2048, help="default 2048")
    p.add_argument("--device", help="hf: cpu, cuda, cuda:1 (default cuda when available)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="hf: CPU threads for torch (default: torch's choice, one per core; fewer can be "
        "much faster on a machine shared with other jobs)",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model")
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="weights and compute dtype (default: float32 on a CPU; on a GPU bfloat16 for hf, "
        "the checkpoint's for vllm)",
    )
    p.add_argument(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hf: run the base on 4-bit NF4 weights (bitsandbytes). Default: as trained, so a "
        "QLoRA adapter runs on the NF4 base it was trained on; --no-load-in-4bit merges it "
        "into a full-precision base instead",
    )
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        metavar="GIB",
        help="vllm: KV-cache size (default on a CPU 2 GiB; on a GPU what "
        "--gpu-memory-utilization leaves, and a given size replaces that setting)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=memory_fraction,
        metavar="F",
        help="vllm on a GPU: the fraction of the GPU's memory the engine takes for weights, "
        "activations and KV cache (default 0.9; lower it when something else shares the GPU)",
    )
    p.add_argument(
        "--max-model-len",
        type=positive_int,
        metavar="TOKENS",
        help="vllm: the engine's context, prompt plus new tokens (default: the max_length the "
        "model was trained with, or 2048 for a model without a reasonguard.json, plus "
        "--max-new-tokens; at most the model's own). A longer prompt is refused with the "
        "length that fits it",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run model code from the hub (off by default)",
    )


def add_mode_argument(p: argparse.ArgumentParser) -> None:
    """`--mode`: reasoning, fast, cascade or classifier, and `--classifier` (shared by
    `classify`, `generate`, `evaluate`); None when not given (`resolve_mode`: the model's
    default)."""
    p.add_argument(
        "--mode",
        choices=("reasoning", "fast", "cascade", "classifier"),
        default=None,
        help="reasoning (default): the guard reasons, then answers; fast: no reasoning, the "
        "labels read from the answer block's probabilities (a few forward passes); "
        "cascade: fast, then reasoning for the items inside the uncertainty bands that "
        "`reasonguard calibrate` saved with the model (with --classifier, the default: the "
        "classifier first); classifier (the default and only mode of a folder from "
        "`reasonguard train classifier`): one encoder pass per item",
    )
    add_classifier_argument(p)


def add_classifier_argument(p: argparse.ArgumentParser) -> None:
    """`--classifier DIR`: an encoder classifier in front of the guard (the first tier)."""
    p.add_argument(
        "--classifier",
        metavar="DIR",
        help="a classifier folder from `reasonguard train classifier`, put in front of the "
        "guard: a three-tier cascade (the classifier, then fast mode, then reasoning, each "
        "answering outside its uncertainty bands, which `reasonguard calibrate --classifier` "
        "saves with the model); each verdict names the tier that answered it",
    )


def resolve_mode(args: argparse.Namespace) -> str:
    """`--mode`, or the model's default when it is not given: `classifier` for a classifier
    folder, else `reasoning`. Sets `args.mode`."""
    if args.mode is None and getattr(args, "classifier", None):
        args.mode = "cascade"  # a classifier in front: the three-tier cascade
    if args.mode is None:
        from reasonguard.classifier.kinds import is_classifier
        from reasonguard.models import resolve_model

        model = getattr(args, "model", None)
        args.mode = "classifier" if model and is_classifier(resolve_model(model)) else "reasoning"
    return args.mode


def classifier_tier(args: argparse.Namespace) -> dict | None:
    """The calibrated bands of `--classifier` (the first tier) as a dict, checked before
    anything loads; None without --classifier.

    Raises: UserError (see `infer.classifier.check_classifier_tier`).
    """
    if not getattr(args, "classifier", None):
        return None
    from reasonguard.errors import UserError
    from reasonguard.infer.classifier import check_classifier_tier
    from reasonguard.models import resolve_model

    mode = resolve_mode(args)
    if mode != "cascade":
        raise UserError(
            f"--classifier is the first tier of --mode cascade, not of --mode {mode} (the "
            "classifier alone: --model CLASSIFIER)"
        )
    path = resolve_model(args.model)
    bands = check_classifier_tier(args.model, path, args.classifier, mode)
    _warn_other_classifier(path, args.classifier)
    return bands.to_dict()


def _warn_other_classifier(model_path: str, classifier: str) -> None:
    """Warn (stderr) when the classifier bands were fitted to another classifier folder."""
    import sys
    from pathlib import Path

    from reasonguard.cascade.bands import CASCADE_FILE, read_calibration

    named = (read_calibration(model_path) or {}).get("classifier")
    if isinstance(named, str) and Path(named).resolve() != Path(classifier).resolve():
        print(
            f"warning: the classifier bands in {Path(model_path) / CASCADE_FILE} were calibrated "
            f"with {named}, not {classifier}; rerun `reasonguard calibrate --classifier "
            f"{classifier}` if it is another classifier",
            file=sys.stderr,
        )


def cascade_bands(model: str, mode: str) -> dict | None:
    """The calibrated bands of `model` as a dict, for `--mode cascade` (None otherwise).

    Raises:
        UserError: a cascade asked of a model without `cascade.json`.
    """
    if mode != "cascade":
        return None
    from pathlib import Path

    from reasonguard.cascade.bands import CASCADE_FILE, read_bands
    from reasonguard.errors import UserError
    from reasonguard.models import resolve_model

    path = resolve_model(model)
    bands = read_bands(path) if Path(path).is_dir() else None
    if bands is None:
        raise UserError(
            f"{model}: no {CASCADE_FILE}; run `reasonguard calibrate --model {model} --data DEV` "
            "first (it picks and saves the uncertainty bands)"
        )
    return bands.to_dict()


def warn_calibration_overlap(model: str, jobs: list, limit: int | None) -> None:
    """Warn (stderr) when a cascade scores items its bands were calibrated on: their F1 is
    in-sample, so optimistic. Named per benchmark, with how many."""
    import sys
    from pathlib import Path

    from reasonguard.cascade.bands import CASCADE_FILE, read_calibration
    from reasonguard.cascade.holdout import calibrated_on
    from reasonguard.models import resolve_model

    path = resolve_model(model)
    record = read_calibration(path) if Path(path).is_dir() else None
    if record is None:
        return
    where = Path(path) / CASCADE_FILE
    found, total = [], 0
    for job in jobs:
        records = job.records if limit is None else job.records[: max(limit, 0)]
        total += len(records)
        count = calibrated_on(record, [r["input"] for r in records])
        if count is None:
            print(
                f"note: {where} does not list the items it was calibrated on; rerun "
                "`reasonguard calibrate` to have scored items checked against them",
                file=sys.stderr,
            )
            return
        if count:
            found.append((job.name, count))
    if found:
        overlap = sum(count for _, count in found)
        named = ", ".join(f"{name} {count}" for name, count in found)
        print(
            f"warning: {overlap} of the {total} items scored ({named}) are items the cascade "
            f"bands in {where} were calibrated on; their cascade F1 is in-sample (optimistic). "
            "Calibrate on dev data you do not score.",
            file=sys.stderr,
        )


def backend_options(args: argparse.Namespace) -> dict:
    """The `load_backend` keyword options of the parsed model arguments."""
    from reasonguard.errors import UserError

    options = {"batch_size": args.batch_size, "trust_remote_code": args.trust_remote_code}
    if getattr(args, "dtype", None) is not None:
        options["dtype"] = args.dtype
    if args.backend == "hf":
        options.update(device=args.device, threads=args.threads)
        if getattr(args, "load_in_4bit", None) is not None:
            options["load_in_4bit"] = args.load_in_4bit
        for flag, value in (
            ("--kv-cache-gib", getattr(args, "kv_cache_gib", None)),
            ("--gpu-memory-utilization", getattr(args, "gpu_memory_utilization", None)),
            ("--max-model-len", getattr(args, "max_model_len", None)),
        ):
            if value is not None:
                raise UserError(f"{flag} goes with --backend vllm")
    else:
        for flag, value in (
            ("--threads", args.threads),
            ("--device", args.device),
            ("--load-in-4bit", getattr(args, "load_in_4bit", None)),
        ):
            if value is not None:
                raise UserError(f"{flag} goes with --backend hf (vLLM places the model itself)")
        options["tensor_parallel_size"] = args.tensor_parallel_size
        for key in ("kv_cache_gib", "gpu_memory_utilization", "max_model_len"):
            if getattr(args, key, None) is not None:
                options[key] = getattr(args, key)
    return options


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Decoding and input options of resumable generation (shared with `evaluate --model`)."""
    p.add_argument("--samples", type=int, default=1, help="outputs per input (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N inputs of each file")
    add_mode_argument(p)
    p.add_argument(
        "--scores",
        action="store_true",
        help="benchmarks: also store each answer's label probabilities (hf: an extra forward "
        "pass per row; vllm: read from the generation's log-probs); `evaluate` then adds AUPRC "
        "and a threshold sweep",
    )
    p.add_argument(
        "--data-parallel",
        type=int,
        metavar="N",
        help="split the inputs across N worker processes, each with its own model (on CUDA one "
        "GPU each, on CPU cores/N threads each), merged in input order; the same outputs as one "
        "process, resumable per shard (default 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def benchmark_names(values: list[str]) -> list[str]:
    """`--benchmarks` values, space or comma separated."""
    return [n for value in values for n in value.split(",") if n]


def run_generation(args: argparse.Namespace, jobs: list, out: str) -> dict[str, int]:
    """Run `jobs` into `out` with the parsed model and generation options (resumable)."""
    from reasonguard.generation.run import Decoding, run_jobs

    resolve_mode(args)
    classifier_bands = classifier_tier(args)
    if args.mode == "cascade":
        warn_calibration_overlap(args.model, jobs, args.limit)
    decoding = Decoding(
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        mode=args.mode,
        bands=cascade_bands(args.model, args.mode),
        classifier=args.classifier,
        classifier_bands=classifier_bands,
    )
    return run_jobs(
        args.model,
        jobs,
        out,
        decoding,
        backend=args.backend,
        prompt_format=args.prompt_format,
        limit=args.limit,
        progress=not args.no_progress,
        scores=args.scores,
        data_parallel=1 if args.data_parallel is None else args.data_parallel,
        **backend_options(args),
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate guard outputs for benchmarks or training data (resumable)",
        description="Generate with a guard model. Benchmarks go to OUT/<Benchmark>/"
        "generated_predictions.jsonl, training data to OUT/<split>.jsonl. Rerun the same "
        "command after an interruption to continue where it stopped.",
    )
    add_model_arguments(p)
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--benchmarks",
        nargs="+",
        metavar="NAME",
        help="'all' or benchmark names (space or comma separated), e.g. AegisSafetyTest",
    )
    inputs.add_argument(
        "--data", metavar="SOURCE", help="training data: hub id, folder, file or 'samples'"
    )
    p.add_argument("--benchmark-dir", metavar="D", help="default: $REASONGUARD_BENCHMARKS")
    p.add_argument("--splits", nargs="+", metavar="SPLIT", help="with --data: only these splits")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_generation_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reasonguard.errors import UserError
    from reasonguard.generation.run import benchmark_jobs, data_jobs

    if args.benchmarks:
        from reasonguard.evaluate.registry import resolve_benchmark_dir

        if args.splits:
            raise UserError("--splits goes with --data, not --benchmarks")
        folder = resolve_benchmark_dir(args.benchmark_dir)
        if folder is None:
            raise UserError("--benchmarks needs --benchmark-dir D (or $REASONGUARD_BENCHMARKS)")
        jobs = benchmark_jobs(benchmark_names(args.benchmarks), folder)
    else:
        if args.scores:
            raise UserError("--scores goes with --benchmarks (scores are read by `evaluate`)")
        jobs = data_jobs(args.data, args.splits)
    run_generation(args, jobs, args.out)
    return 0
