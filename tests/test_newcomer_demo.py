"""The demo as a new user meets it: started the way `make demo` starts it (the venv's script,
never activated), its printed commands pasted into a fresh shell from the repository root, and
what the terminal shows while it trains (step k/N, elapsed, ETA; never a raw log dict).

The tiny random model stands in for SmolLM2 (the commands and the output are the same).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.prefix) / "bin" / "reasonguard"
TINY_RUN = ["model_name_or_path=tiny-llama", "eval_strategy=no", "save_strategy=no"]
PROGRESS_LINE = re.compile(
    r"^step (\d+)/(\d+) \(\d+%\) \| elapsed \d\d:\d\d \| ETA \S+ \| loss \S+$"
)


def fresh_shell_env() -> dict[str, str]:
    """A new login's environment: no venv on PATH. PYTHONPATH and the model cache are kept
    (they point a developer's checkout at its own code and cached conversions)."""
    keep = ("HOME", "PYTHONPATH", "REASONGUARD_CACHE", "TMPDIR", "LANG")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    return {**env, "PATH": "/usr/local/bin:/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}


def as_make_demo_runs_it() -> str:
    """`make demo` runs `.venv/bin/reasonguard` from the repository root."""
    try:
        return str(SCRIPT.relative_to(REPO))
    except ValueError:  # a checkout that uses a venv made elsewhere
        return str(SCRIPT)


@pytest.mark.slow  # the demo, then its commands, each a child process
def test_the_demos_printed_commands_run_as_printed_in_a_fresh_shell(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(
        [as_make_demo_runs_it(), "demo", "--out", out, "--max-new-tokens", "8"]
        + [*TINY_RUN, "max_steps=2"],
        cwd=REPO,
        env=fresh_shell_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = lines.index("Try it (from this folder, in any shell):")
    tried = [line.strip() for line in lines[start + 1 :] if line.startswith("  ")]
    planned = [line.strip().split("   #")[0] for line in lines if " plan --config " in line]
    assert len(tried) == 2 and len(planned) == 1
    assert not tried[0].startswith("reasonguard ")  # not on a fresh shell's PATH

    for line in [*tried, *planned]:
        ran = subprocess.run(
            ["bash", "-c", line],
            cwd=REPO,
            env=fresh_shell_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert ran.returncode == 0, f"{line}\n{ran.stderr}"
        assert "command not found" not in ran.stderr
        if " classify " in line:
            verdict = json.loads(ran.stdout)
            assert verdict["mode"] == ("fast" if "--mode fast" in line else "reasoning")
        else:
            assert "about 30 hours" in ran.stdout

    # While it trained: one plain progress line per logged step (no terminal here), no dicts.
    progress = [m for m in map(PROGRESS_LINE.match, done.stderr.splitlines()) if m]
    assert [(m[1], m[2]) for m in progress] == [("1", "2"), ("2", "2")], done.stderr
    assert "{'loss'" not in done.stdout + done.stderr
    assert "{'train_runtime'" not in done.stdout + done.stderr


@pytest.mark.slow  # a training run in a child process
def test_training_on_a_terminal_shows_the_trainers_progress_bar(tmp_path: Path) -> None:
    """On a terminal (a pseudo-terminal here, 120 columns): tqdm's bar from Trainer's own
    progress callback, `k/N [elapsed<ETA, ...]` with the loss, and no printed log dicts."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [str(SCRIPT), "train", "sft", "--config", "configs/demo-cpu.yaml", *TINY_RUN]
        + ["max_steps=3", f"output_dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=fresh_shell_env(),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:  # read as it runs: a full pseudo-terminal buffer would stall the process
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the process closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    os.close(leader)
    assert process.wait(timeout=600) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert re.search(r"\| 3/3 \[\d\d:\d\d<\d\d:\d\d, [^\]]*loss=", screen), screen[-2000:]
    assert "{'loss'" not in screen and "{'train_runtime'" not in screen
    assert not any(PROGRESS_LINE.match(line.strip()) for line in screen.splitlines())
