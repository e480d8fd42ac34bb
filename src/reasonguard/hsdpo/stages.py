"""Each heavy stage of `reasonguard hsdpo` in a child process of its own.

Why: a process that has trained keeps the GPU memory torch's caching allocator reserved (and its
CUDA context) until it exits, and a vLLM engine claims a fixed share of the whole GPU when it
starts (`gpu_memory_utilization`), counting memory another engine or a finished training still
holds as taken. Run in one process, an R-SFT run, four generation engines and DPO would starve
each other; a child process hands all of its memory back when it exits.

A stage is the `reasonguard` command a user would type (`train sft|dpo --config STAGE.yaml`,
`generate ...`), printed before it starts and run with this interpreter, in the current
directory, with this process's environment; its output goes straight to the same terminal. The
kernel stops the child when the pipeline dies (Linux), so a killed pipeline leaves no stage
writing behind it and a rerun resumes cleanly.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.launch.command import SHARDINGS
from reasonguard.train.config import save_config


@dataclass(frozen=True)
class TrainLaunch:
    """How each training stage is launched: `reasonguard train`'s own `--num-processes N`,
    `--sharding S` and `--cpu`, passed on to every R-SFT and DPO stage as the user gave them.

    Raises:
        UserError: a sharding without several processes, or fewer than one process.
    """

    num_processes: int | None = None
    sharding: str = "ddp"
    cpu: bool = False

    def __post_init__(self) -> None:
        if self.sharding not in SHARDINGS:
            raise UserError(
                f"--sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}"
            )
        if self.num_processes is not None and self.num_processes < 1:
            raise UserError(f"--num-processes must be at least 1, got {self.num_processes}")
        if self.sharding != "ddp" and not (self.num_processes and self.num_processes > 1):
            raise UserError(f"--sharding {self.sharding} needs --num-processes N (N >= 2)")

    def flags(self) -> list[str]:
        """The `reasonguard train` flags of this launch (none for one process)."""
        flags = []
        if self.num_processes is not None:
            flags += ["--num-processes", str(self.num_processes)]
        if self.sharding != "ddp":
            flags += ["--sharding", self.sharding]
        if self.cpu:
            flags.append("--cpu")
        return flags

    def train_argv(self, stage: str, config_path: str | os.PathLike[str]) -> list[str]:
        """The `reasonguard train STAGE` command (after `reasonguard`) of a training stage."""
        return ["train", stage, "--config", str(config_path), *self.flags()]

    def describe(self) -> str:
        processes = self.num_processes or 1
        where = " CPU" if self.cpu else ""
        return f"{processes}{where} process{'es' if processes > 1 else ''}, {self.sharding}"


class StageFailed(Exception):
    """A stage's child process failed; `exit_code` is what the pipeline exits with."""

    def __init__(self, stage: str, argv: Sequence[str], returncode: int) -> None:
        self.stage = stage
        self.returncode = returncode
        if returncode < 0:  # killed by a signal: exit as a shell reports it, 128 + signal
            self.exit_code = 128 - returncode
            how = f"was killed by {signal.Signals(-returncode).name}"
        else:
            self.exit_code = returncode
            how = f"exited with code {returncode}"
        super().__init__(
            f"stage '{stage}' failed: `{command_line(argv)}` {how} (its output is above). "
            "Rerun the same `reasonguard hsdpo` command once it is fixed: the finished stages "
            "are skipped"
        )


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["reasonguard", *argv])


def save_stage_config(config: Any, path: str | os.PathLike[str], stage: str) -> Path:
    """Write a training config as the YAML file `reasonguard train STAGE --config` reads."""
    return save_config(config, path, header=f"# reasonguard train {stage} --config {path}")


def run_stage(stage: str, argv: Sequence[str]) -> None:
    """Run `reasonguard ARGV` for `stage` in a child process and wait for it.

    Raises:
        StageFailed: the child exited with a non-zero code or was killed.
        KeyboardInterrupt: Ctrl-C, once the child has stopped.
    """
    print(f"  $ {command_line(argv)}", file=sys.stderr)
    sys.stdout.flush()  # our lines before the child's, in a log file too
    sys.stderr.flush()
    child = subprocess.Popen(
        [sys.executable, "-m", "reasonguard", *argv], preexec_fn=_die_with_pipeline()
    )
    try:
        returncode = child.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the child too (same terminal): let it record why it stopped (a
        # training run writes its status), unless a second Ctrl-C asks to stop at once.
        try:
            child.wait()
        except KeyboardInterrupt:
            child.kill()
            child.wait()
        raise
    if returncode != 0:
        raise StageFailed(stage, argv, returncode)


_PR_SET_PDEATHSIG = 1


def _die_with_pipeline() -> Callable[[], None] | None:
    """Linux: a `preexec_fn` that has the kernel SIGTERM the child when this process dies (an
    OOM kill, `kill -9`), so no orphaned stage keeps writing a folder a rerun resumes (the
    setting survives the exec). Elsewhere None: an orphan runs to its end."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: no dlopen after fork
    except (OSError, AttributeError):
        return None
    pipeline = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm)
        if os.getppid() != pipeline:  # the pipeline died before the request took effect
            os.kill(os.getpid(), sigterm)

    return preexec
