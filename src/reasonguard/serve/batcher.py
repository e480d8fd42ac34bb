"""A dynamic batcher: items from concurrent requests are queued and run as one model batch.

One worker task takes the first waiting item, then collects more until the batch holds
`max_batch_size` items or `max_wait_ms` has passed since the first, and runs the batch in a
single worker thread (the model is not thread-safe, and the event loop must keep accepting
requests while it runs). Each item carries its own future, so a request's items may be spread
over several batches and batches mix items of several requests.

A request that times out or disconnects cancels its futures; the worker skips cancelled items
it has not started. A batch already running in the thread cannot be interrupted (the backends
have no cancellation), so its result for a cancelled item is dropped. If a batch fails, its
items are retried one by one, so one bad item fails only its own request.

Example:
    >>> batcher = DynamicBatcher(lambda items: [{"n": len(i["prompt"])} for i in items])
    >>> await batcher.start()
    >>> await batcher.submit([{"prompt": "hi"}], timeout_s=5)
    [{'n': 2}]
    >>> batcher.stats()["batch_sizes"]
    {'1': 1}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

RunBatch = Callable[[list[dict[str, Any]]], list[Any]]

# What the app carries with each queued item besides the item itself, and strips before the
# guard sees it: the request's time.monotonic() deadline, the guard mode it asked for, and
# whether to compute the label probabilities of reasoned verdicts.
DEADLINE_KEY, MODE_KEY, SCORES_KEY = "_deadline", "_mode", "_scores"
OPTION_KEYS = (DEADLINE_KEY, MODE_KEY, SCORES_KEY)


class BatchTimeout(Exception):
    """The items were not all answered within the request's time limit."""


class QueueFull(Exception):
    """Accepting the items would exceed the batcher's queue limit."""


class BatchFailed(Exception):
    """The model failed on an item (the original exception is the cause)."""


@dataclass
class _Entry:
    item: dict[str, Any]
    future: asyncio.Future[Any]


class DynamicBatcher:
    """Merge concurrently submitted items into batches of up to `max_batch_size`.

    Args:
        run_batch: called in the worker thread with a list of items; returns one result per
            item, in order (e.g. a guard's `classify`).
        max_batch_size: the most items per call of `run_batch`.
        max_wait_ms: how long the first item of a batch waits for company.
        max_queue: the most items waiting or running; `submit` raises `QueueFull` beyond.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        max_batch_size: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 1024,
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self._queue: asyncio.Queue[_Entry] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0  # items submitted and not yet answered or abandoned
        self._sizes: Counter[int] = Counter()
        self._counts: Counter[str] = Counter()
        self._busy_s = 0.0

    async def start(self) -> None:
        """Start the worker (call from the event loop that will submit)."""
        if self._worker is not None:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reasonguard-batch")
        self._worker = asyncio.create_task(self._work(), name="reasonguard-batcher")

    async def close(self) -> None:
        """Stop the worker and fail whatever is still queued."""
        if self._worker is None:
            return
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        assert self._queue is not None and self._executor is not None
        while not self._queue.empty():
            entry = self._queue.get_nowait()
            if not entry.future.done():
                entry.future.set_exception(BatchFailed("the server is shutting down"))
        # A batch still running in the thread cannot be stopped; do not wait for it.
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._worker = self._queue = self._executor = None

    async def submit(self, items: Sequence[Mapping[str, Any]], timeout_s: float | None) -> list:
        """Queue items and wait for their results.

        Args:
            items: the items (copied; the caller's mappings are not kept or changed).
            timeout_s: seconds to wait for all results (None: no limit).

        Returns:
            One result per item, in order.

        Raises:
            QueueFull: the queue cannot take `len(items)` more items.
            BatchTimeout: not answered in `timeout_s`.
            BatchFailed: the model raised on one of the items.
        """
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        if self._pending + len(items) > self.max_queue:
            self._counts["rejected_requests"] += 1
            raise QueueFull(f"the server is busy ({self._pending} items queued)")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending += len(items)
        self._counts["requests"] += 1
        for item, future in zip(items, futures, strict=True):
            future.add_done_callback(self._settled)
            self._queue.put_nowait(_Entry(dict(item), future))
        try:
            async with asyncio.timeout(timeout_s):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            self._counts["timeouts"] += 1
            raise BatchTimeout(f"not answered within {timeout_s:g} s") from None
        finally:
            # Abandoned items (timeout, failure of a sibling, client gone) are skipped by the
            # worker if it has not started them yet.
            for future in futures:
                future.cancel()

    async def call(self, fn: Callable[[], Any], timeout_s: float | None) -> Any:
        """Run `fn()` on the model's worker thread, between batches (a streamed response's
        check: one item's own state, not a batch), under the same queue limit and time limit.

        Raises:
            QueueFull: the queue is full.
            BatchTimeout: not done in `timeout_s` (it still runs to its end in the thread).
            BatchFailed: `fn` raised (the original exception is the cause).
        """
        if self._executor is None:
            raise RuntimeError("the batcher is not started")
        if self._pending + 1 > self.max_queue:
            self._counts["rejected_requests"] += 1
            raise QueueFull(f"the server is busy ({self._pending} items queued)")
        self._pending += 1
        self._counts["calls"] += 1

        def timed() -> Any:
            started = time.perf_counter()
            try:
                return fn()
            finally:
                self._busy_s += time.perf_counter() - started

        running = asyncio.get_running_loop().run_in_executor(self._executor, timed)
        # A call abandoned at its time limit may still fail: its error is read here, so asyncio
        # does not report it as never retrieved.
        running.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(running)
        except TimeoutError:
            self._counts["timeouts"] += 1
            raise BatchTimeout(f"not answered within {timeout_s:g} s") from None
        except Exception as exc:
            self._counts["failed_items"] += 1
            logger.error("the model failed on a streamed check", exc_info=exc)
            error = BatchFailed(f"the model failed on this input ({type(exc).__name__})")
            raise error from exc
        finally:
            self._pending -= 1

    def _settled(self, future: asyncio.Future[Any]) -> None:
        self._pending -= 1
        if future.cancelled():
            self._counts["abandoned_items"] += 1

    def stats(self) -> dict[str, Any]:
        """Counters for /health: batch-size histogram, items, batches, timeouts, queue depth."""
        batches = sum(self._sizes.values())
        items = sum(size * n for size, n in self._sizes.items())
        return {
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.max_wait_s * 1000,
            "batches": batches,
            "items": items,
            "mean_batch_size": items / batches if batches else None,
            "largest_batch": max(self._sizes, default=0),
            # JSON object keys are strings; sorted so the histogram reads in order.
            "batch_sizes": {str(size): self._sizes[size] for size in sorted(self._sizes)},
            "busy_s": round(self._busy_s, 3),
            "queued_items": self._pending,
            "requests": self._counts["requests"],
            "calls": self._counts["calls"],
            "timeouts": self._counts["timeouts"],
            "rejected_requests": self._counts["rejected_requests"],
            "abandoned_items": self._counts["abandoned_items"],
            "failed_items": self._counts["failed_items"],
        }

    async def _work(self) -> None:
        while True:
            try:
                batch = await self._collect()
                live = [entry for entry in batch if not entry.future.done()]
                if live:
                    await self._execute(live)
            except Exception:  # never let the worker die: later requests still need it
                logger.exception("the batcher worker hit an unexpected error")

    async def _collect(self) -> list[_Entry]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                if remaining <= 0:
                    # Past the wait, still take what is already queued: it costs no latency.
                    batch.append(self._queue.get_nowait())
                else:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except (TimeoutError, asyncio.QueueEmpty):
                break
        return batch

    async def _execute(self, live: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        assert self._executor is not None
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self._executor, self.run_batch, [entry.item for entry in live]
            )
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)}")
        except Exception as exc:
            self._busy_s += time.perf_counter() - started
            if len(live) == 1:
                self._fail(live[0], exc)
                return
            logger.warning("batch of %d failed (%s); retrying its items one by one", len(live), exc)
            for entry in live:
                if not entry.future.done():
                    await self._execute([entry])
            return
        self._busy_s += time.perf_counter() - started
        self._sizes[len(live)] += 1
        for entry, result in zip(live, results, strict=True):
            if not entry.future.done():
                entry.future.set_result(result)

    def _fail(self, entry: _Entry, exc: Exception) -> None:
        self._counts["failed_items"] += 1
        logger.error("the model failed on an item", exc_info=exc)
        if not entry.future.done():
            error = BatchFailed(f"the model failed on this input ({type(exc).__name__})")
            error.__cause__ = exc
            entry.future.set_exception(error)
