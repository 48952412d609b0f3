"""Decoding for batch jobs: a bounded pool of threads feeding inference, under one of two schemes.

Decoding and inference are both CPU-bound and share the cores, so the best a pipeline can reach is
``1 / (1/decode + sum_i 1/model_i)`` (each stage's images/s alone on every core). Two schemes:

* ``overlap`` (the default): the decoding threads run ahead of inference, at most
  ``2 * batch_size + 4 * workers`` images, so each stage runs whenever the other waits.
* ``phases``: a chunk of images is decoded with every decoding thread while inference waits, then
  scored with every core while decoding waits. The two stages never contend for a core, so each runs
  at its own all-core speed and the pipeline costs exactly the sum of the two (the bound, by
  construction, less the stall at the end of each chunk's decode). For CPUs whose back ends lose
  speed when decoding runs beside them (issue 29 measured the overlapped pipeline at 0.61x of the
  bound with INT8 on AMX).

Both give the same batches in the same order, so the same rows; only the timing differs.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from memexport.core.errors import InputImageError, check_choice
from memexport.runtime.predictor import group_batches

PIPELINES = ("overlap", "phases")


def check_pipeline(pipeline: str) -> str:
    """``pipeline`` when it is a scheme (``overlap``, ``phases``).

    Raises:
        UsageError: Any other value; one line naming the choices.
    """
    return check_choice("--pipeline", pipeline, PIPELINES)


def safe_item(name: str, make: Callable[[], Any]) -> Any:
    """``make()``, or the :class:`InputImageError` it raised; any other exception also becomes
    an error naming ``name`` (reason ``internal-error``), so a bug costs one image, never the run."""
    try:
        return make()
    except InputImageError as error:
        return error
    except Exception as exc:  # noqa: BLE001 - a bug must cost one image, never the run
        return InputImageError(name, "internal-error", f"unexpected {type(exc).__name__}: {exc}; please report it")


def _safe_preprocess(predictor: Any, path: Path) -> Any:
    return safe_item(str(path), lambda: predictor.preprocess(path))


def decoded_batches(
    predictor: Any, paths: Sequence[Path], batch_size: int, workers: int, pipeline: str = "overlap",
) -> Iterator[list[tuple[Path, Any]]]:
    """Preprocess ``paths`` in parallel and group them, in input order, into batches.

    Each batch holds up to ``batch_size`` decoded images plus the failures met on the way.

    Args:
        predictor: Supplies ``preprocess(path)`` (thread-safe): a
            :class:`~memexport.runtime.predictor.Predictor`, or a
            :class:`~memexport.runtime.multi.MultiPredictor` (every model's inputs from one decode).
        paths: Image files, in the order to report them.
        batch_size: Decoded images per batch.
        workers: Decoding threads; 0 decodes in the calling thread.
        pipeline: ``overlap`` (default: decoding runs ahead while the caller scores) or ``phases``
            (decoding runs only while the caller waits for the next batch); see the module docstring.
    """
    decode = _decoded if check_pipeline(pipeline) == "overlap" else _decoded_in_phases
    items = decode(predictor, paths, batch_size, workers)
    try:
        yield from group_batches(items, batch_size)
    finally:
        items.close()  # stops the decode pool at once when the caller stops early


def _decoded(predictor: Any, paths: Sequence[Path], batch_size: int, workers: int) -> Iterator[tuple[Path, Any]]:
    """``(path, preprocessed input or error)`` in input order, from a bounded pool of decode threads."""
    if workers <= 0:
        for path in paths:
            yield path, _safe_preprocess(predictor, path)
        return
    window = 2 * batch_size + 4 * workers
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memexport-decode")
    queue: deque[tuple[Path, Future]] = deque()
    todo = iter(paths)
    try:

        def fill() -> None:
            while len(queue) < window:
                path = next(todo, None)
                if path is None:
                    return
                queue.append((path, pool.submit(_safe_preprocess, predictor, path)))

        fill()
        while queue:
            path, future = queue.popleft()
            item = future.result()
            fill()
            yield path, item
    finally:
        # On Ctrl-C or an inference error: drop queued work, let running decodes finish.
        pool.shutdown(wait=True, cancel_futures=True)


def _decoded_in_phases(predictor: Any, paths: Sequence[Path], batch_size: int, workers: int) -> Iterator[tuple[Path, Any]]:
    """``(path, preprocessed input or error)`` in input order, a chunk at a time: every decoding thread
    works on one chunk of ``batch_size`` images (at least one per thread) and nothing is decoded while
    the caller, suspended in its loop, scores what was yielded."""
    if workers <= 0:
        yield from _decoded(predictor, paths, batch_size, 0)
        return
    chunk = max(batch_size, workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memexport-decode")
    try:
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            # list(): the whole chunk is decoded before the first of it is handed on.
            yield from zip(part, list(pool.map(lambda path: _safe_preprocess(predictor, path), part)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
