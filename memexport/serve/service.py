"""The :class:`Service` every route calls: the loaded model plus admission, decoding and batching.

One :class:`Service` holds the loaded :class:`~memexport.runtime.predictor.Predictor`, decodes
request images on a small thread pool with the runtime's own preprocessing, and hands batches
to an inference function: the plain server's :class:`~memexport.serve.batching.Batcher`, or Ray
Serve's ``@serve.batch`` (:mod:`memexport.serve.ray`). Admission lives here: at most
``max_queue`` requests at once (:meth:`Service.admit`), each answered within ``timeout_s`` of
being scored (:meth:`Service.score`); the body cap and the token are the gate's
(:mod:`memexport.serve.gate`).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Sequence

import numpy as np

from memexport.core.errors import InputImageError
from memexport.serve.metrics import Metrics
from memexport.serve.options import ServeOptions
from memexport.serve.stats import Statistics, recorded
from memexport.serve.v2 import IMAGE, InferRequest, RequestError, check_version, model_metadata


def load_predictor(model: Path, options: ServeOptions) -> Any:
    """The one place serve builds its :class:`Predictor` (new predictor options are passed here).

    The runner is entered here, so ``--no-integrity-check`` can reach it; the caller exits it
    (``predictor.runner.__exit__``) after ``predictor.close()``.
    """
    from memexport.runtime.base import RunnerOptions
    from memexport.runtime.predictor import Predictor
    from memexport.runtime.registry import runner_for

    # varying_batch: the batcher forms batches of every size up to max_batch_size.
    runner_options = RunnerOptions(device=options.device, check_integrity=options.check_integrity, varying_batch=True)
    runner = runner_for(model, runner_options, options.backend,
                        precision=options.precision)
    with_runner = runner.__enter__()
    try:
        return Predictor(with_runner, batch_size=options.max_batch_size, decode=options.decode)
    except BaseException:
        runner.__exit__(None, None, None)
        raise


InferFn = Callable[[np.ndarray], Awaitable[np.ndarray]]


class Service:
    """The loaded model plus admission, decoding and batching: what every route calls.

    Args:
        model: The artifact.
        options: :class:`ServeOptions`.
    """

    def __init__(self, model: Path, options: ServeOptions) -> None:
        self.model_path = Path(model)
        self.options = options
        self.metrics = Metrics()
        self.stats = Statistics()
        self.predictor: Any = None
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._batcher: Any = None
        self._infer: Optional[InferFn] = None
        from memexport.runtime.batch import default_workers

        self._pool = ThreadPoolExecutor(options.workers or default_workers(), thread_name_prefix="memexport-decode")

    # -- life cycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load the artifact (integrity first) and warm it up at batch 1 and the largest batch (blocking)."""
        self.predictor = load_predictor(self.model_path, self.options)
        shape = tuple(self.predictor.metadata.input_shape)
        for size in sorted({1, self.options.max_batch_size}):
            self.predictor.infer(np.zeros((size, *shape), np.float32))

    async def start(self) -> None:
        """Load on a thread (``live`` answers meanwhile), then start the plain server's batcher and turn ready."""
        from memexport.serve.batching import Batcher

        await asyncio.get_running_loop().run_in_executor(None, self.load)
        self._batcher = Batcher(self.predictor.infer, self.options.max_batch_size, self.options.max_delay_ms / 1000,
                                self.metrics.batch_size.observe, self.stats)
        self._batcher.start()
        self.activate(self._batcher.submit)

    def activate(self, infer: InferFn) -> None:
        """Turn ready, scoring through ``infer`` (the batcher's ``submit``, or Ray Serve's batched method)."""
        self._infer = infer
        self.ready = True

    async def stop(self) -> None:
        """Stop accepting, answer everything accepted, then release the model."""
        self.draining = True
        if self.in_flight:
            self._idle.clear()
            await self._idle.wait()
        if self._batcher is not None:
            await self._batcher.stop()
        self._pool.shutdown(wait=True)
        if self.predictor is not None:
            self.predictor.close()
            self.predictor.runner.__exit__(None, None, None)  # entered by load_predictor, not by the Predictor

    # -- what routes call -----------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        self.require_ready()
        return self.predictor.metadata.model

    def require_ready(self) -> None:
        if not self.ready:
            raise RequestError(503, f"the model is still loading ({self.model_path.name}); retry shortly")

    def check_model(self, model: str, version: Optional[str] = None) -> None:
        if model != self.model_name:
            raise RequestError(404, f"unknown model {model!r}; this server serves {self.model_name!r}")
        check_version(version)

    def metadata(self) -> dict[str, Any]:
        meta = self.predictor.metadata
        return model_metadata(meta.model, f"memexport_{self.predictor.runner.backend}", meta.input_shape)

    def admit(self) -> None:
        """Take a slot, or 503 when draining or full. Every admitted request calls :meth:`release` once."""
        self.require_ready()
        if self.draining:
            raise RequestError(503, "the server is shutting down; retry on another replica")
        if self.in_flight >= self.options.max_queue:
            raise RequestError(503, f"the server is busy ({self.in_flight} requests queued, --max-queue {self.options.max_queue}); retry shortly")
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)

    def release(self, _: object = None) -> None:
        self.in_flight -= 1
        self.metrics.queue_depth.set(self.in_flight)
        if self.in_flight == 0:
            self._idle.set()

    async def offload(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func`` on the decoding pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    async def decode(self, rows: Sequence[bytes], names: Sequence[str]) -> list[Any]:
        """Each encoded image preprocessed, or its :class:`InputImageError` (counted by kind)."""
        def one(data: bytes, name: str) -> Any:
            try:
                return self.predictor.preprocess_bytes(data, name)
            except InputImageError as error:
                return error

        items = await asyncio.gather(*(self.offload(one, data, name) for data, name in zip(rows, names)))
        for item in items:
            if isinstance(item, InputImageError):
                self.metrics.input_errors.labels(item.reason).inc()
        return list(items)

    async def score(self, batch: np.ndarray) -> np.ndarray:
        """Scores for a preprocessed batch, through the batcher; 504 past the per-request timeout.

        A timed-out request keeps its slot until its batch has run, so the queue stays bounded.
        """
        assert self._infer is not None
        task = asyncio.ensure_future(self._infer(batch))
        try:
            scores = await asyncio.wait_for(asyncio.shield(task), self.options.timeout_s)
        except asyncio.TimeoutError:
            self.in_flight += 1
            task.add_done_callback(self.release)
            raise RequestError(504, f"no answer within {self.options.timeout_s:g} s (server overloaded); retry later") from None
        self.metrics.images.inc(len(scores))
        return scores

    @recorded
    async def infer(self, request: InferRequest) -> np.ndarray:
        """All or nothing: one bad image row fails the request with one line per bad row."""
        if request.input_name != IMAGE:
            return await self.score(request.rows)
        items = await self.decode(request.rows, [f"row {i}" for i in range(request.count)])
        bad = [str(item) for item in items if isinstance(item, InputImageError)]
        if bad:
            raise RequestError(400, "\n".join(bad))
        return await self.score(np.stack(items))

    @recorded
    async def score_files(self, files: Sequence[tuple[str, bytes]]) -> list[dict[str, Any]]:
        """``/score``: every good file scored, every bad one reported, in the order sent."""
        items = await self.decode([data for _, data in files], [name for name, _ in files])
        good = [item for item in items if not isinstance(item, InputImageError)]
        scores = iter((await self.score(np.stack(good))).tolist() if good else [])
        return [{"file": name, "error": item.detail} if isinstance(item, InputImageError) else {"file": name, "score": float(next(scores))}
                for (name, _), item in zip(files, items)]
