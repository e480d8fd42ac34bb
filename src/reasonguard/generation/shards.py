"""Shards: the rows of a job that data-parallel workers share out, cut on window boundaries.

The rows a job still needs, `done`..`total`, are cut into N contiguous shards whose boundaries
fall on multiples of the window size (`Backend.window_size`). A worker therefore runs the very
windows one process runs: the same prompts in the same batches, with seeds that follow an
input's position in the whole job, not in the shard. A job with fewer windows than workers
leaves some workers without a shard of it. Each shard has its own file, which the parent
(`parallel.run_data_parallel`) and the worker (`workers.worker_main`) open the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reasonguard.generation.jobs import Job
from reasonguard.generation.resume import JsonlAppender
from reasonguard.generation.windows import check_resume


@dataclass(frozen=True)
class Part:
    """One shard of one job, as its worker sees it.

    Attributes:
        job: the job cut down to the shard's windows.
        offset: the position of `job.records[0]` in the whole job (a multiple of the window).
        first: the first row the shard writes, in `job.records` (earlier ones are done already).
        path: the shard file.
    """

    job: Job
    offset: int
    first: int
    path: str


def shard_ranges(done: int, total: int, window: int, shards: int) -> list[tuple[int, int] | None]:
    """Split rows `done`..`total` into `shards` contiguous ranges on multiples of `window` (the
    first range starts at `done`, the last ends at `total`).

    Returns:
        `(first, stop)` per shard; None for a shard left without rows (fewer windows than shards).

    Example:
        >>> shard_ranges(5, 30, 4, 3)  # windows 1..7 of 4 rows: 3, 2 and 2 windows
        [(5, 16), (16, 24), (24, 30)]
    """
    if done >= total:
        return [None] * shards
    low = done // window
    count = -(-total // window) - low  # windows touched by rows done..total
    bounds = [low + -(-count * i // shards) for i in range(shards + 1)]
    return [
        (max(a * window, done), min(b * window, total)) if a < b else None
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def part_of(job: Job, first: int, stop: int, window: int, root: Path) -> Part:
    """The shard of `job` that writes rows `first`..`stop`, its file under `root`."""
    low = first // window * window  # the window `first` falls in starts here
    cut = Job(job.name, job.relpath, job.records[low:stop], job.kind)
    return Part(cut, low, first - low, str(root / f"{first}-{stop}" / job.relpath))


def open_part(part: Part) -> tuple[JsonlAppender, int]:
    """Open a shard file (cutting off a partial last line) and check its rows; return it and
    the position, in `part.job.records`, of the next row to write."""
    out = JsonlAppender(part.path)
    try:
        done = part.first + out.open()
        check_resume(part.job, out, done)
    except BaseException:
        out.close()
        raise
    return out, done
