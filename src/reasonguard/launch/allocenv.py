"""glibc allocator settings for CPU training, applied by re-executing the CLI once.

On CPU, PyTorch's large short-lived activation buffers go through glibc `mmap`/`munmap` by
default: every step then pays a storm of page faults (measured here at ~2x on the LM head, up to
10x for a tiny model). Raising the mmap and trim thresholds keeps that memory in the heap. glibc
reads these variables once, when the process starts, so they cannot be set from Python: `reasonguard
train` re-executes itself once with them set (the same values as the Makefile's `CPU_ENV`).

Skipped when CUDA is available (GPU memory does not go through glibc), when any of the variables
is already set (the user's choice wins), and when `REASONGUARD_NO_MALLOC_ENV=1`. The decision is
recorded in `training_info.json` (`model.cpu_allocator`) of a training run.

Example:
    >>> from reasonguard.launch.allocenv import decision
    >>> decision({"REASONGUARD_NO_MALLOC_ENV": "1"})["action"]
    'disabled by REASONGUARD_NO_MALLOC_ENV=1'
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "10000000000",
    "MALLOC_TRIM_THRESHOLD_": "10000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}
GUARD = "REASONGUARD_MALLOC_REEXEC"  # set in the re-executed process: never loop
OPT_OUT = "REASONGUARD_NO_MALLOC_ENV"


def decision(env: Mapping[str, str] | None = None, cuda: bool | None = None) -> dict[str, Any]:
    """What the allocator set-up is (or would be) for this process: `action`, `re_exec`, values."""
    env = os.environ if env is None else env
    values = {k: env.get(k) for k in MALLOC_ENV}
    if env.get(GUARD) == "1":
        action, re_exec = "re-executed with the glibc allocator settings", False
    elif env.get(OPT_OUT) == "1":
        action, re_exec = f"disabled by {OPT_OUT}=1", False
    elif any(v is not None for v in values.values()):
        action, re_exec = "already set in the environment (kept as given)", False
    else:
        if cuda is None:
            from reasonguard.train.modeling import cuda_available

            cuda = cuda_available()
        if cuda:
            action, re_exec = "not needed (CUDA)", False
        else:
            action, re_exec = "re-execute with the glibc allocator settings", True
    return {"action": action, "re_exec": re_exec, "env": values}


def reexec_if_needed(argv: Sequence[str]) -> None:
    """Re-execute `python -m reasonguard ARGV` with the allocator settings when `decision` says
    so (never returns then); otherwise return and let the caller go on."""
    if not decision()["re_exec"]:
        return
    env = {**os.environ, **MALLOC_ENV, GUARD: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(sys.executable, [sys.executable, "-m", "reasonguard", *argv], env)
