"""`reasonguard runs status RUN_DIR [--json]`: a training run's progress, from any terminal.

Reads RUN_DIR/status.json (rewritten by the run at each logging step) and says whether the
process behind it is still alive. Given a folder that holds runs (the demo's `runs/demo` holds its
training run in `runs/demo/model`), it names the run folders inside.

Example:
    reasonguard runs status runs/demo/model
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("runs", help="inspect training runs")
    verbs = parser.add_subparsers(dest="runs_command", metavar="VERB", required=True)
    status = verbs.add_parser(
        "status",
        help="step / total, epoch, losses, tokens/s, ETA, checkpoints, GPU memory of a run",
    )
    status.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="the run's output_dir, the folder holding status.json (the demo's: runs/demo/model)",
    )
    status.add_argument("--json", action="store_true", help="print status.json as JSON")
    status.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reasonguard.train.monitor import read_status

    status = read_status(args.run_dir)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """Human-readable lines for a status.json."""
    import socket

    from reasonguard.train.monitor import format_duration, process_alive, resume_hint

    state = status.get("state", "?")
    live = state not in ("finished", "failed", "interrupted")
    if live and status.get("host") == socket.gethostname():
        pid = status.get("pid")
        if isinstance(pid, int) and not process_alive(pid):
            state, live = f"stopped (process {pid} is gone)", False
    step, total = status.get("step"), status.get("total_steps")
    # A stopped run has no ETA: it says how to go on instead.
    left = f"ETA {format_duration(status.get('eta_seconds'))}" if live else "stopped"
    lines = [
        f"run          {status.get('run_dir')}  [{status.get('stage', '?')}]",
        f"state        {state}" + (f": {status['message']}" if status.get("message") else ""),
        f"step         {step if step is not None else '?'}/{total if total is not None else '?'}"
        + (f"  (epoch {status['epoch']:.2f})" if status.get("epoch") is not None else ""),
        f"train loss   {_num(status.get('train_loss'))}"
        + (
            f" (mean of the last {status['train_loss_logs_averaged']} logs; last "
            f"{_num(status.get('last_logged_train_loss'))})"
            if (status.get("train_loss_logs_averaged") or 0) > 1
            else ""
        ),
        f"eval loss    {_num(status.get('eval_loss'))}  (best {_num(status.get('best_eval_loss'))})",
        f"speed        {_num(status.get('tokens_per_second'), '{:,.0f}')} tokens/s",
        f"elapsed      {format_duration(status.get('elapsed_seconds'))}   {left}",
        f"checkpoints  {', '.join(status.get('checkpoints') or []) or 'none yet'}",
    ]
    if not live and state != "finished":
        lines.append(f"resume       {resume_hint(status)}")
    gpu = status.get("gpu_memory")
    if gpu:
        # Reserved is what torch's allocator holds of the card (allocated plus its cache).
        reserved = f"{gpu['reserved_gib']} GiB reserved" if "reserved_gib" in gpu else ""
        if reserved and "max_reserved_gib" in gpu:
            reserved += f" ({gpu['max_reserved_gib']} GiB peak)"
        lines.append(
            f"GPU memory   {gpu['allocated_gib']} GiB allocated ({gpu['max_allocated_gib']} GiB "
            f"peak), {reserved + ', ' if reserved else ''}{gpu['total_gib']} GiB total"
        )
    if status.get("final_dir"):
        lines.append(f"final model  {status['final_dir']}")
    for warning in status.get("warnings") or []:
        lines.append(f"warning      {warning}")
    lines.append(f"updated      {status.get('updated_at', '?')}")
    return "\n".join(lines)


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    return fmt.format(value) if isinstance(value, int | float) else "-"
