"""Dynamic batching for the plain server: a queue feeding one inference thread.

Requests wait in an :class:`asyncio.Queue`; one task takes them in arrival order and joins them
into a batch of up to ``max_batch`` images, waiting at most ``max_delay_s`` after the first for
more, then runs the batch in a single worker thread so the event loop never blocks. How many
requests may wait is bounded by the caller (:class:`memexport.serve.service.Service` admits at most
``max_queue`` requests; past it they get 503), so this queue never needs to refuse or drop one.
Under Ray Serve, ``@serve.batch`` does this job instead (:mod:`memexport.serve.ray`).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

from memexport.serve.stats import Statistics, run_timed
from memexport.serve.v2 import RequestError

# (rows, their future, when they were queued: perf_counter_ns)
Entry = tuple[np.ndarray, "asyncio.Future[np.ndarray]", int]


class Batcher:
    """Join queued requests into batches and score them on one worker thread.

    Args:
        infer: Scores for a preprocessed batch (``Predictor.infer``); runs on the worker thread.
        max_batch: Images per inference call at most; larger requests are split into parts.
        max_delay_s: How long the first request of a batch waits for company.
        on_batch: Called on the event loop with each batch's size (for metrics).
        stats: Where each scored batch's queue and compute times go (Triton's statistics; default none).
    """

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, max_delay_s: float,
                 on_batch: Callable[[int], None] = lambda size: None, stats: Optional[Statistics] = None) -> None:
        self._infer = infer
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._on_batch = on_batch
        self._stats = stats
        self._queue: asyncio.Queue[Entry] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="memexport-infer")
        self._task: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._fail_waiting)

    @property
    def alive(self) -> bool:
        """Whether the loop still runs (readiness turns 503 once it has died)."""
        return self._task is not None and not self._task.done()

    def _fail_waiting(self, _: object) -> None:
        """The loop ended (stopped, or died of a fault): nothing queued would ever be answered, so fail it now."""
        while not self._queue.empty():
            _, future, _ = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RequestError(503, "the inference loop has stopped; retry on another replica"))

    async def stop(self) -> None:
        """Stop the loop; callers first wait until every accepted request is answered."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize()

    async def submit(self, batch: np.ndarray) -> np.ndarray:
        """Queue a batch (split into ``max_batch`` parts if larger); its scores once they have run."""
        if len(batch) > self._max_batch:
            step = self._max_batch
            parts = await asyncio.gather(*(self._submit(batch[i : i + step]) for i in range(0, len(batch), step)))
            return np.concatenate(parts)
        return await self._submit(batch)

    async def _submit(self, batch: np.ndarray) -> np.ndarray:
        """Queue one part; the caller's cancellation never loses it (the future is shielded)."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((batch, future, time.perf_counter_ns()))
        return await asyncio.shield(future)

    async def _run(self) -> None:
        carry: Optional[Entry] = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            entries, carry = await self._gather(first)
            await self._score(entries)

    async def _gather(self, first: Entry) -> tuple[list[Entry], Optional[Entry]]:
        """``first`` and the requests that arrive within the delay and fit; the one that did not fit is carried."""
        entries, size = [first], len(first[0])
        deadline = asyncio.get_running_loop().time() + self._max_delay_s
        while size < self._max_batch:
            left = deadline - asyncio.get_running_loop().time()
            try:
                entry = self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if size + len(entry[0]) > self._max_batch:
                return entries, entry
            entries.append(entry)
            size += len(entry[0])
        return entries, None

    async def _score(self, entries: list[Entry]) -> None:
        self._on_batch(sum(len(e[0]) for e in entries))
        try:
            scores, timing, started = await run_timed(self._executor, self._infer, [e[0] for e in entries])
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure, none hangs
            for _, future, _ in entries:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for rows, future, _ in entries:
            if not future.done():
                future.set_result(scores[start : start + len(rows)])
            start += len(rows)
        if self._stats is not None:
            self._stats.execution(len(scores), [started - queued for _, _, queued in entries], timing)
