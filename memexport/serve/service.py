"""The :class:`Service` every route calls: the served models plus admission, decoding and batching.

One :class:`Service` holds one :class:`ServedModel` per artifact, each under its served name
(:mod:`memexport.runtime.names`) with its loaded :class:`~memexport.runtime.predictor.Predictor`,
its own inference function (the plain server's :class:`~memexport.serve.batching.Batcher`, or
Ray Serve's ``@serve.batch``, :mod:`memexport.serve.ray`) and its own Triton statistics
(:mod:`memexport.serve.stats`, fed by that function and by :meth:`Service.infer`). Request images are
decoded on one small thread pool with each model's own preprocessing, and scored in pieces of at most ``max_batch_size``
rows, so one request never holds more decoded images than that. Admission is server-wide, whatever the
model: at most ``max_queue`` requests at once, taken once a request's body has arrived (a slow client
holds no slot), each answered by its deadline, ``timeout_s`` from its arrival (:meth:`Service.run`).
The token, the body caps and reading within the deadline are the gate's (:mod:`memexport.serve.gate`).
REST and gRPC (:mod:`memexport.serve.grpc`) reach the models through the same :meth:`Service.run` and
:meth:`Service.infer`, so both share admission, the deadline, the pieces and the statistics.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

import numpy as np

from memexport.core.errors import InputImageError
from memexport.serve.metrics import Metrics
from memexport.serve.options import ServeOptions
from memexport.serve.stats import Statistics, recorded
from memexport.serve.v2 import IMAGE, InferRequest, RequestError, check_version, model_metadata, parse_infer, quoted


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
T = TypeVar("T")


class ServedModel:
    """One artifact behind the server, under the name clients use.

    Args:
        name: The served name (``/v2/models/{name}``; see :mod:`memexport.runtime.names`).
        path: The artifact.
        options: :class:`ServeOptions`.
    """

    def __init__(self, name: str, path: Path, options: ServeOptions) -> None:
        self.name = name
        self.path = Path(path)
        self.options = options
        self.predictor: Any = None
        self.batcher: Any = None
        self.stats = Statistics()  # Triton's statistics extension, this model's own
        self._infer: Optional[InferFn] = None

    def load(self) -> None:
        """Load the artifact (integrity first) and warm it up at batch 1 and the largest batch (blocking)."""
        self.predictor = load_predictor(self.path, self.options)
        shape = tuple(self.predictor.metadata.input_shape)
        for size in sorted({1, self.options.max_batch_size}):
            self.predictor.infer(np.zeros((size, *shape), np.float32))

    def start_batcher(self, on_batch: Callable[[int], None]) -> None:
        """The plain server's inference loop for this model (on the running event loop)."""
        from memexport.serve.batching import Batcher

        self.batcher = Batcher(self.predictor.infer, self.options.max_batch_size, self.options.max_delay_ms / 1000, on_batch,
                               self.stats)
        self.batcher.start()
        self.activate(self.batcher.submit)

    def activate(self, infer: InferFn) -> None:
        """Score through ``infer`` (the batcher's ``submit``, or Ray Serve's batched function)."""
        self._infer = infer

    @property
    def ready(self) -> bool:
        """Able to score: activated, and its inference loop (the plain server's batcher) still running."""
        return self._infer is not None and (self.batcher is None or self.batcher.alive)

    @property
    def meaning(self) -> str:
        """What its score means (:attr:`~memexport.runtime.metadata.ArtifactMetadata.output_meaning`)."""
        return self.predictor.metadata.output_meaning

    def metadata(self) -> dict[str, Any]:
        """``GET /v2/models/{name}``, with what the score means among its ``properties``."""
        meta = self.predictor.metadata
        properties = {"model": meta.model, "precision": meta.precision, "output_meaning": self.meaning, "artifact": self.path.name}
        return model_metadata(self.name, f"memexport_{self.predictor.runner.backend}", meta.input_shape, properties)

    def decode_key(self) -> tuple:
        """Models with equal keys preprocess an image to the same pixels: ``/score`` decodes it once for them."""
        predictor = self.predictor
        return predictor.metadata.preprocess, predictor.exif_transpose, predictor.decode

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        """Scores for one piece (at most ``max_batch_size`` rows); 503 at once when the loop has stopped."""
        if not self.ready or self._infer is None:
            raise RequestError(503, f"model {self.name!r} cannot score: its inference loop has stopped; retry on another replica")
        return await self._infer(batch)

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    def close(self) -> None:
        if self.predictor is not None:
            self.predictor.close()
            self.predictor.runner.__exit__(None, None, None)  # entered by load_predictor, not by the Predictor


class Service:
    """The served models plus admission, decoding and batching: what every route calls.

    Args:
        models: ``(name, artifact)`` per model, in the order ``/score`` answers them.
        options: :class:`ServeOptions`, shared by every model; the limits hold across the whole server.
    """

    def __init__(self, models: Sequence[tuple[str, Path]], options: ServeOptions) -> None:
        self.models = {name: ServedModel(name, path, options) for name, path in models}
        self.options = options
        self.metrics = Metrics()
        self.loaded = False
        self.draining = False
        self.in_flight = 0
        self.body_bytes = 0  # request bodies held at once (being read or answered), after inflating
        self._idle = asyncio.Event()
        from memexport.runtime.batch import default_workers

        self._pool = ThreadPoolExecutor(options.workers or default_workers(), thread_name_prefix="memexport-decode")

    # -- life cycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load every model, in order (blocking)."""
        for model in self.models.values():
            model.load()

    async def start(self) -> None:
        """Load on a thread (``live`` answers meanwhile), then start each model's batcher and turn ready."""
        await asyncio.get_running_loop().run_in_executor(None, self.load)
        for model in self.models.values():
            model.start_batcher(self.metrics.batch_size.observe)
        self.loaded = True

    @property
    def ready(self) -> bool:
        """Loaded, every model able to score, and not draining (``/v2/health/ready``)."""
        return self.loaded and not self.draining and all(model.ready for model in self.models.values())

    def model_ready(self, model: ServedModel) -> bool:
        """``model`` able to score and the server not draining (``/v2/models/{m}/ready``, gRPC ``ModelReady``)."""
        return model.ready and not self.draining

    @property
    def live(self) -> bool:
        """No model's inference loop has died (``/v2/health/live``: a dead loop never comes back; restart)."""
        return not self.loaded or all(model.ready for model in self.models.values())

    async def stop(self) -> None:
        """Stop accepting, answer everything accepted, then release the models."""
        self.draining = True
        if self.in_flight:
            self._idle.clear()
            await self._idle.wait()
        for model in self.models.values():
            await model.stop()
        self._pool.shutdown(wait=True)
        for model in self.models.values():
            model.close()

    # -- admission ------------------------------------------------------------------------------

    def require_loaded(self) -> None:
        if not self.loaded:
            names = ", ".join(model.path.name for model in self.models.values())
            raise RequestError(503, f"the model is still loading ({names}); retry shortly")

    def check_model(self, name: str, version: Optional[str] = None) -> ServedModel:
        """The model served as ``name``; 404 naming the served ones when there is none."""
        self.require_loaded()
        model = self.models.get(name)
        if model is None:
            raise RequestError(404, f"unknown model {quoted(name)}; this server serves {', '.join(map(repr, self.models))}")
        check_version(version)
        return model

    def check_room(self) -> None:
        """503 when loading, draining or full (takes nothing: the gate asks before reading a body)."""
        self.require_loaded()
        if self.draining:
            raise RequestError(503, "the server is shutting down; retry on another replica")
        if self.in_flight >= self.options.max_queue:
            raise RequestError(503, f"the server is busy ({self.in_flight} requests queued, --max-queue {self.options.max_queue}); retry shortly")

    def hold_body(self, size: int) -> None:
        """Count ``size`` more body bytes held (negative: given back); 503 past ``max_queue`` full bodies."""
        budget = self.options.max_queue * self.options.max_body_bytes
        if size > 0 and self.body_bytes + size > budget:
            raise RequestError(503, f"the server holds its limit of request bodies ({budget:,} bytes: --max-queue times --max-body-mb); retry shortly")
        self.body_bytes += size

    def admit(self) -> None:
        """Take a slot, or 503 when loading, draining or full. Every admitted request calls :meth:`release` once."""
        self.check_room()
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)

    def release(self, _: object = None) -> None:
        self.in_flight -= 1
        self.metrics.queue_depth.set(self.in_flight)
        if self.in_flight == 0:
            self._idle.set()

    async def run(self, deadline: float, work: Callable[[], Awaitable[T]]) -> T:
        """``work()`` (parsing, decoding, scoring) in an admitted slot, answered by ``deadline`` (event-loop time).

        Past the deadline the answer is 504; the work keeps its slot until it ends (it stops at its next
        piece), so the queue stays bounded whatever the clients do.
        """
        self.admit()
        task = asyncio.ensure_future(work())
        task.add_done_callback(self._finished)
        left = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(left, 0))
        except asyncio.TimeoutError:
            raise self.late() from None

    def _finished(self, task: asyncio.Future) -> None:
        """Work has ended: its slot is free. Its outcome is read even when nobody waits for it any more (answered
        504), so a late failure is not reported as an exception never retrieved."""
        self.release()
        if not task.cancelled():
            task.exception()

    def late(self) -> RequestError:
        return RequestError(504, f"no answer within {self.options.timeout_s:g} s of the request's arrival (--timeout; server overloaded); retry later")

    def check_deadline(self, deadline: float) -> None:
        """Stop work whose answer is already late (its client has had its 504)."""
        if asyncio.get_running_loop().time() > deadline:
            raise self.late()

    # -- work -----------------------------------------------------------------------------------

    async def offload(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func`` on the decoding pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    async def decode(self, model: ServedModel, rows: Sequence[bytes], names: Sequence[str]) -> list[Any]:
        """Each encoded image preprocessed for ``model``, or its :class:`InputImageError` (counted by kind)."""
        def one(data: bytes, name: str) -> Any:
            try:
                return model.predictor.preprocess_bytes(data, name)
            except InputImageError as error:
                return error

        items = await asyncio.gather(*(self.offload(one, data, name) for data, name in zip(rows, names)))
        for item in items:
            if isinstance(item, InputImageError):
                self.metrics.input_errors.labels(item.reason).inc()
        return list(items)

    async def score(self, model: ServedModel, batch: np.ndarray) -> np.ndarray:
        """Scores for one preprocessed piece, through the model's batcher."""
        scores = await model.infer(batch)
        self.metrics.images.inc(len(scores))
        return scores

    def pieces(self, count: int) -> range:
        """Where each piece of a ``count``-row request starts: at most ``max_batch_size`` rows are decoded at once."""
        return range(0, count, self.options.max_batch_size)

    async def infer_body(self, model: ServedModel, body: bytes, header_length: Optional[str], deadline: float) -> tuple[InferRequest, np.ndarray]:
        """An ``infer`` body parsed (off the event loop) and scored."""
        parsed = await self.offload(functools.partial(parse_infer, max_rows=self.options.max_rows), body, header_length,
                                    model.predictor.metadata.input_shape)
        return parsed, await self.infer(model, parsed, deadline)

    @recorded(lambda service, model, *_: [model.stats])  # the request counts for the model it names
    async def infer(self, model: ServedModel, request: InferRequest, deadline: float) -> np.ndarray:
        """Decoded and scored in pieces; all or nothing: one bad image row fails the request with one line per bad row."""
        step, scores, bad = self.options.max_batch_size, [], []
        for start in self.pieces(request.count):
            self.check_deadline(deadline)
            rows = request.rows[start : start + step]
            if request.input_name != IMAGE:
                scores.append(await self.score(model, rows))
                continue
            items = await self.decode(model, rows, [f"row {i}" for i in range(start, start + len(rows))])
            bad += [str(item) for item in items if isinstance(item, InputImageError)]
            if not bad:  # past a bad row, decode the rest only to report every bad one
                scores.append(await self.score(model, np.stack(items)))
        if bad:
            raise RequestError(400, "\n".join(bad))
        return np.concatenate(scores)

    # /score counts once for every model it answers
    @recorded(lambda service, *_: [model.stats for model in service.models.values()])
    async def score_files(self, files: Sequence[tuple[str, bytes]], deadline: float) -> list[dict[str, Any]]:
        """``/score``: one row per file and model (file order, then model order), each naming the model and what
        its score means; every good file scored, every bad one reported. Models that preprocess alike share one decode."""
        groups: dict[tuple, list[ServedModel]] = {}
        for model in self.models.values():
            groups.setdefault(model.decode_key(), []).append(model)
        rows: dict[tuple[int, str], dict[str, Any]] = {}
        for group in groups.values():
            for start in self.pieces(len(files)):
                self.check_deadline(deadline)
                rows.update(await self._score_piece(group, files[start : start + self.options.max_batch_size], start))
        return [rows[index, name] for index in range(len(files)) for name in self.models]

    async def _score_piece(self, group: Sequence[ServedModel], files: Sequence[tuple[str, bytes]], start: int) -> dict[tuple[int, str], dict[str, Any]]:
        """One piece of ``/score`` files, decoded once for ``group`` (models that preprocess alike), scored by each."""
        items = await self.decode(group[0], [data for _, data in files], [name for name, _ in files])
        good = [item for item in items if not isinstance(item, InputImageError)]
        scored = await asyncio.gather(*(self.score(model, np.stack(good)) for model in group)) if good else [np.zeros(0)] * len(group)
        rows: dict[tuple[int, str], dict[str, Any]] = {}
        for model, scores in zip(group, scored):
            left = iter(scores.tolist())
            for index, ((name, _), item) in enumerate(zip(files, items), start):
                head = {"file": name, "model": model.name}
                rows[index, model.name] = ({**head, "error": item.detail} if isinstance(item, InputImageError)
                                           else {**head, "meaning": model.meaning, "score": float(next(left))})
        return rows
