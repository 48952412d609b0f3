"""Triton's statistics extension: a thread-safe recorder per served model and its ``ModelStatistics`` message.

Each served model (:class:`~memexport.serve.service.ServedModel`) has its own :class:`Statistics`, so
``/v2/models/{m}/stats`` counts only what model ``m`` did. It counts what Triton counts, fed by the scoring path itself:

* per request (:func:`recorded`, around :meth:`memexport.serve.service.Service.infer`, HTTP and gRPC alike):
  ``success``/``fail`` counts and durations, from the parsed request reaching the model to its scores
  a ``/score`` request counts once for every model it answers;
* per batcher entry (:meth:`Statistics.execution`, from :class:`memexport.serve.batching.Batcher` or Ray's
  ``@serve.batch``): ``queue`` (waiting for a batch, the batching delay included) and the batch's
  ``compute_input`` (joining the entries into one tensor and reaching the inference thread),
  ``compute_infer`` (the back end's ``infer``) and ``compute_output`` (the scores back on the event loop);
  a request larger than ``--max-batch-size`` is queued as several entries, each counted;
* per execution: ``batch_stats`` by batch size, ``inference_count`` (images scored), ``execution_count``
  (inference calls) and ``last_inference`` (ms since the epoch).

Durations are ``time.perf_counter_ns`` differences. Decoding lies in ``success`` but in no queue or
compute figure; parsing and the network lie in none (they come before the request reaches the model). :func:`model_statistics` builds Triton's ``ModelStatistics`` message,
the one source of both the REST (``/v2/models/{m}/stats``) and the gRPC (``ModelStatistics``) answers.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

import numpy as np

from memexport.serve import protos
from memexport.serve.v2 import VERSION

T = TypeVar("T")


@dataclass(frozen=True)
class Duration:
    """A count and a cumulative duration, Triton's ``StatisticDuration``."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> "Duration":
        return Duration(self.count + count, self.ns + max(0, ns))


@dataclass(frozen=True)
class Timing:
    """Where one batch's time went: compute input, infer and output, in nanoseconds."""

    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass(frozen=True)
class Snapshot:
    """The recorder's figures at one moment (immutable; the message is built from it without the lock)."""

    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    # batch size -> (compute input, infer, output) of its executions, each Duration counting the executions
    batches: dict[int, tuple[Duration, Duration, Duration]] = field(default_factory=dict)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0


class Statistics:
    """A thread-safe recorder of one model's statistics (one per :class:`~memexport.serve.service.ServedModel`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = Snapshot()

    def request(self, ok: bool, ns: int) -> None:
        """One request answered (``ok``) or failed, ``ns`` after it reached the model."""
        with self._lock:
            now = self._now
            self._now = replace(now, success=now.success.add(ns)) if ok else replace(now, fail=now.fail.add(ns))

    def execution(self, size: int, waits_ns: Sequence[int], timing: Timing) -> None:
        """One batch of ``size`` images scored: the queue time of each entry in it, and the batch's :class:`Timing`."""
        entries = len(waits_ns)
        with self._lock:
            now = self._now
            executions = now.batches.get(size, (Duration(), Duration(), Duration()))
            self._now = replace(
                now,
                queue=now.queue.add(sum(waits_ns), entries),
                compute_input=now.compute_input.add(timing.input_ns * entries, entries),
                compute_infer=now.compute_infer.add(timing.infer_ns * entries, entries),
                compute_output=now.compute_output.add(timing.output_ns * entries, entries),
                batches={**now.batches, size: (executions[0].add(timing.input_ns), executions[1].add(timing.infer_ns),
                                               executions[2].add(timing.output_ns))},
                inference_count=now.inference_count + size,
                execution_count=now.execution_count + 1,
                last_inference_ms=int(time.time() * 1000),
            )

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._now


async def run_timed(executor: Executor, infer: Callable[[np.ndarray], np.ndarray], parts: Sequence[np.ndarray]) -> tuple[np.ndarray, Timing, int]:
    """Join ``parts`` into one batch and score it on ``executor``, timing each step (Batcher and Ray alike).

    Returns:
        The scores, the batch's :class:`Timing`, and when its compute began (``perf_counter_ns``), so each
        entry's queue time is that start minus its arrival.
    """
    start = time.perf_counter_ns()
    batch = parts[0] if len(parts) == 1 else np.concatenate(parts)

    def timed() -> tuple[np.ndarray, int, int]:
        begun = time.perf_counter_ns()
        scores = infer(batch)
        return scores, begun, time.perf_counter_ns()

    scores, begun, ended = await asyncio.get_running_loop().run_in_executor(executor, timed)
    return scores, Timing(begun - start, ended - begun, time.perf_counter_ns() - ended), start


def recorded(recorders: Callable[..., Iterable[Statistics]]) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Record each call of a :class:`Service` coroutine method as one request (failed if it raises) in every
    recorder ``recorders(self, *args)`` names: the model a request is for, or every model ``/score`` answers."""

    def decorate(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(method)
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
            start, ok = time.perf_counter_ns(), False
            try:
                result = await method(self, *args, **kwargs)
                ok = True
                return result
            finally:
                took = time.perf_counter_ns() - start
                for stats in recorders(self, *args):
                    stats.request(ok, took)

        return wrapper

    return decorate


def model_statistics(pb: Any, name: str, version: str, figures: Snapshot) -> Any:
    """Triton's ``ModelStatistics`` message (``pb``: ``tritonclient.grpc.service_pb2``) for one model version."""

    def duration(value: Duration) -> Any:
        return pb.StatisticDuration(count=value.count, ns=value.ns)

    stats = pb.ModelStatistics(name=name, version=version, last_inference=figures.last_inference_ms,
                               inference_count=figures.inference_count, execution_count=figures.execution_count)
    for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        getattr(stats.inference_stats, key).CopyFrom(duration(getattr(figures, key)))
    for key in ("cache_hit", "cache_miss"):  # no response cache: zeros, present as in Triton's answers
        getattr(stats.inference_stats, key).SetInParent()
    for size, (input_, infer, output) in sorted(figures.batches.items()):
        stats.batch_stats.add(batch_size=size, compute_input=duration(input_), compute_infer=duration(infer),
                              compute_output=duration(output))
    return stats


def statistics_of(models: Sequence[Any]) -> Any:
    """Triton's ``ModelStatisticsResponse`` for ``models`` (each a loaded
    :class:`~memexport.serve.service.ServedModel`, under its served name, version ``1``): the one source of
    the REST and gRPC answers.

    Raises:
        BackendUnavailableError: ``tritonclient[grpc]`` is missing (the ``serve`` extra).
    """
    pb = protos.service_pb2("the statistics extension")
    return pb.ModelStatisticsResponse(model_stats=[model_statistics(pb, model.name, VERSION, model.stats.snapshot())
                                                   for model in models])
