"""Ctrl-C and resume, as a user lives them: the real CLI trains the tiny Llama in a subprocess,
gets SIGINT after its checkpoint at step 8 (of 16), and the same command finishes the run.

One interrupted-and-resumed run is shared by every test (a module fixture): the message Ctrl-C
prints, what `runs status` says of the stopped run, and the totals after the resume (training
seconds of both sessions, a train loss averaged over logs of both).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_train_support import cli_env, tiny_config, write_yaml_config

pytestmark = pytest.mark.slow

CHECKPOINT_STEP, TOTAL_STEPS = 8, 16


@dataclass
class Interrupted:
    run_dir: Path
    config: Path
    stderr: str  # of the interrupted session
    returncode: int
    stopped: Path  # a copy of the run's status.json as the interrupted session left it
    info: dict  # training_info.json as the interrupted session left it
    resumed_stdout: str


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    tmp = tmp_path_factory.mktemp("interrupt")
    # 16 train rows, 4 per step, 4 epochs: 16 steps; one checkpoint at step 8; a log every step.
    config = tiny_config(
        tmp,
        rows=20,
        num_train_epochs=4,
        save_steps=CHECKPOINT_STEP,
        eval_steps=4,
        logging_steps=1,
    )
    path = write_yaml_config(tmp / "run.yaml", config)
    run_dir = Path(config.output_dir)
    command = [sys.executable, "-m", "reasonguard", "train", "sft", "--config", str(path)]
    proc = subprocess.Popen(
        command,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # A suite started in the background (`make test &`) passes SIGINT on as ignored, and a
        # Python started so never raises KeyboardInterrupt: the run gets a terminal's Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        checkpoint = run_dir / f"checkpoint-{CHECKPOINT_STEP}" / "trainer_state.json"
        # Past the checkpoint, so the session also trains time the checkpoint does not hold.
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not pass its checkpoint"
            status = run_dir / "status.json"
            if checkpoint.is_file() and status.is_file():
                step = _read(status).get("step") or 0
                if step > CHECKPOINT_STEP:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # Ctrl-C, to this process only (its pid)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stopped = tmp / "stopped"
    stopped.mkdir()
    shutil.copy(run_dir / "status.json", stopped / "status.json")
    info = _read(run_dir / "training_info.json")
    resumed = subprocess.run(
        command, env=cli_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return Interrupted(run_dir, path, stderr, proc.returncode, stopped, info, resumed.stdout)


def test_ctrl_c_says_the_same_command_resumes(interrupted: Interrupted) -> None:
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    last = interrupted.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: stopped at step ")
    assert last.endswith(
        f"/{TOTAL_STEPS}; run the same command again (or `reasonguard train sft --config "
        f"{interrupted.run_dir.resolve() / 'config.yaml'}`) to resume from "
        f"checkpoint-{CHECKPOINT_STEP}"
    )
    assert "Traceback" not in interrupted.stderr
    assert f"resuming from {interrupted.run_dir / f'checkpoint-{CHECKPOINT_STEP}'}" in (
        interrupted.resumed_stdout
    )


def test_status_of_the_stopped_run_shows_no_eta_but_how_to_resume(
    interrupted: Interrupted, cli
) -> None:
    status = _read(interrupted.stopped / "status.json")
    assert status["state"] == "interrupted" and status["eta_seconds"] is None
    assert status["elapsed_seconds"] > 0
    code, out, _ = cli("runs", "status", interrupted.stopped)
    assert code == 0
    assert "state        interrupted: stopped by the user (Ctrl-C)" in out
    assert "ETA" not in out
    elapsed = next(line for line in out.splitlines() if line.startswith("elapsed"))
    assert "?" not in elapsed and elapsed.endswith("stopped")
    assert f"to resume from checkpoint-{CHECKPOINT_STEP}" in out
    assert "resume       stopped at step" in out


def test_totals_after_the_resume_cover_both_sessions(interrupted: Interrupted, cli) -> None:
    info = _read(interrupted.run_dir / "training_info.json")
    assert info["outcome"] == "finished" and info["steps_completed"] == TOTAL_STEPS
    first = interrupted.info["timings"]["train_seconds_all_sessions"]
    assert interrupted.info["outcome"] == "interrupted" and first > 0
    # The interrupted session trained past its checkpoint: every second of it counts.
    total, this_session = (
        info["timings"]["train_seconds_all_sessions"],
        info["timings"]["train_seconds"],
    )
    assert total >= first + this_session - 0.02  # both rounded to 0.01 s
    # The checkpoint carries the time up to its own step.
    checkpoint = _read(interrupted.run_dir / f"checkpoint-{CHECKPOINT_STEP}/trainer_state.json")
    saved = checkpoint["stateful_callbacks"]["RunMonitor"]
    saved = saved[-1] if isinstance(saved, list) else saved
    assert 0 < saved["attributes"]["train_seconds"] <= first

    # The train loss status.json shows averages the last logs of the whole run, the steps before
    # the resume included (metrics.jsonl holds each step once).
    events = [
        json.loads(x) for x in (interrupted.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [e["train_loss"] for e in events if "train_loss" in e]
    assert len(losses) == TOTAL_STEPS
    status = _read(interrupted.run_dir / "status.json")
    assert status["train_loss_logs_averaged"] == 10
    assert status["train_loss"] == pytest.approx(sum(losses[-10:]) / 10)
    assert status["elapsed_seconds"] == pytest.approx(total, abs=0.02)
    code, out, _ = cli("runs", "status", interrupted.run_dir)
    assert code == 0 and "mean of the last 10 logs" in out and "resume " not in out
    elapsed = next(line for line in out.splitlines() if line.startswith("elapsed"))
    assert "?" not in elapsed.split("ETA")[0]
